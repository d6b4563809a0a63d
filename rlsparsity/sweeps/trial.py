"""The trial driver: the Ray Tune function that runs one grid point.

It opens the trial's nested MLflow run, reserves a placement group for its rollout
actors, runs a Ray Train `TorchTrainer` whose workers run the `Learner`
(`train_worker.train_loop`), and reports the trial's summary back to Tune.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import ray
import ray.tune
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from ray.tune.integration.ray_train import TuneReportCallback
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from rlsparsity.contracts.mlflow_layout import (
    ERROR_TAG,
    KIND_TRIAL,
    LABEL_TAG,
    MODEL_REVISION_TAG,
    SUBNETWORK_SOURCE_TAG,
    SUBNETWORK_TAG,
    SUMMARY_METRICS,
)
from rlsparsity.platform.learner_state import STATE_JSON
from rlsparsity.platform.plugins import import_plugins
from rlsparsity.platform.rollout import RolloutActor
from rlsparsity.platform.tracking import Tracker
from rlsparsity.platform.train_worker import train_loop
from rlsparsity.platform.trial_spec import TrialSpec

# The trial's last Tune result carries this key; a trial without it did not complete.
COMPLETE_KEY = "trial_complete"


def trial_tags(spec: TrialSpec, ctx: dict[str, Any]) -> dict[str, Any]:
    return {
        "seed": spec.seed,
        "data_seed": spec.problem_seed,
        "dataset": spec.dataset_label,
        "algorithm": spec.algorithm,
        "model": spec.model,
        **({MODEL_REVISION_TAG: ctx["model_revision"]} if ctx.get("model_revision") else {}),
        "base_hash": ctx["base"]["hash"],
        "git_commit": ctx["git_commit"],
        LABEL_TAG: spec.label,
        **subnetwork_tags(spec, ctx),
    }


def subnetwork_tags(spec: TrialSpec, ctx: dict[str, Any]) -> dict[str, Any]:
    """A masked trial's kind and source, so the analysis can pair it with its full trial."""
    sub = spec.training.subnetwork
    if sub is None:
        return {}
    _, source = ctx.get("subnetwork_masks", {}).get(spec.label, (None, "none"))
    return {SUBNETWORK_TAG: sub.kind, SUBNETWORK_SOURCE_TAG: source}


def engine_options(spec: TrialSpec) -> dict[str, Any] | None:
    """Keyword arguments of the rollout engine beyond (model, threads, replica)."""
    r = spec.rollout
    if r.backend == "vllm":
        # vLLM seeds the engine once (per-request seeds fail on CPU): the trial seed, with the
        # replica folded in by the engine. On CUDA each request is seeded as well.
        return {"seed": spec.seed, **r.vllm.model_dump(), **({"per_request_seed": True} if r.gpus else {})}
    return {"device": "cuda"} if r.gpus else None


