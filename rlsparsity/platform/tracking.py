"""MLflow tracking: one experiment per sweep, a parent run, nested trial runs.

Everything goes through `MlflowClient` with an explicit run id, so a Ray worker in any
process can log into the trial's run without global MLflow state.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

from rlsparsity.contracts.mlflow_layout import KIND_TAG

T = TypeVar("T")


def resolve_tracking_uri(uri: str) -> str:
    """Make a relative `sqlite:///file.db` absolute: Ray workers run in other directories."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str(Path(uri[len(prefix) :]).resolve())
    return uri


def default_artifact_location(uri: str) -> str | None:
    """For a SQLite store, keep artifacts in `mlartifacts/` beside the database file."""
    prefix = "sqlite:///"
    if uri.startswith(prefix):
        return (Path(uri[len(prefix) :]).parent / "mlartifacts").resolve().as_uri()
    return None  # a tracking server decides (--artifacts-destination)


def _retry(fn: Callable[[], T], attempts: int = 5) -> T:
    # Concurrent trials write to one SQLite file; it answers "database is locked" under load.
    for i in range(attempts):
        try:
            return fn()
        except MlflowException as e:
            if "locked" not in str(e) or i == attempts - 1:
                raise
            time.sleep(0.2 * 2**i)
    raise AssertionError("unreachable")


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class Tracker:
    def __init__(self, uri: str, artifact_location: str | None = None) -> None:
        self.uri = resolve_tracking_uri(uri)
        self.artifact_location = artifact_location or default_artifact_location(self.uri)
        self.client = MlflowClient(tracking_uri=self.uri)

    def experiment(self, name: str) -> str:
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        try:
            return self.client.create_experiment(name, artifact_location=self.artifact_location)
        except MlflowException:
            # Another process created it first.
            return self.client.get_experiment_by_name(name).experiment_id

    def start_run(
        self, experiment_id: str, name: str, *, kind: str, parent: str | None = None, tags: Mapping[str, Any] | None = None
    ) -> str:
        all_tags = {KIND_TAG: kind, MLFLOW_RUN_NAME: name, **{k: str(v) for k, v in (tags or {}).items()}}
        if parent:
            all_tags[MLFLOW_PARENT_RUN_ID] = parent
        run = _retry(lambda: self.client.create_run(experiment_id, tags=all_tags, run_name=name))
        return run.info.run_id

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            _retry(lambda chunk=items[i : i + 100]: self.client.log_batch(run_id, params=chunk))

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        for i in range(0, len(items), 500):
            _retry(lambda chunk=items[i : i + 500]: self.client.log_batch(run_id, metrics=chunk))

    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        _retry(lambda: self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()]))

    def log_artifact(self, run_id: str, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        _retry(lambda: self.client.log_artifact(run_id, str(path), artifact_path))

    def log_artifacts(self, run_id: str, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        _retry(lambda: self.client.log_artifacts(run_id, str(path), artifact_path))

    def finish(self, run_id: str, ok: bool, *, killed: bool = False) -> None:
        status = "FINISHED" if ok else "KILLED" if killed else "FAILED"
        _retry(lambda: self.client.set_terminated(run_id, status))

    def reopen(self, run_id: str) -> None:
        """A resumed run is RUNNING again (MLflow keeps its params, metrics and artifacts)."""
        _retry(lambda: self.client.update_run(run_id, status="RUNNING"))

    def children(self, experiment_id: str, parent_id: str, *, kind: str | None = None,
                 status: str | None = None) -> list[Any]:
        """Runs nested under `parent_id`, oldest first, optionally of one kind and status."""
        where = [f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent_id}'"]
        if kind:
            where.append(f"tags.`{KIND_TAG}` = '{kind}'")
        if status:
            where.append(f"attributes.status = '{status}'")
        runs, token = [], None
        while True:
            page = _retry(lambda t=token: self.client.search_runs(
                [experiment_id], " and ".join(where), max_results=1000,
                order_by=["attributes.start_time ASC"], page_token=t))
            runs += page
            if not (token := page.token):
                return runs



class RunSink:
    """The learner's `Sink` for one MLflow run: metrics and mask files go to `run_id`."""

    def __init__(self, tracker: Tracker, run_id: str) -> None:
        self.tracker, self.run_id = tracker, run_id

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        self.tracker.log_metrics(self.run_id, metrics, step=step)

    def log_artifact(self, path: str | os.PathLike, artifact_dir: str) -> None:
        self.tracker.log_artifact(self.run_id, path, artifact_dir)

    def log_artifacts(self, path: str | os.PathLike, artifact_dir: str) -> None:
        self.tracker.log_artifacts(self.run_id, path, artifact_dir)
