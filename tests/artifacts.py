"""What a trial's mask artifacts should be, spelled out independently of the recorder.

The default `training.masks.criteria` ("bitwise masters abs:1e-5 rel:1e-3") and dynamics give
six mask series: the bf16 view's bitwise masks directly under masks/ (each step's with a CSV
table beside it), the other criteria and the two dynamics series in folders of their own.
"""

from __future__ import annotations

from collections.abc import Iterable

from mlflow import MlflowClient

DEFAULT_SERIES = (
    "masks",
    "masks/masters",
    "masks/abs_1e-5",
    "masks/rel_0.001",
    "masks/since_prev",
    "masks/ever",
)


def artifact_files(client: MlflowClient, run_id: str, path: str) -> set[str]:
    """Every file under `path` in a run's artifacts, recursively."""
    files: set[str] = set()
    for info in client.list_artifacts(run_id, path):
        files |= artifact_files(client, run_id, info.path) if info.is_dir else {info.path}
    return files


def mask_files(
    steps: Iterable[int], *, final: bool = True, series: Iterable[str] = DEFAULT_SERIES
) -> set[str]:
    """The mask files of a trial that recorded masks at `steps` and (with `final`) at its end."""
    names = [*(f"step_{s:06d}" for s in steps), *(["final"] if final else [])]
    files = {f"{folder}/{name}.arrow" for folder in series for name in names}
    return files | {f"masks/{name}.csv" for name in names}
