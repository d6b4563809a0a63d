"""The learner's parameters across its ranks: whole on every rank (one process, or DDP), or
sharded along dim 0 by FSDP2 (`resources.strategy: fsdp`).

Sharded, each rank keeps the sync state and the mask recorder of its own rows only, so no
rank ever holds a second full copy of the model; what rank 0 needs whole (the sync patch it
sends, the mask bits it writes) is gathered here: changed entries with their global flat
indices, and packed mask bits. Every function that gathers is a collective: all ranks call
it, in the same order. `Ranks` for one process makes each one a no-op, so the learner's
code path is the same on one rank, under DDP and under FSDP.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from rlsparsity.analysis.rank import DEFAULT_MAX_DIM, RankResult, final_update_rank, skip_reason
from rlsparsity.platform.weight_sync import SparsePatch, bf16_bits


def shard_model(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """FSDP2 over every rank: each transformer block (the model's `_no_split_modules`, as
    transformers declares them for device maps) is one unit, the rest (embeddings, final
    norm, a tied head) the root's. The module is changed in place and returned."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    blocks = set(getattr(module, "_no_split_modules", None) or ())
    for sub in module.modules():
        if sub is not module and type(sub).__name__ in blocks:
            fully_shard(sub, mesh=mesh)
    fully_shard(module, mesh=mesh)
    return module


def local(p: torch.Tensor) -> torch.Tensor:
    """This rank's part of a parameter (the whole of it unless FSDP sharded it); shares storage."""
    return p.to_local() if isinstance(p, DTensor) else p


def rows_of(dim0: int, rank: int, world: int) -> tuple[int, int]:
    """The rows [start, stop) that FSDP2's Shard(0) gives `rank`: torch.chunk's split, where
    the last ranks may get fewer rows, or none."""
    size = math.ceil(dim0 / world) if dim0 else 0
    start = min(rank * size, dim0)
    return start, min(start + size, dim0)


@dataclass(frozen=True)
class Layout:
    """Each tensor's global shape and every rank's (flat offset, entries) in it."""

    shapes: dict[str, tuple[int, ...]]
    parts: dict[str, list[tuple[int, int]]]  # name -> per rank (offset, numel)

    @classmethod
    def of(cls, named: Iterable[tuple[str, torch.Tensor]], rank: int, world: int, sharded: bool) -> Layout:
        shapes, parts = {}, {}
        for name, p in named:
            shape = tuple(p.shape)
            row = math.prod(shape[1:])
            if sharded:
                spans = [rows_of(shape[0] if shape else 1, r, world) for r in range(world)]
                parts[name] = [(a * row, (b - a) * row) for a, b in spans]
                if parts[name][rank][1] != local(p).numel():
                    raise RuntimeError(
                        f"tensor {name!r} {list(shape)}: FSDP gave rank {rank} {local(p).numel()} entries, "
                        f"the dim-0 split expects {parts[name][rank][1]}"
                    )
            else:
                parts[name] = [(0, p.numel())]
            shapes[name] = shape
        return cls(shapes, parts)


