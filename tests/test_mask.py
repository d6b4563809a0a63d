"""rlsparsity.mask/1: round trip from hand-built masks, tamper and truncation detection."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from rlsparsity.contracts.mask import (
    CHUNK_ELEMS,
    MaskError,
    MaskWriter,
    check_compatible,
    combine_digests,
    read_mask,
    read_meta,
    row_digest,
)

BASE = {"id": "base", "hash": "sha256:aaa"}


def write(path, tensors, base=BASE):
    with MaskWriter(path, criterion={"mode": "bitwise"}, dtype="bfloat16", base=base, target={"id": "t"},
                    tied=[["model.embed_tokens.weight", "lm_head.weight"]]) as w:
        for name, m in tensors.items():
            w.add(name, m.shape, m)
    return path


def hand_built() -> dict[str, np.ndarray]:
    # Known changes: 3 in a 2x5 matrix; a vector spanning 2 chunks + 5 elements with changes at the edges.
    a = np.zeros((2, 5), dtype=bool)
    a[0, 0] = a[1, 2] = a[1, 4] = True
    b = np.zeros(2 * CHUNK_ELEMS + 5, dtype=bool)
    b[[0, CHUNK_ELEMS - 1, CHUNK_ELEMS, 2 * CHUNK_ELEMS + 4]] = True
    return {"a": a, "b": b, "empty": np.zeros((0,), dtype=bool), "c": np.ones((7,), dtype=bool)}


def test_round_trip_bits_counts_and_metadata(tmp_path):
    tensors = hand_built()
    m = read_mask(write(tmp_path / "m.arrow", tensors))
    assert m.total_changed == 3 + 4 + 0 + 7
    assert m.total_elems == 10 + 2 * CHUNK_ELEMS + 5 + 0 + 7
    got = m.to_dict()
    for name, want in tensors.items():
        np.testing.assert_array_equal(got[name], want)
    assert m.per_tensor_counts()["b"] == (4, 2 * CHUNK_ELEMS + 5)
    rows = m.table.filter(pa.compute.equal(m.table["tensor"], "b")).to_pylist()
    assert [r["chunk"] for r in rows] == [0, 1, 2]
    assert [r["length"] for r in rows] == [CHUNK_ELEMS, CHUNK_ELEMS, 5]
    assert [r["changed"] for r in rows] == [2, 1, 1]
    # LSB-first packing: element 0 is bit 0 of byte 0, element 4 of the last chunk is bit 4.
    assert rows[0]["bits"][0] == 0b1 and rows[2]["bits"] == bytes([0b10000])
    assert m.meta["format"] == "rlsparsity.mask/1" and m.meta["chunk_elems"] == CHUNK_ELEMS
    assert m.meta["tied"] == [["model.embed_tokens.weight", "lm_head.weight"]]
    assert m.meta["checksum"].startswith("blake2b:")


def test_no_file_until_close_and_abort_leaves_nothing(tmp_path):
    path = tmp_path / "m.arrow"
    w = MaskWriter(path, criterion={"mode": "bitwise"}, dtype="bfloat16", base=BASE, target={})
    w.add("x", (3,), np.array([1, 0, 1], dtype=bool))
    assert not path.exists()
    with pytest.raises(RuntimeError), MaskWriter(path, criterion={}, dtype="bf16", base=BASE, target={}) as w2:
        w2.add("x", (3,), np.ones(3, bool))
        raise RuntimeError("disk full")
    assert not path.exists() and len(list(tmp_path.glob("*.partial"))) == 1  # only w's own
    w.close()
    assert read_mask(path).total_changed == 2 and not list(tmp_path.glob("*.partial"))


def test_shape_mismatch_and_duplicate_names_are_errors(tmp_path):
    w = MaskWriter(tmp_path / "m.arrow", criterion={}, dtype="bf16", base=BASE, target={})
    with pytest.raises(MaskError, match="'x' has shape \\[2, 2\\]"):
        w.add("x", (2, 2), np.ones(5, bool))
    w.add("y", (1,), np.ones(1, bool))
    with pytest.raises(MaskError, match="added twice"):
        w.add("y", (1,), np.ones(1, bool))
    w.abort()


def _rewrite(src, dst, fn):
    """Copy a mask, letting fn alter the table and metadata (simulating tampering)."""
    with pa.memory_map(str(src)) as f:
        reader = pa.ipc.open_file(f)
        table, meta = reader.read_all(), dict(reader.schema.metadata)
    table, meta = fn(table, meta)
    with pa.OSFile(str(dst), "wb") as sink, pa.ipc.new_file(sink, table.schema.with_metadata(meta)) as w:
        w.write_table(table)


def test_tampered_bits_fail_the_checksum(tmp_path):
    src = write(tmp_path / "m.arrow", hand_built())

    def flip(table, meta):
        rows = table.to_pylist()
        rows[0]["bits"] = bytes([rows[0]["bits"][0] ^ 0b10]) + rows[0]["bits"][1:]
        rows[0]["changed"] += 1  # keep the popcount consistent so only the checksum can tell
        return pa.Table.from_pylist(rows, schema=table.schema), meta

    _rewrite(src, tmp_path / "bad.arrow", flip)
    with pytest.raises(MaskError, match="bad.arrow: checksum mismatch"):
        read_mask(tmp_path / "bad.arrow")


def test_inconsistent_changed_column_is_rejected(tmp_path):
    src = write(tmp_path / "m.arrow", hand_built())

    def lie(table, meta):
        rows = table.to_pylist()
        rows[0]["changed"] += 1
        return pa.Table.from_pylist(rows, schema=table.schema), meta

    _rewrite(src, tmp_path / "bad.arrow", lie)
    with pytest.raises(MaskError, match="'changed' does not match"):
        read_mask(tmp_path / "bad.arrow")


def test_malformed_chunk_is_rejected(tmp_path):
    src = write(tmp_path / "m.arrow", hand_built())

    def shift(table, meta):
        rows = table.to_pylist()
        rows[1]["offset"] += 8  # 'b' chunk 0 no longer starts on a chunk boundary
        return pa.Table.from_pylist(rows, schema=table.schema), meta

    _rewrite(src, tmp_path / "bad.arrow", shift)
    with pytest.raises(MaskError, match="tensor 'b' at offset 8: malformed chunk"):
        read_mask(tmp_path / "bad.arrow")


def _consistent(rows, schema, meta):
    """A table of ``rows`` with its checksum and totals recomputed: a well-formed file
    whose only fault is which rows it holds."""
    meta = {
        **meta,
        b"checksum": json.dumps(combine_digests([row_digest(r["bits"]) for r in rows])).encode(),
        b"total_changed": json.dumps(sum(r["changed"] for r in rows)).encode(),
        b"total_elems": json.dumps(sum(r["length"] for r in rows)).encode(),
    }
    return pa.Table.from_pylist(rows, schema=schema), meta


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda rows: [r for r in rows if not (r["tensor"] == "b" and r["chunk"] == 1)], "'b'.*do not cover shape"),
        (lambda rows: rows[:2] + rows[3:4] + rows[2:3] + rows[4:], "'b'.*do not cover shape"),
        (lambda rows: rows + [dict(rows[0])], "'a' appears in two separate runs"),
    ],
    ids=["dropped chunk", "reordered chunks", "tensor repeated"],
)
def test_rows_must_cover_each_tensor_exactly(tmp_path, edit, message):
    src = write(tmp_path / "m.arrow", hand_built())
    _rewrite(src, tmp_path / "bad.arrow", lambda t, m: _consistent(edit(t.to_pylist()), t.schema, m))
    with pytest.raises(MaskError, match=message):
        read_mask(tmp_path / "bad.arrow")


def test_truncated_file_is_rejected(tmp_path):
    src = write(tmp_path / "m.arrow", hand_built())
    data = src.read_bytes()
    (tmp_path / "cut.arrow").write_bytes(data[: len(data) // 2])
    with pytest.raises(MaskError, match="cut.arrow: not a readable Arrow IPC mask file"):
        read_mask(tmp_path / "cut.arrow")


def test_missing_file_is_named(tmp_path):
    for read in (read_mask, read_meta):
        with pytest.raises(MaskError, match="gone.arrow: mask file does not exist"):
            read(tmp_path / "gone.arrow")


def test_wrong_format_is_rejected(tmp_path):
    src = write(tmp_path / "m.arrow", hand_built())
    _rewrite(src, tmp_path / "v2.arrow", lambda t, m: (t, {**m, b"format": json.dumps("rlsparsity.mask/2").encode()}))
    with pytest.raises(MaskError, match="expected 'rlsparsity.mask/1'"):
        read_meta(tmp_path / "v2.arrow")


def test_masks_with_different_bases_or_chunks_are_not_compared(tmp_path):
    a = read_mask(write(tmp_path / "a.arrow", {"x": np.ones(3, bool)}))
    b = read_mask(write(tmp_path / "b.arrow", {"x": np.ones(3, bool)}, base={"id": "other", "hash": "sha256:bbb"}))
    check_compatible([a, a])
    with pytest.raises(MaskError, match="different bases"):
        check_compatible([a, b])
    other_chunks = {**a.meta, "chunk_elems": 4096}
    with pytest.raises(MaskError, match="different chunk sizes"):
        check_compatible([a.meta, other_chunks], ["a", "c"])
