"""The mask artifact, format ``rlsparsity.mask/1`` (see docs/DESIGN.md, "Mask artifact").

An Arrow IPC file with one row per chunk of a flattened tensor. Bits are packed LSB
first (``np.packbits(..., bitorder="little")``). Every mask shares ``CHUNK_ELEMS``, so
two masks of the same base model join on (tensor, chunk).

The checksum is a two-level BLAKE2b: a 16-byte digest per row, then one digest over
those in row order. A task that reads only some chunks can digest its own rows and a
combiner can still verify the file without a second pass over the bits.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

FORMAT = "rlsparsity.mask/1"
# 2**20 elements = 128 KiB of bits per chunk: cache-sized for AND + popcount, and few
# enough rows (about 7k for a 7B model) that the table itself stays small.
CHUNK_ELEMS = 1 << 20

SCHEMA = pa.schema(
    [
        ("tensor", pa.string()),
        ("shape", pa.list_(pa.int64())),
        ("chunk", pa.int32()),
        ("offset", pa.int64()),
        ("length", pa.int64()),
        ("bits", pa.binary()),
        ("changed", pa.int64()),
    ]
)
REQUIRED_META = (
    "format",
    "chunk_elems",
    "criterion",
    "dtype",
    "base",
    "target",
    "total_elems",
    "total_changed",
    "checksum",
)


class MaskError(ValueError):
    """A mask file is malformed, corrupt, or incompatible with another mask."""


def row_digest(bits: bytes | memoryview) -> bytes:
    """The 16-byte digest of one row's bits."""
    return hashlib.blake2b(bits, digest_size=16).digest()


def combine_digests(digests: Sequence[bytes]) -> str:
    """The file checksum from its row digests, in file row order."""
    return "blake2b:" + hashlib.blake2b(b"".join(digests), digest_size=32).hexdigest()


def pack(mask: np.ndarray) -> bytes:
    """Pack a flat boolean array, LSB first."""
    return np.packbits(mask.reshape(-1), bitorder="little").tobytes()


def unpack(bits: bytes | memoryview, length: int) -> np.ndarray:
    return np.unpackbits(np.frombuffer(bits, dtype=np.uint8), count=length, bitorder="little").astype(bool)


def popcount(bits: bytes | memoryview) -> int:
    return int(np.bitwise_count(np.frombuffer(bits, dtype=np.uint8)).sum(dtype=np.int64))


