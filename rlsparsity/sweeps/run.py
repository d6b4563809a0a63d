"""Run a sweep: spec -> base model -> MLflow parent run -> Ray Tune grid -> summary -> overlap.

This is the recipe `rlsparsity sweep` and `rlsparsity.sweep(spec)` both call.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
from ray import tune
from rich.console import Console
from rich.table import Table

from rlsparsity.contracts.mlflow_layout import (
    ERROR_TAG,
    GRID_AXES_TAG,
    KIND_SWEEP,
    KIND_TAG,
    KIND_TRIAL,
    LABEL_TAG,
    MODEL_REVISION_TAG,
    PARENT_TAG,
    PLUGINS_TAG,
    SPEC_KEY_TAG,
)
from rlsparsity.platform.algorithms import get_algorithm
from rlsparsity.platform.cluster import init_ray
from rlsparsity.platform.models import (
    load_tokenizer,
    model_content_hash,
    model_revision,
    resolve_model,
)
from rlsparsity.platform.plugins import search_paths_of
from rlsparsity.platform.subnetwork_source import SourceError, fetch_source_mask
from rlsparsity.platform.tracking import Tracker, TrackingUnavailable, git_commit
from rlsparsity.platform.tracking_spool import Spool
from rlsparsity.sweeps.interrupt import Interrupted, interrupt_in, signals_interrupt
from rlsparsity.sweeps.spec import SpecError, SweepSpec, apply_overrides
from rlsparsity.sweeps.trial import COMPLETE_KEY, run_trial


class SweepFailed(RuntimeError):
    """One or more trials of a sweep failed. `result` holds the completed trials and
    `result.failed` names each failed trial with its error."""

    def __init__(self, result: SweepResult) -> None:
        self.result = result
        lines = "\n  ".join(result.failed)
        super().__init__(
            f"{len(result.failed)} of {len(result.failed) + len(result.trials)} trial(s) of sweep "
            f"{result.experiment!r} failed (MLflow sweep run {result.sweep_run_id}):\n  {lines}"
        )


class SweepInterrupted(SweepFailed):
    """The sweep got SIGINT or SIGTERM. Its run and its unfinished trials' runs are KILLED;
    `finished` and `unfinished` are trial labels. Resume with `sweep(..., resume=True)`
    (`rlsparsity sweep SPEC --resume`): only the unfinished trials run again."""

    def __init__(self, result: SweepResult, interrupt: Interrupted, finished: list[str], unfinished: list[str]) -> None:
        self.result, self.interrupt = result, interrupt
        self.finished, self.unfinished = finished, unfinished
        self.exit_code = interrupt.exit_code
        RuntimeError.__init__(
            self,
            f"sweep {result.experiment!r} interrupted by {interrupt.signal_name}: {len(finished)} of "
            f"{len(finished) + len(unfinished)} trial(s) finished"
            + (f" ({', '.join(finished)})" if finished else "")
            + (f"; not finished: {', '.join(unfinished)}" if unfinished else "")
            + f". The sweep run {result.sweep_run_id} and the unfinished trials' runs are KILLED in MLflow "
            f"({result.tracking_uri}); finished trials are kept and are not run again on resume.",
        )


@dataclass
class SweepResult:
    experiment: str
    sweep_run_id: str
    tracking_uri: str
    trials: list[dict[str, Any]] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    overlap: Any = None

    @property
    def ok(self) -> bool:
        return not self.failed


class SweepTrackingLost(SweepFailed):
    """The tracking server stopped answering and the sweep stopped. `spool` holds what it did
    not take; `rlsparsity upload SPOOL` sends it once the server is back."""

    def __init__(self, result: SweepResult, error: TrackingUnavailable) -> None:
        self.result, self.error, self.spool = result, error, error.spool
        RuntimeError.__init__(self, f"{error}\nthe sweep stopped; {error.spool.describe()}")


def load_spec(spec: SweepSpec | Mapping[str, Any] | str | os.PathLike, overrides: Iterable[str] = ()) -> SweepSpec:
    if isinstance(spec, SweepSpec):
        if overrides:
            return SweepSpec(apply_overrides(spec.to_dict(), overrides))
        return spec
    if isinstance(spec, Mapping):
        return SweepSpec(apply_overrides(spec, overrides))
    return SweepSpec.load(spec, overrides)


def sweep(
    spec: SweepSpec | Mapping[str, Any] | str | os.PathLike,
    overrides: Iterable[str] = (),
    *,
    console: Console | None = None,
    parent_run_id: str | None = None,
    run_tags: Mapping[str, Any] | None = None,
    resume: bool = False,
) -> SweepResult:
    """Run every trial of the grid on Ray Tune and return their summaries.

    Raises `SpecError` before anything runs for a bad spec, and `SweepFailed` (carrying the
    result, completed trials included) when any trial failed; its MLflow run and the
    sweep's are then FAILED. SIGINT or SIGTERM raise `SweepInterrupted` (runs KILLED).
    ``resume`` continues the experiment's latest unfinished sweep run of the same spec (after
    an interrupt or a dead driver): Tune restores its grid, finished trials are not run
    again, and the results go into the same MLflow parent run. ``parent_run_id`` nests the
    sweep run (a study's stage) and ``run_tags`` tag it."""
    console = console or Console()
    spec = load_spec(spec, overrides)
    if spec.stages is not None:
        raise SpecError("invalid sweep spec:\n  subnetwork_stages: a staged study runs with rlsparsity.sweep() or "
                        "`rlsparsity sweep`, which call rlsparsity.sweeps.study.run_study")
    first = spec.trials()[0]

    model_path = resolve_model(first.model)
    if any(t.training.prompt_format == "chat" for t in spec.trials()) and not load_tokenizer(model_path).chat_template:
        raise SpecError(f"invalid sweep spec:\n  training.prompt_format: 'chat' needs a chat template, and {first.model}'s tokenizer has none; use 'native'")
    base = {"id": first.model, "hash": model_content_hash(model_path)}
    # A hub model is resolved once, here: every trial loads this snapshot, pinned to its commit.
    revision = model_revision(model_path)
    tracker = Tracker(first.tracking.uri, first.tracking.artifact_location)
    resumed = _resumable_run(tracker, spec, parent_run_id) if resume else None  # before anything starts
    storage = Path(os.environ.get("RLSPARSITY_RAY_STORAGE", Path.cwd() / ".rlsparsity" / "ray")).resolve()
    subnetwork_masks = _fetch_subnetwork_masks(spec, tracker, storage.parent / "masks", base)
    init_ray()
    _check_fits(spec)

    experiment_id = tracker.experiment(spec.name)
    commit = git_commit()
    if resumed is not None:
        sweep_run_id = resumed
        # A driver that died (SIGKILL, a lost node) left its runs RUNNING; nothing runs them now.
        _end_running(tracker, experiment_id, sweep_run_id, "its sweep's driver died")
        tracker.reopen(sweep_run_id)
        console.print(f"resuming sweep run {sweep_run_id}")
    else:
        sweep_run_id = tracker.start_run(
            experiment_id,
            f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}",
            kind=KIND_SWEEP,
            parent=parent_run_id,
            tags={**(run_tags or {}), "model": first.model, "base_hash": base["hash"], "git_commit": commit,
                  **({MODEL_REVISION_TAG: revision} if revision else {}),
                  GRID_AXES_TAG: json.dumps(sorted(spec.axes)), SPEC_KEY_TAG: spec.fingerprint(),
                  **({PLUGINS_TAG: json.dumps(spec.plugins)} if spec.plugins else {})},
        )
    # Shared by this machine's trial actors and learners: what a server gone down did not take.
    spool = tracker.keep_unsent_in(storage.parent / "unsent" / sweep_run_id)
    ok = False
    interrupt: Interrupted | None = None
    result = SweepResult(spec.name, sweep_run_id, tracker.uri)
    try:
        with signals_interrupt():
            if not resume:
                tracker.log_params(sweep_run_id, {"spec": json.dumps(spec.to_dict()), "trials": len(spec.grid()),
                                                  **{f"axis.{k}": json.dumps(v) for k, v in spec.axes.items()}})
            _run_grid(spec, tracker, result, console, resume=resume, ctx={
                "raw_spec": spec.to_dict(),
                "plugins": spec.plugins,
                "plugin_paths": search_paths_of(spec.plugins),
                "artifact_location": first.tracking.artifact_location,
                "model_path": str(model_path),
                "model_revision": revision,
                "base": base,
                "tracking_uri": tracker.uri,
                "experiment_id": experiment_id,
                "sweep_run_id": sweep_run_id,
                "git_commit": commit,
                "storage_path": str(storage),
                "subnetwork_masks": subnetwork_masks,
                "resume": resume,
                "spool": str(spool.root),
            })
            ok = result.ok
    except Exception as e:
        interrupt = interrupt_in(e)
        if interrupt is None:
            raise
    finally:
        # Whatever stopped the sweep, no run of it stays RUNNING: Tune stops trial actors
        # without their clean-up, and a dead trial cannot end its own run.
        why = f"interrupted by {interrupt.signal_name}" if interrupt else "the sweep stopped before this trial ended"
        try:
            _end_running(tracker, experiment_id, sweep_run_id, why)
        except TrackingUnavailable:  # `rlsparsity upload` ends them once the server is back
            spool.keep_status(sweep_run_id, "", end_running_children=why)
        tracker.finish(sweep_run_id, ok, killed=interrupt is not None)
    if spool.down():  # one message, naming the spool, rather than each trial's error
        raise SweepTrackingLost(result, TrackingUnavailable(tracker.uri, spool))
    if interrupt is not None:
        finished = {r.data.tags.get(LABEL_TAG) for r in tracker.children(experiment_id, sweep_run_id, kind=KIND_TRIAL, status="FINISHED")}
        labels = [t.label for t in spec.trials()]
        raise SweepInterrupted(result, interrupt, [x for x in labels if x in finished], [x for x in labels if x not in finished])
    if not result.ok:
        raise SweepFailed(result)
    return result


