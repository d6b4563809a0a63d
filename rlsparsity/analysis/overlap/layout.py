"""The small columns of every mask file (all but the bits), the byte range of every row's
bits, and their join on (tensor, chunk) across masks.

A file is read where it lives (``object_store``): memory-mapped when local; from an object
store or an MLflow server in a few large requests, the footer first, then every record
batch's header with the small columns before its bits and the 'changed' column after
them, all fetched ahead and concurrently (``RangeCache``), so pyarrow's per-buffer reads
hit memory. The bits themselves are read by the tasks, each only its rows' ranges."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from rlsparsity.analysis.object_store import RangeCache, Source, StoreError, coalesce, open_source
from rlsparsity.analysis.overlap import ipc
from rlsparsity.contracts.mask import (
    CHUNK_ELEMS,
    SCHEMA,
    MaskError,
    bits_offsets,
    check_chunks,
    open_reader,
    read_meta,
)

SMALL_COLUMNS = ["tensor", "shape", "chunk", "offset", "length", "changed"]
TAIL_FETCH = 16 << 10  # the file's end: the footer (about 24 bytes per batch), with its length
# Guesses of a batch's small columns from its body's size (a row per 128 KiB of bits): the
# columns before the bits (name, shape, chunk, offset, length, the bits' offsets: under
# 256 bytes a row for names under 150 characters) and 'changed' after them (8 bytes a row).
# A short guess costs one more request, never a wrong result.
HEAD_BASE, HEAD_PER_ROW = 1024, 256
TAIL_BASE, TAIL_PER_ROW = 64, 8
# Bits between two of those ranges shorter than this are read through: one request fewer
# costs less than the bytes (a small tensor's bits: norms, biases, small matrices).
HOLE = 64 << 10
_BITS_NODE, _BITS_BUF = ipc.column_position(SCHEMA, "bits")


@dataclass
class _Layout:
    """The small columns of one mask file, in file row order, and where each row's bits are."""

    tensor: list[str]
    shape: dict[str, list[int]]
    chunk: np.ndarray
    offset: np.ndarray
    length: np.ndarray
    nbytes: np.ndarray  # bytes of bits, from the bits column's offsets
    changed: np.ndarray
    pos: np.ndarray  # absolute file offset of each row's bits
    io: dict[str, int] = field(default_factory=dict)  # remote requests and bytes


def open_meta(location: str, label: str) -> tuple[dict[str, Any], Source]:
    """A mask's validated metadata (footer only) and its source, still open, with the
    identity seen before anything was read. The caller closes the source."""
    src = open_source(location)
    try:
        if src.remote:
            cache = RangeCache(src)
            cache.fetch([(max(0, src.size - TAIL_FETCH), min(src.size, TAIL_FETCH))])
            meta = read_meta(location, source=pa.PythonFile(cache, mode="r"))
        else:
            meta = read_meta(location, source=src.native())
    except MaskError as e:
        src.close()
        raise MaskError(f"{label}: {e}") from e
    except BaseException:
        src.close()
        raise
    return meta, src


def _read_layout(location: str, label: str) -> _Layout:
    try:
        with open_source(location) as src:
            lay = _layout_of(src)
            lay.io = {"requests": src.requests, "bytes": src.bytes}
            return lay
    except StoreError:
        raise
    except MaskError as e:
        raise MaskError(f"{label}: {e}") from e
    except ipc.IpcLayoutError as e:
        raise MaskError(f"{label} ({location}): {e}") from e
    except (pa.ArrowInvalid, OSError) as e:
        raise MaskError(f"{label} ({location}): not a readable mask file ({e})") from e


