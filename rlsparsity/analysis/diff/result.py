"""What ``rlsparsity diff`` returns: per-tensor counts, exclusions, the per-layer table and
the JSON document (``rlsparsity.diff/1``)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from rlsparsity.analysis.criteria import Criterion
from rlsparsity.contracts.layers import layer_prefix, natural_key

RESULT_FORMAT = "rlsparsity.diff/1"
NON_LAYER = "(no layer number)"


def layer_group(name: str) -> str:
    """The key's prefix up to its first numeric component (``model.layers.3``), else NON_LAYER."""
    return layer_prefix(name) or NON_LAYER


@dataclass
class TensorResult:
    """One compared tensor: its dtypes and its changed count per criterion (keyed by spelling)."""

    name: str
    shape: tuple[int, ...]
    numel: int
    base_dtype: str
    target_dtype: str
    bitwise_dtype: str
    compute_dtype: str
    changed: dict[str, int]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "shape": list(self.shape),
            "numel": self.numel,
            "dtype": {"base": self.base_dtype, "target": self.target_dtype, "bitwise": self.bitwise_dtype, "compute": self.compute_dtype},
            "changed": self.changed,
            "sparsity": {k: _sparsity(v, self.numel) for k, v in self.changed.items()},
        }


@dataclass
class Excluded:
    """A tensor left out of n (``allow_mismatch``), with the reason and both shapes."""

    name: str
    reason: str
    base_shape: tuple[int, ...] | None = None
    target_shape: tuple[int, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "reason": self.reason,
            "base_shape": list(self.base_shape) if self.base_shape is not None else None,
            "target_shape": list(self.target_shape) if self.target_shape is not None else None,
        }


def _sparsity(changed: int, total: int) -> float:
    return 1.0 - changed / total if total else 1.0


@dataclass
class DiffResult:
    """A diff: per-tensor counts and their totals, exclusions, ties, notes, the optional
    update rank and mask path, and timing."""

    base: dict[str, Any]
    target: dict[str, Any]
    criteria: list[Criterion]
    tensors: list[TensorResult]
    excluded: list[Excluded] = field(default_factory=list)
    tied: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    rank: Any = None  # rank.RankResult when computed
    mask: str | None = None
    timing: dict[str, Any] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(t.numel for t in self.tensors)

    def changed(self, criterion: Criterion | str) -> int:
        key = str(criterion)
        return sum(t.changed[key] for t in self.tensors)

    def sparsity(self, criterion: Criterion | str) -> float:
        return _sparsity(self.changed(criterion), self.total)

    def per_layer(self) -> list[dict[str, Any]]:
        """Totals grouped by :func:`layer_group`, layers in numeric order, non-layer last."""
        groups: dict[str, dict[str, Any]] = {}
        for t in self.tensors:
            g = groups.setdefault(layer_group(t.name), {"tensors": 0, "numel": 0, "changed": dict.fromkeys(t.changed, 0)})
            g["tensors"] += 1
            g["numel"] += t.numel
            for k, v in t.changed.items():
                g["changed"][k] += v
        order = sorted(groups, key=lambda g: (g == NON_LAYER, natural_key(g)))
        return [
            {"group": g, **groups[g], "sparsity": {k: _sparsity(v, groups[g]["numel"]) for k, v in groups[g]["changed"].items()}}
            for g in order
        ]

    def to_dict(self) -> dict[str, Any]:
        total = self.total
        return {
            "format": RESULT_FORMAT,
            "base": self.base,
            "target": self.target,
            "total": total,
            "criteria": {
                str(c): {**c.to_meta(), "changed": self.changed(c), "sparsity": self.sparsity(c)} for c in self.criteria
            },
            "tensors": [t.to_dict() for t in sorted(self.tensors, key=lambda t: natural_key(t.name))],
            "layers": self.per_layer(),
            "excluded": [e.to_dict() for e in self.excluded],
            "tied": self.tied,
            "notes": self.notes,
            "rank": self.rank.to_dict() if self.rank is not None else None,
            "mask": self.mask,
            "timing": self.timing,
        }

    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent)
