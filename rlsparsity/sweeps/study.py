"""A staged subnetwork study (the paper's RQ2/RQ3, with random-mask controls): the full
trials, then one masked stage per kind over the same grid, each trial masked by its own grid
point's full trial, then the closeness table. All stages nest under one study run.

A stage whose spec matches a FINISHED stage of an earlier study in the experiment is reused,
not run again (keyed by the stage's spec; the code's version is not part of the key).
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from rlsparsity.analysis.closeness import CLOSENESS_CRITERIA, identical_shares, update_overlap
from rlsparsity.contracts.mlflow_layout import (
    ANALYSIS_TAG,
    CLOSENESS_ARTIFACT,
    KIND_ANALYSIS,
    KIND_STUDY,
    KIND_SWEEP,
    KIND_TAG,
    KIND_TRIAL,
    LABEL_TAG,
    STAGE_KEY_TAG,
    STAGE_TAG,
    SUMMARY_METRICS,
    WEIGHTS_DIR,
    mask_artifact_path,
)
from rlsparsity.platform.models.saving import verify_weights_dir
from rlsparsity.platform.tracking import Tracker
from rlsparsity.sweeps.interrupt import interrupt_in, signals_interrupt
from rlsparsity.sweeps.run import SweepInterrupted, SweepResult, sweep
from rlsparsity.sweeps.spec import SweepSpec


@dataclass
class StudyResult:
    experiment: str
    study_run_id: str
    tracking_uri: str
    stages: dict[str, SweepResult] = field(default_factory=dict)
    reused: list[str] = field(default_factory=list)  # stages taken from an earlier study
    table: list[dict[str, Any]] = field(default_factory=list)  # one row per full trial and kind
    analysis_run_id: str | None = None


def stage_spec(spec: SweepSpec, kind: str) -> SweepSpec:
    """The sweep of one stage: ``full`` is the spec itself; a masked kind adds its
    ``training.subnetwork`` and leaves the overlap analysis to the study."""
    raw = spec.to_dict()
    raw.pop("subnetwork_stages", None)
    if kind != "full":
        raw.setdefault("training", {})["subnetwork"] = spec.stages.subnetwork(kind, spec.name)
        raw["analysis"] = False
    return SweepSpec(raw)


def stage_key(stage: SweepSpec) -> str:
    return stage.fingerprint()


def run_study(spec: SweepSpec, *, console: Console | None = None) -> StudyResult:
    """Run (or reuse) every stage, then compute, log and print the closeness table."""
    console = console or Console()
    first = spec.trials()[0]
    tracker = Tracker(first.tracking.uri, first.tracking.artifact_location)
    experiment_id = tracker.experiment(spec.name)
    study_run = tracker.start_run(
        experiment_id, f"{spec.name}-study-{time.strftime('%Y%m%d-%H%M%S')}", kind=KIND_STUDY,
        tags={"stages": json.dumps(["full", *spec.stages.kinds])},
    )
    result = StudyResult(spec.name, study_run, tracker.uri)
    ok = killed = False
    try:
        with signals_interrupt():  # between stages too: the study's run ends KILLED
            tracker.log_params(study_run, {"spec": json.dumps(spec.to_dict())})
            for kind in ("full", *spec.stages.kinds):
                stage = stage_spec(spec, kind)
                key = stage_key(stage)
                earlier = _finished_stage(tracker, spec.name, experiment_id, key)
                if earlier is not None:
                    console.print(f"[bold]stage {kind}[/]: reusing sweep run {earlier.sweep_run_id} (finished, same spec)")
                    result.stages[kind] = earlier
                    result.reused.append(kind)
                    continue
                console.print(f"[bold]stage {kind}[/]")
                result.stages[kind] = sweep(stage, console=console, parent_run_id=study_run,
                                            run_tags={STAGE_TAG: kind, STAGE_KEY_TAG: key})
            result.table = closeness_table(tracker, result.stages)
            result.analysis_run_id = _log_table(tracker, experiment_id, study_run, result.table)
            print_table(result, console)
            ok = True
    except Exception as e:
        killed = isinstance(e, SweepInterrupted) or interrupt_in(e) is not None
        raise
    finally:
        tracker.finish(study_run, ok, killed=killed)
    return result


def _finished_stage(tracker: Tracker, experiment: str, experiment_id: str, key: str) -> SweepResult | None:
    """The latest FINISHED stage sweep with this key, its trials read back from MLflow."""
    runs = tracker.client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{STAGE_KEY_TAG}` = '{key}' and tags.`{KIND_TAG}` = '{KIND_SWEEP}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not runs:
        return None
    sweep_run = runs[0]
    result = SweepResult(experiment, sweep_run.info.run_id, tracker.uri)
    for run in tracker.children(experiment_id, sweep_run.info.run_id, kind=KIND_TRIAL):
        tags, metrics = run.data.tags, run.data.metrics
        result.trials.append({
            "label": tags[LABEL_TAG], "seed": int(tags["seed"]), "dataset": tags["dataset"], "algorithm": tags["algorithm"],
            "mlflow_run_id": run.info.run_id, **{k: metrics[k] for k in SUMMARY_METRICS if k in metrics},
        })
    return result


def closeness_table(tracker: Tracker, stages: dict[str, SweepResult]) -> list[dict[str, Any]]:
    """Per full trial and masked kind: test accuracies, sparsities, the share of θ_sub's
    parameters identical to θ_full's per criterion, and the overlap of the update sets."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="rlsparsity-study-") as tmp:
        fetched: dict[str, tuple[Path, Path]] = {}

        def fetch(run_id: str) -> tuple[Path, Path]:
            if run_id not in fetched:
                dest = Path(tmp) / run_id
                dest.mkdir()
                weights = Path(tracker.client.download_artifacts(run_id, WEIGHTS_DIR, str(dest)))
                verify_weights_dir(weights)
                mask = Path(tracker.client.download_artifacts(run_id, mask_artifact_path(None), str(dest)))
                fetched[run_id] = (weights, mask)
            return fetched[run_id]

        for full in sorted(stages["full"].trials, key=lambda t: t["label"]):
            full_weights, full_mask = fetch(full["mlflow_run_id"])
            for kind, stage in stages.items():
                if kind == "full":
                    continue
                masked = next((t for t in stage.trials if t["label"] == f"{full['label']}/{kind}"), None)
                if masked is None:
                    continue
                weights, mask = fetch(masked["mlflow_run_id"])
                overlap = update_overlap(mask, full_mask)
                rows.append({
                    "label": full["label"], "kind": kind,
                    "full_run_id": full["mlflow_run_id"], "run_id": masked["mlflow_run_id"],
                    "test_accuracy_theta0": full.get("test_accuracy_before", math.nan),
                    "test_accuracy_full": full.get("test_accuracy_after", math.nan),
                    "test_accuracy": masked.get("test_accuracy_after", math.nan),
                    "sparsity_full": full.get("final/sparsity_bf16", math.nan),
                    "sparsity": masked.get("final/sparsity_bf16", math.nan),
                    "identical": identical_shares(weights, full_weights),
                    "overlap_of_sub": overlap["of_sub"], "overlap_of_full": overlap["of_full"],
                })
    return rows


