"""Subnetwork-only training: random masks, the refusals, and bit-identity outside the mask
(float32 masters and bf16 view, with weight decay) for one algorithm of each batch source."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydantic
import pytest
import torch

from rlsparsity.contracts.mask import MaskError, MaskWriter
from rlsparsity.contracts.mlflow_layout import WEIGHTS_DIR, WEIGHTS_MANIFEST
from rlsparsity.platform.config import SubnetworkSpec
from rlsparsity.platform.engines import HFEngine, LocalRollout
from rlsparsity.platform.learner import Learner, LocalSink, run_learner
from rlsparsity.platform.models import load_model
from rlsparsity.platform.models.saving import verify_weights_dir
from rlsparsity.platform.subnetwork import SubnetworkMask, random_mask
from rlsparsity.sweeps.spec import SweepSpec

SHAPES = [("a", (3, 5)), ("b", (1000,)), ("c", (7, 7, 2)), ("d", (1,))]
BASE = {"id": "embedded", "hash": "sha256:theta0"}


@pytest.mark.parametrize("density", [0.01, 0.3, 1.0])
def test_random_global_mask_has_exactly_the_requested_count(density):
    m = random_mask(SHAPES, density, seed=3, draw="global")
    total = sum(int(np.prod(s)) for _, s in SHAPES)
    assert {k: v.shape for k, v in m.items()} == dict(SHAPES)
    assert sum(int(v.sum()) for v in m.values()) == round(density * total)


@pytest.mark.parametrize("density", [0.01, 0.3, 1.0])
def test_random_per_tensor_mask_has_the_share_in_every_tensor(density):
    m = random_mask(SHAPES, density, seed=3, draw="per_tensor")
    for name, shape in SHAPES:
        assert int(m[name].sum()) == round(density * int(np.prod(shape))), name


@pytest.mark.parametrize("draw", ["global", "per_tensor"])
def test_random_masks_are_a_function_of_the_seed(draw):
    a, b, c = (random_mask(SHAPES, 0.2, seed=s, draw=draw) for s in (7, 7, 8))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not all(np.array_equal(a[k], c[k]) for k in a)


def test_global_draw_is_not_per_tensor():
    """One draw over all entries: tensors' shares vary (b holds 1000 of 1114 entries)."""
    m = random_mask(SHAPES, 0.5, seed=0, draw="global")
    shares = [m[k].mean() for k in ("a", "b", "c")]
    assert max(shares) - min(shares) > 0.02


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"random": {"density": 0.0}}, "greater than 0"),
        ({"random": {"density": 1.5}}, "less than or equal to 1"),
        ({"random": {"seed": 1}}, "no mask source"),
        ({}, "no mask source"),
        ({"mask": "m.arrow", "run": "abc"}, "one mask source"),
        ({"experiment": "e"}, "give both or neither"),
        ({"mask": "m.arrow", "step": 3}, "needs run or experiment/trial"),
        ({"run": "abc", "complement": True, "random": {"density": 0.1}}, "complement applies to a learned mask"),
    ],
)
def test_subnetwork_spec_refusals(raw, message):
    with pytest.raises(pydantic.ValidationError, match=message):
        SubnetworkSpec.model_validate(raw)


def test_kinds():
    assert SubnetworkSpec(mask="m").kind == "learned"
    assert SubnetworkSpec(mask="m", complement=True).kind == "complement"
    assert SubnetworkSpec(mask="m", random={"draw": "per_tensor"}).kind == "random_per_tensor"
    assert SubnetworkSpec(random={"density": 0.1}).kind == "random_global"


def test_masking_the_gradient_alone_lets_adamw_decay_move_frozen_entries():
    """Why the decay is taken out of AdamW: the naive way fails the invariant, ours holds it."""
    torch.manual_seed(0)
    theta0 = torch.randn(64)
    keep = torch.rand(64) < 0.25

    def run(ours: bool) -> torch.Tensor:
        p = torch.nn.Parameter(theta0.clone())
        opt = torch.optim.AdamW([p], lr=1e-2, weight_decay=0.0 if ours else 0.1)
        sub = SubnetworkMask([("p", p)], {"p": keep.numpy()})
        for _ in range(5):
            opt.zero_grad()
            (p**3).sum().backward()
            sub.mask_grads()
            if ours:
                sub.decay(1e-2, 0.1)
            opt.step()
        return p.detach()

    naive, ours = run(False), run(True)
    assert (naive.view(torch.int32) != theta0.view(torch.int32))[~keep].any()
    assert torch.equal(ours.view(torch.int32)[~keep], theta0.view(torch.int32)[~keep])
    assert (ours != theta0)[keep].all()


