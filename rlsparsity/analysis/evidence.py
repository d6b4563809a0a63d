"""What a reproduction report is built from: the finished trials of some experiments, their
overlap analyses and their subnetwork studies, read from MLflow once.

Only what exists is read: a claim whose runs are absent is reported as not run.
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlsparsity.analysis.mlflow_runs import search_all_runs
from rlsparsity.contracts.mlflow_layout import (
    CLOSENESS_ARTIFACT,
    KIND_ANALYSIS,
    KIND_STUDY,
    KIND_TAG,
    KIND_TRIAL,
    LABEL_TAG,
    OVERLAP_DIR,
    SUBNETWORK_TAG,
)

# What a measurement's setting is: the axes the follow-up work says sparsity hinges on, and
# the number of steps (sparsity falls as training goes on).
SETTING_KEYS = ("model", "training.lr", "training.steps", "training.precision", "training.optimizer")
# Per-step metrics some claims read over the mask steps (the rest come from the summary).
HISTORY_METRICS = ("sparsity_bf16", "changed_frac_since_prev", "drift/step_update_vanished_frac")


@dataclass
class Trial:
    experiment: str
    run_id: str
    label: str
    params: dict[str, str]
    metrics: dict[str, float]
    subnetwork: str | None = None
    history: dict[str, list[tuple[int, float]]] = field(default_factory=dict)

    def param(self, key: str, default: str = "") -> str:
        return self.params.get(key, default)

    @property
    def algorithm(self) -> str:
        return self.param("algorithm")

    @property
    def variant(self) -> str:
        return self.param("variant", "None")

    @property
    def seed(self) -> int:
        return int(self.param("seed", "0"))

    @property
    def setting(self) -> tuple[tuple[str, str], ...]:
        return tuple((k, _short(k, self.param(k))) for k in SETTING_KEYS)

    def get(self, key: str) -> float:
        return self.metrics.get(key, math.nan)


def _short(key: str, value: str) -> str:
    if key == "training.lr":
        try:
            return f"{float(value):g}"
        except ValueError:
            return value
    return value


@dataclass
class Overlap:
    """One overlap analysis: its runs' factors and every pair's counts (result.json)."""

    experiment: str
    run_id: str
    runs: list[dict[str, Any]]  # label, sparsity, factors
    pairs: list[dict[str, Any]]
    factor_keys: list[str]


@dataclass
class Closeness:
    """One subnetwork study's closeness table (rows as `sweeps.study.closeness_table` logs them)."""

    experiment: str
    run_id: str
    rows: list[dict[str, Any]]


@dataclass
class Evidence:
    experiments: list[str]
    trials: list[Trial] = field(default_factory=list)
    overlaps: list[Overlap] = field(default_factory=list)
    closeness: list[Closeness] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # experiments that do not exist


def gather(tracking_uri: str, experiments: Sequence[str], *, history: bool = True) -> Evidence:
    """Every FINISHED trial of `experiments` (the latest run of each label), the latest overlap
    analysis of each experiment, and every study's closeness table."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    ev = Evidence(list(experiments))
    for name in experiments:
        exp = client.get_experiment_by_name(name)
        if exp is None:
            ev.missing.append(name)
            continue
        finished = "attributes.status = 'FINISHED'"
        latest: dict[str, Any] = {}
        for run in search_all_runs(client, exp.experiment_id, f"tags.`{KIND_TAG}` = '{KIND_TRIAL}' and {finished}",
                                   order_by=["attributes.start_time ASC"]):
            latest[run.data.tags.get(LABEL_TAG, run.info.run_id)] = run  # a re-run label: its latest run
        for label, run in latest.items():
            t = Trial(name, run.info.run_id, label, dict(run.data.params), dict(run.data.metrics),
                      run.data.tags.get(SUBNETWORK_TAG))
            if history:
                for key in HISTORY_METRICS:
                    if key in run.data.metrics:
                        t.history[key] = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
            ev.trials.append(t)
        analyses = search_all_runs(client, exp.experiment_id, f"tags.`{KIND_TAG}` = '{KIND_ANALYSIS}' and {finished}",
                                   order_by=["attributes.start_time DESC"])
        for run in analyses:
            doc = _download_json(client, run.info.run_id, f"{OVERLAP_DIR}/result.json")
            if doc is not None:
                ev.overlaps.append(Overlap(name, run.info.run_id, doc["run_info"], doc["pairs"],
                                           list(doc.get("meta", {}).get("factor_keys") or [])))
                break
        seen: set[tuple] = set()
        for run in search_all_runs(client, exp.experiment_id, f"tags.`{KIND_TAG}` = '{KIND_STUDY}' and {finished}",
                                   order_by=["attributes.start_time DESC"]):
            for child in search_all_runs(client, exp.experiment_id,
                                         f"tags.`mlflow.parentRunId` = '{run.info.run_id}' and tags.`{KIND_TAG}` = '{KIND_ANALYSIS}'"):
                doc = _download_json(client, child.info.run_id, CLOSENESS_ARTIFACT)
                rows = []
                for row in (doc or {}).get("rows", []):
                    # The full run's setting: two studies of one experiment may differ in lr.
                    params = client.get_run(row["full_run_id"]).data.params
                    row["setting"] = {k: _short(k, params.get(k, "")) for k in SETTING_KEYS}
                    key = (tuple(row["setting"].items()), row["label"], row["kind"])
                    if key not in seen:  # the latest study's row wins
                        seen.add(key)
                        rows.append(row)
                if rows:
                    ev.closeness.append(Closeness(name, child.info.run_id, rows))
    return ev


def _download_json(client: Any, run_id: str, path: str) -> Any:
    with tempfile.TemporaryDirectory(prefix="rlsparsity-report-") as tmp:
        try:
            local = client.download_artifacts(run_id, path, tmp)
        except Exception:  # noqa: BLE001 - absent artifact: this run has none
            return None
        return json.loads(Path(local).read_text())


def select(trials: Iterable[Trial], **where: Any) -> list[Trial]:
    """Trials whose param (dots as __) equals the value, or is in it when a tuple is given."""
    out = []
    for t in trials:
        ok = True
        for key, want in where.items():
            have = t.params.get(key.replace("__", "."), "None")
            ok &= have in want if isinstance(want, tuple) else have == str(want)
        if ok:
            out.append(t)
    return out
