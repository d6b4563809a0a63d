"""A rollout actor whose process dies is restarted by Ray, gets the learner's current
weights in full, and generation goes on: no θ0 weights served, no patch applied to the
wrong base."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch

from rlsparsity.platform.models import load_model
from rlsparsity.platform.rollout import RolloutActor, RolloutPool
from rlsparsity.platform.weight_sync import Bf16SyncState, bf16_bits


def _kill(actor) -> None:
    import ray

    os.kill(ray.get(actor.pid.remote()), signal.SIGKILL)


def _engine_matches(actor, named) -> bool:
    import ray

    held = ray.get(actor.weights_bf16.remote())
    return all(torch.equal(held[n], bf16_bits(p)) for n, p in named)


def _train_a_bit(model: torch.nn.Module, seed: int) -> None:
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 1e-2 * (torch.rand_like(p) < 0.1))


@pytest.mark.slow
def test_killed_actor_is_restarted_and_resynced(embedded_model_dir: Path, ray_session) -> None:
    ray = ray_session
    learner = load_model(embedded_model_dir)
    with torch.no_grad():
        for p in learner.parameters():
            p.copy_(p.to(torch.bfloat16))
    named = list(learner.named_parameters())
    actor = RolloutActor.options(num_cpus=0.5).remote("hf", str(embedded_model_dir), 0, 1)
    pool = RolloutPool([actor], named)
    sync = Bf16SyncState(named)
    prompts = ["12+34=", "7*8=", "305+9="]

    _train_a_bit(learner, 1)
    pool.sync(sync.diff(named), version=1)
    assert _engine_matches(actor, named)
    first_pid = ray.get(actor.pid.remote())

    # Dies between syncs: the next generation finds it gone, waits for the restart, sends
    # the full weights, and generates from them.
    _kill(actor)
    out = pool.generate(prompts, n=1, temperature=0.0, max_new_tokens=6, seed=0)
    assert len(out) == 3 and pool.restarts == 1
    assert ray.get(actor.pid.remote()) != first_pid
    assert ray.get(actor.get_version.remote()) == 1
    assert _engine_matches(actor, named)

    # Dies before a sync: the sparse patch cannot be applied to a θ0 engine, so the pool
    # sends the full weights at the new version instead.
    _kill(actor)
    _train_a_bit(learner, 2)
    pool.sync(sync.diff(named), version=2)
    assert pool.restarts == 2 and ray.get(actor.get_version.remote()) == 2
    assert _engine_matches(actor, named)
    ray.kill(actor)


@pytest.mark.slow
def test_trial_goes_on_after_its_rollout_actor_is_killed(embedded_model_dir: Path, ray_session, tmp_path: Path, monkeypatch) -> None:
    """Mid-trial, the rollout actor's process is killed for real (SIGKILL, found by its Ray
    process title); Ray restarts it, the learner resyncs it in full, the trial finishes."""
    from mlflow.tracking import MlflowClient
    from services import killing

    import rlsparsity

    monkeypatch.setenv("RLSPARSITY_RAY_STORAGE", str(tmp_path / "ray"))
    db = f"sqlite:///{tmp_path / 'restart.db'}"
    client = MlflowClient(tracking_uri=db)

    def after_some_steps() -> bool:
        exp = client.get_experiment_by_name("restart")
        runs = client.search_runs([exp.experiment_id], "tags.`rlsparsity.kind` = 'trial'") if exp else []
        return bool(runs) and len(client.get_metric_history(runs[0].info.run_id, "sync_bytes")) >= 5

    with killing("ray::RolloutActor", after_some_steps, poll_s=0.2) as killed:
        result = rlsparsity.sweep("sweeps/quickstart.yaml", [
            "name=restart", "seed=0", "dataset=add", "algorithm=grpo", "training.steps=60",
            "training.prompts_per_step=4", "training.masks.every=60", "training.eval_problems=16",
            "analysis=false", f"tracking.uri={db}",
        ])
    assert len(killed) == 1, f"expected to kill one rollout actor mid-trial, killed {killed}"
    assert result.ok, result.failed
    run = client.get_run(result.trials[0]["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    restarts = sorted(client.get_metric_history(run.info.run_id, "rollout_restarts"), key=lambda m: m.step)
    assert restarts[-1].value == 1 and restarts[-1].step == 60
    assert 5 <= min(m.step for m in restarts if m.value == 1) < 60  # noticed mid-trial, then trained on