class MaskWriter:
    """Streams tensor masks into a mask file; the file appears under its name only on ``close``.

    Rows go to ``PATH.<random>.partial`` as they come, so memory stays bounded by one tensor.
    ``close`` rewrites them into the final file with the schema metadata (which Arrow
    stores before the rows, so it can only be written once the totals are known) and
    renames it into place. A failed or abandoned writer leaves no file at ``PATH``.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        criterion: dict[str, Any],
        dtype: str,
        base: dict[str, Any],
        target: dict[str, Any],
        tied: list[list[str]] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # A unique partial name: two writers of the same path never clobber each other.
        self._partial = self.path.with_name(f"{self.path.name}.{uuid.uuid4().hex[:8]}.partial")
        self._meta = {
            "format": FORMAT,
            "chunk_elems": CHUNK_ELEMS,
            "criterion": criterion,
            "dtype": dtype,
            "base": base,
            "target": target,
            "tied": tied or [],
            **(extra or {}),
        }
        self._sink = pa.OSFile(str(self._partial), "wb")
        self._writer = pa.ipc.new_file(self._sink, SCHEMA)
        self._digests: list[bytes] = []
        self._names: set[str] = set()
        self.total_elems = 0
        self.total_changed = 0

    def add(self, name: str, shape: tuple[int, ...] | list[int], mask: np.ndarray) -> int:
        """Add one tensor's boolean mask (any shape, flattened row-major). Returns its changed count."""
        flat = np.ascontiguousarray(mask, dtype=bool).reshape(-1)
        if flat.size != math.prod(shape):
            raise MaskError(f"{self.path}: tensor {name!r} has shape {list(shape)} ({math.prod(shape)} elements) but its mask has {flat.size}")
        return self.add_bits(name, shape, np.packbits(flat, bitorder="little"))

    def add_bits(self, name: str, shape: tuple[int, ...] | list[int], bits: np.ndarray) -> int:
        """Add one tensor's mask already packed LSB first (``ceil(numel / 8)`` bytes, padding
        bits 0), as `criteria.compare(..., packed=True)` returns it. Returns its changed count."""
        if name in self._names:
            raise MaskError(f"{self.path}: tensor {name!r} added twice")
        numel = math.prod(shape)
        packed = np.ascontiguousarray(bits, dtype=np.uint8).reshape(-1)
        if packed.size != (numel + 7) // 8:
            raise MaskError(f"{self.path}: tensor {name!r} has {numel} elements, so {(numel + 7) // 8} bytes of bits, got {packed.size}")
        self._names.add(name)
        cols: dict[str, list] = {k: [] for k in SCHEMA.names}
        changed_total = 0
        for chunk, offset in enumerate(range(0, max(numel, 1), CHUNK_ELEMS)):
            length = min(CHUNK_ELEMS, numel - offset)  # CHUNK_ELEMS is a multiple of 8: rows start on whole bytes
            row = packed[offset // 8 : offset // 8 + (length + 7) // 8].tobytes()
            changed = popcount(row)
            for key, value in zip(SCHEMA.names, (name, list(shape), chunk, offset, length, row, changed), strict=True):
                cols[key].append(value)
            self._digests.append(row_digest(row))
            changed_total += changed
        self._writer.write_batch(pa.record_batch(cols, schema=SCHEMA))
        self.total_elems += numel
        self.total_changed += changed_total
        return changed_total

    def close(self) -> Path:
        self._writer.close()
        self._sink.close()
        meta = {
            **self._meta,
            "total_elems": self.total_elems,
            "total_changed": self.total_changed,
            "checksum": combine_digests(self._digests),
        }
        schema = SCHEMA.with_metadata({k: json.dumps(v) for k, v in meta.items()})
        tmp = self._partial.with_suffix(".tmp")
        with pa.memory_map(str(self._partial)) as src, pa.ipc.open_file(src) as reader:
            with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
                for i in range(reader.num_record_batches):
                    writer.write_batch(reader.get_batch(i).replace_schema_metadata(None))
            # Flush to disk before the rename so a crash never leaves a torn file under PATH.
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, self.path)
        self._partial.unlink()
        return self.path

    def abort(self) -> None:
        for f in (self._writer, self._sink):
            with contextlib.suppress(Exception):  # best-effort cleanup after an earlier error
                f.close()
        self._partial.unlink(missing_ok=True)

    def __enter__(self) -> MaskWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


@dataclass
class Mask:
    """A mask file opened memory-mapped. ``table`` rows are chunks in file order."""

    path: Path
    meta: dict[str, Any]
    table: pa.Table

    @property
    def chunk_elems(self) -> int:
        return int(self.meta["chunk_elems"])

    @property
    def total_elems(self) -> int:
        return int(self.meta["total_elems"])

    @property
    def total_changed(self) -> int:
        return int(self.meta["total_changed"])

    @property
    def sparsity(self) -> float:
        return 1.0 - self.total_changed / self.total_elems if self.total_elems else 1.0

    def tensor_names(self) -> list[str]:
        return list(dict.fromkeys(self.table.column("tensor").to_pylist()))

    def iter_tensors(self) -> Iterator[tuple[str, tuple[int, ...], np.ndarray]]:
        """Yield (name, shape, boolean mask of that shape) per tensor, in file order."""
        names = self.table.column("tensor").to_pylist()
        shapes = self.table.column("shape").to_pylist()
        lengths = self.table.column("length").to_pylist()
        bits = self.table.column("bits")
        i = 0
        while i < len(names):
            j = i
            parts = []
            while j < len(names) and names[j] == names[i]:
                parts.append(unpack(bits[j].as_buffer(), lengths[j]))
                j += 1
            shape = tuple(shapes[i])
            yield names[i], shape, np.concatenate(parts).reshape(shape)
            i = j

    def to_dict(self) -> dict[str, np.ndarray]:
        return {name: m for name, _, m in self.iter_tensors()}

    def per_tensor_counts(self) -> dict[str, tuple[int, int]]:
        """Tensor name -> (changed, numel)."""
        out: dict[str, list[int]] = {}
        for name, length, changed in zip(
            self.table.column("tensor").to_pylist(),
            self.table.column("length").to_pylist(),
            self.table.column("changed").to_pylist(),
            strict=True,
        ):
            acc = out.setdefault(name, [0, 0])
            acc[0] += changed
            acc[1] += length
        return {k: (v[0], v[1]) for k, v in out.items()}