def _layout_of(src: Source, *, parse: bool | None = None) -> _Layout:
    """The layout of an open mask. Rows' byte ranges: for a local file, where pyarrow's
    zero-copy buffers point in its memory map; for a remote one (or ``parse``), from the
    footer and batch headers (``ipc``), the small columns alone being fetched."""
    parse = src.remote if parse is None else parse
    if parse:
        reader, positions = _parsed(src)
    else:
        reader, _ = open_reader(src.native(), src.location)
        base = src.read(0, 1).address  # the map's first byte (a valid mask is not empty)

        def positions(b: int, rb: pa.RecordBatch) -> tuple[np.ndarray, np.ndarray]:
            offs, data = bits_offsets(rb)
            # No bytes of bits (an empty tensor): pyarrow's own empty buffer, not in the map.
            at = data.address - base if data.size else 0
            return np.diff(offs), offs[:-1].astype(np.int64) + at

    tensors: list[str] = []
    shapes: dict[str, list[int]] = {}
    cols: dict[str, list[np.ndarray]] = {k: [] for k in ("chunk", "offset", "length", "changed", "nbytes", "pos")}
    for b in range(reader.num_record_batches):
        rb = reader.get_batch(b)
        if rb.num_rows == 0:
            continue
        names = rb.column("tensor").to_pylist()
        tensors.extend(names)
        for name, shp in zip(names, rb.column("shape").to_pylist(), strict=True):
            shapes.setdefault(name, shp)
        for k in ("chunk", "offset", "length", "changed"):
            cols[k].append(rb.column(k).to_numpy())
        nbytes, pos = positions(b, rb)
        cols["nbytes"].append(nbytes)
        cols["pos"].append(pos)

    def cat(xs: list[np.ndarray], dtype: Any) -> np.ndarray:
        return np.concatenate(xs).astype(dtype) if xs else np.zeros(0, dtype=dtype)

    return _Layout(tensor=tensors, shape=shapes, **{k: cat(v, np.int64) for k, v in cols.items()})


def _parsed(src: Source) -> tuple[pa.ipc.RecordBatchFileReader, Any]:
    """A reader of the small columns and the rows' byte ranges from the footer and the batch
    headers; for a remote file both come from a few requests fetched ahead (see module doc)."""
    size = src.size
    cache = RangeCache(src)
    if size >= ipc.TAIL:
        cache.fetch([(max(0, size - TAIL_FETCH), min(size, TAIL_FETCH))])
    fstart, flen = ipc.footer_range(size, cache.read_range(max(0, size - ipc.TAIL), min(size, ipc.TAIL)).to_pybytes())
    blocks = ipc.record_batch_blocks(cache.read_range(fstart, flen).to_pybytes(), size)
    if src.remote:
        ahead = []
        for b in blocks:
            rows = b.body_len // (CHUNK_ELEMS // 8) + 1
            head, tail = HEAD_BASE + HEAD_PER_ROW * rows, TAIL_BASE + TAIL_PER_ROW * rows
            ahead.append((b.offset, b.meta_len + min(b.body_len, head)))
            if b.body_len > head:
                ahead.append((b.body + b.body_len - min(tail, b.body_len - head), min(tail, b.body_len - head)))
        cache.fetch(coalesce(ahead, hole=HOLE, limit=1 << 20))
        native: pa.NativeFile = pa.PythonFile(cache, mode="r")
    else:
        native = src.native()
    reader, _ = open_reader(native, src.location, columns=SMALL_COLUMNS)
    if reader.num_record_batches != len(blocks):
        raise MaskError(f"{src.location}: {reader.num_record_batches} record batches, its footer lists {len(blocks)}")

    def positions(b: int, rb: pa.RecordBatch) -> tuple[np.ndarray, np.ndarray]:
        blk = blocks[b]
        head = ipc.batch_header(lambda o, n: cache.read_range(o, n).to_pybytes(), blk)
        rows = head.length
        if head.compressed:
            raise MaskError(f"{src.location}: record batch {b} is compressed; masks are written uncompressed")
        if rows != rb.num_rows or head.nodes[_BITS_NODE] != (rows, 0):
            raise MaskError(f"{src.location}: record batch {b}'s bits column has nulls or a wrong length")
        (off_at, off_len), (data_at, data_len) = head.buffers[_BITS_BUF + 1 : _BITS_BUF + 3]
        if off_len < 4 * (rows + 1):
            raise MaskError(f"{src.location}: record batch {b}'s bits offsets are short")
        offs = np.frombuffer(cache.read_range(blk.body + off_at, 4 * (rows + 1)), dtype=np.int32)
        nbytes = np.diff(offs)
        if offs[0] < 0 or nbytes.min() < 0 or offs[-1] > data_len:
            raise MaskError(f"{src.location}: record batch {b}'s bits offsets are not within its bits")
        return nbytes, offs[:-1].astype(np.int64) + (blk.body + data_at)

    return reader, positions


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
    read_s: float = 0.0  # seconds the layouts took to read


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
