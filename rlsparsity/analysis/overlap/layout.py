"""The small columns of every mask file (all but the bits, whose sizes come from the bits
column's offsets), read through a memory map, and their join on (tensor, chunk) across masks."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from rlsparsity.contracts.mask import MaskError, bits_offsets, check_chunks, open_reader


@dataclass
class _Layout:
    """The small columns of one mask file, in file row order."""

    tensor: list[str]
    shape: dict[str, list[int]]
    chunk: np.ndarray
    offset: np.ndarray
    length: np.ndarray
    nbytes: np.ndarray  # bytes of bits, from the bits column's offsets
    changed: np.ndarray
    batch: np.ndarray  # record batch of each row
    in_batch: np.ndarray  # row index within it


def _read_layout(path: str, label: str) -> _Layout:
    try:
        with pa.memory_map(path) as src:
            reader, _ = open_reader(src, path)
            tensors: list[str] = []
            shapes: dict[str, list[int]] = {}
            chunk, offset, length, nbytes, changed, batch, in_batch = [], [], [], [], [], [], []
            for b in range(reader.num_record_batches):
                rb = reader.get_batch(b)
                if rb.num_rows == 0:
                    continue
                names = rb.column("tensor").to_pylist()
                tensors.extend(names)
                for name, shp in zip(names, rb.column("shape").to_pylist(), strict=True):
                    shapes.setdefault(name, shp)
                chunk.append(rb.column("chunk").to_numpy())
                offset.append(rb.column("offset").to_numpy())
                length.append(rb.column("length").to_numpy())
                changed.append(rb.column("changed").to_numpy())
                nbytes.append(np.diff(bits_offsets(rb)[0]).astype(np.int64))
                batch.append(np.full(rb.num_rows, b, dtype=np.int32))
                in_batch.append(np.arange(rb.num_rows, dtype=np.int32))
    except MaskError as e:
        raise MaskError(f"{label}: {e}") from e
    except (pa.ArrowInvalid, OSError) as e:
        raise MaskError(f"{label} ({path}): not a readable mask file ({e})") from e

    def cat(xs: list[np.ndarray], dtype: Any) -> np.ndarray:
        return np.concatenate(xs).astype(dtype) if xs else np.zeros(0, dtype=dtype)

    return _Layout(
        tensor=tensors,
        shape=shapes,
        chunk=cat(chunk, np.int64),
        offset=cat(offset, np.int64),
        length=cat(length, np.int64),
        nbytes=cat(nbytes, np.int64),
        changed=cat(changed, np.int64),
        batch=cat(batch, np.int32),
        in_batch=cat(in_batch, np.int32),
    )


@dataclass
class _Plan:
    """Rows joined on (tensor, chunk) across masks, in the first mask's row order."""

    tensor_names: list[str]
    tensor_numel: np.ndarray
    row_tensor: np.ndarray  # (R,) tensor index
    row_chunk: np.ndarray  # (R,) chunk index within the tensor
    row_nbytes: np.ndarray  # (R,)
    file_row: np.ndarray  # (N, R): row index in each mask's file
    layouts: list[_Layout]
    layout_hash: str


def _join(layouts: list[_Layout], labels: list[str], paths: list[str], chunk_elems: int) -> _Plan:
    ref = layouts[0]
    for lay, label, path in zip(layouts, labels, paths, strict=True):
        where = _row_where(label, path, lay.tensor, lay.chunk)
        check_chunks(lay.length, lay.nbytes, chunk_elems, offset=lay.offset, where=where)
    names = list(dict.fromkeys(ref.tensor))
    tindex = {t: k for k, t in enumerate(names)}
    numel = np.zeros(len(names), dtype=np.int64)
    row_tensor = np.array([tindex[t] for t in ref.tensor], dtype=np.int32)
    np.add.at(numel, row_tensor, ref.length)
    for t, k in tindex.items():
        if int(numel[k]) != math.prod(ref.shape[t]):
            raise MaskError(
                f"{labels[0]} ({paths[0]}): tensor {t!r} rows cover {int(numel[k])} elements, shape {ref.shape[t]}"
            )
    file_row = np.empty((len(layouts), len(ref.tensor)), dtype=np.int64)
    file_row[0] = np.arange(len(ref.tensor))
    ref_keys: dict[tuple[str, int], int] | None = None
    for m, (lay, label) in enumerate(zip(layouts[1:], labels[1:], strict=True), start=1):
        if lay.tensor == ref.tensor and np.array_equal(lay.chunk, ref.chunk):
            file_row[m] = np.arange(len(ref.tensor))  # the common case: same writer, same order
        else:
            if ref_keys is None:
                ref_keys = {
                    (t, int(c)): r
                    for r, (t, c) in enumerate(zip(ref.tensor, ref.chunk.tolist(), strict=True))
                }
            own = {
                (t, int(c)): r
                for r, (t, c) in enumerate(zip(lay.tensor, lay.chunk.tolist(), strict=True))
            }
            missing = [k for k in ref_keys if k not in own]
            extra = [k for k in own if k not in ref_keys]
            if missing or extra:
                what = (
                    f"lacks tensor {missing[0][0]!r} chunk {missing[0][1]}"
                    if missing
                    else f"has extra tensor {extra[0][0]!r} chunk {extra[0][1]}"
                )
                raise MaskError(
                    f"{label} ({paths[m]}) {what} compared with {labels[0]}; masks must cover the same tensors"
                )
            file_row[m] = [own[k] for k in ref_keys]
        for t in names:
            if lay.shape.get(t) != ref.shape[t]:
                raise MaskError(
                    f"{label} ({paths[m]}): tensor {t!r} has shape {lay.shape.get(t)} but {ref.shape[t]} in {labels[0]}"
                )
        if not np.array_equal(lay.length[file_row[m]], ref.length):
            raise MaskError(f"{label} ({paths[m]}): chunk lengths differ from {labels[0]}")
    return _Plan(
        tensor_names=names,
        tensor_numel=numel,
        row_tensor=row_tensor,
        row_chunk=ref.chunk,
        row_nbytes=ref.nbytes,
        file_row=file_row,
        layouts=layouts,
        layout_hash=_layout_hash(names, [ref.shape[t] for t in names]),
    )


def _layout_hash(names: list[str], shapes: list[list[int]]) -> str:
    return hashlib.blake2b(json.dumps([names, shapes]).encode(), digest_size=12).hexdigest()


def _row_where(
    label: str, path: str, tensor: list[str], chunk: np.ndarray, first: int = 0
) -> Callable[[int], str]:
    """Names row ``first + r`` of ``tensor``/``chunk`` in error messages (``contracts.mask``'s ``where``)."""
    return lambda r: f"{label} ({path}): tensor {tensor[first + r]!r} chunk {int(chunk[first + r])}"