def _metric_name(text: str) -> str:
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in text)


def _log_table(tracker: Tracker, experiment_id: str, study_run: str, table: list[dict[str, Any]]) -> str:
    run_id = tracker.start_run(experiment_id, "subnetwork-closeness", kind=KIND_ANALYSIS, parent=study_run,
                               tags={ANALYSIS_TAG: "subnetwork_closeness"})
    ok = False
    try:
        metrics = {}
        for row in table:
            prefix = _metric_name(f"{row['label']}/{row['kind']}")
            metrics[f"{prefix}/test_accuracy"] = row["test_accuracy"]
            metrics[f"{prefix}/overlap_of_sub"] = row["overlap_of_sub"]
            for crit, share in row["identical"].items():
                metrics[f"{prefix}/identical_{_metric_name(crit)}"] = share
        tracker.log_metrics(run_id, {k: v for k, v in metrics.items() if not math.isnan(v)})
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / Path(CLOSENESS_ARTIFACT).name
            path.write_text(json.dumps({"criteria": list(CLOSENESS_CRITERIA), "rows": table}, indent=1))
            tracker.log_artifact(run_id, path, str(Path(CLOSENESS_ARTIFACT).parent))
        ok = True
    finally:
        tracker.finish(run_id, ok)
    return run_id


def print_table(result: StudyResult, console: Console) -> None:
    table = Table(title=f"study {result.experiment}: subnetwork runs against their full runs (RQ2/RQ3)")
    for col in ("trial", "mask", "test acc θ0 / full / masked", "bf16 sparsity full / masked",
                *(f"identical {c}" for c in CLOSENESS_CRITERIA), "I_sub ∩ I_full / I_sub"):
        table.add_column(col, justify="left" if col in ("trial", "mask") else "right")
    for r in result.table:
        table.add_row(
            r["label"], r["kind"],
            f"{r['test_accuracy_theta0']:.3f} / {r['test_accuracy_full']:.3f} / {r['test_accuracy']:.3f}",
            f"{100 * r['sparsity_full']:.2f} % / {100 * r['sparsity']:.2f} %",
            *(f"{100 * r['identical'][c]:.2f} %" for c in CLOSENESS_CRITERIA),
            f"{100 * r['overlap_of_sub']:.2f} %",
        )
    console.print(table)
