"""A trial's learner killed mid-run (SIGKILL of its Ray Train worker process) is restarted by
Ray Train from its last checkpoint, into the same MLflow run, and the trial ends with masks
bit-identical to an uninterrupted run's: the same trial's learner run without Ray."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import psutil
import pytest
from artifacts import mask_files
from mlflow.tracking import MlflowClient
from services import killing, own_ray_processes

import rlsparsity
from rlsparsity.contracts.mask import read_mask
from rlsparsity.platform.engines import HFEngine, LocalRollout
from rlsparsity.platform.learner import Learner, LocalSink, run_learner
from rlsparsity.sweeps.run import load_spec

STEPS, EVERY = 20, 4
COMMON = ["seed=0", "dataset=add", "algorithm=grpo", f"training.steps={STEPS}", "training.prompts_per_step=4",
          "training.eval_problems=16", f"training.masks.every={EVERY}", f"training.checkpoint_every={EVERY}",
          "analysis=false"]


def _train_workers() -> list[psutil.Process]:
    return own_ray_processes("ray::RayTrainWorker")


def _registered_steps(trial_storage: Path) -> list[int]:
    snapshot = trial_storage / "checkpoint_manager_snapshot.json"
    try:
        results = json.loads(snapshot.read_text())["checkpoint_results"]
    except (OSError, ValueError, KeyError):  # not written yet, or mid-write
        return []
    return [r["metrics"]["step"] for r in results if r["metrics"]["step"] < STEPS]


def _loss_steps(client: MlflowClient, name: str) -> list[int]:
    exp = client.get_experiment_by_name(name)
    runs = client.search_runs([exp.experiment_id], "tags.`rlsparsity.kind` = 'trial'") if exp else []
    return [m.step for m in client.get_metric_history(runs[0].info.run_id, "loss")] if runs else []


def _masks(root: Path) -> dict[str, dict[str, np.ndarray]]:
    """Every mask under `root` (all series: criteria, since_prev, ever), by relative path."""
    return {str(f.relative_to(root)): read_mask(f).to_dict() for f in sorted(root.rglob("*.arrow"))}


@pytest.mark.slow
def test_a_killed_learner_resumes_from_its_checkpoint_with_bit_identical_masks(
    embedded_model_dir: Path, ray_session, tmp_path: Path, monkeypatch
) -> None:
    storage = tmp_path / "ray"
    monkeypatch.setenv("RLSPARSITY_RAY_STORAGE", str(storage))
    db = f"sqlite:///{tmp_path / 'restart.db'}"
    client = MlflowClient(tracking_uri=db)

    # The uninterrupted reference: the same trial's learner without Ray, on one in-process
    # engine (LocalRollout folds the sampling seed as a one-replica pool does).
    (spec,) = load_spec("sweeps/quickstart.yaml", ["name=whole", f"tracking.uri={db}", *COMMON]).trials()
    engine = HFEngine(embedded_model_dir, threads=1)
    sink = LocalSink(tmp_path / "whole")
    whole = Learner(spec, embedded_model_dir, base={"id": "embedded", "hash": "h"}, target={"run_id": "local"},
                    rollout=lambda named: LocalRollout(engine, named), sink=sink)
    whole_metrics = run_learner(whole)

    last_step: list[int] = []  # the last logged step when the learner was killed

    def past_the_first_checkpoint() -> bool:
        # Once Ray Train's controller has registered a learner checkpoint (a checkpoint that
        # is uploaded but not yet registered is not one to restart from) and the learner has
        # trained past it.
        if not any(_registered_steps(d) for d in storage.glob("*-grpo-add-s0-*")):
            return False
        last_step.append(max(_loss_steps(client, "killed"), default=0))
        return last_step[-1] > EVERY

    with killing("ray::RayTrainWorker", past_the_first_checkpoint) as killed:
        result = rlsparsity.sweep("sweeps/quickstart.yaml", ["name=killed", f"tracking.uri={db}", *COMMON])
    assert len(killed) == 1, f"expected to kill one learner worker mid-trial, killed {killed}"
    (pid,), at_step = killed, last_step[-1]
    assert at_step < STEPS, f"the learner was killed after its last step ({at_step})"
    assert result.ok, result.failed
    assert not any(p.pid == pid for p in _train_workers())

    # One trial run, continued by the restarted learner: FINISHED, resumed from a checkpoint
    # step at or before the kill, with every step's loss on record.
    exp = client.get_experiment_by_name("killed")
    (run,) = client.search_runs([exp.experiment_id], "tags.`rlsparsity.kind` = 'trial'")
    assert run.info.run_id == result.trials[0]["mlflow_run_id"] and run.info.status == "FINISHED"
    (resumed,) = client.get_metric_history(run.info.run_id, "resumed_from_step")
    assert resumed.value % EVERY == 0 and EVERY <= resumed.value <= at_step, (resumed.value, at_step)
    print(f"learner killed after step {at_step}, resumed from step {resumed.value:.0f}")
    assert set(_loss_steps(client, "killed")) == set(range(1, STEPS + 1))

    # The masks and the final summary equal the uninterrupted run's, bit for bit.
    # The ever-changed series is the one a restart could break: it is updated every step and
    # restored from the learner's checkpoint.
    want = _masks(tmp_path / "whole" / "masks")
    got = _masks(Path(client.download_artifacts(run.info.run_id, "masks", str(tmp_path / "killed"))))
    arrows = {f for f in mask_files(range(EVERY, STEPS, EVERY)) if f.endswith(".arrow")}
    assert {f"masks/{name}" for name in got} == {f"masks/{name}" for name in want} == arrows
    for name in want:
        for tensor in want[name]:
            np.testing.assert_array_equal(got[name][tensor], want[name][tensor], err_msg=f"{name}: {tensor}")
    for key in ("final/changed_bf16", "test_accuracy_after", "train_reward_last", "sync_bytes_total"):
        assert run.data.metrics[key] == whole_metrics[key], key
    assert whole_metrics["final/changed_bf16"] > 0


@pytest.mark.slow
def test_killed_fsdp_learners_resume_and_end_with_the_masks_of_ddp_learners(
    embedded_model_dir: Path, ray_session, tmp_path: Path, monkeypatch
) -> None:
    """resources.learners=2 under ddp (gloo), uninterrupted, and under fsdp (FSDP2 on gloo,
    every rank diffing, masking and checkpointing its own rows) with both learners SIGKILLed
    after a registered checkpoint: Ray Train restarts them from their merged checkpoint files
    and the trial ends with every mask series of the ddp trial, bit for bit. The two
    strategies reduce 2 ranks' gradients alike (a sum of two, halved), so they train alike;
    gradient clipping is off because its total norm is summed in another order (per shard,
    then over the ranks), which moves the clip factor in its last bit (one bf16 entry of
    50k differed after 8 steps with max_grad_norm 1.0)."""
    steps, every = 8, 4
    storage = tmp_path / "ray"
    monkeypatch.setenv("RLSPARSITY_RAY_STORAGE", str(storage))
    db = f"sqlite:///{tmp_path / 'fsdp.db'}"
    client = MlflowClient(tracking_uri=db)
    common = [*COMMON, f"training.steps={steps}", f"training.masks.every={every}", f"training.checkpoint_every={every}",
              "resources.learners=2", "training.max_grad_norm=null", f"tracking.uri={db}"]
    whole = rlsparsity.sweep("sweeps/quickstart.yaml", ["name=whole", "resources.strategy=ddp", *common])
    assert whole.ok, whole.failed
    whole_run = client.get_run(whole.trials[0]["mlflow_run_id"])
    assert whole_run.info.status == "FINISHED" and whole_run.data.params["resources.learners"] == "2"
    snapshots = set(storage.rglob("checkpoint_manager_snapshot.json"))

    def past_a_checkpoint() -> bool:
        new = [d.parent for d in storage.rglob("checkpoint_manager_snapshot.json") if d not in snapshots]
        if not any(0 < s < steps for d in new for s in _registered_steps(d)):
            return False
        return max(_loss_steps(client, "killed"), default=0) > every

    with killing("ray::RayTrainWorker", past_a_checkpoint) as killed:
        result = rlsparsity.sweep("sweeps/quickstart.yaml", ["name=killed", "resources.strategy=fsdp", *common])
    assert len(killed) == 2, f"expected to kill both learner workers, killed {killed}"
    assert result.ok, result.failed
    run_id = result.trials[0]["mlflow_run_id"]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["resources.strategy"] == "fsdp"
    checkpoints = {p.parent for p in storage.rglob("weights.rank0-of-2.safetensors")}
    files = {f"{kind}.rank{r}-of-2.safetensors" for kind in ("weights", "optimizer", "buffers", "rng") for r in (0, 1)}
    assert checkpoints and all({p.name for p in c.iterdir()} == files | {"state.json"} for c in checkpoints)
    assert [m.value for m in client.get_metric_history(run_id, "resumed_from_step")] == [every]
    assert set(_loss_steps(client, "killed")) == set(range(1, steps + 1))
    for key in ("final/changed_bf16", "final/changed_frac_masters", "sync_bytes_total", "train_reward_last"):
        assert run.data.metrics[key] == whole_run.data.metrics[key], key
    want = _masks(Path(client.download_artifacts(whole_run.info.run_id, "masks", str(tmp_path / "whole"))))
    got = _masks(Path(client.download_artifacts(run_id, "masks", str(tmp_path / "killed"))))
    assert set(got) == set(want) and len(want) == 2 * 6  # step 4 and final, six series
    for name in want:
        for tensor in want[name]:
            np.testing.assert_array_equal(got[name][tensor], want[name][tensor], err_msg=f"{name}: {tensor}")
