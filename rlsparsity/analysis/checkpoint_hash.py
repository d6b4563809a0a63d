"""The content hash of a checkpoint: sha256 over fixed-size chunks of each tensor's raw
bytes, then over (name, dtype, shape, digest) of every tensor in name order. `diff` computes
the same digests while it reads (`diff/engine.py`); `content_hash` is the sequential
reference, and the base-model hash every trial records."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator

import numpy as np

from rlsparsity.analysis.checkpoints import CHUNK_ELEMS, Checkpoint, Reader

HASH_CHUNK_ELEMS = CHUNK_ELEMS


def chunk_digest(raw: bytes | memoryview | np.ndarray) -> bytes:
    """Digest of one hash chunk (``HASH_CHUNK_ELEMS`` elements of raw bytes)."""
    return hashlib.sha256(raw).digest()


def tensor_digest(chunk_digests: list[bytes]) -> str:
    return hashlib.sha256(b"".join(chunk_digests)).hexdigest()


def combine_tensor_digests(entries: dict[str, tuple[str, tuple[int, ...], str]]) -> str:
    """Checkpoint hash from ``name -> (dtype, shape, tensor digest)``."""
    h = hashlib.sha256()
    for name in sorted(entries):
        dtype, shape, digest = entries[name]
        h.update(json.dumps([name, dtype, list(shape), digest]).encode() + b"\n")
    return "sha256:" + h.hexdigest()


def iter_chunk_ranges(numel: int, chunk: int = HASH_CHUNK_ELEMS) -> Iterator[tuple[int, int]]:
    for s in range(0, numel, chunk):
        yield s, min(chunk, numel - s)


def content_hash(ck: Checkpoint, reader: Reader | None = None) -> str:
    """Sequential reference implementation of the checkpoint content hash."""
    own = reader is None
    reader = reader or Reader()
    try:
        entries = {}
        for name, info in ck.tensors.items():
            digests = []
            for s, c in iter_chunk_ranges(info.numel):
                digests.append(chunk_digest(reader.read_bytes(info, s, c)))
            entries[name] = (info.dtype, info.shape, tensor_digest(digests))
        return combine_tensor_digests(entries)
    finally:
        if own:
            reader.close()