def _run_grid(spec: SweepSpec, tracker: Tracker, result: SweepResult, console: Console, *, resume: bool,
              ctx: dict[str, Any]) -> None:
    """The Tune grid (restored from its saved state on resume), the summary and the overlap."""
    first = spec.trials()[0]
    have = ray.cluster_resources()
    fits = max(1, min(math.floor(have.get(k, 0.0) / need) if need else math.inf
                      for k, need in (("CPU", max(t.cpus() for t in spec.trials())),
                                      ("GPU", max(t.gpus() for t in spec.trials())))))
    concurrent = first.resources.max_concurrent_trials or fits
    console.print(
        f"[bold]sweep {spec.name}[/]: {len(spec.grid())} trials over {sorted(spec.axes) or 'no axes'}, "
        f"{concurrent} at a time; MLflow {tracker.uri} (experiment {spec.name!r}, run {result.sweep_run_id})"
    )
    # The trial function only coordinates: its actors and learners hold the CPUs. Tune
    # refuses an empty bundle, so the driver reserves memory only.
    trainable = tune.with_resources(tune.with_parameters(_tune_fn, ctx=ctx), {"cpu": 0, "memory": 256 * 2**20})
    name = f"{spec.name}-{result.sweep_run_id[:8]}"
    path = Path(ctx["storage_path"]) / name
    if resume and tune.Tuner.can_restore(str(path)):
        console.print(f"resuming the Tune grid saved in {path}")
        # Unfinished and failed trials run again from their start; a trial that finished in
        # MLflow after Tune's last save reports its run instead of running (trial.run_trial).
        tuner = tune.Tuner.restore(str(path), trainable=trainable, resume_unfinished=True,
                                   resume_errored=False, restart_errored=True)
    else:
        if resume:
            console.print(f"no saved Tune grid in {path}: running the grid, skipping trials finished in MLflow")
        tuner = tune.Tuner(
            trainable,
            param_space={"trial": tune.grid_search([{"point": p, "label": spec.trial(p).label} for p in spec.grid()])},
            tune_config=tune.TuneConfig(max_concurrent_trials=concurrent, trial_name_creator=_trial_name),
            run_config=tune.RunConfig(
                name=name,
                storage_path=ctx["storage_path"],
                stop=_StopWhenTrackingDown(tracker.spool),  # set by sweep()
                verbose=1,
                progress_reporter=tune.CLIReporter(
                    metric_columns={"step": "step", "reward": "reward", "loss": "loss", "sync_bytes": "sync B"},
                    parameter_columns={},
                    max_report_frequency=15,
                ),
            ),
        )
    grid = tuner.fit()
    for r in grid:
        point, label = r.config["trial"]["point"], r.config["trial"]["label"]
        metrics = r.metrics or {}
        if r.error or not metrics.get(COMPLETE_KEY):
            result.failed.append(f"{label}: {_error_text(r.error)}")
        else:
            trial = spec.trial(point)
            result.trials.append({"label": label, **trial.model_dump(include={"seed", "data_seed", "algorithm"}),
                                  "dataset": trial.dataset_label,
                                  "setting": trial.setting_label,
                                  "loss_type": getattr(trial.algo_config, "loss_type", None), **metrics})
    print_summary(result, console)
    if not result.failed and first.analysis and len(result.trials) > 1:
        from rlsparsity.analysis.job import run_overlap_analysis

        result.overlap = run_overlap_analysis(tracker.uri, spec.name, sweep_run_id=result.sweep_run_id, console=console)