class Ranks:
    """The collectives the learner needs; on one process (or unsharded) they do nothing."""

    def __init__(self, rank: int, world: int, device: torch.device, sharded: bool) -> None:
        self.rank, self.world, self.device, self.sharded = rank, world, device, sharded

    # ---------------------------------------------------------------------- primitives
    def _all_gather_bytes(self, data: np.ndarray) -> list[np.ndarray]:
        """Every rank's byte buffer (sizes may differ), in rank order."""
        buf = torch.from_numpy(np.ascontiguousarray(data).view(np.uint8).reshape(-1)).to(self.device)
        size = torch.tensor([buf.numel()], dtype=torch.int64, device=self.device)
        sizes = [torch.empty_like(size) for _ in range(self.world)]
        dist.all_gather(sizes, size)
        longest = max(int(s) for s in sizes)
        padded = torch.zeros(longest, dtype=torch.uint8, device=self.device)
        padded[: buf.numel()] = buf
        out = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(out, padded)
        return [o[: int(s)].cpu().numpy() for o, s in zip(out, sizes, strict=True)]

    def sum_ints(self, values: list[int]) -> list[int]:
        """Element-wise sum over the ranks (of counts)."""
        if not self.sharded:
            return values
        t = torch.tensor(values, dtype=torch.int64, device=self.device)
        dist.all_reduce(t)
        return t.cpu().tolist()

    def broadcast_json(self, obj: Any) -> Any:
        """Rank 0's JSON-able value on every rank (as JSON bytes: no pickle)."""
        if not self.sharded:
            return obj
        # A writable copy (bytearray): torch warns on a read-only numpy buffer.
        data = np.frombuffer(bytearray(json.dumps(obj).encode()), np.uint8) if self.rank == 0 else np.zeros(0, np.uint8)
        return json.loads(self._all_gather_bytes(data)[0].tobytes())

    def full(self, p: torch.Tensor, part: torch.Tensor) -> torch.Tensor:
        """`part`, shaped and split like parameter `p`'s local shard, gathered whole on every rank."""
        if not isinstance(p, DTensor):
            return part
        return DTensor.from_local(part, p.device_mesh, p.placements, shape=p.shape, stride=p.stride()).full_tensor()

    # ---------------------------------------------------------------------- the sync patch
    def gather_patch(self, patch: SparsePatch, named_local: list[tuple[str, torch.Tensor]], layout: Layout,
                     mode: str, dense_above: float) -> SparsePatch | None:
        """Rank 0: the whole model's patch from every rank's patch of its rows (global flat
        indices), dense when `mode` is dense or the sparse one would outgrow `dense_above` of
        the dense bytes, as `choose_patch` decides for a whole model. Other ranks: None."""
        nbytes, dense_bytes, changed = self.sum_ints([patch.nbytes, patch.dense_bytes, patch.changed])
        dense = mode == "dense" or (dense_bytes and nbytes > dense_above * dense_bytes)
        header = np.zeros((len(named_local), 2), np.int64)  # entries sent, the whole shard?
        idx_parts, bit_parts = [], []
        for i, (name, p) in enumerate(named_local):
            entry = patch.tensors.get(name)
            if dense:
                entry = (None, bf16_bits(p).reshape(-1).cpu().numpy())
            if entry is None:
                continue
            idx, bits = entry
            header[i, 0], header[i, 1] = len(bits), idx is None
            if idx is not None:
                idx_parts.append(np.asarray(idx, np.int32) + np.int32(layout.parts[name][self.rank][0]))
            bit_parts.append(np.asarray(bits, np.int16))
        payload = np.concatenate([header.reshape(-1).view(np.uint8),
                                  *(a.view(np.uint8) for a in idx_parts), *(b.view(np.uint8) for b in bit_parts)])
        gathered = self._all_gather_bytes(payload)
        if self.rank != 0:
            return None
        whole = _assemble_patch(gathered, [n for n, _ in named_local], layout)
        whole.changed = changed  # since the last sync, whatever was sent
        return whole

    # ---------------------------------------------------------------------- mask bits
    def gather_bits(self, bits: dict[str, list[np.ndarray]], names: list[str], layout: Layout) -> dict[str, list[np.ndarray]] | None:
        """Rank 0: per series, each tensor's whole packed mask (LSB first) from every rank's
        packed bits of its rows; other ranks: None. Unsharded, `bits` as given."""
        if not self.sharded:
            return bits
        out: dict[str, list[np.ndarray]] = {}
        for slug in sorted(bits):  # the same order on every rank
            gathered = self._all_gather_bytes(np.concatenate(bits[slug]) if bits[slug] else np.zeros(0, np.uint8))
            if self.rank != 0:
                continue
            cursors = [0] * self.world
            whole = []
            for name in names:
                pieces = []
                for r, (_, n) in enumerate(layout.parts[name]):
                    nbytes = (n + 7) // 8
                    pieces.append(np.unpackbits(gathered[r][cursors[r]: cursors[r] + nbytes], count=n, bitorder="little"))
                    cursors[r] += nbytes
                whole.append(np.packbits(np.concatenate(pieces), bitorder="little"))
            out[slug] = whole
        return out if self.rank == 0 else None

    # ---------------------------------------------------------------------- whole tensors
    def host_bf16(self, named: list[tuple[str, torch.Tensor]], named_local: list[tuple[str, torch.Tensor]],
                  ) -> list[tuple[str, torch.Tensor]] | None:
        """Rank 0: the whole bf16 view on the host, gathered a tensor at a time; others: None."""
        out = []
        for (name, p), (_, part) in zip(named, named_local, strict=True):
            whole = self.full(p, part.detach().to(torch.bfloat16))
            if self.rank == 0:
                out.append((name, whole.cpu()))
        return out if self.rank == 0 else None

    def update_rank(self, named: list[tuple[str, torch.Tensor]], named_local: list[tuple[str, torch.Tensor]],
                    base_bf16: Callable[[str], torch.Tensor]) -> RankResult | None:
        """Rank 0: `final_update_rank` of the whole matrices, each gathered with its θ0 in
        turn on every rank (`base_bf16(name)`: this rank's rows of θ0); others: None."""
        theta0: dict[str, torch.Tensor] = {}

        def whole() -> Iterator[tuple[str, torch.Tensor]]:
            for (name, p), (_, part) in zip(named, named_local, strict=True):
                if skip_reason(name, tuple(p.shape), DEFAULT_MAX_DIM):  # its shape is all the rule reads
                    yield name, torch.empty(p.shape, device="meta")
                    continue
                theta0[name] = self.full(p, base_bf16(name))
                yield name, self.full(p, part.detach())

        if self.rank == 0:
            return final_update_rank(theta0.pop, whole())
        for _ in whole():
            pass
        return None


