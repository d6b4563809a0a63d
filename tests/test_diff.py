"""``rlsparsity diff``: exact counts on constructed pairs, edge cases, outputs and tracking."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from paper_reference import script_changed
from safetensors.torch import save_file

from rlsparsity.analysis import checkpoints as ckpts
from rlsparsity.analysis.checkpoint_hash import content_hash
from rlsparsity.analysis.checkpoints import CheckpointError, open_checkpoint
from rlsparsity.analysis.criteria import parse_criteria
from rlsparsity.analysis.diff import DiffError, diff, layer_group, natural_key
from rlsparsity.analysis.diff import cli as diff_cli
from rlsparsity.contracts.layers import layer_prefix
from rlsparsity.contracts.mask import read_mask

TABLE6 = ["bitwise", "abs:1e-8,1e-7,1e-6,1e-5", "rel:1e-3"]


def save_sharded(root: Path, tensors: dict[str, torch.Tensor], shards: int = 3, config: dict | None = None) -> Path:
    """A Hugging Face style sharded checkpoint: model-0000i-of-0000n.safetensors + index."""
    root.mkdir(parents=True, exist_ok=True)
    names = list(tensors)
    weight_map = {}
    for i in range(shards):
        part = {n: tensors[n].contiguous() for n in names[i::shards]}
        if not part:
            continue
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file(part, str(root / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, fname))
    (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    if config is not None:
        (root / "config.json").write_text(json.dumps(config))
    return root


def run_cli(*argv: str) -> int:
    parser = __import__("argparse").ArgumentParser(prog="rlsparsity")
    sub = parser.add_subparsers(dest="command", required=True)
    diff_cli.add_parser(sub)
    args = parser.parse_args(["diff", *map(str, argv)])
    return args.func(args)


# ----------------------------------------------------------------------------- known pairs

# Each group: θ0 value, θ1 value as exact bf16 offsets. bf16 ulp at 2^-k is 2^-(k+7), so
# the pairs below put |Δ| just under and just over each of the paper's tolerances.
BF16_GROUPS = [
    # (θ0, θ1, count)
    (2.0**-20, 2.0**-20 + 2.0**-27, 5),  # Δ = 7.45e-9  <= 1e-8
    (2.0**-20, 2.0**-20 + 2 * 2.0**-27, 7),  # Δ = 1.49e-8  > 1e-8
    (2.0**-17, 2.0**-17 + 2.0**-24, 11),  # Δ = 5.96e-8  <= 1e-7
    (2.0**-17, 2.0**-17 + 2 * 2.0**-24, 13),  # Δ = 1.19e-7  > 1e-7
    (2.0**-14, 2.0**-14 + 2 * 2.0**-21, 17),  # Δ = 9.54e-7  <= 1e-6
    (2.0**-14, 2.0**-14 + 3 * 2.0**-21, 19),  # Δ = 1.43e-6  > 1e-6
    (2.0**-10, 2.0**-10 + 2.0**-17, 23),  # Δ = 7.63e-6  <= 1e-5
    (2.0**-10, 2.0**-10 + 2 * 2.0**-17, 29),  # Δ = 1.53e-5  > 1e-5
    (-(2.0**-10), -(2.0**-10) - 2 * 2.0**-17, 3),  # negative side, Δ = -1.53e-5
    (0.0, -0.0, 31),  # bitwise only
]
# float32: θ0 = 0, θ1 = the float32 neighbours of each tolerance.
F32_TOLS = [1e-8, 1e-7, 1e-6, 1e-5]


def _f32_neighbours(tol: float) -> tuple[float, float]:
    t = np.float32(tol)
    below = t if float(t) <= tol else np.nextafter(t, np.float32(0))
    return float(below), float(np.nextafter(below, np.float32(1)))


def _place(shape: tuple[int, ...], dtype: torch.dtype, groups: list[tuple[float, float, int]], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A base with 0.5-valued filler and groups of (θ0, θ1) pairs at random positions."""
    n = int(np.prod(shape))
    a = torch.full((n,), 0.5, dtype=dtype)
    b = a.clone()
    pos = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    k = 0
    for v0, v1, cnt in groups:
        a[pos[k : k + cnt]] = v0
        b[pos[k : k + cnt]] = v1
        k += cnt
    return a.reshape(shape), b.reshape(shape)


