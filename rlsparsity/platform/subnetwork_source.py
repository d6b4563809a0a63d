"""Where a subnetwork's mask comes from, fetched before anything runs: a local mask file, or
the mask artifact of a finished trial in MLflow (by run id, or by experiment and label)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mlflow.exceptions import MlflowException

from rlsparsity.contracts.mask import MaskError, read_meta
from rlsparsity.contracts.mlflow_layout import (
    KIND_TAG,
    KIND_TRIAL,
    LABEL_TAG,
    MASK_DIR,
    mask_artifact_path,
    mask_file_name,
)
from rlsparsity.platform.config import SubnetworkSpec
from rlsparsity.platform.subnetwork import check_base
from rlsparsity.platform.tracking import Tracker


class SourceError(ValueError):
    """A subnetwork's mask source does not exist or does not fit this trial."""


def find_trial_run(tracker: Tracker, sub: SubnetworkSpec, label: str = "") -> str:
    """The run id of the finished trial ``sub`` names; ``label`` fills '{label}' in its
    ``trial`` (the masked trial's own grid point)."""
    client = tracker.client
    if sub.run is not None:
        try:
            run = client.get_run(sub.run)
        except MlflowException as e:
            raise SourceError(f"training.subnetwork.run: no MLflow run {sub.run!r} in {tracker.uri}") from e
        if run.data.tags.get(KIND_TAG) != KIND_TRIAL:
            raise SourceError(f"training.subnetwork.run: run {sub.run!r} is a {run.data.tags.get(KIND_TAG)!r} run, not a trial")
        if run.info.status != "FINISHED":
            raise SourceError(f"training.subnetwork.run: trial run {sub.run!r} is {run.info.status}, not FINISHED")
        return sub.run
    exp = client.get_experiment_by_name(sub.experiment)
    if exp is None:
        raise SourceError(f"training.subnetwork.experiment: no MLflow experiment {sub.experiment!r} in {tracker.uri}")
    trial = sub.trial.replace("{label}", label)
    runs = client.search_runs(
        [exp.experiment_id],
        filter_string=f"tags.`{LABEL_TAG}` = '{trial}' and tags.`{KIND_TAG}` = '{KIND_TRIAL}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not runs:
        raise SourceError(
            f"training.subnetwork.trial: experiment {sub.experiment!r} has no FINISHED trial labelled {trial!r}"
        )
    return runs[0].info.run_id


def fetch_source_mask(
    sub: SubnetworkSpec, tracker: Tracker, dest: Path, base: dict[str, Any], label: str = ""
) -> tuple[Path, str] | None:
    """The local file of ``sub``'s source mask and where it came from (the trial's run id, or
    the file), checked against ``base``; None for a random mask with its own density. A
    trial's mask is downloaded under ``dest``; ``label`` fills '{label}' in ``sub.trial``."""
    if sub.mask is not None:
        path = Path(sub.mask).expanduser().resolve()
        if not path.is_file():
            raise SourceError(f"training.subnetwork.mask: no mask file {str(path)!r}")
        source = str(path)
    elif sub.run is not None or sub.experiment is not None:
        run_id = find_trial_run(tracker, sub, label)
        have = {Path(a.path).name for a in tracker.client.list_artifacts(run_id, MASK_DIR)}
        name = mask_file_name(sub.step)
        if name not in have:
            steps = sorted(have)
            raise SourceError(
                f"training.subnetwork: trial run {run_id} has no mask {mask_artifact_path(sub.step)!r}"
                + (f" (step {sub.step} was not recorded)" if sub.step else "") + f"; it has {steps}"
            )
        (dest / run_id).mkdir(parents=True, exist_ok=True)
        path = Path(tracker.client.download_artifacts(run_id, mask_artifact_path(sub.step), str(dest / run_id)))
        source = run_id
    else:
        return None
    try:
        check_base(read_meta(path), base, str(path))
    except MaskError as e:
        raise SourceError(f"training.subnetwork: {e}") from e
    return path, source