def _assemble_patch(gathered: list[np.ndarray], names: list[str], layout: Layout) -> SparsePatch:
    """Rank 0: one SparsePatch from every rank's payload (see `Ranks.gather_patch`)."""
    t = len(names)
    parsed = []
    for buf in gathered:
        header = buf[: t * 16].view(np.int64).reshape(t, 2)
        n_idx = int(header[header[:, 1] == 0, 0].sum())
        idx_end = t * 16 + 4 * n_idx
        idx = buf[t * 16: idx_end].view(np.int32)
        bits = buf[idx_end: idx_end + 2 * int(header[:, 0].sum())].view(np.int16)
        parsed.append((header, idx, bits, [0, 0]))  # cursors into idx and bits
    out = SparsePatch()
    for i, name in enumerate(names):
        out.dense_bytes += 2 * math.prod(layout.shapes[name])
        idx_parts, bit_parts, whole = [], [], True
        for r, (header, idx, bits, cur) in enumerate(parsed):
            sent, is_whole = (int(x) for x in header[i])
            b = bits[cur[1]: cur[1] + sent]
            cur[1] += sent
            if sent == 0:
                whole = whole and layout.parts[name][r][1] == 0
                continue
            if is_whole:
                offset = layout.parts[name][r][0]
                idx_parts.append(np.arange(offset, offset + sent, dtype=np.int32))
            else:
                idx_parts.append(idx[cur[0]: cur[0] + sent])
                cur[0] += sent
                whole = False
            bit_parts.append(b)
        if not bit_parts:
            continue
        bits_all = np.concatenate(bit_parts)
        out.tensors[name] = (None, bits_all) if whole else (np.concatenate(idx_parts), bits_all)
    return out


def full_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """An FSDP module's whole state dict on rank 0's host (empty elsewhere); a collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
