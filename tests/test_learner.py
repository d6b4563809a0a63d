"""The Learner without Ray: an in-process engine, a few GRPO and SFT steps, and checks of
what rank 0 produces against brute force (bf16 views compared with torch directly)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rlsparsity.contracts.mask import read_mask
from rlsparsity.platform.config import TrainingSpec
from rlsparsity.platform.engines import HFEngine, LocalRollout
from rlsparsity.platform.learner import Learner, LocalSink, run_learner
from rlsparsity.platform.models import load_model
from rlsparsity.platform.optimization import lr_schedule
from rlsparsity.sweeps.spec import SweepSpec


def _spec(algorithm: str, steps: int = 3):
    overrides = {"algorithm": algorithm, "seed": 0, "dataset": "add",
                 "training": {"steps": steps, "prompts_per_step": 4, "samples_per_prompt": 4, "eval_problems": 16,
                              "warmup_steps": 1, "masks": {"every": 2}}}
    (spec,) = SweepSpec(overrides).trials()
    return spec


@pytest.mark.parametrize("algorithm", ["grpo", "sft"])
def test_learner_runs_steps_without_ray(algorithm, embedded_model_dir, tmp_path):
    import ray

    spec = _spec(algorithm)
    engine = HFEngine(embedded_model_dir, threads=1)
    sink = LocalSink(tmp_path)
    learner = Learner(spec, embedded_model_dir, base={"id": "embedded", "hash": "h"}, target={"run_id": "local"},
                      rollout=lambda named: LocalRollout(engine, named), sink=sink)
    summary = run_learner(learner)
    assert not ray.is_initialized()
    assert [s for s, _ in sink.metrics] == [0, 1, 2, 3, 3]  # before, each step, the summary

    # The engine holds the bf16 view of the learner's masters, bit for bit, after the last sync.
    for name, p in learner.policy.named_parameters():
        assert torch.equal(engine.weights_bf16()[name], p.detach().to(torch.bfloat16).view(torch.int16)), name

    # The final mask equals a brute-force bf16 comparison against the checkpoint's bf16 view.
    theta0 = load_model(embedded_model_dir, dtype=torch.float32)
    mask = read_mask(tmp_path / "masks" / "final.arrow")
    assert {p.name for p in (tmp_path / "masks").glob("*.arrow")} == {"step_000002.arrow", "final.arrow"}
    series = {"masters", "abs_1e-5", "rel_0.001", "since_prev", "ever"}
    assert {p.name for p in (tmp_path / "masks").iterdir() if p.is_dir()} == series
    for s in series:
        assert {p.name for p in (tmp_path / "masks" / s).iterdir()} == {"step_000002.arrow", "final.arrow"}, s
    assert mask.meta["target"] == {"run_id": "local", "step": 3}
    bits = mask.to_dict()
    changed = 0
    for name, p in learner.policy.named_parameters():
        want = (p.detach().to(torch.bfloat16).view(torch.int16) != dict(theta0.named_parameters())[name].detach().to(torch.bfloat16).view(torch.int16)).numpy()
        np.testing.assert_array_equal(bits[name], want, err_msg=name)
        changed += int(want.sum())
    assert changed > 0
    assert summary["final/changed_bf16"] == changed
    assert summary["final/sparsity_bf16"] == pytest.approx(1 - changed / mask.total_elems)
    for key in ("test_accuracy_before", "test_accuracy_after", "train_loss_first", "train_loss_last", "sync_bytes_total"):
        assert key in summary, key
    assert ("train_reward_first" in summary) == (algorithm == "grpo")


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
@pytest.mark.parametrize("warmup", [0, 3])
def test_lr_schedule_warms_up_without_a_zero_step_and_decays_to_zero(schedule, warmup):
    """The factor of optimizer step i (from 0): (i + 1) / (warmup + 1) during warmup, then the
    schedule over the remaining steps, written out independently here."""
    t = TrainingSpec(steps=10, warmup_steps=warmup, lr_schedule=schedule, lr=0.5)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=t.lr)
    sched = lr_schedule(opt, t)
    got = []
    for _ in range(t.steps):
        got.append(opt.param_groups[0]["lr"] / t.lr)
        opt.step()
        sched.step()
    want = []
    for i in range(t.steps):
        if i < warmup:
            want.append((i + 1) / (warmup + 1))
            continue
        frac = (i - warmup) / (t.steps - warmup)
        want.append({"constant": 1.0, "linear": 1.0 - frac, "cosine": 0.5 * (1 + math.cos(math.pi * frac))}[schedule])
    assert got == pytest.approx(want, rel=1e-12, abs=1e-15)
    assert min(got) > 0


def test_gradient_checkpointing_trains_the_same_weights(embedded_model_dir, tmp_path):
    """training.gradient_checkpointing recomputes activations in the backward; the updates,
    and so the weights and the masks, are the same bit for bit."""
    weights = {}
    for on in (False, True):
        spec = _spec("grpo", steps=2)
        spec = spec.model_copy(update={"training": spec.training.model_copy(update={"gradient_checkpointing": on})})
        engine = HFEngine(embedded_model_dir, threads=1)
        learner = Learner(spec, embedded_model_dir, base={"id": "embedded", "hash": "h"},
                          rollout=lambda named, engine=engine: LocalRollout(engine, named), sink=LocalSink(tmp_path / str(on)))
        run_learner(learner)
        assert learner.policy.is_gradient_checkpointing == on
        weights[on] = {n: p.detach().clone() for n, p in learner.policy.named_parameters()}
    assert all(torch.equal(weights[True][n], weights[False][n]) for n in weights[False])
    assert any(not torch.equal(weights[True][n], p.detach()) for n, p in load_model(embedded_model_dir).named_parameters())
    masks = [read_mask(tmp_path / str(on) / "masks" / "final.arrow").meta["checksum"] for on in (False, True)]
    assert masks[0] == masks[1]


def test_micro_batches_train_the_whole_batch_step(embedded_model_dir, tmp_path):
    """training.micro_batch_size runs each step's 16 sequences in blocks of 6, 5 and 5 and
    accumulates their gradients: the same step up to float32 summation order (the exact
    gradient identity, per algorithm, is in test_micro_batches.py)."""
    runs = {}
    for micro in (None, 6):
        spec = _spec("grpo", steps=2)
        spec = spec.model_copy(update={"training": spec.training.model_copy(update={"micro_batch_size": micro})})
        engine = HFEngine(embedded_model_dir, threads=1)
        sink = LocalSink(tmp_path / str(micro))
        learner = Learner(spec, embedded_model_dir, base={"id": "embedded", "hash": "h"},
                          rollout=lambda named, engine=engine: LocalRollout(engine, named), sink=sink)
        summary = run_learner(learner)
        runs[micro] = summary, {n: p.detach().clone() for n, p in learner.policy.named_parameters()}, sink.metrics
    (whole, w_whole, m_whole), (micro, w_micro, m_micro) = runs[None], runs[6]
    theta0 = dict(load_model(embedded_model_dir).named_parameters())
    moved = max((w_whole[n] - theta0[n].detach()).abs().max().item() for n in w_whole)
    apart = max((w_micro[n] - w_whole[n]).abs().max().item() for n in w_whole)
    print(f"largest update {moved:.3g}, largest micro-vs-whole difference {apart:.3g}")
    assert moved > 1e-4 and apart < 1e-3 * moved
    assert m_micro[1][1]["loss"] == pytest.approx(m_whole[1][1]["loss"], rel=1e-5)
    assert micro["final/changed_bf16"] == pytest.approx(whole["final/changed_bf16"], rel=1e-3)