class _StopWhenTrackingDown(tune.Stopper):
    """Start no more trials, and stop the running ones, once the tracking server is down."""

    def __init__(self, spool: Spool) -> None:
        self.spool = spool

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        return False

    def stop_all(self) -> bool:
        return self.spool.down()


def _resumable_run(tracker: Tracker, spec: SweepSpec, parent_run_id: str | None) -> str:
    """The latest sweep run of this experiment, if it did not finish and ran this spec."""
    exp = tracker.client.get_experiment_by_name(spec.name)
    where = f"tags.`{KIND_TAG}` = '{KIND_SWEEP}'"
    runs = [] if exp is None else [
        r for r in tracker.client.search_runs([exp.experiment_id], where, order_by=["attributes.start_time DESC"], max_results=50)
        if r.data.tags.get(PARENT_TAG) == parent_run_id]
    if not runs:
        raise SpecError(f"--resume: experiment {spec.name!r} ({tracker.uri}) has no sweep run to resume; run it without --resume")
    run = runs[0]
    if run.info.status == "FINISHED":
        raise SpecError(f"--resume: the latest sweep run of {spec.name!r}, {run.info.run_id}, finished; nothing to resume")
    if run.data.tags.get(SPEC_KEY_TAG) != spec.fingerprint():
        raise SpecError(f"--resume: sweep run {run.info.run_id} of {spec.name!r} ran another spec (tag {SPEC_KEY_TAG} "
                        f"{run.data.tags.get(SPEC_KEY_TAG)!r}, this spec {spec.fingerprint()!r}); resume with the same "
                        "spec file and --set overrides")
    return run.info.run_id


