from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM, PreTrainedTokenizerFast

from rlsparsity.platform import models
from rlsparsity.platform.models import (
    REQUIRED_FILES,
    build_tokenizer,
    ensure_embedded_model,
    get_recipe,
    load_model,
    load_tokenizer,
    model_content_hash,
    recipe_hash,
    resolve_model,
)
from rlsparsity.platform.models import cache as model_cache
from rlsparsity.platform.tasks import TASKS

# The "fair share" band: the base model must solve part of each task, leaving RL room.
FAIR_SHARE = (0.15, 0.8)


# ----------------------------------------------------------------------------- tokenizer


def test_tokenizer_is_fast_and_roundtrips() -> None:
    tok = build_tokenizer()
    assert isinstance(tok, PreTrainedTokenizerFast)
    assert (tok.pad_token, tok.bos_token, tok.eos_token, tok.unk_token) == models.SPECIAL_TOKENS
    assert tok.padding_side == "left"
    for text in ["12+345=", "Q: what is 12 plus 345?\nA: 357", "~!@#$%^&*()_{}|\t"]:
        ids = tok(text)["input_ids"]
        assert ids[0] == tok.bos_token_id
        assert tok.unk_token_id not in ids
        assert len(ids) == len(text) + 1  # character level
        assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok("ab", add_special_tokens=False)["input_ids"] == [
        tok.convert_tokens_to_ids("a"),
        tok.convert_tokens_to_ids("b"),
    ]


def test_tokenizer_save_load(tmp_path: Path) -> None:
    tok = build_tokenizer()
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert isinstance(loaded, PreTrainedTokenizerFast)
    assert loaded.padding_side == "left"
    assert loaded.get_vocab() == tok.get_vocab()
    texts = ["1+2=", "Q: what is 7 times 8?\nA:"]
    assert loaded(texts, padding=True)["input_ids"] == tok(texts, padding=True)["input_ids"]
    batch = loaded(texts, padding=True)
    assert batch["input_ids"][0][0] == loaded.pad_token_id  # left padding
    assert loaded.decode(loaded(texts[1])["input_ids"], skip_special_tokens=True) == texts[1]
    assert load_tokenizer(tmp_path).get_vocab() == tok.get_vocab()


# ----------------------------------------------------------------------------- recipe


def test_recipe_hash_is_process_independent() -> None:
    import subprocess
    import sys

    code = "from rlsparsity.platform.models import *; print(recipe_hash(get_recipe('tiny-arith')))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == recipe_hash(get_recipe("tiny-arith"))


def test_recipe_hash_stable_and_sensitive() -> None:
    r = get_recipe("tiny-arith")
    h = recipe_hash(r)
    assert len(h) == 64 and h == recipe_hash(get_recipe("tiny-arith"))
    changed = models.Recipe(
        name=r.name, arch=r.arch, train=models.TrainRecipe(**{**r.train.__dict__, "seed": 99})
    )
    assert recipe_hash(changed) != h
    assert set(n for n, _ in r.train.tasks) <= set(TASKS)
    json.dumps(r.to_dict())
    with pytest.raises(ValueError, match="tiny-arith"):
        get_recipe("huge-arith")


def test_llama_config_is_tiny_and_tied() -> None:
    r = get_recipe("tiny-arith")
    cfg = models.llama_config(r, build_tokenizer())
    assert cfg.tie_word_embeddings
    assert 64 <= cfg.hidden_size <= 128 and 2 <= cfg.num_hidden_layers <= 4
    assert cfg.vocab_size == len(build_tokenizer())


# ----------------------------------------------------------------------------- cache logic
# These tests replace the pretraining with a fast fake build, to check the cache rules
# (reuse, atomic publish, rejection of partial directories, locking) in milliseconds.


def _fake_build(calls: list[Path], delay: float = 0.0, fail: bool = False, log_every: list[int] | None = None):
    def build(recipe: models.Recipe, out_dir: Path, *, log_every: int = 0, _seen=log_every) -> dict:
        calls.append(out_dir)
        if _seen is not None:
            _seen.append(log_every)
        time.sleep(delay)
        for f in REQUIRED_FILES:
            (out_dir / f).write_text("{}")
        (out_dir / "recipe.json").write_text(json.dumps({"hash": recipe_hash(recipe)}))
        if fail:
            raise RuntimeError("simulated crash mid-build")
        return {}

    return build


