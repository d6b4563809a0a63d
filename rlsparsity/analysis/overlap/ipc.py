"""Where each record batch's buffers sit in an Arrow IPC file, for ranged reads of single
rows' bits.

pyarrow reads a record batch whole, or whole columns of it (``included_fields``), and does
not expose the file offsets of the buffers. An overlap task reading some chunks of a
tensor (a record batch holds all chunks of one tensor) needs the byte range of just
those rows. The offsets are in the file's footer (the record batches' blocks) and in each
batch's message header, both flatbuffers whose layout is fixed by Arrow's format
specification (format/File.fbs, format/Message.fbs). This module reads only the fields it
needs, with ``struct``. It is checked against pyarrow's own buffers in the tests, and every
byte read through it is verified against the mask's checksum anyway.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

import pyarrow as pa

MAGIC = b"ARROW1"
TAIL = 10  # int32 footer length + "ARROW1"
_RECORD_BATCH = 3  # MessageHeader union: Schema=1, DictionaryBatch=2, RecordBatch=3


class IpcLayoutError(ValueError):
    """The file's footer or a message header is not what the Arrow format specifies."""


@dataclass(frozen=True)
class Block:
    """A record batch's message: ``offset`` of its header, header length, body length."""

    offset: int
    meta_len: int
    body_len: int

    @property
    def body(self) -> int:
        return self.offset + self.meta_len


@dataclass(frozen=True)
class BatchHeader:
    """A record batch's header: its row count, (length, null count) per field node, and
    (offset, length) per buffer relative to the body, in schema depth-first order."""

    length: int
    nodes: list[tuple[int, int]]
    buffers: list[tuple[int, int]]
    compressed: bool


class _Table:
    """One flatbuffer table: field i's scalar, its offset target, or its vector."""

    def __init__(self, buf: bytes, pos: int) -> None:
        self.buf, self.pos = buf, pos
        vt = pos - _i32(buf, pos)
        self.vt_size = _u16(buf, vt)
        self.vt = vt

    def _field(self, i: int) -> int:
        at = 4 + 2 * i
        if at >= self.vt_size:
            return 0
        off = _u16(self.buf, self.vt + at)
        return self.pos + off if off else 0

    def scalar(self, i: int, fmt: str, default: int = 0) -> int:
        at = self._field(i)
        return struct.unpack_from("<" + fmt, self.buf, at)[0] if at else default

    def target(self, i: int) -> int:
        at = self._field(i)
        return at + _u32(self.buf, at) if at else 0

    def table(self, i: int) -> _Table | None:
        t = self.target(i)
        return _Table(self.buf, t) if t else None

    def structs(self, i: int, fmt: str) -> list[tuple]:
        v = self.target(i)
        if not v:
            return []
        n, size = _u32(self.buf, v), struct.calcsize("<" + fmt)
        if v + 4 + n * size > len(self.buf):
            raise IpcLayoutError(f"vector of {n} structs runs past its flatbuffer")
        return list(struct.iter_unpack("<" + fmt, self.buf[v + 4 : v + 4 + n * size]))


def _i32(b: bytes, at: int) -> int:
    return struct.unpack_from("<i", b, at)[0]


def _u32(b: bytes, at: int) -> int:
    return struct.unpack_from("<I", b, at)[0]


def _u16(b: bytes, at: int) -> int:
    return struct.unpack_from("<H", b, at)[0]


def footer_range(size: int, tail: bytes) -> tuple[int, int]:
    """(start, length) of the footer flatbuffer, from the file's last ``TAIL`` bytes."""
    if size < len(MAGIC) + 2 + TAIL or tail[-len(MAGIC) :] != MAGIC:
        raise IpcLayoutError("no Arrow IPC file magic at the end (not an Arrow file, or truncated)")
    n = _i32(tail, len(tail) - TAIL)
    start = size - TAIL - n
    if n <= 0 or start < 8:
        raise IpcLayoutError(f"footer length {n} does not fit a file of {size} bytes")
    return start, n


def record_batch_blocks(footer: bytes, size: int) -> list[Block]:
    """The record batches' blocks listed by the footer (File.fbs: Footer.recordBatches;
    struct Block {offset: long; metaDataLength: int; (pad); bodyLength: long})."""
    try:
        root = _Table(footer, _u32(footer, 0))
        blocks = [Block(o, m, b) for o, m, _pad, b in root.structs(3, "qiiq")]
    except (struct.error, IndexError) as e:
        raise IpcLayoutError(f"unreadable footer ({e})") from e
    for b in blocks:
        if b.offset < 8 or b.meta_len <= 0 or b.body_len < 0 or b.body + b.body_len > size:
            raise IpcLayoutError(f"record batch block {b} lies outside the file's {size} bytes")
    return blocks


def batch_header(read: Callable[[int, int], bytes], block: Block) -> BatchHeader:
    """Parse the message header of ``block`` (Message.fbs: Message.header is a RecordBatch
    {length: long; nodes: [FieldNode]; buffers: [Buffer]; compression}); ``read(offset,
    nbytes)`` reads the file."""
    raw = bytes(read(block.offset, block.meta_len))
    # Encapsulated message: 0xFFFFFFFF continuation (since format 0.15), int32 size, flatbuffer.
    start = 8 if raw[:4] == b"\xff\xff\xff\xff" else 4
    try:
        fb = raw[start:]
        msg = _Table(fb, _u32(fb, 0))
        if msg.scalar(1, "B") != _RECORD_BATCH:
            raise IpcLayoutError(f"message at {block.offset} is not a record batch")
        body_len = msg.scalar(3, "q")
        rb = msg.table(2)
        if rb is None or body_len != block.body_len:
            raise IpcLayoutError(f"message at {block.offset}: body length {body_len}, footer says {block.body_len}")
        header = BatchHeader(
            length=rb.scalar(0, "q"),
            nodes=[(n, c) for n, c in rb.structs(1, "qq")],
            buffers=[(o, n) for o, n in rb.structs(2, "qq")],
            compressed=bool(rb.target(3)),
        )
    except (struct.error, IndexError) as e:
        raise IpcLayoutError(f"unreadable record batch header at {block.offset} ({e})") from e
    for o, n in header.buffers:
        if o < 0 or n < 0 or o + n > block.body_len:
            raise IpcLayoutError(f"record batch at {block.offset}: buffer ({o}, {n}) outside its {block.body_len}-byte body")
    return header


def _counts(t: pa.DataType) -> tuple[int, int]:
    """(field nodes, buffers) of one column of type ``t`` in a record batch."""
    if pa.types.is_list(t):
        n, b = _counts(t.value_type)
        return 1 + n, 2 + b
    if pa.types.is_string(t) or pa.types.is_binary(t):
        return 1, 3
    if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t):
        return 1, 2
    raise IpcLayoutError(f"no buffer layout for column type {t}")


def column_position(schema: pa.Schema, name: str) -> tuple[int, int]:
    """(first field node, first buffer) of top-level column ``name``: nodes and buffers are
    listed depth-first in schema order, a buffer for validity first in each."""
    node = buf = 0
    for f in schema:
        if f.name == name:
            return node, buf
        n, b = _counts(f.type)
        node, buf = node + n, buf + b
    raise IpcLayoutError(f"no column {name!r}")
