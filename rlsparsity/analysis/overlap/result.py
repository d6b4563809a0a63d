"""The result of an overlap analysis: intersection counts of N masks per tensor, and the
metrics and random baselines of docs/DESIGN.md ("Metrics") derived from them."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from rlsparsity.contracts.layers import group_sort_key, layer_of, matrix_type

RESULT_FORMAT = "rlsparsity.overlap/1"
DEFAULT_FACTORS = ("seed", "dataset", "algorithm")


def pair_metrics(size_a: int, size_b: int, inter: int, n: int) -> dict[str, float | None]:
    """o_A, o_B, Jaccard and their random baselines (None where undefined)."""
    union = size_a + size_b - inter
    exp_inter = size_a * size_b / n if n else 0.0
    exp_union = size_a + size_b - exp_inter
    return {
        "o_a": inter / size_a if size_a else None,
        "o_b": inter / size_b if size_b else None,
        "o_a_random": size_b / n if n else None,
        "o_b_random": size_a / n if n else None,
        "jaccard": inter / union if union else None,
        # Ratio of expectations for uniformly random sets of these sizes; the exact
        # hypergeometric mean differs by O(1/n), nothing at model sizes.
        "jaccard_random": exp_inter / exp_union if exp_union else None,
    }


def _mean(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return sum(vals) / len(vals) if vals else None


@dataclass
class OverlapResult:
    """Intersection counts of N masks, per tensor and in total.

    ``inter[i, j]`` = |I_i ∩ I_j| over the whole model (diagonal: |I_i|);
    ``tensor_inter[t, i, j]`` the same per tensor.
    """

    labels: list[str]
    n: int
    inter: np.ndarray
    tensor_names: list[str]
    tensor_numel: np.ndarray
    tensor_inter: np.ndarray
    checksums: list[str] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    factors: list[dict[str, Any]] | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def counts(self) -> np.ndarray:
        return np.diagonal(self.inter).copy()

    @property
    def sparsity(self) -> list[float]:
        return [1.0 - c / self.n if self.n else 1.0 for c in self.counts.tolist()]

    # -- groupings
    def groups(self, level: str) -> tuple[list[str], np.ndarray, np.ndarray]:
        """(group names, numel per group, (G, N, N) intersections) for level tensor/layer/matrix."""
        if level == "tensor":
            return list(self.tensor_names), self.tensor_numel, self.tensor_inter
        key = {"layer": layer_of, "matrix": matrix_type}.get(level)
        if key is None:
            raise ValueError(f"level must be tensor, layer or matrix, not {level!r}")
        names = sorted({key(t) for t in self.tensor_names}, key=group_sort_key)
        index = {g: k for k, g in enumerate(names)}
        gid = np.array([index[key(t)] for t in self.tensor_names], dtype=np.int64)
        numel = np.zeros(len(names), dtype=np.int64)
        np.add.at(numel, gid, self.tensor_numel)
        inter = np.zeros((len(names), *self.inter.shape), dtype=np.int64)
        np.add.at(inter, gid, self.tensor_inter)
        return names, numel, inter

    # -- rows
    def pairs(self) -> list[dict[str, Any]]:
        """One row per unordered pair (i < j, input order)."""
        rows = []
        counts = self.counts.tolist()
        for i, j in _pair_indices(len(self.labels)):
            rows.append(
                {
                    "a": self.labels[i],
                    "b": self.labels[j],
                    "size_a": counts[i],
                    "size_b": counts[j],
                    "intersection": int(self.inter[i, j]),
                    **pair_metrics(counts[i], counts[j], int(self.inter[i, j]), self.n),
                }
            )
        return rows

    def group_rows(self, level: str) -> list[dict[str, Any]]:
        """Per-pair rows for every layer / matrix type / tensor."""
        names, numel, inter = self.groups(level)
        rows = []
        for g, name in enumerate(names):
            n = int(numel[g])
            for i, j in _pair_indices(len(self.labels)):
                a, b, x = int(inter[g, i, i]), int(inter[g, j, j]), int(inter[g, i, j])
                rows.append(
                    {
                        level: name,
                        "numel": n,
                        "a": self.labels[i],
                        "b": self.labels[j],
                        "size_a": a,
                        "size_b": b,
                        "intersection": x,
                        **pair_metrics(a, b, x, n),
                    }
                )
        return rows

    def group_means(self, level: str) -> list[dict[str, Any]]:
        """Per layer / matrix type: sparsity and overlap averaged over runs and pairs."""
        names, numel, inter = self.groups(level)
        out = []
        n_runs = len(self.labels)
        for g, name in enumerate(names):
            n = int(numel[g])
            sizes = np.diagonal(inter[g]).tolist()
            ms = [
                pair_metrics(sizes[i], sizes[j], int(inter[g, i, j]), n)
                for i, j in _pair_indices(n_runs)
            ]
            out.append(
                {
                    level: name,
                    "numel": n,
                    "sparsity": _mean([1 - s / n if n else None for s in sizes]),
                    **{f"mean_{k}": _mean([m[k] for m in ms]) for k in _METRIC_KEYS},
                }
            )
        return out

    def summary(self, factor_keys: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """Pairs grouped by which factors differ (the platform's Table 4)."""
        if not self.factors:
            return []
        keys = list(factor_keys or self.meta.get("factor_keys") or DEFAULT_FACTORS)
        spars = self.sparsity
        buckets: dict[str, list[tuple[int, int, dict[str, Any]]]] = {}
        for (i, j), row in zip(_pair_indices(len(self.labels)), self.pairs(), strict=True):
            diff = differing_factors(self.factors[i], self.factors[j], keys)
            cat = diff[0] if len(diff) == 1 else ("several" if diff else "none")
            buckets.setdefault(cat, []).append((i, j, row))
        order = [*keys, "several", "none"]
        out = []
        for cat in sorted(buckets, key=lambda c: (order.index(c) if c in order else len(order), c)):
            items = buckets[cat]
            rows = [r for _, _, r in items]
            out.append(
                {
                    "differs": cat,
                    "pairs": len(rows),
                    **{f"mean_{k}": _mean([r[k] for r in rows]) for k in _METRIC_KEYS},
                    "mean_sparsity_a": _mean([spars[i] for i, _, _ in items]),
                    "mean_sparsity_b": _mean([spars[j] for _, j, _ in items]),
                }
            )
        return out

    # -- serialisation
    def to_json(self, *, detail: bool = False) -> dict[str, Any]:
        """JSON-ready dict: ``runs`` (labels), ``pairs`` rows, per-layer/matrix means, summary."""
        counts = self.counts.tolist()
        doc: dict[str, Any] = {
            "format": RESULT_FORMAT,
            "runs": list(self.labels),
            "n": self.n,
            "run_info": [
                {
                    "label": lab,
                    "changed": counts[i],
                    "sparsity": self.sparsity[i],
                    "checksum": self.checksums[i] if self.checksums else None,
                    "path": self.paths[i] if self.paths else None,
                    "factors": self.factors[i] if self.factors else None,
                }
                for i, lab in enumerate(self.labels)
            ],
            "pairs": self.pairs(),
            "layers": self.group_means("layer"),
            "matrices": self.group_means("matrix"),
            "summary": self.summary(),
            "meta": self.meta,
            "stats": self.stats,
        }
        if detail:
            doc["layer_pairs"] = self.group_rows("layer")
            doc["matrix_pairs"] = self.group_rows("matrix")
        return doc

    def to_arrow(self, level: str = "pair") -> pa.Table:
        """Arrow table of ``pairs()`` (level "pair") or of ``group_rows(level)``."""
        rows = self.pairs() if level == "pair" else self.group_rows(level)
        return rows_to_table(rows)

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> OverlapResult:
        """Rebuild the totals (not the per-tensor tables) from ``to_json`` output."""
        labels = doc["runs"]
        index = {lab: k for k, lab in enumerate(labels)}
        inter = np.zeros((len(labels), len(labels)), dtype=np.int64)
        for k, info in enumerate(doc["run_info"]):
            inter[k, k] = info["changed"]
        for p in doc["pairs"]:
            i, j = index[p["a"]], index[p["b"]]
            inter[i, j] = inter[j, i] = p["intersection"]
        return cls(
            labels=labels,
            n=doc["n"],
            inter=inter,
            tensor_names=[],
            tensor_numel=np.zeros(0, dtype=np.int64),
            tensor_inter=np.zeros((0, len(labels), len(labels)), dtype=np.int64),
            factors=[i["factors"] for i in doc["run_info"]]
            if doc["run_info"] and doc["run_info"][0]["factors"] is not None
            else None,
            meta=doc.get("meta", {}),
            stats=doc.get("stats", {}),
        )


_METRIC_KEYS = ("o_a", "o_b", "o_a_random", "o_b_random", "jaccard", "jaccard_random")


def differing_factors(fa: dict[str, Any], fb: dict[str, Any], keys: Sequence[str]) -> list[str]:
    """Factor keys whose values differ between two runs (missing on both counts as equal)."""
    return [k for k in keys if str(fa.get(k)) != str(fb.get(k))]


def _pair_indices(n: int) -> list[tuple[int, int]]:
    return [(i, j) for i in range(n) for j in range(i + 1, n)]


def rows_to_table(rows: list[dict[str, Any]]) -> pa.Table:
    if not rows:
        return pa.table({})
    cols = {k: [r[k] for r in rows] for k in rows[0]}
    arrays = {}
    for k, v in cols.items():
        if k in _METRIC_KEYS or k.startswith("mean_") or k == "sparsity":
            arrays[k] = pa.array([math.nan if x is None else x for x in v], type=pa.float64())
        else:
            arrays[k] = pa.array(v)
    return pa.table(arrays)