def test_cache_reuse_and_location(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []
    monkeypatch.setattr(model_cache, "build_embedded_model", _fake_build(calls))
    monkeypatch.setenv("RLSPARSITY_CACHE", str(tmp_path))
    p1 = ensure_embedded_model()
    assert p1.parent == tmp_path / "models"
    assert p1.name == f"tiny-arith-{recipe_hash(get_recipe('tiny-arith'))[:12]}"
    assert len(calls) == 1 and calls[0].parent == p1.parent and calls[0] != p1
    p2 = ensure_embedded_model()
    assert p2 == p1 and len(calls) == 1
    # Explicit cache_dir wins over the environment.
    p3 = ensure_embedded_model(cache_dir=tmp_path / "other")
    assert p3.parent == tmp_path / "other" / "models" and len(calls) == 2
    # No temp directories are left behind.
    assert not [x for x in p1.parent.iterdir() if ".tmp-" in x.name]
    # The build lock is a file next to the model, left in place for the next builder.
    assert (p1.parent / f".{p1.name}.lock").is_file()
    # Published with umask-based modes (mkdtemp's 0700 would hide it from other users).
    umask = os.umask(0)
    os.umask(umask)
    assert p1.stat().st_mode & 0o777 == 0o777 & ~umask
    assert (p1 / "config.json").stat().st_mode & 0o777 == 0o666 & ~umask


def test_a_build_announces_itself_and_reports_progress(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    seen: list[int] = []
    monkeypatch.setattr(model_cache, "build_embedded_model", _fake_build([], log_every=seen))
    path = ensure_embedded_model(cache_dir=tmp_path)
    steps = get_recipe("tiny-arith").train.steps
    assert seen == [steps // 10]
    assert f"building the embedded model tiny-arith (θ0) once into {path}: {steps} pretraining steps" in capsys.readouterr().out
    ensure_embedded_model(cache_dir=tmp_path)  # cached: not a word
    assert capsys.readouterr().out == "" and seen == [steps // 10]
    ensure_embedded_model(cache_dir=tmp_path / "quiet", log_every=0)
    assert capsys.readouterr().out == "" and seen[-1] == 0


def test_partial_directory_is_not_accepted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []
    monkeypatch.setattr(model_cache, "build_embedded_model", _fake_build(calls))
    final = models.embedded_model_dir("tiny-arith", tmp_path)
    final.mkdir(parents=True)
    (final / "config.json").write_text("{}")  # looks like a model dir, but half of it
    (final / "junk").write_text("x")
    assert not models.is_complete(final, get_recipe("tiny-arith"))
    assert ensure_embedded_model(cache_dir=tmp_path) == final
    assert len(calls) == 1
    assert not (final / "junk").exists()
    assert models.is_complete(final, get_recipe("tiny-arith"))


def test_wrong_recipe_hash_is_not_accepted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []
    monkeypatch.setattr(model_cache, "build_embedded_model", _fake_build(calls))
    final = models.embedded_model_dir("tiny-arith", tmp_path)
    final.mkdir(parents=True)
    for f in REQUIRED_FILES:
        (final / f).write_text("{}")
    (final / "recipe.json").write_text(json.dumps({"hash": "0" * 64}))
    ensure_embedded_model(cache_dir=tmp_path)
    assert len(calls) == 1


def test_crash_leaves_no_complete_looking_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[Path] = []
    monkeypatch.setattr(model_cache, "build_embedded_model", _fake_build(calls, fail=True))
    with pytest.raises(RuntimeError, match="simulated"):
        ensure_embedded_model(cache_dir=tmp_path)
    final = models.embedded_model_dir("tiny-arith", tmp_path)
    assert not final.exists()
    assert not [x for x in final.parent.iterdir() if ".tmp-" in x.name]
    # Stale temp dirs from a builder killed outright are swept by the next builder.
    stale = final.parent / f".{final.name}.tmp-dead"
    stale.mkdir()
    monkeypatch.setattr(model_cache, "build_embedded_model", _fake_build(calls))
    assert ensure_embedded_model(cache_dir=tmp_path) == final
    assert not stale.exists()


def test_concurrent_builders_build_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []
    monkeypatch.setattr(model_cache, "build_embedded_model", _fake_build(calls, delay=0.3))
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(ensure_embedded_model(cache_dir=tmp_path)))
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert len(set(results)) == 1 and len(results) == 3


# ----------------------------------------------------------------------------- resolution


def test_resolve_local_dir(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model(str(tmp_path)) == tmp_path.resolve()


@pytest.mark.parametrize("model_id", ["/no/such/dir", "gpt2", "not a/model id"])
def test_resolve_rejects_unknown(model_id: str) -> None:
    # Hub ids (org/name) resolve through huggingface_hub: tests/test_model_ids.py.
    with pytest.raises(ValueError) as e:
        resolve_model(model_id)
    msg = str(e.value)
    assert model_id in msg and "config.json" in msg and "embedded:" in msg


def test_resolve_rejects_dir_without_config(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no config.json"):
        resolve_model(str(tmp_path))


def test_resolve_unknown_embedded_name() -> None:
    with pytest.raises(ValueError, match="unknown embedded model"):
        resolve_model("embedded:nope")


# ----------------------------------------------------------------------------- content hash


def test_model_content_hash_matches_diff_and_tracks_the_bytes(tmp_path: Path) -> None:
    from rlsparsity.analysis.checkpoint_hash import content_hash
    from rlsparsity.analysis.checkpoints import CheckpointError, open_checkpoint

    model = LlamaForCausalLM(models.llama_config(get_recipe("tiny-arith"), build_tokenizer()))
    model.save_pretrained(tmp_path)
    h = model_content_hash(tmp_path)
    assert h.startswith("sha256:") and h == content_hash(open_checkpoint(tmp_path))
    with torch.no_grad():
        model.model.norm.weight[0] += 1.0
    model.save_pretrained(tmp_path)
    assert model_content_hash(tmp_path) != h
    with pytest.raises(CheckpointError, match="nothing-here"):
        model_content_hash(tmp_path / "nothing-here")


# ----------------------------------------------------------------------------- the real build


@pytest.mark.slow
def test_embedded_model_build_and_reuse(embedded_model_dir: Path) -> None:
    d = embedded_model_dir
    assert d.parent == Path(os.environ["RLSPARSITY_CACHE"]) / "models"
    for f in REQUIRED_FILES:
        assert (d / f).is_file(), f
    assert not list(d.glob("*.bin")) and not list(d.glob("*.pt"))  # no pickle
    ev = json.loads((d / "eval.json").read_text())
    recipe = get_recipe("tiny-arith")
    assert set(ev["accuracy"]) == {n for n, _ in recipe.train.tasks}
    for name, acc in ev["accuracy"].items():
        assert FAIR_SHARE[0] <= acc <= FAIR_SHARE[1], (name, acc)
    meta = json.loads((d / "recipe.json").read_text())
    assert meta["hash"] == recipe_hash(recipe)

    mtime = (d / "model.safetensors").stat().st_mtime_ns
    t0 = time.perf_counter()
    again = ensure_embedded_model("tiny-arith")
    assert again == d
    assert time.perf_counter() - t0 < 5.0
    assert (d / "model.safetensors").stat().st_mtime_ns == mtime
    assert resolve_model("embedded:tiny-arith") == d
    assert resolve_model("embedded") == d


@pytest.mark.slow
def test_load_embedded(embedded_model_dir: Path) -> None:
    model = load_model(embedded_model_dir)
    tok = load_tokenizer(embedded_model_dir)
    assert isinstance(tok, PreTrainedTokenizerFast)
    assert not model.training
    assert model.config.tie_word_embeddings
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight
    assert next(model.parameters()).dtype == torch.float32
    assert model_content_hash(embedded_model_dir).startswith("sha256:")
    bf16 = load_model(embedded_model_dir, dtype=torch.bfloat16)
    assert next(bf16.parameters()).dtype == torch.bfloat16