def run_trial(point: dict[str, Any], label: str, ctx: dict[str, Any]) -> None:
    """`point` is the grid point (dotted field -> value) and `label` its trial label (from the
    driver); `ctx` is fixed for the sweep. Any failure leaves the trial's MLflow run FAILED,
    with the error in its `rlsparsity.error` tag, and is raised to Tune."""
    from rlsparsity.sweeps.spec import SweepSpec, flatten

    tracker = Tracker(ctx["tracking_uri"], ctx["artifact_location"], spool=ctx.get("spool"))
    earlier = []
    if ctx.get("resume"):  # only a resumed sweep can hold runs of this trial already
        earlier = [r for r in tracker.children(ctx["experiment_id"], ctx["sweep_run_id"], kind=KIND_TRIAL)
                   if r.data.tags.get(LABEL_TAG) == label]
    done = [r for r in earlier if r.info.status == "FINISHED"]
    # A run the interrupted sweep stopped whose learner left a checkpoint is continued from it.
    stopped = [r for r in earlier if r.info.status == "KILLED" and _has_learner_state(ctx, label, r.info.run_id)]
    if done:
        # A resumed sweep whose driver died after this trial finished but before Tune saved
        # that: the finished run is the result, and the trial does not run twice.
        metrics = done[-1].data.metrics
        ray.tune.report({COMPLETE_KEY: 1, "mlflow_run_id": done[-1].info.run_id,
                         **{k: metrics[k] for k in SUMMARY_METRICS if k in metrics}})
        return
    try:
        # The plugins register custom algorithms and tasks in this process before the spec,
        # which names them, is validated here again.
        import_plugins(ctx["plugins"], ctx["plugin_paths"])
        spec = SweepSpec(ctx["raw_spec"]).trial(point)
    except Exception as e:
        run_id = tracker.start_run(ctx["experiment_id"], label, kind=KIND_TRIAL, parent=ctx["sweep_run_id"], tags={LABEL_TAG: label})
        _fail(tracker, run_id, e)
        raise
    if stopped:
        run_id = stopped[-1].info.run_id
        tracker.reopen(run_id)  # Ray Train restores its learner's last checkpoint (train_name)
    else:
        run_id = tracker.start_run(
            ctx["experiment_id"], spec.label, kind=KIND_TRIAL, parent=ctx["sweep_run_id"], tags=trial_tags(spec, ctx)
        )
        # The trial's own algorithm config, resolved with its defaults; not the other algorithms'.
        params = spec.model_dump(exclude={"algorithm_config"})
        params["algorithm_config"] = {spec.algorithm: spec.algo_config.model_dump()}
        tracker.log_params(run_id, flatten(params))
    pg = None
    actors: list = []
    error: BaseException | None = None
    try:
        r = spec.rollout
        bundle = {"CPU": r.cpus, **({"GPU": r.gpus} if r.gpus else {})}
        pg = placement_group([bundle] * r.replicas, strategy="PACK", name=f"rollout-{run_id}")
        ray.get(pg.ready())
        actors += [
            RolloutActor.options(
                num_cpus=r.cpus,
                num_gpus=r.gpus,
                scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i),
            ).remote(r.backend, ctx["model_path"], i, max(1, int(r.cpus)), engine_options(spec))
            for i in range(r.replicas)
        ]
        if r.backend == "vllm":
            from rlsparsity.platform.vllm.engine import engine_seed

            tracker.log_params(run_id, {"rollout.engine_seeds": [engine_seed(spec.seed, i) for i in range(r.replicas)]})
        res = spec.resources
        trainer = TorchTrainer(
            train_loop,
            train_loop_config={
                "spec": spec,
                "plugin_paths": ctx["plugin_paths"],
                "model_path": ctx["model_path"],
                "base": ctx["base"],
                "run_id": run_id,
                "tracking_uri": tracker.uri,
                "spool": ctx.get("spool"),
                "rollout_actors": actors,
                "threads": max(1, int(res.cpus_per_learner)),
                "subnetwork_mask": ctx.get("subnetwork_masks", {}).get(spec.label, (None,))[0],
            },
            scaling_config=ScalingConfig(
                num_workers=res.learners,
                use_gpu=res.gpus_per_learner > 0,
                resources_per_worker={"CPU": res.cpus_per_learner, "GPU": res.gpus_per_learner},
            ),
            run_config=RunConfig(
                name=train_name(ctx, spec.label, run_id),
                storage_path=str(Path(ctx["storage_path"]).resolve()),
                callbacks=[TuneReportCallback()],
                failure_config=FailureConfig(max_failures=res.max_failures),
                # The last learner state, and the one before in case the last is unreadable.
                checkpoint_config=CheckpointConfig(num_to_keep=2),
            ),
        )
        # The learner's last report is its summary.
        final = trainer.fit().metrics or {}
        summary = {k: final[k] for k in SUMMARY_METRICS if k in final}
    except BaseException as e:
        error = e
        raise
    finally:
        try:  # the CPUs go back even if the tracking server is unreachable
            for a in actors:
                ray.kill(a)
            if pg is not None:
                remove_placement_group(pg)
        finally:
            if error is None:
                tracker.finish(run_id, True)
            else:
                _fail(tracker, run_id, error)
    # The final report comes after the clean-up, and nothing follows it: Tune may stop the
    # trial's actor as soon as it holds a result (e.g. a stopper, or its reserved `done` key),
    # which raced the MLflow run's FINISHED status and the placement group's removal.
    ray.tune.report({COMPLETE_KEY: 1, "mlflow_run_id": run_id, **summary})


def train_name(ctx: dict[str, Any], label: str, run_id: str) -> str:
    """The trial's Ray Train run, one per MLflow run: Train V2 restores a run of the same name
    from its last checkpoint, so a continued MLflow run continues its learner, and a new
    MLflow run of the same trial starts from step 0."""
    return f"{ctx['sweep_run_id'][:8]}-{label.replace('/', '-')}-{run_id[:8]}"


def _has_learner_state(ctx: dict[str, Any], label: str, run_id: str) -> bool:
    """Whether Ray Train registered a learner state for this MLflow run's learner (its latest
    checkpoint, in its snapshot), on a local storage path. Anything else, e.g. the final
    summary checkpoint or a remote store, reads as no: the trial then runs from step 0."""
    run_dir = Path(ctx["storage_path"]) / train_name(ctx, label, run_id)
    try:
        snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
        return (run_dir / snapshot["latest_checkpoint_result"]["checkpoint_dir_name"] / STATE_JSON).is_file()
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _fail(tracker: Tracker, run_id: str, error: BaseException) -> None:
    """Mark the trial's run FAILED (KILLED when interrupted), naming the error."""
    try:
        tracker.set_tags(run_id, {ERROR_TAG: f"{type(error).__name__}: {error}"[:4000]})
    finally:
        tracker.finish(run_id, False, killed=isinstance(error, KeyboardInterrupt))
