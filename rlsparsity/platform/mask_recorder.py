"""Masks of the bf16 view against θ0, written in rlsparsity.mask/1 during training."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rlsparsity.contracts.layers import layer_of
from rlsparsity.contracts.mask import MaskWriter
from rlsparsity.platform.weight_sync import bf16_bits


@dataclass
class MaskStats:
    total: int
    changed: int
    master_changed: int  # float32 master entries that differ from θ0 at all
    per_layer: dict[str, list[int]] = field(default_factory=dict)  # layer -> [changed, total]

    @property
    def sparsity(self) -> float:
        return 1.0 - self.changed / self.total

    @property
    def master_changed_frac(self) -> float:
        return self.master_changed / self.total

    def metrics(self, prefix: str = "") -> dict[str, float]:
        out = {
            f"{prefix}sparsity_bf16": self.sparsity,
            f"{prefix}changed_bf16": float(self.changed),
            f"{prefix}master_changed_frac": self.master_changed_frac,
        }
        for layer, (c, n) in self.per_layer.items():
            key = f"layer.{int(layer):02d}" if layer.isdigit() else layer
            out[f"{prefix}sparsity/{key}"] = 1.0 - c / n
        return out


class MaskRecorder:
    """Holds θ0 (float32 and its bf16 view) and writes the cumulative bitwise bf16 mask."""

    def __init__(self, named_params: Iterable[tuple[str, torch.Tensor]], *, base: dict[str, Any], tied: list[list[str]]) -> None:
        params = list(named_params)
        self.base_bits = {n: bf16_bits(p).clone() for n, p in params}
        self.base_master = {n: p.detach().clone() for n, p in params}
        self.base = base
        self.tied = tied

    @torch.no_grad()
    def record(self, named_params: Iterable[tuple[str, torch.Tensor]], path: Path, target: dict[str, Any]) -> MaskStats:
        stats = MaskStats(total=0, changed=0, master_changed=0)
        writer = MaskWriter(
            path, criterion={"mode": "bitwise"}, dtype="bfloat16", base=self.base, target=target, tied=self.tied
        )
        with writer:
            for name, p in named_params:
                changed = bf16_bits(p) != self.base_bits[name]
                n_changed = writer.add(name, tuple(p.shape), changed.numpy())
                stats.master_changed += int(torch.count_nonzero(p.detach() != self.base_master[name]))
                acc = stats.per_layer.setdefault(layer_of(name), [0, 0])
                acc[0] += n_changed
                acc[1] += p.numel()
        stats.total, stats.changed = writer.total_elems, writer.total_changed
        return stats