def _spec(algorithm: str, subnetwork: dict, steps: int = 3):
    overrides = {"algorithm": algorithm, "seed": 0, "dataset": "add",
                 "training": {"steps": steps, "prompts_per_step": 4, "samples_per_prompt": 4, "eval_problems": 8,
                              "weight_decay": 0.1, "lr": 1e-3, "masks": {"every": 1}, "subnetwork": subnetwork},
                 "algorithm_config": {"dpo": {"pairs": "best_vs_worst"}}}
    (spec,) = SweepSpec(overrides).trials()
    return spec


def _bits(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.detach().to(dtype).view(torch.int32 if dtype == torch.float32 else torch.int16)


@pytest.mark.parametrize("algorithm", ["grpo", "dpo", "sft"])  # rollouts, pairs, dataset
def test_entries_outside_the_mask_stay_bit_identical_at_every_step(algorithm, embedded_model_dir, tmp_path):
    spec = _spec(algorithm, {"random": {"density": 0.05, "seed": 1, "draw": "per_tensor"}})
    engine = HFEngine(embedded_model_dir, threads=1)
    learner = Learner(spec, embedded_model_dir, base=BASE, target={"run_id": "local"},
                      rollout=lambda named: LocalRollout(engine, named), sink=LocalSink(tmp_path))
    learner.setup()
    # θ0 as the learner starts from it: the bf16 view of the checkpoint, held in float32.
    theta0 = {n: p.detach().to(torch.bfloat16).float() for n, p in load_model(embedded_model_dir).named_parameters()}
    keep = dict(zip(learner.subnet.names, learner.subnet.masks, strict=True))
    moved_inside = 0
    for step in range(1, spec.training.steps + 1):
        learner.step(step)
        for name, p in learner.policy.named_parameters():
            for dtype in (torch.float32, torch.bfloat16):
                same = _bits(p, dtype) == _bits(theta0[name], dtype)
                assert same[~keep[name]].all(), (algorithm, step, name, dtype)
            moved_inside += int((~same[keep[name]]).sum())
    assert moved_inside > 0  # the subnetwork itself did train
    summary = learner.finish()
    assert summary["final/changed_bf16"] <= learner.subnet.size


def test_a_learned_mask_of_another_base_is_refused(embedded_model_dir, tmp_path):
    path = tmp_path / "other.arrow"
    with MaskWriter(path, criterion={"mode": "bitwise"}, dtype="bfloat16", base={"id": "x", "hash": "sha256:other"}, target={}) as w:
        w.add("x", (1,), np.ones(1, bool))
    spec = _spec("sft", {"mask": str(path)})
    learner = Learner(spec, embedded_model_dir, base=BASE, rollout=lambda named: None, subnetwork_mask=path)
    with pytest.raises(MaskError, match="against base sha256:other but this trial trains base sha256:theta0"):
        learner.setup()


def test_a_learned_mask_trains_only_its_entries_and_the_weights_are_saved(embedded_model_dir, tmp_path):
    """Full SFT trial -> its final mask -> a subnetwork trial from it: the subnetwork run's
    changed entries are a subset of the mask; both trials' saved weights load back and match
    the learner's bf16 view."""
    engine = HFEngine(embedded_model_dir, threads=1)
    full_spec = SweepSpec({"algorithm": "sft", "seed": 0, "dataset": "add",
                           "training": {"steps": 2, "prompts_per_step": 4, "eval_problems": 8}}).trials()[0]
    full = Learner(full_spec, embedded_model_dir, base=BASE, rollout=lambda named: LocalRollout(engine, named), sink=LocalSink(tmp_path / "full"))
    run_learner(full)
    mask_path = tmp_path / "full" / "masks" / "final.arrow"

    sub_spec = _spec("sft", {"mask": str(mask_path)}, steps=2)
    sub = Learner(sub_spec, embedded_model_dir, base=BASE, rollout=lambda named: LocalRollout(engine, named),
                  sink=LocalSink(tmp_path / "sub"), subnetwork_mask=mask_path)
    summary = run_learner(sub)
    assert sub.subnet.size == full.history[-1].series["bf16"].total_changed
    assert summary["final/changed_bf16"] <= sub.subnet.size

    for learner, root in ((full, tmp_path / "full"), (sub, tmp_path / "sub")):
        weights = root / WEIGHTS_DIR
        manifest = verify_weights_dir(weights)
        assert manifest["base"] == BASE and manifest["target"]["step"] == 2
        loaded = load_model(weights, dtype=torch.bfloat16)
        assert json.loads((weights / "config.json").read_text())["dtype"] == "bfloat16"
        for name, p in learner.policy.named_parameters():
            assert torch.equal(dict(loaded.named_parameters())[name].view(torch.int16), _bits(p, torch.bfloat16)), name
    assert manifest["subnetwork"]["kind"] == "learned"

    # Tampering with a saved file, or an upload that never wrote the manifest, is caught.
    (tmp_path / "sub" / WEIGHTS_DIR / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="config.json does not match its sha256"):
        verify_weights_dir(tmp_path / "sub" / WEIGHTS_DIR)
    (tmp_path / "sub" / WEIGHTS_DIR / WEIGHTS_MANIFEST).unlink()
    with pytest.raises(ValueError, match="not completely written"):
        verify_weights_dir(tmp_path / "sub" / WEIGHTS_DIR)


# ---------------------------------------------------------------- sources, before anything runs


def _trial_with_mask(tracker, experiment: str, label: str, mask: Path, status: str = "FINISHED") -> str:
    """A trial run as a sweep leaves it: kind and label tags, its final mask artifact."""
    from rlsparsity.contracts.mlflow_layout import KIND_TRIAL, LABEL_TAG, MASK_DIR

    run_id = tracker.start_run(tracker.experiment(experiment), label, kind=KIND_TRIAL, tags={LABEL_TAG: label})
    tracker.log_artifact(run_id, mask, MASK_DIR)
    tracker.client.set_terminated(run_id, status)
    return run_id


def _final_mask(path: Path, base: dict) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    with MaskWriter(path / "final.arrow", criterion={"mode": "bitwise"}, dtype="bfloat16", base=base, target={}) as w:
        w.add("x", (4,), np.array([1, 0, 0, 1], bool))
    return path / "final.arrow"


def test_a_finished_trials_mask_is_fetched_by_run_id_or_by_experiment_and_label(tmp_path):
    from rlsparsity.platform.subnetwork_source import SourceError, fetch_source_mask
    from rlsparsity.platform.tracking import Tracker

    tracker = Tracker(f"sqlite:///{tmp_path / 'm.db'}")
    mask = _final_mask(tmp_path / "src", BASE)
    run_id = _trial_with_mask(tracker, "full", "grpo/add/s0", mask)
    failed = _trial_with_mask(tracker, "full", "grpo/add/s1", mask, status="FAILED")
    for sub in (SubnetworkSpec(run=run_id), SubnetworkSpec(experiment="full", trial="grpo/add/s0")):
        path, source = fetch_source_mask(sub, tracker, tmp_path / "dl", BASE)
        assert source == run_id and path.read_bytes() == mask.read_bytes()

    refusals = [
        (SubnetworkSpec(run="nope"), "no MLflow run 'nope'"),
        (SubnetworkSpec(run=failed), f"trial run '{failed}' is FAILED, not FINISHED"),
        (SubnetworkSpec(experiment="full", trial="sft/add/s0"), "has no FINISHED trial labelled 'sft/add/s0'"),
        (SubnetworkSpec(experiment="other", trial="grpo/add/s0"), "no MLflow experiment 'other'"),
        (SubnetworkSpec(run=run_id, step=5), r"has no mask 'masks/step_000005.arrow' \(step 5 was not recorded\)"),
        (SubnetworkSpec(mask=str(tmp_path / "gone.arrow")), "no mask file"),
    ]
    for sub, message in refusals:
        with pytest.raises(SourceError, match=message):
            fetch_source_mask(sub, tracker, tmp_path / "dl", BASE)
    other = SubnetworkSpec(mask=str(_final_mask(tmp_path / "other", {"id": "x", "hash": "sha256:other"})))
    with pytest.raises(SourceError, match="against base sha256:other but this trial trains base sha256:theta0"):
        fetch_source_mask(other, tracker, tmp_path / "dl", BASE)


def test_a_sweep_with_a_bad_mask_source_is_refused_before_any_trial(embedded_model_dir, tmp_path):
    from mlflow.tracking import MlflowClient

    import rlsparsity
    from rlsparsity.sweeps.spec import SpecError

    db = f"sqlite:///{tmp_path / 'm.db'}"
    other = _final_mask(tmp_path / "other", {"id": "x", "hash": "sha256:other"})
    for sub, message in [
        ({"run": "nope"}, r"trial sft/add/s0/learned: training.subnetwork.run: no MLflow run 'nope'"),
        ({"mask": str(other)}, r"trial sft/add/s0/learned: training.subnetwork: .*against base sha256:other but this trial trains base sha256:"),
    ]:
        with pytest.raises(SpecError, match=message):
            rlsparsity.sweep({"name": "refused", "algorithm": "sft", "dataset": "add", "tracking": {"uri": db},
                              "training": {"subnetwork": sub}})
    # Refused before the sweep's experiment, its runs or its Ray trials existed.
    assert MlflowClient(tracking_uri=db).get_experiment_by_name("refused") is None
