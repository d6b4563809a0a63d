"""What crosses ``collective_rpc`` between the engine and its worker: patches and tensors as bytes.

Tensors passed to ``collective_rpc`` arrive as nested lists when the engine core runs in
its own process; raw bytes survive as they are. So every entry is a msgpack/JSON-friendly
dict of a name, a plain header (count, dtype, shape) and the raw bytes.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from rlsparsity.platform.weight_sync import SparsePatch


def pack_patch(patch: SparsePatch) -> list[dict[str, Any]]:
    """One entry per tensor: int16 bf16 bits, and int32 flat indices (``None`` when dense)."""
    out = []
    for name, (idx, bits) in patch.tensors.items():
        bits = np.ascontiguousarray(bits, dtype=np.int16).reshape(-1)
        entry: dict[str, Any] = {"name": name, "n": int(bits.size), "bits": bits.tobytes(), "idx": None}
        if idx is not None:
            idx = np.ascontiguousarray(idx, dtype=np.int32).reshape(-1)
            if idx.size != bits.size:
                raise ValueError(f"{name}: {idx.size} indices for {bits.size} values")
            entry["idx"] = idx.tobytes()
        out.append(entry)
    return out


def unpack_entry(entry: dict[str, Any]) -> tuple[str, np.ndarray | None, np.ndarray]:
    """(name, flat indices or ``None``, bf16 bits) of one `pack_patch` entry."""
    bits = np.frombuffer(entry["bits"], dtype=np.int16)
    if bits.size != entry["n"]:
        raise ValueError(f"{entry['name']}: payload has {bits.size} values, header says {entry['n']}")
    idx = None if entry["idx"] is None else np.frombuffer(entry["idx"], dtype=np.int32)
    return entry["name"], idx, bits


def pack_tensors(tensors: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
    """CPU tensors as entries of name, dtype, shape and raw bytes."""
    return [
        {"name": n, "dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape), "data": t.contiguous().numpy().tobytes()}
        for n, t in tensors.items()
    ]


def unpack_tensors(packed: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """The tensors of `pack_tensors`, by name."""
    out = {}
    for e in packed:
        dtype = getattr(torch, e["dtype"])
        t = torch.frombuffer(bytearray(e["data"]), dtype=dtype) if e["data"] else torch.empty(0, dtype=dtype)
        out[e["name"]] = t.reshape(e["shape"])
    return out
