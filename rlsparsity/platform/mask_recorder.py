"""A trial's training masks, written in rlsparsity.mask/1 at every mask step.

From one pass over the policy at each mask step:
- one cumulative mask against θ0 per criterion of `training.masks.criteria`: `bitwise`,
  `abs:`, `rel:` and `paper:` on the bf16 view, through `analysis.criteria.compare` (the
  code `rlsparsity diff` runs, so the masks equal `diff` on the saved weights), and
  `masters`, bitwise on the master weights (float32, or bf16 under precision bf16);
- with `dynamics`: the bf16 mask against the previous mask step (`since_prev`; the first
  is against θ0) and the ever-changed mask (`ever`), every entry whose bf16 view changed
  at any optimizer step, fed after each step by the sync diff (`mark_changed`).
Every mask file gets a CSV table beside it (sparsity per layer and matrix type for each
series), which the MLflow UI previews as a table.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rlsparsity.analysis.criteria import BITWISE, compare, dtype_name
from rlsparsity.analysis.tables import write_csv
from rlsparsity.contracts.layers import group_sort_key, layer_of, matrix_type
from rlsparsity.contracts.mask import MaskWriter
from rlsparsity.contracts.mlflow_layout import BF16_SLUG, EVER, SINCE_PREV, mask_dir, mask_file_name
from rlsparsity.platform.config import TrainingCriterion


@dataclass
class SeriesStats:
    """One mask's counts: changed entries per tensor, and the tensors' sizes."""

    changed: dict[str, int] = field(default_factory=dict)
    numel: dict[str, int] = field(default_factory=dict)

    @property
    def total_changed(self) -> int:
        return sum(self.changed.values())

    @property
    def total(self) -> int:
        return sum(self.numel.values())

    @property
    def changed_frac(self) -> float:
        return self.total_changed / self.total if self.total else 0.0

    def grouped(self, key) -> dict[Any, list[int]]:
        """[changed, total] per key(tensor name)."""
        out: dict[Any, list[int]] = {}
        for name, c in self.changed.items():
            acc = out.setdefault(key(name), [0, 0])
            acc[0] += c
            acc[1] += self.numel[name]
        return out

    def to_json(self) -> dict[str, Any]:
        return {"changed": self.changed, "numel": self.numel}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> SeriesStats:
        return cls(dict(d["changed"]), dict(d["numel"]))


@dataclass
class Recorded:
    """What one mask step recorded: each series' counts (criteria slugs, since_prev, ever)."""

    step: int
    series: dict[str, SeriesStats]

    def metrics(self, prefix: str = "") -> dict[str, float]:
        """sparsity_<slug> (the fraction of entries unchanged) and changed_frac_<slug> per
        criterion; the bf16 view's changed count and per-layer sparsity; the dynamics."""
        out: dict[str, float] = {}
        for slug, s in self.series.items():
            if slug in (SINCE_PREV, EVER):
                out[f"{prefix}changed_frac_{slug}"] = s.changed_frac
            else:
                out[f"{prefix}sparsity_{slug}"] = 1.0 - s.changed_frac
                out[f"{prefix}changed_frac_{slug}"] = s.changed_frac
        bf16 = self.series[BF16_SLUG]
        out[f"{prefix}changed_bf16"] = float(bf16.total_changed)
        for layer, (c, n) in bf16.grouped(layer_of).items():
            key = f"layer.{int(layer):02d}" if layer.isdigit() else layer
            out[f"{prefix}sparsity/{key}"] = 1.0 - c / n
        for matrix, (c, n) in bf16.grouped(matrix_type).items():
            out[f"{prefix}sparsity/matrix.{matrix}"] = 1.0 - c / n
        if EVER in self.series and self.series[EVER].total_changed:
            # Ever-changed entries whose bf16 view is back at θ0's (the paper's 8.5 %).
            ever = self.series[EVER].total_changed
            out[f"{prefix}reverted_frac_of_ever"] = (ever - bf16.total_changed) / ever
        return out

    def table_rows(self) -> list[dict[str, Any]]:
        """One row per (layer, matrix type): its size and each series' sparsity in %."""
        key = lambda n: (layer_of(n), matrix_type(n))  # noqa: E731
        groups = {slug: s.grouped(key) for slug, s in self.series.items()}
        rows = []
        for layer, matrix in sorted(groups[BF16_SLUG], key=lambda lm: (group_sort_key(lm[0]), lm[1])):
            row: dict[str, Any] = {"layer": layer, "matrix": matrix, "elements": groups[BF16_SLUG][(layer, matrix)][1]}
            for slug, g in groups.items():
                c, n = g[(layer, matrix)]
                name = f"changed % {slug}" if slug in (SINCE_PREV, EVER) else f"sparsity % {slug}"
                row[name] = round(100 * (n - c) / n if name.startswith("sparsity") else 100 * c / n, 4)
            rows.append(row)
        return rows

    def to_json(self) -> dict[str, Any]:
        return {"step": self.step, "series": {k: s.to_json() for k, s in self.series.items()}}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Recorded:
        return cls(int(d["step"]), {k: SeriesStats.from_json(s) for k, s in d["series"].items()})