def _expected(groups: list[tuple[float, float, int]], crits: list, dtype: torch.dtype) -> dict[str, int]:
    out = {}
    for c in crits:
        total = 0
        for v0, v1, cnt in groups:
            x0, x1 = (torch.tensor([v], dtype=dtype) for v in (v0, v1))
            bits_differ = x0.view(torch.uint8).tolist() != x1.view(torch.uint8).tolist()
            d = abs(float(x1) - float(x0))  # exact: these differences are representable
            if c.mode == "bitwise":
                hit = bits_differ
            elif c.mode == "abs":
                hit = d > c.tol
            else:
                hit = d > c.tol * max(abs(float(x0)), abs(float(x1)))
            total += cnt * hit
        out[str(c)] = total
    return out


@pytest.fixture(scope="module")
def known_pair(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Sharded bf16 and float32 pairs with exactly known changed counts per criterion."""
    root = tmp_path_factory.mktemp("known")
    crits = parse_criteria(TABLE6)
    base, target, expected, per_tensor = {}, {}, dict.fromkeys(map(str, crits), 0), {}
    for layer in range(3):
        name = f"model.layers.{layer}.mlp.up_proj.weight"
        a, b = _place((40, 37), torch.bfloat16, BF16_GROUPS, seed=layer)
        base[name], target[name] = a, b
        per_tensor[name] = _expected(BF16_GROUPS, crits, torch.bfloat16)
        name = f"model.layers.{layer}.self_attn.q_proj.weight"
        groups = [(0.0, v, 3 + i) for i, tol in enumerate(F32_TOLS) for v in _f32_neighbours(tol)]
        a, b = _place((19, 23), torch.float32, groups, seed=10 + layer)
        base[name], target[name] = a, b
        per_tensor[name] = _expected(groups, crits, torch.float32)
        norm = f"model.layers.{layer}.input_layernorm.weight"
        base[norm] = target[norm] = torch.ones(37, dtype=torch.bfloat16)
        per_tensor[norm] = dict.fromkeys(map(str, crits), 0)
    base["model.embed_tokens.weight"] = torch.randn(50, 37).bfloat16()
    target["model.embed_tokens.weight"] = base["model.embed_tokens.weight"].clone()
    target["model.embed_tokens.weight"][3, 4] = 7.0
    per_tensor["model.embed_tokens.weight"] = dict.fromkeys(map(str, crits), 1)
    for pt in per_tensor.values():
        for k, v in pt.items():
            expected[k] += v
    cfg = {"tie_word_embeddings": True}
    return {
        "base": save_sharded(root / "base", base, shards=3, config=cfg),
        "target": save_sharded(root / "target", target, shards=2, config=cfg),
        "expected": expected,
        "per_tensor": per_tensor,
        "total": sum(t.numel() for t in base.values()),
        "tensors": (base, target),
    }


def test_groups_really_straddle() -> None:
    crits = parse_criteria(TABLE6)
    exp = _expected(BF16_GROUPS, crits, torch.bfloat16)
    # By hand: 158 pairs differ in bits; ±0 (31) only there; each tolerance drops its "just below" group.
    assert exp == {"bitwise": 158, "abs:1e-8": 122, "abs:1e-7": 104, "abs:1e-6": 74, "abs:1e-5": 32, "rel:0.001": 127}


@pytest.mark.parametrize("workers,unit", [(1, 64), (2, 1 << 20), (2, 200)])
def test_known_counts_exact(known_pair: dict, workers: int, unit: int) -> None:
    r = diff(known_pair["base"], known_pair["target"], TABLE6, workers=workers, unit_elems=unit)
    assert r.total == known_pair["total"]
    assert {str(c): r.changed(c) for c in r.criteria} == known_pair["expected"]
    assert {t.name: t.changed for t in r.tensors} == known_pair["per_tensor"]
    assert r.tied == [["model.embed_tokens.weight", "lm_head.weight"]]
    assert r.excluded == []


def test_numba_kernel_gives_the_known_counts(known_pair: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """Forcing the fused numba kernel (normally only for large bf16 pairs) changes nothing."""
    pytest.importorskip("numba")
    from rlsparsity.analysis.criteria import numba_available
    from rlsparsity.analysis.diff import engine

    if not numba_available():
        pytest.skip("numba kernel disabled or not compilable here")
    small = diff(known_pair["base"], known_pair["target"], TABLE6, workers=2)
    assert small.timing["kernel"] == "numpy"  # a few KB: not worth importing numba
    monkeypatch.setattr(engine, "NUMBA_MIN_BYTES_PER_WORKER", 0)
    for workers, unit in ((1, 64), (2, 1 << 20)):
        r = diff(known_pair["base"], known_pair["target"], TABLE6, workers=workers, unit_elems=unit)
        assert r.timing["kernel"] == "numba+numpy"  # numba for the bf16 tensors, numpy for float32
        assert {str(c): r.changed(c) for c in r.criteria} == known_pair["expected"]
        assert {t.name: t.changed for t in r.tensors} == known_pair["per_tensor"]


def test_timing_names_the_kernel_that_ran(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A float32 pair runs numpy even when numba is forced for every bf16 byte; a bf16 pair
    forced onto numba says so (when numba is here)."""
    from rlsparsity.analysis.criteria import numba_available
    from rlsparsity.analysis.diff import engine

    monkeypatch.setattr(engine, "NUMBA_MIN_BYTES_PER_WORKER", 0)
    x = torch.randn(64, 8)
    b, t = _pair(tmp_path / "f32", {"w": x}, {"w": x * 1.5})
    r = diff(b, t, TABLE6, workers=1)
    assert r.timing["kernel"] == "numpy" and r.changed("bitwise") == int((x != 0).sum())
    b, t = _pair(tmp_path / "bf16", {"w": x.bfloat16()}, {"w": (x * 1.5).bfloat16()})
    assert diff(b, t, TABLE6, workers=1).timing["kernel"] == ("numba" if numba_available() else "numpy")
    assert diff(b, t, TABLE6, workers=1, mask_path=tmp_path / "m.arrow").timing["kernel"] == "numpy"  # masks: numpy


# θ0, θ1, count: paper:1e-5 against abs:1e-5 on bf16 and float32 tensors (see the criteria
# module for the rules). T5 = bf16(float32(1e-5)) = 168 * 2^-24 = 1.0013580e-5.
T5 = 168 * 2.0**-24
PAPER_BF16 = [
    (0.0, -0.0, 3),  # bitwise only
    (0.0, T5, 5),  # abs only: |Δ| = T5 > 1e-5, but not above the rounded tolerance
    (0.0, 169 * 2.0**-24, 7),  # both
    (-133 * 2.0**-28, 160 * 2.0**-24, 11),  # abs only: Δ = 1.0032e-5 rounds to T5 in bf16
    (0.0, 167 * 2.0**-24, 13),  # bitwise only: 9.95e-6
    (float("nan"), float("nan"), 2),  # paper only: identical NaN, NaN Δ is never close
]
PAPER_F32 = [
    (1.0, 1.0 + 2.0**-12, 17),  # abs only: the same bf16 once rounded
    (0.0, 1.002e-5, 19),  # abs only: rounds to T5
    (0.1, 0.2, 23),  # both
    (3.4e38, 3.4e38, 1),  # paper only: identical, but inf in bf16 (inf - inf = NaN)
]


def test_paper_criterion_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """diff's paper:1e-5 is the script's count; it differs from abs:1e-5 by a hand-counted 49."""
    a16, b16 = _place((30, 20), torch.bfloat16, PAPER_BF16, seed=1)
    a32, b32 = _place((25, 20), torch.float32, PAPER_F32, seed=2)
    base, target = {"layers.0.w": a16, "layers.1.w": a32}, {"layers.0.w": b16, "layers.1.w": b32}
    b, t = save_sharded(tmp_path / "b", base, 2), save_sharded(tmp_path / "t", target, 2)
    crits = ["bitwise", "abs:1e-5", "paper:1e-5"]
    # By hand: bitwise 3+5+7+11+13 + 17+19+23 = 98; abs 5+7+11 + 17+19+23 = 82; paper 7+2 + 23+1 = 33.
    want = {"bitwise": 98, "abs:1e-5": 82, "paper:1e-5": 33}
    assert want["abs:1e-5"] - want["paper:1e-5"] == (5 + 11 + 17 + 19) - (2 + 1) == 49
    script = sum(int(script_changed(base[k], target[k], 1e-5).sum()) for k in base)
    assert script == want["paper:1e-5"]  # the hand count is the script's
    r = diff(b, t, crits, mask_path=tmp_path / "m.arrow", workers=2, unit_elems=64)
    assert {str(c): r.changed(c) for c in r.criteria} == want and r.total == 1100
    r = diff(b, t, ["paper:1e-5", "abs:1e-5"], mask_path=tmp_path / "p.arrow", workers=1)
    m = read_mask(tmp_path / "p.arrow")
    assert m.meta["criterion"] == {"mode": "paper", "tol": 1e-5, "spec": "paper:1e-5", "atol_bf16": T5}
    assert m.meta["compute_dtype"].startswith("bfloat16")
    for name, _, bits in m.iter_tensors():
        np.testing.assert_array_equal(bits.reshape(-1), script_changed(base[name], target[name], 1e-5))
    # The CLI, with the fused numba kernel forced where it can run (the bf16 tensor).
    from rlsparsity.analysis.diff import engine

    monkeypatch.setattr(engine, "NUMBA_MIN_BYTES_PER_WORKER", 0)
    assert run_cli(b, t, "-c", "paper:1e-8,1e-7,1e-6,1e-5", "-c", "abs:1e-5,0", "--json", tmp_path / "r.json", "-q") == 0
    d = json.loads((tmp_path / "r.json").read_text())
    assert list(d["criteria"]) == ["paper:1e-8", "paper:1e-7", "paper:1e-6", "paper:1e-5", "abs:1e-5", "abs:0"]
    assert d["criteria"]["paper:1e-5"]["changed"] == 33 and d["criteria"]["abs:1e-5"]["changed"] == 82
    assert d["criteria"]["abs:0"]["changed"] == 98 - 3  # every bit change but ±0
    assert set(d["tensors"][0]["changed"]) == set(d["criteria"])
    for tol in (1e-8, 1e-7, 1e-6):
        assert d["criteria"][str(parse_criteria(f"paper:{tol}")[0])]["changed"] == sum(
            int(script_changed(base[k], target[k], tol).sum()) for k in base
        )


def test_random_pairs_match_numpy_brute_force(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(1)
    base, target = {}, {}
    for i, (shape, dtype) in enumerate([((300, 211), torch.bfloat16), ((5000,), torch.float16), ((77, 91), torch.float32), ((3, 4, 5), torch.bfloat16)]):
        x = torch.randn(shape, generator=g) * 0.05
        upd = torch.rand(shape, generator=g) < 0.3
        y = x + upd * torch.randn(shape, generator=g) * 10 ** torch.randint(-9, -3, shape, generator=g).float()
        base[f"layers.{i}.w"], target[f"layers.{i}.w"] = x.to(dtype), y.to(dtype)
    crits = parse_criteria(["bitwise", "abs:1e-8,1e-6,1e-5", "rel:1e-3"])
    save_sharded(tmp_path / "a", base, shards=2)
    save_sharded(tmp_path / "b", target, shards=3)
    r = diff(tmp_path / "a", tmp_path / "b", crits, unit_elems=4096)
    for name, a in base.items():
        b = target[name]
        fa, fb = a.float().numpy().ravel(), b.float().numpy().ravel()
        bits = a.view(torch.uint8).numpy().reshape(a.numel(), -1) != b.view(torch.uint8).numpy().reshape(b.numel(), -1)
        bits = bits.any(axis=1)
        d = np.abs(fb - fa)
        ref = {
            "bitwise": int(bits.sum()),
            "abs:1e-8": int((d.astype(np.float64) > 1e-8).sum()),
            "abs:1e-6": int((d.astype(np.float64) > 1e-6).sum()),
            "abs:1e-5": int((d.astype(np.float64) > 1e-5).sum()),
            "rel:0.001": int((d > np.float32(1e-3) * np.maximum(np.abs(fa), np.abs(fb))).sum()),
        }
        got = next(t for t in r.tensors if t.name == name).changed
        assert got == ref, name


# ----------------------------------------------------------------------------- mismatches


def _pair(tmp_path: Path, base: dict, target: dict, cfg_b: dict | None = None, cfg_t: dict | None = None) -> tuple[Path, Path]:
    return save_sharded(tmp_path / "b", base, 2, cfg_b), save_sharded(tmp_path / "t", target, 2, cfg_t)


def test_shape_mismatch_errors_then_excluded(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    w = torch.zeros(4, 3)
    b, t = _pair(tmp_path, {"emb.weight": torch.zeros(10, 3), "w": w}, {"emb.weight": torch.zeros(12, 3), "w": w + 1})
    with pytest.raises(DiffError) as e:
        diff(b, t)
    assert "emb.weight" in str(e.value) and "[10, 3]" in str(e.value) and "[12, 3]" in str(e.value)
    assert run_cli(b, t) == 1
    assert "emb.weight: shape mismatch: base [10, 3] vs target [12, 3]" in capsys.readouterr().err

    r = diff(b, t, allow_mismatch=True)
    assert r.total == 12 and r.changed("bitwise") == 12
    assert [x.to_dict() for x in r.excluded] == [
        {"name": "emb.weight", "reason": "shape mismatch: base [10, 3] vs target [12, 3]", "base_shape": [10, 3], "target_shape": [12, 3]}
    ]
    assert run_cli(b, t, "--allow-mismatch", "--json", tmp_path / "r.json") == 0
    out = capsys.readouterr().out
    assert "excluded 1 tensor(s)" in out and "emb.weight" in out
    assert json.loads((tmp_path / "r.json").read_text())["excluded"][0]["name"] == "emb.weight"


def test_one_side_only(tmp_path: Path) -> None:
    w = torch.ones(5)
    b, t = _pair(tmp_path, {"a": w, "only_base": w}, {"a": w, "extra.bias": torch.ones(2)})
    with pytest.raises(DiffError, match=r"extra.bias: only in target \(shape \[2\]\)[\s\S]*only_base: only in base"):
        diff(b, t)
    r = diff(b, t, allow_mismatch=True)
    assert r.total == 5
    assert {x.name: x.reason for x in r.excluded} == {"only_base": "only in base (shape [5])", "extra.bias": "only in target (shape [2])"}


def test_differing_dtypes_compared_in_common_dtype(tmp_path: Path) -> None:
    x = torch.randn(64, 8).bfloat16()
    y = x.float()  # same values, float32 storage
    y[0, :5] += 1e-3  # 5 changed, only representable in float32
    b, t = _pair(tmp_path, {"w": x}, {"w": y})
    r = diff(b, t, ["bitwise", "abs:1e-5", "abs:1e-2"])
    assert [r.changed(c) for c in r.criteria] == [5, 5, 0]
    assert r.tensors[0].bitwise_dtype == "float32" and r.tensors[0].base_dtype == "bfloat16"
    assert any("different dtypes" in n and "BF16->F32" in n for n in r.notes)


def test_ties(tmp_path: Path) -> None:
    emb = torch.randn(20, 4).bfloat16()
    layer = torch.randn(4, 4).bfloat16()
    tied = {"tie_word_embeddings": True}
    # lm_head absent on both sides: counted once, listed.
    b, t = _pair(tmp_path / "1", {"model.embed_tokens.weight": emb, "l.0.w": layer}, {"model.embed_tokens.weight": emb, "l.0.w": layer}, tied, tied)
    r = diff(b, t)
    assert r.total == 96 and r.tied == [["model.embed_tokens.weight", "lm_head.weight"]]
    # lm_head stored as an identical copy on both sides: still counted once.
    both = {"model.embed_tokens.weight": emb, "lm_head.weight": emb.clone(), "l.0.w": layer}
    b, t = _pair(tmp_path / "2", both, both, tied, tied)
    r = diff(b, t)
    assert r.total == 96 and len(r.tied) == 1
    # Tied in base, a separate trained head in the target: base embedding vs target head.
    head = emb.clone()
    head[0, 0] = 3.0
    b, t = _pair(tmp_path / "3", {"model.embed_tokens.weight": emb}, {"model.embed_tokens.weight": emb, "lm_head.weight": head}, tied, {"tie_word_embeddings": False})
    r = diff(b, t)
    assert r.total == 160 and r.changed("bitwise") == 1 and r.tied == []
    assert any("tied to model.embed_tokens.weight in base only" in n for n in r.notes)
    # No tie declared: a missing lm_head is a mismatch, with a hint.
    b, t = _pair(tmp_path / "4", {"model.embed_tokens.weight": emb}, {"model.embed_tokens.weight": emb, "lm_head.weight": emb}, {}, {})
    with pytest.raises(DiffError, match="tie_word_embeddings"):
        diff(b, t)


# ----------------------------------------------------------------------------- files


def test_pickle_refused(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    (tmp_path / "m" / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="arbitrary code"):
        open_checkpoint(tmp_path / "m")
    (tmp_path / "w.pt").write_bytes(b"\x80\x04")
    with pytest.raises(CheckpointError, match="refuses to unpickle"):
        open_checkpoint(tmp_path / "w.pt")


def test_corrupt_and_truncated_files_named(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    good = save_sharded(tmp_path / "good", {"a": torch.ones(100), "b": torch.ones(50)}, shards=2)
    bad = tmp_path / "bad"
    shutil.copytree(good, bad)
    shard = bad / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-7])
    with pytest.raises(CheckpointError, match=str(shard)):
        open_checkpoint(bad)
    assert run_cli(good, bad) == 1
    assert "model-00002-of-00002.safetensors" in capsys.readouterr().err
    shard.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{abc}")
    with pytest.raises(CheckpointError, match="not a valid safetensors file"):
        open_checkpoint(bad)
    (bad / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="does not exist"):
        open_checkpoint(bad)


def test_single_file_and_hub_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "src"
    src.mkdir()
    save_file({"w": torch.arange(10.0)}, str(src / "model.safetensors"))
    (src / "config.json").write_text("{}")
    calls = []

    def fake_snapshot(repo_id: str, revision: str | None = None, cache_dir: object = None, allow_patterns: list | None = None) -> str:
        calls.append(allow_patterns)
        snap = tmp_path / "hub" / repo_id.replace("/", "--") / "snapshots" / "abc123"
        snap.mkdir(parents=True, exist_ok=True)
        for f in src.iterdir():
            if any(Path(f.name).match(p) for p in allow_patterns):
                shutil.copy(f, snap / f.name)
        return str(snap)

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda repo_id, revision=None: [p.name for p in src.iterdir()])
    ck = open_checkpoint("org/model", revision="v1")
    assert ck.source == "hub" and ck.commit == "abc123" and ck.revision == "v1" and list(ck.tensors) == ["w"]
    assert calls == [["*.json"], ["model.safetensors", "*.json"]]
    r = diff("org/model", src / "model.safetensors", base_revision="v1")
    assert r.changed("bitwise") == 0 and r.base["commit"] == "abc123"
    # A pickle-only repo is refused before any weight is downloaded.
    (src / "model.safetensors").unlink()
    (src / "pytorch_model.bin").write_bytes(b"\x80")
    calls.clear()
    with pytest.raises(CheckpointError, match="only pickle weights"):
        open_checkpoint("org/pickled")
    assert calls == [["*.json"]]
    with pytest.raises(CheckpointError, match="local path"):
        open_checkpoint(src, revision="main")


# ----------------------------------------------------------------------------- outputs


def test_cli_json_mask_and_layers(known_pair: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out, mask = tmp_path / "r.json", tmp_path / "m.arrow"
    rc = run_cli(known_pair["base"], known_pair["target"], "-c", "abs:1e-5", "-c", "bitwise", "--per-layer", "--per-tensor", "--json", out, "--mask", mask)
    assert rc == 0
    text = capsys.readouterr().out
    assert "model.layers.2" in text and "abs:1e-5" in text and "tied: lm_head.weight" in text
    d = json.loads(out.read_text())
    assert d["total"] == known_pair["total"]
    assert d["criteria"]["abs:1e-5"]["changed"] == known_pair["expected"]["abs:1e-5"]
    assert d["criteria"]["abs:1e-5"]["sparsity"] == pytest.approx(1 - known_pair["expected"]["abs:1e-5"] / known_pair["total"])
    assert d["excluded"] == []
    t0 = d["tensors"][0]
    assert set(t0) >= {"name", "shape", "numel", "changed"} and set(t0["changed"]) == {"abs:1e-5", "bitwise"}
    assert [g["group"] for g in d["layers"]] == ["model.layers.0", "model.layers.1", "model.layers.2", "(no layer number)"]

    m = read_mask(mask)  # verifies the checksum
    assert m.meta["criterion"]["spec"] == "abs:1e-5" and m.meta["dtype"] == "mixed:bfloat16,float32"
    assert m.total_changed == known_pair["expected"]["abs:1e-5"] and m.total_elems == known_pair["total"]
    assert m.meta["tied"] == [["model.embed_tokens.weight", "lm_head.weight"]]
    assert m.meta["base"]["hash"] == content_hash(open_checkpoint(known_pair["base"]))
    assert m.meta["target"]["hash"] == content_hash(open_checkpoint(known_pair["target"]))
    base, target = known_pair["tensors"]
    for name, _, bits in m.iter_tensors():
        d_ = (target[name].float() - base[name].float()).abs().numpy()
        np.testing.assert_array_equal(bits, d_ > 1e-5)


def test_content_hash_independent_of_sharding(tmp_path: Path) -> None:
    t = {"a": torch.randn(1_500_000).half(), "b": torch.randn(7, 3)}
    one = save_sharded(tmp_path / "one", t, shards=1)
    two = save_sharded(tmp_path / "two", t, shards=2)
    h1, h2 = content_hash(open_checkpoint(one)), content_hash(open_checkpoint(two))
    assert h1 == h2
    r = diff(one, two, content_hash=True, workers=2)
    assert r.base["hash"] == r.target["hash"] == h1
    t["b"][0, 0] += 1
    assert content_hash(open_checkpoint(save_sharded(tmp_path / "three", t, shards=2))) != h1


def test_help_documents_every_option(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        run_cli("--help")
    text = capsys.readouterr().out
    for opt in ("--revision", "--base-revision", "--target-revision", "--cache-dir", "--allow-mismatch", "--criterion",
                "--rank", "--rank-max-dim", "--per-tensor", "--per-layer", "--json", "--mask", "--hash", "--quiet",
                "--no-progress", "--mlflow", "--tracking-uri", "--experiment", "--run-name", "--workers", "--ray", "--ray-address"):
        assert opt in text, opt
    flat = " ".join(text.split())  # argparse wraps lines
    for says in ("paper:TOL[,TOL...]", "'paper:TOL' = the arithmetic of the paper's check_sparsity.py", "1e-5 -> 1.001358e-5",
                 "-c paper:1e-8,1e-7,1e-6,1e-5", "-0 vs +0 is unchanged under abs, rel and paper"):  # fmt: skip
        assert says in flat, says


def test_grouping_helpers() -> None:
    assert layer_group("model.layers.12.mlp.up_proj.weight") == "model.layers.12"
    assert layer_group("vision.blocks.3.attn.qkv") == "vision.blocks.3"
    assert layer_group("model.norm.weight") == "(no layer number)"
    assert sorted(["l.10.w", "l.2.w", "l.1.w"], key=natural_key) == ["l.1.w", "l.2.w", "l.10.w"]
    # The rule lives in contracts.layers; unlike layer_of it groups any numbered container.
    assert layer_prefix("transformer.resblocks.0.attn.c_proj.weight") == "transformer.resblocks.0"
    assert layer_prefix("model.norm.weight") is None


@pytest.mark.parametrize("workers,window", [(1, 3), (3, 1), (3, 4)])
def test_bounded_map_is_ordered_and_bounded(workers: int, window: int) -> None:
    """The engines' map: results in input order, at most ``window`` items taken ahead of the
    consumer, and nothing left running when the consumer stops early."""
    import threading
    import time

    from rlsparsity.analysis.parallel import bounded_map

    lock = threading.Lock()
    taken, running, peak = [0], [0], [0]

    def items():
        for i in range(30):
            taken[0] += 1
            yield i

    def fn(i: int) -> int:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.001 * (i % 3))
        with lock:
            running[0] -= 1
        return i * i

    out = []
    for k, r in enumerate(bounded_map(fn, items(), workers, window)):
        out.append(r)
        assert taken[0] <= k + 1 + (window if workers > 1 else 0)
    assert out == [i * i for i in range(30)]
    assert peak[0] <= max(1, min(workers, window))
    g = bounded_map(fn, items(), workers, window)
    next(g)
    g.close()
    assert running[0] == 0


def test_mlflow_logging(known_pair: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    assert run_cli(known_pair["base"], known_pair["target"], "--mlflow", "--tracking-uri", uri, "--experiment", "exp-x", "-q") == 0
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["exp-x"], output_format="list")
    assert len(runs) == 1
    run = runs[0]
    assert run.data.tags["rlsparsity.kind"] == "diff" and run.data.tags["base_hash"].startswith("sha256:")
    assert run.data.metrics["total"] == known_pair["total"]
    assert run.data.metrics["sparsity/abs_1e-5"] == pytest.approx(1 - known_pair["expected"]["abs:1e-5"] / known_pair["total"])
    assert run.data.params["criteria"] == "bitwise,abs:1e-5"
    arts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "diff")}
    assert arts == {"diff/mask.arrow", "diff/result.json"}


@pytest.mark.slow
def test_ray_backend_matches_threads(known_pair: dict, tmp_path: Path) -> None:
    ray = pytest.importorskip("ray")
    local = diff(known_pair["base"], known_pair["target"], TABLE6, mask_path=tmp_path / "a.arrow")
    remote = diff(known_pair["base"], known_pair["target"], TABLE6, use_ray=True, mask_path=tmp_path / "b.arrow", rank=True)
    assert not ray.is_initialized()
    assert [t.changed for t in remote.tensors] == [t.changed for t in local.tensors]
    assert remote.base["hash"] == local.base["hash"]
    assert read_mask(tmp_path / "b.arrow").meta["checksum"] == read_mask(tmp_path / "a.arrow").meta["checksum"]
    assert remote.rank is not None and remote.rank.matrices


def test_reader_errors_name_the_file(tmp_path: Path) -> None:
    p = save_sharded(tmp_path / "m", {"a": torch.ones(10)}, shards=1)
    ck = open_checkpoint(p)
    info = ck.tensors["a"]
    f = Path(info.file)
    f.write_bytes(f.read_bytes()[: info.offset + 8])  # truncated after listing
    with ckpts.Reader() as r, pytest.raises(CheckpointError, match=str(f)):
        r.read(info, 0, 10)


def test_engine_runs_without_torch(known_pair: dict) -> None:
    """bf16/float32 pairs never import torch (fast start, small RSS) and use numpy's exact
    bf16 -> float32 conversion, which must give the same counts."""
    import subprocess
    import sys

    code = (
        "import json, sys\n"
        "from rlsparsity.analysis.diff import diff\n"
        f"r = diff({str(known_pair['base'])!r}, {str(known_pair['target'])!r}, {TABLE6!r}, unit_elems=128, workers=2)\n"
        "print(json.dumps({'changed': {str(c): r.changed(c) for c in r.criteria}, 'torch': 'torch' in sys.modules}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    res = json.loads(out)
    assert res == {"changed": known_pair["expected"], "torch": False}


def test_chunk_constants_agree() -> None:
    from rlsparsity.contracts import mask

    assert ckpts.CHUNK_ELEMS == mask.CHUNK_ELEMS


def test_unsupported_dtype_is_a_named_mismatch(tmp_path: Path) -> None:
    q = torch.ones(8, dtype=torch.float64)
    b, t = _pair(tmp_path, {"w": torch.ones(4), "q": q}, {"w": torch.ones(4), "q": q})
    # Rewrite q's dtype code in the target's header to a code rlsparsity does not know.
    for f in t.glob("*.safetensors"):
        raw = f.read_bytes()
        if b'"q"' in raw:
            f.write_bytes(raw.replace(b'"dtype":"F64"', b'"dtype":"C64"', 1))  # same byte size
    try:
        open_checkpoint(t)
    except CheckpointError:
        pytest.skip("this safetensors version rejects C64 headers")
    with pytest.raises(DiffError, match="q: unsupported dtype: base F64 vs target C64"):
        diff(b, t)
    r = diff(b, t, allow_mismatch=True, content_hash=True)
    assert r.total == 4 and r.target["hash"].startswith("sha256:")
