"""Sparse bf16 weight sync from the learner's float32 master weights to the rollout engines.

After every optimizer step only the entries whose bf16 view changed are sent: flat
indices (int32) plus the new bf16 bit patterns, 6 bytes an entry. Where more than
`dense_above` of a tensor changed (1/3 by default: the point where 6 bytes per changed
entry outgrow 2 per entry), that tensor goes dense, without indices. Applying the patch
makes the engine's weights equal the bf16 view of the master weights, bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import torch


def bf16_bits(t: torch.Tensor) -> torch.Tensor:
    """The bf16 view of a tensor as raw int16 bit patterns (bitwise comparison ignores NaN/±0 rules)."""
    return t.detach().to(torch.bfloat16).view(torch.int16)


@dataclass
class SparsePatch:
    """name -> (flat int32 indices, or None for the whole tensor; int16 bf16 bit patterns)."""

    tensors: dict[str, tuple[np.ndarray | None, np.ndarray]] = field(default_factory=dict)
    dense_bytes: int = 0  # what sending every tensor whole would cost
    changed: int = 0  # bf16 entries that differ from the previous sync

    @property
    def nbytes(self) -> int:
        return sum((0 if i is None else i.nbytes) + v.nbytes for i, v in self.tensors.values())


def _changed_bf16(src: np.ndarray, last: np.ndarray, idx: np.ndarray, bits: np.ndarray) -> int:
    """numba kernel, one pass: the bf16 bits of float32 ``src`` (as uint32) that differ from
    ``last`` (int16) go to ``idx``/``bits`` and into ``last``; returns how many.

    Round to nearest even, as torch's float32 -> bfloat16 cast; every NaN becomes 0xFFFF,
    as torch's CPU cast makes it (``tests/test_weight_sync.py`` checks both, edge values too).
    """
    n = 0
    for i in range(src.size):
        u = src[i]
        if (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):
            b = np.int16(-1)
        else:
            b = np.int16(np.uint16((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)))
        if b != last[i]:
            idx[n] = i
            bits[n] = b
            last[i] = b
            n += 1
    return n


def _build_kernel() -> object:
    from rlsparsity.numba_jit import njit

    kern = njit(_changed_bf16)
    kern(np.zeros(2, np.uint32), np.ones(2, np.int16), np.empty(2, np.int32), np.empty(2, np.int16))
    return kern


class Bf16SyncState:
    """Remembers the bf16 view last sent to the rollout engines and diffs against it.

    CPU float32 tensors go through a fused numba kernel (cast, compare, gather and update
    in one pass: 2.0-2.5x faster than the torch ops, benchmarks/bench_sync_diff.py); others
    (CUDA, bf16 masters) through torch.
    """

    def __init__(self, named_params: Iterable[tuple[str, torch.Tensor]], dense_above: float = 1 / 3) -> None:
        self.last = {n: bf16_bits(p).clone() for n, p in named_params}
        self.dense_above = dense_above

    def diff(
        self,
        named_params: Iterable[tuple[str, torch.Tensor]],
        *,
        fused: bool = True,
        on_changed: Callable[[str, np.ndarray | torch.Tensor], None] | None = None,
    ) -> SparsePatch:
        """The patch since the last diff. `on_changed(name, flat_indices)` sees every tensor's
        changed entries, whatever the patch sends (the mask recorder's ever-changed mask)."""
        from rlsparsity.numba_jit import compiled

        kern = compiled("bf16 sync diff", _build_kernel) if fused else None
        patch = SparsePatch()
        for name, p in named_params:
            patch.dense_bytes += p.numel() * 2
            if kern is not None and p.device.type == "cpu" and p.dtype == torch.float32 and p.is_contiguous():
                entry, idx = self._diff_fused(kern, name, p)
            else:
                entry, idx = self._diff_torch(name, p)
            patch.changed += len(idx)
            if on_changed is not None and len(idx):
                on_changed(name, idx)
            if entry is not None:
                patch.tensors[name] = entry
        return patch

    def _diff_fused(self, kern, name: str, p: torch.Tensor) -> tuple[tuple | None, np.ndarray]:
        src = p.detach().reshape(-1).numpy().view(np.uint32)
        last = self.last[name].view(-1).numpy()  # shares memory: updated in place
        idx, bits = np.empty(src.size, np.int32), np.empty(src.size, np.int16)  # pages touched only when written
        n = kern(src, last, idx, bits)
        if n > self.dense_above * src.size:
            return (None, last.copy()), idx[:n]
        return ((idx[:n].copy(), bits[:n].copy()) if n else None), idx[:n]

    def _diff_torch(self, name: str, p: torch.Tensor) -> tuple[tuple | None, torch.Tensor]:
        cur = bf16_bits(p).reshape(-1)
        idx = torch.nonzero(cur != self.last[name].reshape(-1)).squeeze(1)
        n = idx.numel()
        if n:
            self.last[name] = cur.view(p.shape).clone()
        if n > self.dense_above * cur.numel():
            return (None, cur.cpu().numpy().copy()), idx
        return ((idx.to(torch.int32).cpu().numpy(), cur[idx].cpu().numpy()) if n else None), idx


def full_patch(named_params: Iterable[tuple[str, torch.Tensor]]) -> SparsePatch:
    """Every entry of the bf16 view, e.g. for a rollout engine that restarted from θ0."""
    patch = SparsePatch()
    for name, p in named_params:
        cur = bf16_bits(p).reshape(-1)
        patch.tensors[name] = (None, cur.cpu().numpy().copy())
        patch.dense_bytes += cur.numel() * 2
        patch.changed += cur.numel()
    return patch


def choose_patch(
    patch: SparsePatch, named_params: Iterable[tuple[str, torch.Tensor]], mode: str, dense_above: float
) -> SparsePatch:
    """`patch`, or the full bf16 view when `mode` is dense or the sparse patch is larger
    than `dense_above` of the dense bytes (then indices no longer pay for themselves)."""
    if mode not in ("sparse", "dense"):
        raise ValueError(f"unknown sync mode {mode!r}; allowed: sparse, dense")
    if mode == "dense" or (patch.dense_bytes and patch.nbytes > dense_above * patch.dense_bytes):
        full = full_patch(named_params)
        full.changed = patch.changed  # what changed since the last sync, whatever was sent
        return full
    return patch


@torch.no_grad()
def apply_patch(model: torch.nn.Module, patch: SparsePatch) -> None:
    patch_tensors(dict(model.named_parameters()), patch)


@torch.no_grad()
def patch_tensors(params: dict[str, torch.Tensor], patch: SparsePatch) -> None:
    """Apply `patch` to these tensors in place (a model's parameters, or a copy of its bf16 view)."""
    unknown = set(patch.tensors) - set(params)
    if unknown:
        raise KeyError(f"weight patch names tensors the rollout model lacks: {sorted(unknown)}")
    for name, (idx, bits) in patch.tensors.items():
        flat = params[name].data.view(-1)
        # Patches from Ray's object store are read-only arrays; torch wants writable ones.
        values = torch.from_numpy(np.require(bits, requirements="W")).view(torch.bfloat16).to(flat.device, flat.dtype)
        if idx is None:
            if values.numel() != flat.numel():
                raise ValueError(f"dense patch for {name!r} has {values.numel()} entries, the model {flat.numel()}")
            flat.copy_(values)
        else:
            flat[torch.from_numpy(idx.astype(np.int64)).to(flat.device)] = values  # a copy: idx may be read-only
