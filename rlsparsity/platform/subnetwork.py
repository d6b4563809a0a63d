"""Training only a subnetwork (the paper's RQ2/RQ3, and Multiple Ticket's random masks).

How every entry outside the mask stays at θ0, bit for bit, in the float32 masters and so in
the bf16 view:
- the policy's gradient is multiplied by the mask before clipping and every update (the
  paper's semantics); Adam's moments outside the mask then stay exactly 0, and a zero first
  moment makes Adam's step there exactly 0;
- weight decay, which AdamW applies to every entry whatever its gradient, is taken out of
  the optimizer and applied by `SubnetworkMask.decay` to the mask's entries only, with
  AdamW's own formula p ← p·(1 − lr·wd), before the Adam step as AdamW orders it.
The learner checks the result at every mask it records and fails the trial if any entry
outside moved. The side models (PPO's critic, PRIME's PRM) are not masked.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rlsparsity.contracts.mask import MaskError, read_mask
from rlsparsity.platform.config import SubnetworkSpec


def random_mask(
    shapes: Sequence[tuple[str, tuple[int, ...]]], density: float, *, seed: int, draw: str
) -> dict[str, np.ndarray]:
    """A boolean mask per tensor with round(density · n) entries set: n the total element
    count (``global``: one draw over all tensors, concatenated in the given order) or each
    tensor's (``per_tensor``). The same arguments give the same mask."""
    if not 0 < density <= 1:
        raise ValueError(f"subnetwork density must be in (0, 1], got {density}")
    sizes = [math.prod(shape) for _, shape in shapes]
    rng = np.random.default_rng(seed)
    if draw == "global":
        total = sum(sizes)
        flat = np.zeros(total, dtype=bool)
        flat[rng.choice(total, size=round(density * total), replace=False)] = True
        parts = np.split(flat, np.cumsum(sizes)[:-1])
    elif draw == "per_tensor":
        parts = []
        for n, child in zip(sizes, rng.spawn(len(sizes)), strict=True):
            part = np.zeros(n, dtype=bool)
            part[child.choice(n, size=round(density * n), replace=False)] = True
            parts.append(part)
    else:
        raise ValueError(f"subnetwork random draw must be 'global' or 'per_tensor', got {draw!r}")
    return {name: part.reshape(shape) for (name, shape), part in zip(shapes, parts, strict=True)}


def mask_density(path: str | Path) -> float:
    """The share of entries set in a mask file (its metadata's totals)."""
    mask = read_mask(path)
    return mask.total_changed / mask.total_elems


def check_base(meta: dict[str, Any], base: dict[str, Any], where: str) -> None:
    """A mask taken against another θ0 cannot select entries of this one."""
    theirs, ours = meta["base"].get("hash"), base.get("hash")
    if theirs != ours:
        raise MaskError(
            f"{where}: the mask was taken against base {theirs} but this trial trains base {ours}; "
            "a subnetwork mask must come from the same θ0"
        )


def load_mask_file(
    path: str | Path, named: Iterable[tuple[str, torch.Tensor]], *, base: dict[str, Any], tied: list[list[str]]
) -> dict[str, np.ndarray]:
    """Each named parameter's boolean mask from a mask file taken against ``base``. A tied
    parameter may appear in the file under any of its group's names."""
    mask = read_mask(path)
    check_base(mask.meta, base, str(path))
    bits = mask.to_dict()
    alias = {name: group for group in tied for name in group}
    out = {}
    for name, p in named:
        key = next((k for k in alias.get(name, [name]) if k in bits), None)
        if key is None:
            raise MaskError(f"{path}: no mask for parameter {name!r} (the file has {len(bits)} tensors)")
        if tuple(bits[key].shape) != tuple(p.shape):
            raise MaskError(f"{path}: tensor {key!r} has shape {list(bits[key].shape)}, the parameter {list(p.shape)}")
        out[name] = bits[key]
    return out


def build_mask(
    spec: SubnetworkSpec,
    named: Sequence[tuple[str, torch.Tensor]],
    *,
    mask_path: str | Path | None,
    base: dict[str, Any],
    tied: list[list[str]],
) -> dict[str, np.ndarray]:
    """The subnetwork ``spec`` selects over the policy's ``named`` parameters. ``mask_path``
    is the source mask as a local file (``spec.mask``, or a trial's mask fetched by the
    caller); a random mask without a density takes the source's."""
    if mask_path is None and spec.random is None:
        raise ValueError("the subnetwork names a finished trial, but its mask was not fetched (mask_path is None)")
    if spec.random is not None:
        density = spec.random.density
        if density is None:
            if mask_path is None:
                raise ValueError("a random subnetwork without a density needs a source mask for it")
            density = mask_density(mask_path)
        shapes = [(name, tuple(p.shape)) for name, p in named]
        return random_mask(shapes, density, seed=spec.random.seed, draw=spec.random.draw)
    masks = load_mask_file(mask_path, named, base=base, tied=tied)
    return {k: ~m for k, m in masks.items()} if spec.complement else masks


class SubnetworkMask:
    """The policy's mask as torch tensors, and the two operations the learner applies."""

    def __init__(self, named: Sequence[tuple[str, torch.nn.Parameter]], masks: dict[str, np.ndarray]) -> None:
        self.params = [p for _, p in named]
        self.names = [n for n, _ in named]
        self.masks = [torch.from_numpy(np.ascontiguousarray(masks[n])).to(p.device) for n, p in named]
        self.size = sum(int(m.sum()) for m in self.masks)
        self.total = sum(m.numel() for m in self.masks)

    @property
    def density(self) -> float:
        return self.size / self.total

    @torch.no_grad()
    def mask_grads(self) -> None:
        for p, m in zip(self.params, self.masks, strict=True):
            if p.grad is not None:
                p.grad.mul_(m)

    @torch.no_grad()
    def decay(self, lr: float, weight_decay: float) -> None:
        """AdamW's decoupled weight decay on the mask's entries only."""
        if weight_decay == 0:
            return
        factor = 1 - lr * weight_decay
        for p, m in zip(self.params, self.masks, strict=True):
            p.copy_(torch.where(m, p * factor, p))

    @torch.no_grad()
    def outside_changes(self, theta0: dict[str, torch.Tensor], view: torch.dtype | None = None) -> dict[str, int]:
        """Entries outside the mask that differ from θ0 (in ``view``, e.g. bf16), per tensor;
        empty when the invariant holds."""
        out = {}
        for name, p, m in zip(self.names, self.params, self.masks, strict=True):
            a, b = p.detach(), theta0[name]
            if view is not None:
                a, b = a.to(view), b.to(view)
            n = int(torch.count_nonzero((_bits(a) != _bits(b)) & ~m))
            if n:
                out[name] = n
        return out


def _bits(t: torch.Tensor) -> torch.Tensor:
    # Compare bit patterns: -0.0 == 0.0 and NaN != NaN as floats.
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])