def open_reader(
    source: pa.NativeFile, path: str | os.PathLike, *, columns: Sequence[str] | None = None
) -> tuple[pa.ipc.RecordBatchFileReader, dict[str, Any]]:
    """Open the mask file on ``source`` (any random-access file: a memory map of ``path``,
    an object store's file): its reader and its validated metadata. Only the footer is
    read, no bits. ``columns``: the reader's batches hold only these, and reading them
    reads only their buffers."""
    try:
        reader = pa.ipc.open_file(source)
        meta = _parse_meta(Path(path), reader.schema)
        if columns is not None:
            if reader.schema.names != SCHEMA.names:
                # included_fields are indices: they name these columns only in SCHEMA's order.
                raise MaskError(f"{path}: columns {reader.schema.names}, expected {SCHEMA.names} in that order")
            fields = [SCHEMA.get_field_index(c) for c in columns]
            reader = pa.ipc.open_file(source, options=pa.ipc.IpcReadOptions(included_fields=fields))
    except (pa.ArrowInvalid, OSError) as e:
        raise MaskError(f"{path}: not a readable Arrow IPC mask file, truncated or corrupt ({e})") from e
    return reader, meta


def read_meta(path: str | os.PathLike, *, source: pa.NativeFile | None = None) -> dict[str, Any]:
    """Read and validate only the schema metadata (no bits are touched). ``source``: the
    file opened elsewhere (an object store's), ``path`` then only names it."""
    if source is not None:
        return open_reader(source, path)[1]
    try:
        with pa.memory_map(str(path)) as src:
            return open_reader(src, path)[1]
    except FileNotFoundError as e:
        raise MaskError(f"{path}: mask file does not exist") from e
    except OSError as e:
        raise MaskError(f"{path}: not a readable Arrow IPC mask file ({e})") from e


def _parse_meta(path: Path, schema: pa.Schema) -> dict[str, Any]:
    raw = schema.metadata or {}
    try:
        meta = {k.decode(): json.loads(v) for k, v in raw.items()}
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MaskError(f"{path}: schema metadata is not JSON ({e})") from e
    if meta.get("format") != FORMAT:
        raise MaskError(f"{path}: format is {meta.get('format')!r}, expected {FORMAT!r}")
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise MaskError(f"{path}: metadata lacks {missing}")
    if not isinstance(meta["base"], dict):
        raise MaskError(
            f"{path}: metadata field 'base' is {type(meta['base']).__name__} {meta['base']!r}, "
            "expected a mapping with the base model's 'id' and 'hash'"
        )
    for field in SCHEMA:
        if field.name not in schema.names or schema.field(field.name).type != field.type:
            raise MaskError(f"{path}: column {field.name!r} missing or not {field.type}")
    return meta


