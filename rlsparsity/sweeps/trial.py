"""The trial driver: the Ray Tune function that runs one grid point.

It opens the trial's nested MLflow run, reserves a placement group for its rollout
actors, runs a Ray Train `TorchTrainer` whose workers execute `learner.train_loop`, and
reports the trial's summary back to Tune.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import ray
import ray.tune
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from ray.tune.integration.ray_train import TuneReportCallback
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from rlsparsity.platform.config import TrialSpec
from rlsparsity.platform.learner import train_loop
from rlsparsity.platform.rollout import RolloutActor
from rlsparsity.platform.tracking import Tracker

# The trial's last Tune result carries this key; a trial without it did not complete.
COMPLETE_KEY = "trial_complete"
SUMMARY_KEYS = (
    "test_accuracy_before",
    "test_accuracy_after",
    "test_answer_accuracy_before",
    "test_answer_accuracy_after",
    "test_preference_accuracy_before",
    "test_preference_accuracy_after",
    "train_reward_first",
    "train_reward_last",
    "train_loss_first",
    "train_loss_last",
    "final/sparsity_bf16",
    "final/master_changed_frac",
    "sync_bytes_total",
    "sync_dense_bytes_total",
    "reward",
)


def trial_tags(spec: TrialSpec, ctx: dict[str, Any]) -> dict[str, Any]:
    return {
        "seed": spec.seed,
        "data_seed": spec.problem_seed,
        "dataset": spec.dataset,
        "algorithm": spec.algorithm,
        "model": spec.model,
        "base_hash": ctx["base"]["hash"],
        "git_commit": ctx["git_commit"],
        "rlsparsity.label": spec.label,
    }


def engine_options(spec: TrialSpec) -> dict[str, Any] | None:
    """Keyword arguments of the rollout engine beyond (model, threads, replica)."""
    if spec.rollout.backend == "vllm":
        # vLLM seeds the engine once (per-request seeds fail on CPU): the trial seed, with the
        # replica folded in by the engine.
        return {"seed": spec.seed, **spec.rollout.vllm.model_dump()}
    return None


def run_trial(point: dict[str, Any], ctx: dict[str, Any]) -> None:
    """`point` is the grid point (dotted field -> value); `ctx` is fixed for the sweep."""
    from rlsparsity.sweeps.spec import SweepSpec, flatten

    spec = SweepSpec(ctx["raw_spec"]).trial(point)
    tracker = Tracker(ctx["tracking_uri"], spec.tracking.artifact_location)
    run_id = tracker.start_run(
        ctx["experiment_id"], spec.label, kind="trial", parent=ctx["sweep_run_id"], tags=trial_tags(spec, ctx)
    )
    # The trial's own algorithm config, resolved with its defaults; not the other algorithms'.
    params = spec.model_dump(exclude={"algorithm_config"})
    params["algorithm_config"] = {spec.algorithm: spec.algo_config.model_dump()}
    tracker.log_params(run_id, flatten(params))
    pg = None
    actors: list = []
    ok = False
    try:
        r = spec.rollout
        pg = placement_group([{"CPU": r.cpus}] * r.replicas, strategy="PACK", name=f"rollout-{run_id}")
        ray.get(pg.ready())
        actors += [
            RolloutActor.options(
                num_cpus=r.cpus,
                scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i),
            ).remote(r.backend, ctx["model_path"], i, max(1, int(r.cpus)), engine_options(spec))
            for i in range(r.replicas)
        ]
        if r.backend == "vllm":
            from rlsparsity.platform.vllm_engine import engine_seed

            tracker.log_params(run_id, {"rollout.engine_seeds": [engine_seed(spec.seed, i) for i in range(r.replicas)]})
        res = spec.resources
        trainer = TorchTrainer(
            train_loop,
            train_loop_config={
                "spec": spec,
                "model_path": ctx["model_path"],
                "base": ctx["base"],
                "run_id": run_id,
                "tracking_uri": tracker.uri,
                "rollout_actors": actors,
                "threads": max(1, int(res.cpus_per_learner)),
            },
            scaling_config=ScalingConfig(
                num_workers=res.learners,
                use_gpu=res.gpus_per_learner > 0,
                resources_per_worker={"CPU": res.cpus_per_learner, "GPU": res.gpus_per_learner},
            ),
            run_config=RunConfig(
                name=f"{ctx['sweep_run_id'][:8]}-{spec.label.replace('/', '-')}",
                storage_path=str(Path(ctx["storage_path"]).resolve()),
                callbacks=[TuneReportCallback()],
            ),
        )
        trainer.fit()
        run = tracker.client.get_run(run_id)
        summary = {k: run.data.metrics[k] for k in SUMMARY_KEYS if k in run.data.metrics}
        ok = True
    finally:
        try:  # the CPUs go back even if the tracking server is unreachable
            for a in actors:
                ray.kill(a)
            if pg is not None:
                remove_placement_group(pg)
        finally:
            tracker.finish(run_id, ok)
    # The final report comes after the clean-up, and nothing follows it: Tune may stop the
    # trial's actor as soon as it holds a result (e.g. a stopper, or its reserved `done` key),
    # which raced the MLflow run's FINISHED status and the placement group's removal.
    ray.tune.report({COMPLETE_KEY: 1, "mlflow_run_id": run_id, **summary})