def _end_running(tracker: Tracker, experiment_id: str, sweep_run_id: str, why: str) -> None:
    """KILLED for the runs of a sweep left RUNNING: stopped from outside, not failed."""
    for run in tracker.children(experiment_id, sweep_run_id, status="RUNNING"):
        tracker.set_tags(run.info.run_id, {ERROR_TAG: why})
        tracker.finish(run.info.run_id, False, killed=True)


def _check_fits(spec: SweepSpec) -> None:
    """Refuse a trial that can never be placed: Tune would wait for its resources for ever."""
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    total = {k: sum(n.get(k, 0.0) for n in nodes) for k in ("CPU", "GPU")}
    node_max = {k: max((n.get(k, 0.0) for n in nodes), default=0.0) for k in ("CPU", "GPU")}
    for t in spec.trials():
        r, ro = t.resources, t.rollout
        problems = []
        if t.cpus() > total["CPU"]:
            problems.append(f"{ro.replicas} rollout replica(s) x rollout.cpus={ro.cpus} + {r.learners} learner(s) x "
                            f"resources.cpus_per_learner={r.cpus_per_learner} = {t.cpus():g} CPUs, the cluster has {total['CPU']:g}")
        for name, need in (("rollout.cpus", ro.cpus), ("resources.cpus_per_learner", r.cpus_per_learner)):
            if need > node_max["CPU"]:
                problems.append(f"{name}={need:g} CPUs in one actor, the largest node has {node_max['CPU']:g}")
        for name, need in (("rollout.gpus", ro.gpus), ("resources.gpus_per_learner", r.gpus_per_learner)):
            if need > node_max["GPU"]:
                problems.append(f"{name}={need:g} GPUs in one actor, the largest node has {node_max['GPU']:g}")
        if t.gpus() > total["GPU"]:
            problems.append(f"{ro.replicas} rollout replica(s) x rollout.gpus={ro.gpus:g} + {r.learners} learner(s) x "
                            f"resources.gpus_per_learner={r.gpus_per_learner:g} = {t.gpus():g} GPUs, the cluster has "
                            f"{total['GPU']:g} (largest node {node_max['GPU']:g})")
        if problems:
            raise SpecError(f"invalid sweep spec:\n  trial {t.label} can never fit this Ray cluster: "
                            + "; ".join(problems) + ". Lower the resources, or connect to a larger cluster (RAY_ADDRESS)")