def bits_offsets(batch: pa.RecordBatch) -> tuple[np.ndarray, pa.Buffer]:
    """The bits column of a non-empty record batch without copying: (offsets, data), row r's
    bits being ``data[offsets[r]:offsets[r + 1]]``."""
    col = batch.column("bits")
    offsets = np.frombuffer(col.buffers()[1], dtype=np.int32, count=len(col) + 1, offset=4 * col.offset)
    data = col.buffers()[2]
    return offsets, pa.py_buffer(b"") if data is None else data


def read_mask(path: str | os.PathLike, *, verify: bool = True) -> Mask:
    """Open a mask memory-mapped. With ``verify`` (the default) check counts and checksum."""
    path = Path(path)
    try:
        reader, meta = open_reader(pa.memory_map(str(path)), path)
        table = reader.read_all()
    except FileNotFoundError as e:
        raise MaskError(f"{path}: mask file does not exist") from e
    except (pa.ArrowInvalid, OSError) as e:
        raise MaskError(f"{path}: not a readable Arrow IPC mask file, truncated or corrupt ({e})") from e
    mask = Mask(path=path, meta=meta, table=table.replace_schema_metadata(None))
    if verify:
        verify_mask(mask)
    return mask


# Verification, one rule per function; ``verify_mask`` checks a whole file with them, the
# overlap analysis the same rules on the chunks each of its tasks reads. ``where(r)`` names
# row r in error messages.


