"""The overlap analysis (issue 4): kernels vs brute force, cache, errors, MLflow job, CLI."""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from rlsparsity.analysis import overlap as ov
from rlsparsity.analysis.overlap import OverlapError, compute_overlap, engine, kernels, plan_ranges
from rlsparsity.contracts.layers import layer_of, matrix_type
from rlsparsity.contracts.mask import CHUNK_ELEMS, MaskError, MaskWriter, read_meta

# Sizes chosen to be multiples of neither 8 nor CHUNK_ELEMS; one tensor spans two chunks
# (the second short), tiny tensors share packs, and an empty tensor has a zero-length row.
SHAPES: dict[str, tuple[int, ...]] = {
    "model.embed_tokens.weight": (301, 37),
    "model.layers.0.self_attn.q_proj.weight": (1031, 1021),
    "model.layers.0.input_layernorm.weight": (13,),
    "model.layers.1.mlp.down_proj.weight": (5, 7, 3),
    "model.layers.1.mlp.up_proj.bias": (0,),
    "model.norm.weight": (13,),
    "lm_head.weight": (333, 37),
}
DENSITIES = [0.01, 0.3, 0.5, 0.93, 0.0, 1.0]


def write_mask(
    path: Path, masks: dict[str, np.ndarray], *, base_hash: str = "h0", target: str = "t"
) -> Path:
    with MaskWriter(
        path,
        criterion={"mode": "bitwise"},
        dtype="bfloat16",
        base={"id": "base", "hash": base_hash},
        target={"id": target},
    ) as w:
        for name, m in masks.items():
            w.add(name, m.shape, m)
    return path


def random_masks(
    rng: np.random.Generator, density: float, shapes: dict[str, tuple[int, ...]] = SHAPES
) -> dict[str, np.ndarray]:
    # Per-tensor densities vary around the run's density, so layers differ too.
    return {
        t: rng.random(s) < min(1.0, density * rng.uniform(0.5, 1.5))
        if 0 < density < 1
        else np.full(s, density == 1.0)
        for t, s in shapes.items()
    }


