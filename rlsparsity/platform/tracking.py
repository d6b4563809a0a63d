"""MLflow tracking: one experiment per sweep, a parent run, nested trial runs.

Everything goes through `MlflowClient` with an explicit run id, so a Ray worker in any
process can log into the trial's run without global MLflow state.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

from rlsparsity.analysis.mlflow_runs import search_all_runs
from rlsparsity.contracts.mlflow_layout import ERROR_TAG, EXPERIMENT_KIND_TAGS, KIND_TAG
from rlsparsity.platform.tracking_spool import ARTIFACTS, BATCHES, STATUS, Spool

T = TypeVar("T")

# MLflow retries a request that finds no server 7 times by default, backing off 2 s
# doubling: about 250 s before it gives up, per request. 5 retries wait about 60 s, which
# still carries a trial through a restart of the server (tests/test_faults.py), and
# bound the wait when it is down for good. A user's own setting wins.
RETRIES_ENV = "MLFLOW_HTTP_REQUEST_MAX_RETRIES"
DEFAULT_RETRIES = "5"
_UNREACHABLE = ("Max retries exceeded", "Connection refused", "Read timed out", "Failed to establish a new connection")


class TrackingUnavailable(RuntimeError):
    """The tracking server did not answer within MLflow's retries."""

    def __init__(self, uri: str, spool: Spool | None) -> None:
        self.uri, self.spool = uri, spool
        msg = f"the tracking server {uri} is unreachable: no answer within MLflow's {os.environ.get(RETRIES_ENV, DEFAULT_RETRIES)} retries"
        if spool is not None:
            msg += f"; what was not sent is kept in {spool.root}: once the server is back, send it with `rlsparsity upload {spool.root}`"
        super().__init__(msg)

    def __reduce__(self) -> tuple[type, tuple[str, Spool | None]]:  # Ray sends it between processes
        return (TrackingUnavailable, (self.uri, self.spool))