def _fetch_subnetwork_masks(spec: SweepSpec, tracker: Tracker, dest: Path, base: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """Each masked trial's source mask as a local file, with its source (run id or file),
    checked before anything runs."""
    out: dict[str, tuple[str, str]] = {}
    for trial in spec.trials():
        sub = trial.training.subnetwork
        if sub is None:
            continue
        try:
            found = fetch_source_mask(sub, tracker, dest, base, trial.base_label)
        except SourceError as e:
            raise SpecError(f"invalid sweep spec:\n  trial {trial.label}: {e}") from e
        if found is not None:
            out[trial.label] = (str(found[0]), found[1])
    return out


def _error_text(error: BaseException | None) -> str:
    """The root cause of a trial's error: Tune wraps it (RayTaskError, TuneError), and the
    innermost cause names what the user got wrong."""
    if error is None:
        return "ended without its final report"
    # RayTaskError keeps the original as `.cause`; Python chains as `__cause__`.
    while (inner := getattr(error, "cause", None) or error.__cause__) is not None and inner is not error:
        error = inner
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[-1] if lines else ''}"


def _tune_fn(config: dict[str, Any], ctx: dict[str, Any]) -> None:
    run_trial(config["trial"]["point"], config["trial"]["label"], ctx)


def _trial_name(trial) -> str:
    point = trial.config["trial"]["point"]
    return "_".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in point.items()) or "trial"


def _before_after(t: dict[str, Any], key: str) -> str:
    return f"{t.get(key + '_before', float('nan')):.3f} → {t.get(key + '_after', float('nan')):.3f}"


def _algorithm_cell(t: dict[str, Any]) -> str:
    # GRPO's loss aggregation defaults to TRL's (dapo); the table says which ran.
    return t["algorithm"] + (f" ({t['loss_type']})" if t.get("loss_type") else "")


def print_summary(result: SweepResult, console: Console) -> None:
    table = Table(title=f"sweep {result.experiment}: one row per trial (bf16 view vs θ0)")
    # Preference accuracy is what preference algorithms train; show it when the grid has one.
    pref = any(get_algorithm(t["algorithm"]).source == "pairs" for t in result.trials)
    data_seeds = any(t.get("data_seed") is not None for t in result.trials)
    settings = any(t.get("setting") for t in result.trials)
    cols = ["seed", *(["data seed"] if data_seeds else []), "dataset", "algorithm", *(["setting"] if settings else []), "reward first → last", "loss first → last", "test acc θ0 → final", "answer acc θ0 → final"]
    cols += ["pref acc θ0 → final"] if pref else []
    for col in [*cols, "bf16 sparsity", "fp32 changed", "sync bytes / dense"]:
        table.add_column(col, justify="right" if col not in ("algorithm", "setting") else "left")
    for t in sorted(result.trials, key=lambda t: (t["algorithm"], t.get("setting", ""), t["dataset"], t["seed"], -1 if t.get("data_seed") is None else t["data_seed"])):
        sent, dense = t.get("sync_bytes_total", 0), t.get("sync_dense_bytes_total", 0)
        table.add_row(
            str(t["seed"]), *([("—" if t.get("data_seed") is None else str(t["data_seed"]))] if data_seeds else []), t["dataset"],
            _algorithm_cell(t), *([t.get("setting", "")] if settings else []),
            *(f"{t[f'train_{k}_first']:.3f} → {t[f'train_{k}_last']:.3f}" if f"train_{k}_first" in t else "—" for k in ("reward", "loss")),
            _before_after(t, "test_accuracy"),
            _before_after(t, "test_answer_accuracy"),
            *([_before_after(t, "test_preference_accuracy")] if pref else []),
            f"{100 * t.get('final/sparsity_bf16', float('nan')):.2f} %",
            f"{100 * t.get('final/changed_frac_masters', float('nan')):.2f} %",
            f"{sent / 1e6:.2f} MB / {dense / 1e6:.2f} MB ({100 * sent / dense if dense else float('nan'):.1f} %)",
        )
    console.print(table)
