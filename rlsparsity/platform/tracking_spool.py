"""What a sweep could not send to an unreachable tracking server, kept on local disk until
`rlsparsity upload SPOOL` sends it.

One folder per sweep run (`.rlsparsity/unsent/<sweep run id>` by default), shared by the
driver, the trial actors and the learners of one machine:

    UNREACHABLE                      the server is down: every process stops waiting on it
    <run id>/batches.jsonl           metrics, params and tags not logged, in order
    <run id>/artifacts/<dir>/<file>  artifacts not uploaded (masks, weights)
    <run id>/status.json             the run's end: status, and whether its RUNNING children end too

The marker turns MLflow's retries (about a minute per request) into one wait per machine:
after the first request that ran out of retries, the others fail at once. The upload sends
each piece, then deletes it, so an upload that fails half-way can be run again.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MARKER = "UNREACHABLE"
BATCHES = "batches.jsonl"
ARTIFACTS = "artifacts"
STATUS = "status.json"


@dataclass(frozen=True)
class Spool:
    root: Path

    def down(self) -> bool:
        return (self.root / MARKER).exists()

    def mark_down(self, uri: str, error: str) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        if not self.down():
            _write_json(self.root / MARKER, {"uri": uri, "since": time.time(), "error": error[:2000]})

    def uri(self) -> str | None:
        try:
            return json.loads((self.root / MARKER).read_text())["uri"]
        except (OSError, ValueError, KeyError):
            return None

    def clear(self) -> None:
        (self.root / MARKER).unlink(missing_ok=True)

    def _run(self, run_id: str) -> Path:
        path = self.root / run_id
        path.mkdir(parents=True, exist_ok=True)
        return path

    def keep_batch(self, run_id: str, batch: dict[str, Any]) -> None:
        with (self._run(run_id) / BATCHES).open("a") as f:
            f.write(json.dumps(batch) + "\n")

    def keep_artifact(self, run_id: str, path: Path, artifact_path: str | None) -> None:
        dest = self._run(run_id) / ARTIFACTS / (artifact_path or "")
        dest.mkdir(parents=True, exist_ok=True)
        if path.is_dir():
            shutil.copytree(path, dest, dirs_exist_ok=True)
        else:
            shutil.copy2(path, dest / path.name)

    def keep_status(self, run_id: str, status: str, *, end_running_children: str | None = None) -> None:
        previous = self.status(run_id) or {}
        # A run's children are ended once: a later status (its finish) keeps the request.
        why = end_running_children or previous.get("end_running_children")
        _write_json(self._run(run_id) / STATUS, {"status": status or previous.get("status"), "end_running_children": why})

    def status(self, run_id: str) -> dict[str, Any] | None:
        path = self.root / run_id / STATUS
        return json.loads(path.read_text()) if path.exists() else None

    def runs(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if p.is_dir()) if self.root.is_dir() else []

    def describe(self) -> str:
        """What is waiting here, for the message that names the folder."""
        runs = self.runs()
        files = sum(1 for r in runs for p in (self.root / r / ARTIFACTS).rglob("*") if p.is_file())
        ends = sum(1 for r in runs if (self.root / r / STATUS).exists())
        logged = sum(1 for r in runs if (self.root / r / BATCHES).exists())
        return (f"kept for {len(runs)} run(s) in {self.root}: {files} artifact file(s), {ends} run end status(es), "
                f"unsent metrics/params/tags of {logged} run(s)")


def _write_json(path: Path, value: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(value))
    tmp.replace(path)
