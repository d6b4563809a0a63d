"""Matching the two sides' tensors before any data is read: shapes, one-sided tensors,
unsupported dtypes, tied embeddings, mixed dtypes and the read order (see the package
docstring for the rules)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rlsparsity.analysis.checkpoints import DTYPES, Checkpoint, Reader, TensorInfo
from rlsparsity.analysis.criteria import common_dtypes
from rlsparsity.analysis.diff.result import Excluded
from rlsparsity.contracts.layers import natural_key

EMBED_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight", "tok_embeddings.weight")
HEAD_NAME = "lm_head.weight"


class DiffError(ValueError):
    """The pair cannot be compared as asked (mismatched tensors, bad options)."""


@dataclass
class PairPlan:
    """One tensor to compare: its name and the stored tensor read on each side."""

    name: str
    base: TensorInfo  # the stored tensor read on each side (an embedding for a tied lm_head)
    target: TensorInfo


@dataclass
class Plan:
    """The pairs to compare (in read order), the excluded tensors, the ties and the notes."""

    pairs: list[PairPlan]
    excluded: list[Excluded]
    tied: list[list[str]]
    notes: list[str]


def _same_bytes(reader: Reader, x: TensorInfo, y: TensorInfo, unit: int = 1 << 22) -> bool:
    if x.dtype != y.dtype or x.shape != y.shape:
        return False
    return all(
        np.array_equal(reader.read_bytes(x, s, min(unit, x.numel - s)), reader.read_bytes(y, s, min(unit, x.numel - s)))
        for s in range(0, x.numel, unit)
    )


def _tie_aliases(ck: Checkpoint, label: str, reader: Reader, notes: list[str]) -> dict[str, str]:
    """``{lm_head key: embedding key}`` for a side that declares tied embeddings."""
    if not ck.tie_word_embeddings:
        return {}
    embeds = [n for n in ck.tensors if n.endswith(EMBED_SUFFIXES)]
    if len(embeds) != 1:
        notes.append(f"{label}: config ties word embeddings but no single input embedding was found ({embeds}); no tie applied")
        return {}
    emb = embeds[0]
    heads = [n for n in ck.tensors if n.endswith(HEAD_NAME)] or [HEAD_NAME]
    head = heads[0]
    stored = ck.tensors.get(head)
    if stored is not None and not _same_bytes(reader, stored, ck.tensors[emb]):
        notes.append(f"{label}: config ties word embeddings but the stored {head} differs from {emb}; compared as a separate tensor")
        return {}
    return {head: emb}


def plan_diff(base: Checkpoint, target: Checkpoint, *, allow_mismatch: bool = False, reader: Reader | None = None) -> Plan:
    """Match tensors of both sides; raise DiffError on mismatches unless ``allow_mismatch``."""
    own = reader is None
    reader = reader or Reader()
    notes: list[str] = []
    try:
        alias_b = _tie_aliases(base, "base", reader, notes)
        alias_t = _tie_aliases(target, "target", reader, notes)
    finally:
        if own:
            reader.close()

    def resolve(ck: Checkpoint, alias: dict[str, str], name: str) -> TensorInfo | None:
        if name in alias:
            return ck.tensors[alias[name]]
        return ck.tensors.get(name)

    names = set(base.tensors) | set(alias_b) | set(target.tensors) | set(alias_t)
    pairs, excluded, tied, problems = [], [], [], []
    for name in sorted(names, key=natural_key):
        if name in alias_b and name in alias_t:
            tied.append([alias_b[name], name])
            continue
        a, b = resolve(base, alias_b, name), resolve(target, alias_t, name)
        if a is None or b is None:
            side = "base" if a is not None else "target"
            shape = (a or b).shape
            reason = f"only in {side} (shape {list(shape)})"
            excluded.append(Excluded(name, reason, a.shape if a else None, b.shape if b else None))
            problems.append(f"{name}: {reason}")
        elif a.shape != b.shape:
            reason = f"shape mismatch: base {list(a.shape)} vs target {list(b.shape)}"
            excluded.append(Excluded(name, reason, a.shape, b.shape))
            problems.append(f"{name}: {reason}")
        elif a.dtype not in DTYPES or b.dtype not in DTYPES:
            reason = f"unsupported dtype: base {a.dtype} vs target {b.dtype}"
            excluded.append(Excluded(name, reason, a.shape, b.shape))
            problems.append(f"{name}: {reason}")
        else:
            for side, alias in (("base", alias_b), ("target", alias_t)):
                if name in alias:
                    notes.append(f"{name}: tied to {alias[name]} in {side} only; compared as that embedding")
            pairs.append(PairPlan(name, a, b))
    if problems and not allow_mismatch:
        shown = "\n  ".join(problems[:50]) + (f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else "")
        hint = ""
        if any("lm_head" in p and "only in" in p for p in problems):
            hint = "\nIf the model ties lm_head to the input embedding, its config.json should set tie_word_embeddings."
        raise DiffError(
            f"{len(problems)} tensor(s) cannot be compared:\n  {shown}{hint}\n"
            "Use --allow-mismatch to exclude them (they are then listed under 'excluded' and not counted in n)."
        )
    file_order = {str(f): i for i, f in enumerate(base.files)}
    pairs.sort(key=lambda p: (file_order.get(p.base.file, len(file_order)), p.base.offset, natural_key(p.name)))
    mixed = [p for p in pairs if p.base.dtype != p.target.dtype]
    if mixed:
        kinds = sorted({(p.base.dtype, p.target.dtype) for p in mixed})
        desc = ", ".join(
            f"{x}->{y} (bitwise in {common_dtypes(DTYPES[x], DTYPES[y])[0]})" for x, y in kinds
        )
        notes.append(f"{len(mixed)} tensor(s) have different dtypes on the two sides: {desc}; e.g. {mixed[0].name}")
    return Plan(pairs=pairs, excluded=excluded, tied=tied, notes=notes)