def unreachable(error: BaseException) -> bool:
    """MLflow's error for a server that refused, timed out or kept failing every retry."""
    return isinstance(error, MlflowException) and any(s in str(error) for s in _UNREACHABLE)


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
    """The platform's MLflow client. With a `spool` folder, what an unreachable server did not
    take is kept there (see `tracking_spool`), and every later call fails at once."""

    def __init__(self, uri: str, artifact_location: str | None = None, spool: str | os.PathLike | None = None) -> None:
        os.environ.setdefault(RETRIES_ENV, DEFAULT_RETRIES)  # read by MLflow at each request
        self.uri = resolve_tracking_uri(uri)
        self.artifact_location = artifact_location or default_artifact_location(self.uri)
        self.client = MlflowClient(tracking_uri=self.uri)
        self.spool: Spool | None = None
        if spool is not None:
            self.keep_unsent_in(spool)

    def keep_unsent_in(self, folder: str | os.PathLike) -> Spool:
        """From now on, keep what an unreachable server does not take in `folder`."""
        self.spool = Spool(Path(folder))
        # A sweep reports a server gone down once (TrackingUnavailable), not per retry.
        logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)
        return self.spool

    def _send(self, request: Callable[[], T], keep: Callable[[Spool], None] | None = None, *, fatal: bool = True) -> T | None:
        """`request`, or, when the server is unreachable, `keep` what it carried in the spool
        and raise `TrackingUnavailable` (return None where not `fatal`: a run's end)."""
        if self.spool is None or not self.spool.down():
            try:
                return _retry(request)
            except MlflowException as e:
                if not unreachable(e):
                    raise
                if self.spool is not None:
                    self.spool.mark_down(self.uri, str(e))
        if self.spool is not None and keep is not None:
            keep(self.spool)
        if fatal:
            raise TrackingUnavailable(self.uri, self.spool) from None  # not urllib3's chain
        return None

    def experiment(self, name: str) -> str:
        exp = self._send(lambda: self.client.get_experiment_by_name(name))
        if exp is not None:
            return exp.experiment_id
        try:
            return self.client.create_experiment(name, artifact_location=self.artifact_location, tags=EXPERIMENT_KIND_TAGS)
        except MlflowException:
            # Another process created it first.
            return self._send(lambda: self.client.get_experiment_by_name(name)).experiment_id

    def start_run(
        self, experiment_id: str, name: str, *, kind: str, parent: str | None = None, tags: Mapping[str, Any] | None = None
    ) -> str:
        all_tags = {KIND_TAG: kind, MLFLOW_RUN_NAME: name, **{k: str(v) for k, v in (tags or {}).items()}}
        if parent:
            all_tags[MLFLOW_PARENT_RUN_ID] = parent
        run = self._send(lambda: self.client.create_run(experiment_id, tags=all_tags, run_name=name))
        return run.info.run_id

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            chunk = items[i : i + 100]
            self._send(lambda c=chunk: self.client.log_batch(run_id, params=c),
                       lambda sp, c=chunk: sp.keep_batch(run_id, {"params": {p.key: p.value for p in c}}))

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        for i in range(0, len(items), 500):
            chunk = items[i : i + 500]
            self._send(lambda c=chunk: self.client.log_batch(run_id, metrics=c),
                       lambda sp, c=chunk: sp.keep_batch(run_id, {"metrics": [[m.key, m.value, m.timestamp, m.step] for m in c]}))

    def log_metric_rows(self, run_id: str, rows: list[list[Any]]) -> None:
        """Metrics as kept in a spool: [key, value, timestamp ms, step] each."""
        self._send(lambda: self.client.log_batch(run_id, metrics=[Metric(*row) for row in rows]))

    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        strs = {k: str(v) for k, v in tags.items()}
        self._send(lambda: self.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in strs.items()]),
                   lambda sp: sp.keep_batch(run_id, {"tags": strs}))

    def log_artifact(self, run_id: str, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        self._send(lambda: self.client.log_artifact(run_id, str(path), artifact_path),
                   lambda sp: sp.keep_artifact(run_id, Path(path), artifact_path))

    def log_artifacts(self, run_id: str, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        self._send(lambda: self.client.log_artifacts(run_id, str(path), artifact_path),
                   lambda sp: sp.keep_artifact(run_id, Path(path), artifact_path))

    def finish(self, run_id: str, ok: bool, *, killed: bool = False) -> None:
        """End the run; with the server unreachable its status waits in the spool (no raise)."""
        status = "FINISHED" if ok else "KILLED" if killed else "FAILED"
        self._send(lambda: self.client.set_terminated(run_id, status), lambda sp: sp.keep_status(run_id, status), fatal=False)

    def reopen(self, run_id: str) -> None:
        """A resumed run is RUNNING again (MLflow keeps its params, metrics and artifacts),
        without the error tag its interruption left."""
        self._send(lambda: self.client.update_run(run_id, status="RUNNING"))
        if ERROR_TAG in self._send(lambda: self.client.get_run(run_id)).data.tags:
            self._send(lambda: self.client.delete_tag(run_id, ERROR_TAG))

    def children(self, experiment_id: str, parent_id: str, *, kind: str | None = None,
                 status: str | None = None) -> list[Any]:
        """Runs nested under `parent_id`, oldest first, optionally of one kind and status."""
        where = [f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent_id}'"]
        if kind:
            where.append(f"tags.`{KIND_TAG}` = '{kind}'")
        if status:
            where.append(f"attributes.status = '{status}'")
        return self._send(lambda: search_all_runs(self.client, experiment_id, " and ".join(where),
                                                  order_by=["attributes.start_time ASC"]))


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


def upload_unsent(spool_dir: str | os.PathLike, uri: str | None = None) -> dict[str, int]:
    """Send what a sweep kept in `spool_dir` while its tracking server was down, run by run:
    metrics, params and tags in order, then the artifacts, then the run's end (and that of
    its children still RUNNING). Each piece is deleted once sent, so a failed upload can be
    run again. `uri`: default the one the spool was written for. Returns what was sent."""
    spool = Spool(Path(spool_dir))
    if not spool.root.is_dir():
        raise FileNotFoundError(f"{spool.root}: no such spool folder")
    uri = uri or spool.uri()
    if uri is None:
        raise ValueError(f"{spool.root}: no {spool.root / 'UNREACHABLE'} naming the tracking server; give --tracking-uri")
    tracker = Tracker(uri)  # no spool: an unreachable server raises TrackingUnavailable
    sent = {"runs": 0, "batches": 0, "artifact files": 0, "statuses": 0}
    for run_id in spool.runs():
        folder = spool.root / run_id
        batches = folder / BATCHES
        if batches.exists():
            for line in batches.read_text().splitlines():
                b = json.loads(line)
                if "metrics" in b:
                    tracker.log_metric_rows(run_id, b["metrics"])
                if "params" in b:
                    tracker.log_params(run_id, b["params"])
                if "tags" in b:
                    tracker.set_tags(run_id, b["tags"])
                sent["batches"] += 1
            batches.unlink()
        artifacts = folder / ARTIFACTS
        for f in sorted(p for p in artifacts.rglob("*") if p.is_file()) if artifacts.is_dir() else []:
            rel = f.parent.relative_to(artifacts).as_posix()
            tracker.log_artifact(run_id, f, None if rel == "." else rel)
            f.unlink()
            sent["artifact files"] += 1
        status = spool.status(run_id)
        if status is not None:
            if why := status.get("end_running_children"):
                exp_id = tracker.client.get_run(run_id).info.experiment_id
                for child in tracker.children(exp_id, run_id, status="RUNNING"):
                    tracker.set_tags(child.info.run_id, {ERROR_TAG: why})
                    tracker.finish(child.info.run_id, False, killed=True)
            if status.get("status"):
                tracker.finish(run_id, status["status"] == "FINISHED", killed=status["status"] == "KILLED")
            (folder / STATUS).unlink()
            sent["statuses"] += 1
        shutil.rmtree(folder)
        sent["runs"] += 1
    spool.clear()
    return sent