def check_chunks(
    length: np.ndarray,
    nbytes: np.ndarray,
    chunk_elems: int,
    *,
    offset: np.ndarray | None = None,
    where: Callable[[int], str],
) -> None:
    """Rows' shapes: length in [0, chunk_elems], ceil(length / 8) bytes of bits, and (given
    ``offset``) starting on a chunk boundary. Needs only the small columns."""
    bad = (length < 0) | (length > chunk_elems) | (nbytes != (length + 7) // 8)
    if offset is not None:
        bad |= offset % chunk_elems != 0
    if bad.any():
        r = int(np.flatnonzero(bad)[0])
        raise MaskError(f"{where(r)}: malformed chunk (length {int(length[r])}, {int(nbytes[r])} bytes of bits)")


def check_coverage(
    tensor: Sequence[str],
    shape: Sequence[Sequence[int]],
    chunk: np.ndarray,
    length: np.ndarray,
    chunk_elems: int,
    *,
    where: Callable[[int], str],
) -> None:
    """Each tensor's rows are one run of its chunks 0, 1, ... in order, each full but the
    last, and together they hold exactly the elements of its shape (an empty tensor has one
    empty row). Catches a dropped, repeated or reordered chunk, which the checksum cannot
    when the file was written that way."""
    seen: set[str] = set()
    first = 0
    for r in range(1, len(tensor) + 1):
        if r < len(tensor) and tensor[r] == tensor[first]:
            continue
        name, dims = tensor[first], list(shape[first])
        if name in seen:
            raise MaskError(f"{where(first)}: tensor {name!r} appears in two separate runs of rows")
        seen.add(name)
        numel = math.prod(dims)
        n_chunks = max(1, -(-numel // chunk_elems))
        expected = np.minimum(chunk_elems, numel - np.arange(n_chunks) * chunk_elems)
        if (
            r - first != n_chunks
            or not np.array_equal(chunk[first:r], np.arange(n_chunks))
            or not np.array_equal(length[first:r], expected)
            or any(list(s) != dims for s in shape[first:r])
        ):
            raise MaskError(
                f"{where(first)}: its rows do not cover shape {dims} ({numel} elements in "
                f"{n_chunks} chunk(s) of {chunk_elems}); found chunks {chunk[first:r].tolist()[:8]} "
                f"with lengths {length[first:r].tolist()[:8]}"
            )
        first = r


def check_changed(
    popcounts: Sequence[int] | np.ndarray,
    changed: Sequence[int] | np.ndarray,
    *,
    where: Callable[[int], str],
) -> None:
    """Each row's 'changed' equals the popcount of its bits."""
    for r, (got, want) in enumerate(zip(popcounts, changed, strict=True)):
        if got != want:
            raise MaskError(f"{where(r)}: 'changed' does not match its bits")


def verify_rows(
    bits: Sequence[bytes | memoryview],
    changed: Sequence[int] | np.ndarray,
    *,
    popcounts: Sequence[int] | np.ndarray | None = None,
    where: Callable[[int], str],
) -> list[bytes]:
    """Check the rows' 'changed' against their bits (``check_changed``) and return their
    digests, in order. The rows' shapes are ``check_chunks``'s to check, before.

    ``popcounts``: the rows' popcounts where the caller has them already (the overlap
    kernels count bits along with the intersections); counted here otherwise.
    """
    check_changed([popcount(b) for b in bits] if popcounts is None else popcounts, changed, where=where)
    return [row_digest(b) for b in bits]


def check_checksum(digests: Sequence[bytes], meta: dict[str, Any], *, where: str) -> None:
    """The row digests of a whole file, in file row order, combine to its checksum."""
    if combine_digests(digests) != meta["checksum"]:
        raise MaskError(f"{where}: checksum mismatch: the bits were modified or the file is corrupt")


def check_totals(total_changed: int, total_elems: int, meta: dict[str, Any], *, where: str) -> None:
    """The rows' sums of 'changed' and 'length' match the metadata's totals."""
    if total_changed != int(meta["total_changed"]) or total_elems != int(meta["total_elems"]):
        raise MaskError(
            f"{where}: totals in metadata ({meta['total_changed']}/{meta['total_elems']}) "
            f"do not match the rows ({total_changed}/{total_elems})"
        )


def verify_mask(mask: Mask) -> None:
    """Every row's shape and 'changed', each tensor's coverage, the checksum and the totals
    of an opened mask."""
    t = mask.table
    tensor = t.column("tensor").to_pylist()
    offset = t.column("offset").to_numpy()
    length = t.column("length").to_numpy()
    changed = t.column("changed").to_numpy()
    bits: list[memoryview] = []
    for batch in t.to_batches():
        if batch.num_rows:
            offs, data = bits_offsets(batch)
            view = memoryview(data)
            bits.extend(view[offs[i] : offs[i + 1]] for i in range(batch.num_rows))

    def where(r: int) -> str:
        return f"{mask.path}: tensor {tensor[r]!r} at offset {int(offset[r])}"

    nbytes = np.fromiter(map(len, bits), dtype=np.int64, count=len(bits))
    check_chunks(length, nbytes, mask.chunk_elems, offset=offset, where=where)
    shape = t.column("shape").to_pylist()
    check_coverage(tensor, shape, t.column("chunk").to_numpy(), length, mask.chunk_elems, where=where)
    check_checksum(verify_rows(bits, changed.tolist(), where=where), mask.meta, where=str(mask.path))
    check_totals(int(changed.sum()), int(length.sum()), mask.meta, where=str(mask.path))


def check_compatible(masks: list[Mask] | list[dict[str, Any]], labels: list[str] | None = None) -> None:
    """Refuse to compare masks with different bases or chunk sizes."""
    metas = [m.meta if isinstance(m, Mask) else m for m in masks]
    labels = labels or [str(m.path) if isinstance(m, Mask) else f"mask {i}" for i, m in enumerate(masks)]
    if not metas:
        return
    ref = metas[0]
    for label, meta in zip(labels[1:], metas[1:], strict=True):
        if meta["chunk_elems"] != ref["chunk_elems"]:
            raise MaskError(
                f"{label} has chunk_elems {meta['chunk_elems']} but {labels[0]} has {ref['chunk_elems']}; "
                "masks with different chunk sizes cannot be joined"
            )
        if meta["base"].get("hash") != ref["base"].get("hash"):
            raise MaskError(
                f"{label} was taken against base {meta['base']} but {labels[0]} against {ref['base']}; "
                "masks with different bases cannot be compared"
            )
