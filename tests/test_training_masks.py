"""The training masks of issue 13, each against an independent reference:

- every bf16-view criterion's mask equals `rlsparsity diff` on the trial's saved weights
  against θ0's bf16 checkpoint (the same criteria code, a different path to the data);
- the masters mask, the dynamics (against the previous mask step, ever changed) and the
  drift histogram equal brute force over weights snapshotted after every step;
- sgd and pure-bf16 learners train, and their masks are exact.
All Ray-free: the Learner with an in-process engine.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rlsparsity.analysis.diff.engine import diff
from rlsparsity.analysis.drift import HIGH_EXP, LOW_EXP, Drift
from rlsparsity.analysis.dynamics import dynamics_from_dir
from rlsparsity.contracts.mask import read_mask
from rlsparsity.platform.engines import HFEngine, LocalRollout
from rlsparsity.platform.learner import Learner, LocalSink
from rlsparsity.platform.models import load_model, load_tokenizer
from rlsparsity.platform.models.saving import save_bf16_model
from rlsparsity.sweeps.spec import SweepSpec

CRITERIA = "bitwise masters abs:1e-5 rel:1e-3 paper:1e-5"


def _run(model_dir, out, steps=4, every=2, **training):
    raw = {"algorithm": "grpo", "seed": 0, "dataset": "add",
           "training": {"steps": steps, "prompts_per_step": 4, "samples_per_prompt": 4, "eval_problems": 8,
                        "masks": {"every": every, "criteria": CRITERIA}, **training}}
    (spec,) = SweepSpec(raw).trials()
    engine = HFEngine(model_dir, threads=1)
    learner = Learner(spec, model_dir, base={"id": "embedded", "hash": "h"}, target={"run_id": "local"},
                      rollout=lambda named: LocalRollout(engine, named), sink=LocalSink(out))
    views: list[dict[str, torch.Tensor]] = []  # the masters after every step (index 0: θ0)

    def snapshot(_step, _metrics):
        views.append({n: p.detach().clone() for n, p in learner.policy.named_parameters()})

    learner.setup()
    views.append({n: p.detach().clone() for n, p in learner.policy.named_parameters()})
    for step in range(1, steps + 1):
        snapshot(step, learner.step(step))
    summary = learner.finish()
    return learner, engine, views, summary


def _bits(t: torch.Tensor) -> np.ndarray:
    return t.to(torch.bfloat16).view(torch.int16).numpy()


@pytest.fixture(scope="module")
def fp32_run(embedded_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("fp32-run")
    return out, *_run(embedded_model_dir, out)


def test_every_bf16_criterion_equals_diff_on_the_saved_weights(fp32_run, embedded_model_dir, tmp_path):
    out, learner, _engine, _views, summary = fp32_run
    # θ0 as a released checkpoint holds it: the bf16 view of the model directory.
    theta0_dir = tmp_path / "theta0"
    save_bf16_model(load_model(embedded_model_dir, dtype=torch.float32), load_tokenizer(embedded_model_dir), theta0_dir)
    for spec, folder in (("bitwise", "masks"), ("abs:1e-5", "masks/abs_1e-5"), ("rel:1e-3", "masks/rel_0.001"),
                         ("paper:1e-5", "masks/paper_1e-5")):
        result = diff(theta0_dir, out / "weights", [spec], workers=1, mask_path=tmp_path / f"{spec}.arrow")
        want = read_mask(tmp_path / f"{spec}.arrow").to_dict()
        got = read_mask(out / folder / "final.arrow")
        assert got.meta["criterion"]["spec"] == spec.replace("1e-3", "0.001")
        assert got.total_elems == result.total, spec
        assert got.total_changed == result.changed(result.criteria[0]), spec
        got_bits = got.to_dict()
        assert got_bits.keys() == want.keys(), spec
        for name in want:
            np.testing.assert_array_equal(got_bits[name], want[name], err_msg=f"{spec}: {name}")
        slug = folder.rpartition("/")[2] if "/" in folder else "bf16"
        assert summary[f"final/sparsity_{slug}"] == pytest.approx(result.sparsity(result.criteria[0]), abs=0, rel=1e-12)
    # The criteria nest as they must: abs and rel changes are bitwise changes.
    assert summary["final/sparsity_abs_1e-5"] >= summary["final/sparsity_bf16"]
    assert summary["final/sparsity_rel_0.001"] >= summary["final/sparsity_bf16"]


def test_masters_and_dynamics_masks_equal_brute_force(fp32_run):
    out, learner, _engine, views, summary = fp32_run
    theta0, at2, at4 = views[0], views[2], views[4]
    ever = {n: np.zeros(t.numel(), bool) for n, t in theta0.items()}
    for before, after in zip(views, views[1:], strict=False):
        for n in ever:
            ever[n] |= (_bits(before[n]) != _bits(after[n])).reshape(-1)
    for n in theta0:
        assert not np.array_equal(_bits(theta0[n]), _bits(at4[n])) or n.endswith("norm.weight"), n
    expect = {
        "masters/step_000002.arrow": {n: (at2[n] != theta0[n]).numpy() for n in theta0},
        "masters/final.arrow": {n: (at4[n] != theta0[n]).numpy() for n in theta0},
        "since_prev/step_000002.arrow": {n: _bits(at2[n]) != _bits(theta0[n]) for n in theta0},
        "since_prev/final.arrow": {n: _bits(at4[n]) != _bits(at2[n]) for n in theta0},
        "ever/final.arrow": {n: ever[n].reshape(theta0[n].shape) for n in theta0},
    }
    for file, masks in expect.items():
        got = read_mask(out / "masks" / file).to_dict()
        for n, want in masks.items():
            np.testing.assert_array_equal(got[n].reshape(-1), want.reshape(-1), err_msg=f"{file}: {n}")
    total = sum(t.numel() for t in theta0.values())
    final = {n: _bits(at4[n]) != _bits(theta0[n]) for n in theta0}
    n_ever = sum(int(e.sum()) for e in ever.values())
    n_final = sum(int(f.sum()) for f in final.values())
    assert summary["final/changed_frac_ever"] == n_ever / total
    assert summary["final/reverted_frac_of_ever"] == (n_ever - n_final) / n_ever
    assert 0 < n_final <= n_ever  # what differs from θ0 at the end changed at some step
    assert summary["final/changed_frac_masters"] == sum(int((at4[n] != theta0[n]).sum()) for n in theta0) / total
    # `rlsparsity dynamics` on the trial's masks gives what the learner logged.
    dyn = dynamics_from_dir(out / "masks")
    assert dyn.steps == [2, 4]
    assert dyn.consecutive_changed[-1] == pytest.approx(summary["final/changed_frac_since_prev"], rel=1e-14)
    assert dyn.in_final == pytest.approx(n_final / total, rel=1e-14)
    assert dyn.reverted_of_ever == pytest.approx(summary["final/reverted_frac_of_ever"], rel=1e-14)


def _half_ulp(x: np.ndarray) -> np.ndarray:
    """Half the gap from |x| (bf16) to the next bf16 value up, by stepping its bit pattern."""
    bits = np.abs(x.astype(np.float32)).view(np.uint32) >> 16
    up = ((bits + 1) << 16).astype(np.uint32).view(np.float32).astype(np.float64)
    return (up - np.abs(x.astype(np.float64))) / 2


def test_drift_histogram_equals_brute_force(fp32_run):
    out, learner, _engine, views, summary = fp32_run
    theta0, prev, last = views[0], views[3], views[4]
    zero_a = zero_b = 0
    bins_a = np.zeros(HIGH_EXP - LOW_EXP + 1, np.int64)
    bins_b = np.zeros_like(bins_a)
    vanished = updated = 0
    for n in theta0:
        t0 = theta0[n].to(torch.bfloat16).float().numpy().reshape(-1)
        half = _half_ulp(t0)
        for d, bins, which in ((last[n].numpy().reshape(-1) - t0, bins_a, "a"),
                               (last[n].numpy().reshape(-1) - prev[n].numpy().reshape(-1), bins_b, "b")):
            r = np.abs(d.astype(np.float64)) / half
            k = np.floor(np.log2(r[r > 0])).astype(np.int64)
            np.add.at(bins, np.clip(k, LOW_EXP, HIGH_EXP) - LOW_EXP, 1)
            if which == "a":
                zero_a += int((r == 0).sum())
            else:
                zero_b += int((r == 0).sum())
        moved = (last[n] != prev[n]).numpy().reshape(-1)
        updated += int(moved.sum())
        vanished += int((moved & (_bits(last[n]) == _bits(prev[n])).reshape(-1)).sum())
    got = learner.last_drift
    assert (got.since_theta0.zero, got.since_theta0.bins) == (zero_a, bins_a.tolist())
    assert (got.last_step.zero, got.last_step.bins) == (zero_b, bins_b.tolist())
    assert (got.step_updated, got.step_vanished) == (updated, vanished)
    assert got.metrics()["drift/step_update_vanished_frac"] == vanished / updated
    table = (out / "drift" / "final.csv").read_text().splitlines()
    assert table[0].startswith("|Δ| / half-ulp(θ0)") and len(table) == 2 + len(bins_a)
    assert (out / "drift" / "final.png").stat().st_size > 0


def test_fused_drift_kernel_equals_the_torch_path_on_edge_values():
    """The learner's fused numba pass (CPU float32 masters, the brute-force test above) and the
    torch ops (CUDA, bf16 masters) count alike where the bit tricks could differ: θ0 = 0, bf16
    subnormal θ0 and Δ, float32 subnormal Δ, ±0, NaN and ±inf, and every bin."""
    g = torch.Generator().manual_seed(0)
    n = 200_000
    t0 = torch.randn(n, generator=g) * 0.05
    t0[:1000], t0[1000:2000], t0[2000:3000], t0[3000:3100] = 0.0, 1e-39, 3e-35, -(2.0**-126)
    t0 = t0.to(torch.bfloat16)
    prev = t0.float() + torch.randn(n, generator=g) * 1e-4 * (torch.rand(n, generator=g) < 0.3)
    cur = prev + torch.randn(n, generator=g) * 10.0 ** torch.randint(-9, -2, (n,), generator=g) * (torch.rand(n, generator=g) < 0.3)
    cur[5000:5010], cur[5010:5020], cur[5020:5030] = float("nan"), float("inf"), float("-inf")
    cur[6000:6100], prev[6000:6050], cur[6100:6200] = 1e-45, -0.0, 3e-42
    fused, plain = Drift(1), Drift(1)
    fused.add(t0, prev, cur)
    plain.add(t0, prev, cur, fused=False)
    assert fused.to_json() == plain.to_json()
    assert all(fused.since_theta0.bins) and all(fused.last_step.bins) and 0 < fused.step_vanished < fused.step_updated


@pytest.mark.parametrize("setting", [{"optimizer": "sgd", "lr": 0.5}, {"precision": "bf16"}, {"precision": "amp"}])
def test_sgd_and_pure_bf16_learners_train_and_their_masks_are_exact(setting, embedded_model_dir, tmp_path):
    learner, engine, views, summary = _run(embedded_model_dir, tmp_path, steps=2, every=2, **setting)
    params = dict(learner.policy.named_parameters())
    opt = learner.optimized[0].optimizer
    if "optimizer" in setting:
        assert isinstance(opt, torch.optim.SGD) and opt.param_groups[0]["momentum"] == 0.9
        assert all(p.dtype == torch.float32 for p in params.values())
    elif setting["precision"] == "amp":  # float32 masters, bf16 autocast
        assert all(p.dtype == torch.float32 for p in params.values())
        assert all(v.dtype == torch.float32 for st in opt.state.values() for k, v in st.items() if k != "step")
    else:
        assert all(p.dtype == torch.bfloat16 for p in params.values())
        assert all(v.dtype == torch.bfloat16 for st in opt.state.values() for k, v in st.items() if k != "step")
    assert math.isfinite(summary["train_loss_last"])
    mask = read_mask(tmp_path / "masks" / "final.arrow").to_dict()
    masters = read_mask(tmp_path / "masks" / "masters" / "final.arrow").to_dict()
    changed = 0
    for n, p in params.items():
        want = _bits(p.detach()) != _bits(views[0][n])
        np.testing.assert_array_equal(mask[n].reshape(-1), want.reshape(-1), err_msg=n)
        np.testing.assert_array_equal(masters[n].reshape(-1), (p.detach() != views[0][n]).numpy().reshape(-1), err_msg=n)
        # The engine holds the bf16 view, bit for bit.
        assert np.array_equal(engine.weights_bf16()[n].numpy(), _bits(p.detach())), n
        changed += int(want.sum())
    assert changed > 0, "the learner changed no weight"
    if setting.get("precision") == "bf16":  # bf16 masters: the masters mask is the bf16 mask
        assert summary["final/changed_frac_masters"] == summary["final/changed_frac_bf16"]


def test_bad_mask_criteria_and_optimizer_knobs_are_refused():
    from rlsparsity.sweeps.spec import SpecError

    for bad, needle in (
        ({"masks": {"criteria": "abs:1e-5 bitwise"}}, "first criterion must be bitwise"),
        ({"masks": {"criteria": "bitwise abs:x"}}, "'x' is not a number"),
        ({"masks": {"criteria": "bitwise fuzzy:1"}}, "expected bitwise, masters"),
        ({"momentum": 0.5}, "momentum: applies to optimizer sgd"),
        ({"optimizer": "adam"}, "training.optimizer"),
        ({"precision": "fp16"}, "training.precision"),
    ):
        with pytest.raises(SpecError, match=needle):
            SweepSpec({"training": bad})
    (t,) = SweepSpec({"training": {"masks": {"criteria": "bitwise, abs:1e-5,1e-6 masters"}}}).trials()
    assert t.training.masks.criteria == "bitwise abs:1e-5 abs:1e-6 masters"