@pytest.fixture(scope="module")
def mask_set(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[list[Path], list[dict[str, np.ndarray]]]:
    assert (
        SHAPES["model.layers.0.self_attn.q_proj.weight"][0]
        * SHAPES["model.layers.0.self_attn.q_proj.weight"][1]
        > CHUNK_ELEMS
    )
    d = tmp_path_factory.mktemp("masks")
    rng = np.random.default_rng(7)
    arrays = [random_masks(rng, dens) for dens in DENSITIES]
    paths = [write_mask(d / f"run{k}.arrow", a, target=f"t{k}") for k, a in enumerate(arrays)]
    return paths, arrays


def brute_force(arrays: list[dict[str, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    names = list(arrays[0])
    n = len(arrays)
    t = np.zeros((len(names), n, n), dtype=np.int64)
    for k, name in enumerate(names):
        for i, j in itertools.product(range(n), repeat=2):
            t[k, i, j] = np.count_nonzero(arrays[i][name] & arrays[j][name])
    return t.sum(axis=0), t


def labels_for(paths: list[Path]) -> list[str]:
    return [p.stem for p in paths]


def test_matches_brute_force(mask_set) -> None:
    paths, arrays = mask_set
    res = compute_overlap(paths, labels_for(paths), use_ray=False, use_cache=False)
    total, per_tensor = brute_force(arrays)
    assert res.n == sum(int(np.prod(s)) for s in SHAPES.values())
    np.testing.assert_array_equal(res.inter, total)
    assert res.tensor_names == list(SHAPES)
    np.testing.assert_array_equal(res.tensor_inter, per_tensor)
    counts = np.diagonal(total)
    for row in res.pairs():
        i, j = int(row["a"][3:]), int(row["b"][3:])
        a, b, x = int(counts[i]), int(counts[j]), int(total[i, j])
        assert (row["size_a"], row["size_b"], row["intersection"]) == (a, b, x)
        assert row["o_a"] == (x / a if a else None) and row["o_b"] == (x / b if b else None)
        assert row["o_a_random"] == pytest.approx(b / res.n) and row["o_b_random"] == pytest.approx(
            a / res.n
        )
        assert row["jaccard"] == (x / (a + b - x) if a + b - x else None)
    # Jaccard baseline: close to the empirical mean for random sets of those sizes.
    m = ov.pair_metrics(1000, 3000, 0, 10_000)
    sim = np.mean(
        [
            np.count_nonzero(
                np.isin(
                    r.choice(10_000, 1000, replace=False), r.choice(10_000, 3000, replace=False)
                )
            )
            for r in [np.random.default_rng(s) for s in range(200)]
        ]
    )
    assert m["jaccard_random"] == pytest.approx(sim / (4000 - sim), rel=0.03)


@pytest.mark.parametrize(
    ("n", "n_new", "w", "seg"),
    [
        (1, 1, 5, None),
        (3, 2, 700, None),
        (5, 5, 1030, [0, 3, 4, 600]),
        (8, 3, 16384, None),
        (8, 8, 4097, [1, 17, 513, 514]),
        (33, 1, 999, [0, 998]),
        (6, 6, 0, None),
        (9, 9, 1, None),
        (13, 7, 2049, [0, 100]),
    ],
)
def test_numba_kernel_matches_numpy(n: int, n_new: int, w: int, seg: list[int] | None) -> None:
    """The register-blocked numba kernel and the numpy reference agree exactly."""
    pytest.importorskip("numba")
    if kernels._numba_kernels() is None:
        pytest.skip("numba kernel disabled or not compilable here")
    rng = np.random.default_rng(n * 1000 + w)
    X = rng.integers(0, 2**64, size=(n, w), dtype=np.uint64, endpoint=False)
    # Rows of all-ones and all-zeros, and a sparse row: popcount extremes.
    X[0] = np.uint64(2**64 - 1)
    if n > 2:
        X[2] = 0
    if n > 3:
        X[3] &= rng.integers(0, 2**64, size=w, dtype=np.uint64, endpoint=False)
    s = None if seg is None else np.asarray(seg, dtype=np.int64)
    got = ov.pair_counts(X, n_new, s, backend="numba")
    ref = ov.pair_counts(X, n_new, s, backend="numpy")
    assert got.dtype == ref.dtype == np.int64
    np.testing.assert_array_equal(got, ref)
    np.testing.assert_array_equal(
        ov.row_popcounts(X, s, backend="numba"), ov.row_popcounts(X, s, backend="numpy")
    )
    # A non-contiguous view (a block wider than the words used) goes through a copy.
    wide = np.zeros((n, w + 3), dtype=np.uint64)
    wide[:, :w] = X
    np.testing.assert_array_equal(ov.pair_counts(wide[:, :w], n_new, s, backend="numba"), ref)


def test_numpy_path_matches_brute_force(mask_set, tmp_path, monkeypatch) -> None:
    """With numba off (``RLSPARSITY_NUMBA=0`` or not installed) the numpy kernel runs, incl. incremental."""
    paths, arrays = mask_set
    from rlsparsity import numba_jit

    monkeypatch.setitem(numba_jit._COMPILED, "overlap", None)  # as RLSPARSITY_NUMBA=0 leaves it
    assert kernels._numba_kernels() is None
    res = compute_overlap(paths, labels_for(paths), use_ray=False, use_cache=False)
    total, per_tensor = brute_force(arrays)
    np.testing.assert_array_equal(res.tensor_inter, per_tensor)
    compute_overlap(paths[:4], labels_for(paths[:4]), use_ray=False, cache_dir=tmp_path)
    inc = compute_overlap(paths, labels_for(paths), use_ray=False, cache_dir=tmp_path)
    assert inc.stats["pairs_computed"] == 15 - 6
    np.testing.assert_array_equal(inc.tensor_inter, per_tensor)


def test_groupings(mask_set) -> None:
    paths, arrays = mask_set
    res = compute_overlap(paths, labels_for(paths), use_ray=False, use_cache=False)
    names, numel, inter = res.groups("layer")
    assert names == ["embed", "0", "1", "lm_head", "norm"]
    assert int(numel.sum()) == res.n
    np.testing.assert_array_equal(inter.sum(axis=0), res.inter)
    q = "model.layers.0.self_attn.q_proj.weight"
    rows = [
        r
        for r in res.group_rows("matrix")
        if r["matrix"] == "q" and r["a"] == "run1" and r["b"] == "run2"
    ]
    assert rows[0]["intersection"] == np.count_nonzero(arrays[1][q] & arrays[2][q])
    assert {r["matrix"] for r in res.group_means("matrix")} == {
        "embed",
        "q",
        "norm",
        "down",
        "up.bias",
        "lm_head",
    }
    assert res.to_arrow("layer").num_rows == 5 * 15


def test_naming() -> None:
    assert matrix_type("model.layers.3.self_attn.k_proj.weight") == "k"
    assert matrix_type("model.layers.3.mlp.gate_proj.weight") == "gate"
    assert matrix_type("model.layers.3.post_attention_layernorm.weight") == "norm"
    assert matrix_type("model.layers.3.self_attn.q_proj.bias") == "q.bias"
    assert matrix_type("lm_head.weight") == "lm_head"
    assert layer_of("model.layers.12.mlp.up_proj.weight") == "12"
    assert layer_of("model.embed_tokens.weight") == "embed"


def test_ray_matches_local(mask_set, ray_session, tmp_path) -> None:
    paths, arrays = mask_set
    seen: list[tuple[int, int]] = []
    res = compute_overlap(
        paths,
        labels_for(paths),
        use_ray=True,
        workers=2,
        cache_dir=tmp_path,
        progress=lambda d, t: seen.append((d, t)),
    )
    total, per_tensor = brute_force(arrays)
    np.testing.assert_array_equal(res.tensor_inter, per_tensor)
    assert res.stats["tasks"] >= 2 and res.stats["bytes_read"] == seen[-1][0] == seen[-1][1]
    # A task's verification error reaches the caller as the MaskError it is.
    bad = tmp_path / "bad.arrow"
    _rewrite(paths[1], bad, flip=True, fix_changed=False)
    with pytest.raises(MaskError, match="bad .*'changed' does not match its bits"):
        compute_overlap([paths[0], bad], ["good", "bad"], use_ray=True, workers=2, use_cache=False)


def test_plan_ranges() -> None:
    words = np.array([16384] * 50 + [1] * 30 + [16384] * 20)
    ranges = plan_ranges(words, n=32, n_new=32, n_verify=32, workers=2)
    assert ranges[0][0] == 0 and ranges[-1][1] == len(words)
    assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))
    assert len(ranges) >= 8
    assert plan_ranges(np.array([], dtype=np.int64), 2, 2, 2, 2) == []


def test_incremental_cache(mask_set, tmp_path, monkeypatch) -> None:
    paths, arrays = mask_set
    labels = labels_for(paths)
    first = compute_overlap(paths[:4], labels[:4], use_ray=False, cache_dir=tmp_path)
    assert first.stats["pairs_computed"] == 6
    second = compute_overlap(paths[:5], labels[:5], use_ray=False, cache_dir=tmp_path)
    assert (second.stats["pairs_cached"], second.stats["pairs_computed"]) == (6, 4)
    assert second.stats["verified"] == ["run4"]  # the old files were verified last time
    _, per_tensor = brute_force(arrays[:5])
    np.testing.assert_array_equal(second.tensor_inter, per_tensor)

    # Nothing new: no task and not even the small columns of a mask are read.
    def boom(*a, **k):
        raise AssertionError("mask read")

    monkeypatch.setattr(engine, "overlap_task", boom)
    monkeypatch.setattr(engine, "_read_layout", boom)
    third = compute_overlap(paths[4::-1], labels[4::-1], use_ray=False, cache_dir=tmp_path)
    assert third.stats["bytes_read"] == 0 and third.stats["pairs_cached"] == 10
    np.testing.assert_array_equal(third.tensor_inter, per_tensor[:, ::-1, ::-1])
    assert not list(tmp_path.rglob("*.pkl")) and list(tmp_path.rglob("pairs-*.arrow"))


def test_incompatible_masks_rejected(tmp_path) -> None:
    rng = np.random.default_rng(0)
    small = {"w": (10, 3)}
    a = write_mask(tmp_path / "a.arrow", random_masks(rng, 0.5, small))
    b = write_mask(tmp_path / "b.arrow", random_masks(rng, 0.5, small), base_hash="other")
    with pytest.raises(MaskError, match="different bases"):
        compute_overlap([a, b], ["A", "B"], use_ray=False, use_cache=False)
    # Same base, different chunk size in the metadata.
    c = tmp_path / "c.arrow"
    _rewrite(a, c, meta={"chunk_elems": json.dumps(CHUNK_ELEMS // 2)})
    with pytest.raises(MaskError, match="chunk sizes"):
        compute_overlap([a, c], ["A", "C"], use_ray=False, use_cache=False)
    # Same base, different tensors.
    d = write_mask(tmp_path / "d.arrow", random_masks(rng, 0.5, {"w": (10, 3), "x": (2,)}))
    with pytest.raises(MaskError, match="D .*(lack|extra|elements)|elements"):
        compute_overlap([a, d], ["A", "D"], use_ray=False, use_cache=False)


def _rewrite(
    src: Path,
    dst: Path,
    *,
    meta: dict[str, str] | None = None,
    flip: bool = False,
    fix_changed: bool = True,
) -> None:
    """Copy a mask file, changing metadata values or flipping one bit (checksum left stale)."""
    with pa.memory_map(str(src)) as f:
        reader = pa.ipc.open_file(f)
        schema = reader.schema
        table = reader.read_all()
    md = dict(schema.metadata)
    for k, v in (meta or {}).items():
        md[k.encode()] = v.encode()
    if flip:
        bits = table.column("bits").to_pylist()
        changed = table.column("changed").to_pylist()
        buf = bytearray(bits[0])
        buf[0] ^= 1
        bits[0] = bytes(buf)
        if fix_changed:
            changed[0] += 1 if buf[0] & 1 else -1
        table = table.set_column(
            table.schema.get_field_index("bits"), "bits", pa.array(bits, pa.binary())
        )
        table = table.set_column(
            table.schema.get_field_index("changed"), "changed", pa.array(changed, pa.int64())
        )
        if fix_changed:
            total = json.loads(md[b"total_changed"])
            md[b"total_changed"] = json.dumps(total + (1 if buf[0] & 1 else -1)).encode()
    table = table.replace_schema_metadata(md)
    with pa.OSFile(str(dst), "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
        w.write_table(table)


def test_tampered_mask_rejected(mask_set, tmp_path) -> None:
    paths, _ = mask_set
    bad = tmp_path / "bad.arrow"
    _rewrite(paths[1], bad, flip=True)
    with pytest.raises(MaskError, match="bad .*checksum mismatch"):
        compute_overlap(
            [paths[0], bad], ["good", "bad"], use_ray=False, cache_dir=tmp_path / "cache"
        )
    bad2 = tmp_path / "bad2.arrow"
    _rewrite(paths[1], bad2, flip=True, fix_changed=False)
    with pytest.raises(MaskError, match="'changed' does not match"):
        compute_overlap([paths[0], bad2], ["good", "bad2"], use_ray=False, use_cache=False)
    # Chunk shapes are checked from the small columns, before any bits are read.
    bad3 = tmp_path / "bad3.arrow"
    with pa.memory_map(str(paths[1])) as f:
        table = pa.ipc.open_file(f).read_all()
    offset = table.column("offset").to_pylist()
    offset[-1] += 1
    table = table.set_column(
        table.schema.get_field_index("offset"), "offset", pa.array(offset, pa.int64())
    )
    with pa.OSFile(str(bad3), "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
        w.write_table(table)
    with pytest.raises(MaskError, match="bad3 .*'lm_head.weight' chunk 0: malformed chunk"):
        compute_overlap([paths[0], bad3], ["good", "bad3"], use_ray=False, use_cache=False)
    # A file verified once and then modified in place is verified again.
    victim = tmp_path / "victim.arrow"
    victim.write_bytes(paths[1].read_bytes())
    compute_overlap(
        [paths[0], victim], ["good", "victim"], use_ray=False, cache_dir=tmp_path / "c2"
    )
    _rewrite(paths[1], bad, flip=True)
    victim.write_bytes(bad.read_bytes())
    with pytest.raises(MaskError, match="checksum mismatch"):
        compute_overlap(
            [paths[2], victim], ["other", "victim"], use_ray=False, cache_dir=tmp_path / "c2"
        )


def test_claimed_checksum_is_not_trusted(mask_set, tmp_path, capsys) -> None:
    """A tampered mask (bits flipped, counts fixed up, the original's checksum kept) is
    refused against its original, against a pair the cache holds, alone, and after an edit
    in place that restores the mtime: nothing keyed by a checksum is used unverified."""
    from rlsparsity.analysis.overlap_cli import main

    paths, _ = mask_set
    forged = tmp_path / "forged.arrow"
    _rewrite(paths[1], forged, flip=True)
    assert read_meta(forged)["checksum"] == read_meta(paths[1])["checksum"]
    # The pair claims one checksum: before, taken as identical without reading (Jaccard 1.0).
    with pytest.raises(MaskError, match="forged .*checksum mismatch"):
        compute_overlap([paths[1], forged], ["orig", "forged"], use_ray=False, use_cache=False)
    rc = main(
        ["overlap", str(paths[1]), str(forged), "--labels", "orig,forged", "--local",
         "--no-cache", "-q", "--no-progress"]
    )  # fmt: skip
    assert rc == 2 and "checksum mismatch" in capsys.readouterr().err
    # The cache holds (paths[0], paths[1]): the forged file claims paths[1]'s checksum.
    cache = tmp_path / "cache"
    good = compute_overlap(paths[:2], ["a", "b"], use_ray=False, cache_dir=cache)
    for args in ([paths[0], forged], [paths[1], forged], [forged]):
        with pytest.raises(MaskError, match="forged .*checksum mismatch"):
            compute_overlap(args, ["a", "forged"][: len(args)] if len(args) == 2 else ["forged"],
                            use_ray=False, cache_dir=cache)  # fmt: skip
    # The honest files still come from the cache, without a read.
    again = compute_overlap(paths[:2], ["a", "b"], use_ray=False, cache_dir=cache)
    assert again.stats["bytes_read"] == 0 and again.stats["verified"] == []
    np.testing.assert_array_equal(again.inter, good.inter)
    # Edited in place (same inode and size), mtime set back: ctime still tells.
    victim = tmp_path / "victim.arrow"
    victim.write_bytes(paths[1].read_bytes())
    compute_overlap([paths[0], victim], ["a", "victim"], use_ray=False, cache_dir=cache)
    st = victim.stat()
    # Swap two differing bits of one row in the file's bytes: popcounts and size unchanged.
    with pa.memory_map(str(victim)) as f:
        row = pa.ipc.open_file(f).read_all().column("bits")[0].as_py()
    raw = bytearray(victim.read_bytes())
    k = next(i for i, b in enumerate(row) if b not in (0, 255))
    at = raw.find(row) + k
    assert at >= k and raw.find(row, at - k + 1) == -1
    bit = next(i for i in range(7) if ((raw[at] >> i) & 1) != ((raw[at] >> (i + 1)) & 1))
    raw[at] ^= 3 << bit
    with open(victim, "r+b") as f:
        f.write(raw)
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = victim.stat()
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (st.st_ino, st.st_size, st.st_mtime_ns)
    with pytest.raises(MaskError, match="victim .*checksum mismatch"):
        compute_overlap([paths[0], victim], ["a", "victim"], use_ray=False, cache_dir=cache)


def test_single_mask_is_verified(mask_set, tmp_path) -> None:
    paths, arrays = mask_set
    res = compute_overlap([paths[0]], ["only"], use_ray=False, use_cache=False)
    assert res.stats["verified"] == ["only"] and res.stats["bytes_read"] > 0
    assert int(res.inter[0, 0]) == sum(int(a.sum()) for a in arrays[0].values())
    bad = tmp_path / "bad.arrow"
    _rewrite(paths[0], bad, flip=True)
    with pytest.raises(MaskError, match="bad .*checksum mismatch"):
        compute_overlap([bad], ["bad"], use_ray=False, use_cache=False)


def test_json_keys(mask_set) -> None:
    paths, _ = mask_set
    res = compute_overlap(paths, labels_for(paths), use_ray=False, use_cache=False)
    doc = json.loads(json.dumps(res.to_json(), allow_nan=False))
    assert doc["runs"] == labels_for(paths)
    assert len(doc["pairs"]) == 15
    for p in doc["pairs"]:
        assert {
            "a",
            "b",
            "intersection",
            "o_a",
            "o_b",
            "o_a_random",
            "o_b_random",
            "jaccard",
        } <= set(p)
    back = ov.OverlapResult.from_json(doc)
    np.testing.assert_array_equal(back.inter, res.inter)


def test_grouped_summary_known_grouping(tmp_path) -> None:
    # Five hand-made runs over 16 elements. Factors chosen so each category is known.
    runs = {
        "grpo/add/s0": ({"algorithm": "grpo", "dataset": "add", "seed": 0}, [0, 1, 2, 3]),
        "grpo/add/s1": ({"algorithm": "grpo", "dataset": "add", "seed": 1}, [0, 1, 2, 4]),
        "grpo/mul/s0": (
            {"algorithm": "grpo", "dataset": "mul", "seed": 0},
            [0, 5, 6, 7, 8, 9, 10, 11],
        ),
        "ppo/add/s0": ({"algorithm": "ppo", "dataset": "add", "seed": 0}, [3, 12]),
        "ppo/mul/s1": ({"algorithm": "ppo", "dataset": "mul", "seed": 1}, list(range(16))),
    }
    paths, facts = [], []
    for k, (_label, (f, idx)) in enumerate(runs.items()):
        m = np.zeros(16, dtype=bool)
        m[idx] = True
        paths.append(
            write_mask(
                tmp_path / f"r{k}.arrow", {"model.layers.0.mlp.up_proj.weight": m.reshape(4, 4)}
            )
        )
        facts.append(f)
    res = compute_overlap(paths, list(runs), use_ray=False, use_cache=False, factors=facts)
    summ = {r["differs"]: r for r in res.summary()}
    assert set(summ) == {"seed", "dataset", "algorithm", "several"}
    # seed: only (s0, s1) with grpo/add: |A|=4, |B|=4, ∩=3.
    assert summ["seed"]["pairs"] == 1
    assert summ["seed"]["mean_o_a"] == pytest.approx(0.75) and summ["seed"][
        "mean_o_a_random"
    ] == pytest.approx(4 / 16)
    assert summ["seed"]["mean_jaccard"] == pytest.approx(3 / 5)
    # dataset: grpo/add/s0 vs grpo/mul/s0: ∩={0}; algorithm: grpo/add/s0 vs ppo/add/s0: ∩={3}.
    assert summ["dataset"]["pairs"] == 1 and summ["dataset"]["mean_o_a"] == pytest.approx(1 / 4)
    assert summ["dataset"]["mean_o_b"] == pytest.approx(1 / 8) and summ["dataset"][
        "mean_o_b_random"
    ] == pytest.approx(4 / 16)
    assert summ["algorithm"]["pairs"] == 1 and summ["algorithm"]["mean_o_b"] == pytest.approx(1 / 2)
    assert summ["several"]["pairs"] == 10 - 3
    several = [
        p
        for p in res.pairs()
        if len(ov.differing_factors(runs[p["a"]][0], runs[p["b"]][0], ov.DEFAULT_FACTORS)) > 1
    ]
    assert summ["several"]["mean_jaccard"] == pytest.approx(
        np.mean([p["jaccard"] for p in several])
    )


def test_report_outputs(mask_set, tmp_path) -> None:
    from rich.console import Console

    from rlsparsity.analysis.report import print_report, write_outputs

    paths, _ = mask_set
    res = compute_overlap(
        paths[:3],
        labels_for(paths[:3]),
        use_ray=False,
        use_cache=False,
        factors=[{"seed": k} for k in range(3)],
    )
    console = Console(record=True, width=160)
    print_report(res, console)
    text = console.export_text()
    assert "o_A (chance)" in text and "run0" in text and "seed" in text
    files = write_outputs(res, tmp_path / "out")
    assert {
        "pairs.arrow",
        "layers.arrow",
        "heatmap.png",
        "layers.png",
        "result.json",
        "summary.arrow",
    } <= set(files)
    assert (tmp_path / "out" / "heatmap.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_paths(mask_set, tmp_path, capsys) -> None:
    from rlsparsity.analysis.overlap_cli import main

    paths, _ = mask_set
    out = tmp_path / "o.json"
    rc = main(
        [
            "overlap",
            *map(str, paths[:3]),
            "--labels",
            "x,y,z",
            "--local",
            "--no-cache",
            "--json",
            str(out),
            "-q",
            "--no-progress",
        ]
    )
    assert rc == 0
    assert json.loads(out.read_text())["runs"] == ["x", "y", "z"]
    rng = np.random.default_rng(1)
    other = write_mask(tmp_path / "other.arrow", random_masks(rng, 0.5), base_hash="zzz")
    rc = main(
        ["overlap", str(paths[0]), str(other), "--local", "--no-cache", "-q", "--no-progress"]
    )
    assert rc == 2
    assert "different bases" in capsys.readouterr().err


# --------------------------------------------------------------------------- MLflow


@pytest.fixture()
def tracking(tmp_path, monkeypatch) -> str:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return f"sqlite:///{tmp_path / 'mlruns.db'}"


def _make_sweep(
    tracking: str, tmp_path: Path, mask_paths: list[Path], *, missing: int | None = None
) -> tuple[str, list[str]]:
    from mlflow import MlflowClient

    client = MlflowClient(tracking)
    exp = client.create_experiment("sweep-x", artifact_location=(tmp_path / "artifacts").as_uri())
    sweep = client.create_run(
        exp,
        tags={"rlsparsity.kind": "sweep", "rlsparsity.grid_axes": json.dumps(["lr"])},
        run_name="sweep",
    )
    ids = []
    for k, p in enumerate(mask_paths):
        tags = {
            "rlsparsity.kind": "trial",
            "mlflow.parentRunId": sweep.info.run_id,
            "seed": str(k % 2),
            "dataset": "add",
            "algorithm": "grpo" if k < 2 else "ppo",
            "rlsparsity.label": f"trial{k}",
        }
        run = client.create_run(exp, tags=tags, run_name=f"trial{k}")
        client.log_param(run.info.run_id, "lr", "1e-6")
        if k != missing:
            staged = tmp_path / "stage" / str(k) / "final.arrow"
            staged.parent.mkdir(parents=True)
            staged.write_bytes(p.read_bytes())
            client.log_artifact(run.info.run_id, str(staged), "masks")
        client.set_terminated(run.info.run_id, "FINISHED")
        ids.append(run.info.run_id)
    client.set_terminated(sweep.info.run_id, "FINISHED")
    return sweep.info.run_id, ids


def _analysis_runs(tracking: str) -> list:
    from mlflow import MlflowClient

    client = MlflowClient(tracking)
    exp = client.get_experiment_by_name("sweep-x")
    return client.search_runs([exp.experiment_id], "tags.`rlsparsity.kind` = 'analysis'")


def test_mlflow_job(mask_set, tracking, tmp_path, ray_session) -> None:
    from mlflow import MlflowClient

    from rlsparsity.analysis.job import run_overlap_analysis

    paths, arrays = mask_set
    sweep_id, ids = _make_sweep(tracking, tmp_path, paths[:4])
    res = run_overlap_analysis(tracking, "sweep-x", cache_dir=tmp_path / "cache", quiet=True)
    assert res.labels == ["trial0", "trial1", "trial2", "trial3"]
    np.testing.assert_array_equal(res.tensor_inter, brute_force(arrays[:4])[1])
    assert res.meta["factor_keys"] == ["seed", "dataset", "algorithm", "lr"]
    assert {r["differs"] for r in res.summary()} == {"seed", "algorithm", "several"}
    (run,) = _analysis_runs(tracking)
    assert run.info.status == "FINISHED"
    assert (
        run.data.tags["mlflow.parentRunId"] == sweep_id
        and run.data.tags["rlsparsity.sweep_run_id"] == sweep_id
    )
    client = MlflowClient(tracking)
    names = {Path(f.path).name for f in client.list_artifacts(run.info.run_id, "overlap")}
    assert {"pairs.arrow", "heatmap.png", "result.json", "layers.arrow", "layers.png"} <= names
    doc = json.loads(
        Path(
            client.download_artifacts(run.info.run_id, "overlap/result.json", str(tmp_path / "dl"))
        ).read_text()
    )
    assert doc["runs"] == res.labels and len(doc["pairs"]) == 6

    # Again, through the CLI: everything is cached, so no mask is downloaded or read.
    from rlsparsity.analysis.overlap_cli import main

    out = tmp_path / "again.json"
    rc = main(
        [
            "overlap",
            "--experiment",
            "sweep-x",
            "--tracking-uri",
            tracking,
            "--cache-dir",
            str(tmp_path / "cache"),
            "--json",
            str(out),
            "-q",
            "--no-progress",
            "--no-log",
        ]
    )
    assert rc == 0
    again = json.loads(out.read_text())
    assert again["stats"]["bytes_read"] == 0 and again["pairs"] == doc["pairs"]


def test_mlflow_missing_artifact(mask_set, tracking, tmp_path) -> None:
    from rlsparsity.analysis.job import run_overlap_analysis

    paths, _ = mask_set
    _, ids = _make_sweep(tracking, tmp_path, paths[:3], missing=1)
    with pytest.raises(
        OverlapError, match=f"trial1 \\(run {ids[1]}\\) has no artifact masks/final.arrow"
    ):
        run_overlap_analysis(tracking, "sweep-x", use_ray=False, use_cache=False, quiet=True)
    (run,) = _analysis_runs(tracking)
    assert run.info.status == "FAILED" and "trial1" in run.data.tags["rlsparsity.error"]
    with pytest.raises(OverlapError, match="no MLflow experiment named 'nope'"):
        run_overlap_analysis(tracking, "nope", use_ray=False, use_cache=False, quiet=True)