class MaskRecorder:
    """Holds θ0 (the masters and their bf16 view) and what the dynamics need, and writes
    every mask series at a mask step."""

    def __init__(
        self,
        named_params: Iterable[tuple[str, torch.Tensor]],
        *,
        base: dict[str, Any],
        tied: list[list[str]],
        criteria: list[TrainingCriterion],
        dynamics: bool = True,
    ) -> None:
        params = list(named_params)
        # θ0's masters hold its bf16 view exactly (the learner starts from it), so the bf16
        # view of θ0 is cast from them when needed rather than kept twice.
        self.base_master = {n: p.detach().clone() for n, p in params}
        self.master_dtype = dtype_name(params[0][1].dtype) if params else "float32"
        self.base, self.tied, self.criteria, self.dynamics = base, tied, criteria, dynamics
        self.prev_bf16 = {n: self.base_bf16(n) for n in self.base_master} if dynamics else {}
        self.ever = {n: torch.zeros(p.shape, dtype=torch.bool, device=p.device) for n, p in params} if dynamics else {}

    def base_bf16(self, name: str) -> torch.Tensor:
        """θ0's bf16 view of one tensor (a new tensor: under precision bf16 `.to` would alias)."""
        return self.base_master[name].to(torch.bfloat16, copy=True)

    def mark_changed(self, name: str, flat_indices: np.ndarray | torch.Tensor) -> None:
        """After an optimizer step: these entries' bf16 view changed (the ever-changed mask)."""
        if self.dynamics:
            ever = self.ever[name].view(-1)
            ever[torch.as_tensor(flat_indices, device=ever.device).long()] = True

    @torch.no_grad()
    def record(self, named_params: Iterable[tuple[str, torch.Tensor]], workdir: Path, step: int, *,
               final: bool, target: dict[str, Any], shapes: dict[str, tuple[int, ...]] | None = None,
               gather: Callable[[dict[str, list[np.ndarray]], list[str]], dict[str, list[np.ndarray]] | None] | None = None,
               ) -> tuple[Recorded | None, list[tuple[Path, str]]]:
        """Write every series' mask at `step` under `workdir`; returns the counts and the
        (file, artifact folder) pairs to log. Unsharded, tensor by tensor: one tensor's bits
        at a time. Sharded (FSDP), `named_params` are this rank's rows: `gather(bits, names)`
        gives rank 0 each whole tensor's packed bits (None on the other ranks, which then
        return (None, [])) and `shapes` the whole shapes."""
        series = [c.slug for c in self.criteria] + ([SINCE_PREV, EVER] if self.dynamics else [])
        per_tensor = self._bits(named_params)
        if gather is not None:  # every rank's bits of every tensor, before any is written
            names, bits = [], {slug: [] for slug in series}
            for tensor, tensor_bits in per_tensor:
                names.append(tensor)
                for slug in series:
                    bits[slug].append(tensor_bits[slug])
            whole = gather(bits, names)
            if whole is None:
                return None, []
            per_tensor = ((n, {slug: whole[slug][i] for slug in series}) for i, n in enumerate(names))
        return self._write(series, per_tensor, shapes or {}, workdir, step, final=final, target=target)

    def _bits(self, named_params: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, dict[str, np.ndarray]]]:
        """Each tensor's packed bits of every series (and the dynamics' state moved on)."""
        bf16_criteria = [c for c in self.criteria if c.view == "bf16"]
        for tensor, p in named_params:
            cur = p.detach().to(torch.bfloat16, copy=True)
            masks = compare(self.base_bf16(tensor), cur, [c.criterion for c in bf16_criteria],
                            masks=range(len(bf16_criteria)), packed=True).masks
            bits = {c.slug: masks[i] for i, c in enumerate(bf16_criteria)}
            if any(c.slug == "masters" for c in self.criteria):
                bits["masters"] = compare(self.base_master[tensor], p.detach(), [BITWISE], masks=[0], packed=True).masks[0]
            if self.dynamics:
                bits[SINCE_PREV] = compare(self.prev_bf16[tensor], cur, [BITWISE], masks=[0], packed=True).masks[0]
                bits[EVER] = np.packbits(self.ever[tensor].reshape(-1).cpu().numpy(), bitorder="little")
                self.prev_bf16[tensor] = cur
            yield tensor, bits

    def _write(self, series: list[str], per_tensor: Iterable[tuple[str, dict[str, np.ndarray]]],
               shapes: dict[str, tuple[int, ...]], workdir: Path, step: int, *, final: bool,
               target: dict[str, Any]) -> tuple[Recorded, list[tuple[Path, str]]]:
        name = mask_file_name(None if final else step)
        meta = {c.slug: (c.criterion.to_meta() | {"view": c.view}, "bfloat16" if c.view == "bf16" else None)
                for c in self.criteria}
        meta[SINCE_PREV] = (BITWISE.to_meta() | {"view": "bf16", "against": "previous mask step"}, "bfloat16")
        meta[EVER] = ({"mode": "ever", "spec": "ever", "view": "bf16",
                       "meaning": "the bf16 view changed at any optimizer step up to this one"}, "bfloat16")
        stats = {slug: SeriesStats() for slug in series}
        writers: dict[str, MaskWriter] = {}
        try:
            for slug in series:  # one open writer per series, fed tensor by tensor
                criterion, dtype = meta[slug]
                writers[slug] = MaskWriter(workdir / mask_dir(slug) / name, criterion=criterion,
                                           dtype=dtype or self.master_dtype, base=self.base,
                                           target={**target, "step": step}, tied=self.tied, extra={"series": slug})
            for tensor, bits in per_tensor:
                shape = shapes.get(tensor) or tuple(self.base_master[tensor].shape)
                for slug in series:
                    stats[slug].changed[tensor] = writers[slug].add_bits(tensor, shape, bits[slug])
                    stats[slug].numel[tensor] = math.prod(shape)
            for writer in writers.values():
                writer.close()
        except BaseException:
            for w in writers.values():
                w.abort()
            raise
        files = [(workdir / mask_dir(slug) / name, mask_dir(slug)) for slug in series]
        recorded = Recorded(step, stats)
        table = workdir / mask_dir() / f"{Path(name).stem}.csv"
        files.append((write_csv(recorded.table_rows(), table), mask_dir()))
        return recorded, files

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """What a restarted learner needs besides θ0 (rebuilt from the model directory); the
        learner state loads it back into these same tensors."""
        out = {f"prev.{n}": t for n, t in self.prev_bf16.items()}
        out.update({f"ever.{n}": t for n, t in self.ever.items()})
        return out
