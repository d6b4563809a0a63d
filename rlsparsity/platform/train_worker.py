"""The Ray Train worker function of a trial: a thin wrapper that runs the `Learner` on one
rank, with the trial's Ray rollout actors and its MLflow run."""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch.distributed as dist

from rlsparsity.contracts.mlflow_layout import SUMMARY_METRICS
from rlsparsity.platform.learner import Learner, run_learner
from rlsparsity.platform.plugins import import_plugins
from rlsparsity.platform.rollout import RolloutPool
from rlsparsity.platform.sharding import shard_model
from rlsparsity.platform.tracking import RunSink, Tracker

REPORT_EVERY = 10  # steps between progress reports to Ray Train / Tune


def train_loop(cfg: dict[str, Any]) -> None:
    """cfg: spec (TrialSpec), plugins and plugin_paths, model_path, base (id/hash), run_id,
    tracking_uri, spool (`Tracker`'s folder for what an unreachable server did not take), rollout_actors, threads, subnetwork_mask (a local file or None)."""
    spec = cfg["spec"]
    import_plugins(spec.plugins, cfg.get("plugin_paths", ()))
    # Ray Train logs every report at INFO; the per-step metrics already go to Tune and MLflow.
    # Train V2's report logger is named by its file path, outside the "ray.train" tree.
    from ray.train.v2._internal.execution import context as train_context

    for name in ("ray.train", train_context.__file__):
        logging.getLogger(name).setLevel(logging.WARNING)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()  # this worker's GPU (NCCL between them), else the CPU (gloo)
    wrap = wrap_frozen = None
    if spec.resources.strategy == "fsdp":
        wrap = wrap_frozen = lambda m: shard_model(m, device)  # noqa: E731
    elif world > 1:
        wrap = lambda m: ray.train.torch.prepare_model(m, move_to_device=False)  # noqa: E731
    sink = RunSink(Tracker(cfg["tracking_uri"], spec.tracking.artifact_location, cfg.get("spool")), cfg["run_id"]) if rank == 0 else None
    learner = Learner(
        spec, cfg["model_path"], base=cfg["base"], target={"run_id": cfg["run_id"]},
        rollout=lambda named: RolloutPool(cfg["rollout_actors"], named), sink=sink,
        rank=rank, world=world, threads=cfg["threads"],
        wrap=wrap, wrap_frozen=wrap_frozen, subnetwork_mask=cfg.get("subnetwork_mask"), device=device,
    )

    every = spec.training.checkpoint_every

    def after_step(step: int, metrics: dict[str, float]) -> None:
        if world > 1:
            dist.barrier()  # nobody samples from the engines before rank 0 has synced them
        if step == spec.training.steps:
            return  # the final report follows, with the summary
        if every is not None and step % every == 0:
            # Rank 0 writes the learner's state (sharded: every rank its rows, files named by
            # rank); Ray Train merges the ranks' files into the run's storage and hands them
            # to the workers it restarts after a failure (FailureConfig).
            writes = rank == 0 or learner.sharded
            with tempfile.TemporaryDirectory(prefix="rlsparsity-state-") as tmp:
                if writes:
                    learner.save_state(tmp)
                checkpoint = ray.train.Checkpoint.from_directory(tmp) if writes else None
                ray.train.report(_reportable(step, metrics), checkpoint=checkpoint)
        # A report waits for Ray Train's controller to collect the previous one (about 2 s
        # here), so per-step reports would dominate a fast step; MLflow gets every step.
        elif step % REPORT_EVERY == 0:
            ray.train.report(_reportable(step, metrics))

    restored = ray.train.get_checkpoint()  # set when Ray Train restarted this worker group
    if restored is None:
        summary = run_learner(learner, after_step=after_step)
    else:
        with restored.as_directory() as state_dir:
            summary = run_learner(learner, after_step=after_step, resume_from=state_dir)
    final = _reportable(spec.training.steps, summary)
    # The last report carries the summary. Train V2's `Result.metrics` are those of the latest
    # checkpoint, so rank 0 attaches one (the summary as JSON) and the driver reads the result.
    with tempfile.TemporaryDirectory(prefix="rlsparsity-summary-") as tmp:
        checkpoint = None
        if rank == 0:
            (Path(tmp) / "summary.json").write_text(json.dumps(final))
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(final, checkpoint=checkpoint)


def _reportable(step: int, metrics: dict[str, float]) -> dict[str, float]:
    # Per-layer metrics (`sparsity/layer.NN`) stay in MLflow; Tune gets the scalars.
    return {"step": step, **{k: v for k, v in metrics.items() if "/" not in k or k in SUMMARY_METRICS}}
