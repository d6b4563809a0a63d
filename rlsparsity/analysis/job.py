"""The overlap analysis of a sweep, from MLflow to MLflow (docs/DESIGN.md, "MLflow layout").

Finds the sweep's trial runs, locates their mask artifacts where the Ray tasks can read
them in place (``artifact_locations``: an S3 store, an MLflow server, a local folder), or
downloads them through MLflow for other backends (GCS, Azure, ...), computes the pairwise
overlap on Ray and records an analysis run nested under the sweep run. The analysis run
ends FINISHED only when every step succeeded; any error marks it FAILED and is re-raised.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from rlsparsity.analysis.artifact_locations import (
    DESTINATION_ENV,
    artifact_location,
    read_through_server,
)
from rlsparsity.analysis.mlflow_runs import search_all_runs
from rlsparsity.analysis.object_store import StoreError, supports_ranges
from rlsparsity.analysis.overlap import (
    DEFAULT_FACTORS,
    OverlapError,
    OverlapResult,
    compute_overlap,
    default_cache_dir,
)
from rlsparsity.contracts.mlflow_layout import (
    ANALYSIS_TAG,
    ERROR_TAG,
    GRID_AXES_TAG,
    KIND_ANALYSIS,
    KIND_SWEEP,
    KIND_TAG,
    KIND_TRIAL,
    LABEL_TAG,
    MASK_ARTIFACT_TAG,
    OVERLAP_DIR,
    PARENT_TAG,
    SWEEP_RUN_TAG,
    mask_artifact_path,
)


def _client(tracking_uri: str) -> Any:
    """A client of an existing store: reading must not create an empty SQLite database."""
    from mlflow import MlflowClient

    db = _sqlite_path(tracking_uri)
    if db is not None and not db.is_file():
        raise OverlapError(f"no MLflow tracking database at {db} (tracking URI {tracking_uri!r}); "
                           "run a sweep first, or pass --tracking-uri")
    return MlflowClient(tracking_uri=tracking_uri)


def _sqlite_path(uri: str) -> Path | None:
    if not uri.startswith("sqlite:///") or uri == "sqlite:///:memory:":
        return None
    return Path(uri.removeprefix("sqlite:///")).expanduser()


def find_sweep_and_trials(
    client: Any, experiment: str, sweep_run_id: str | None = None
) -> tuple[Any, Any, list[Any]]:
    """(experiment, sweep run, trial runs in start order) or OverlapError."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise OverlapError(f"no MLflow experiment named {experiment!r}")
    if sweep_run_id:
        try:
            sweep = client.get_run(sweep_run_id)
        except Exception as e:  # noqa: BLE001 - MLflow raises MlflowException subclasses by backend
            raise OverlapError(f"sweep run {sweep_run_id} not found: {e}") from e
        if sweep.info.experiment_id != exp.experiment_id:
            raise OverlapError(f"run {sweep_run_id} is not in experiment {experiment!r}")
    else:
        found = client.search_runs(
            [exp.experiment_id],
            filter_string=f"tags.`{KIND_TAG}` = '{KIND_SWEEP}'",
            max_results=1,
            order_by=["attributes.start_time DESC"],
        )
        if not found:
            raise OverlapError(f"experiment {experiment!r} has no sweep run (tag {KIND_TAG}={KIND_SWEEP})")
        sweep = found[0]
    trials = search_all_runs(
        client,
        exp.experiment_id,
        # KILLED runs are interrupted attempts; a resumed sweep ran those trials again.
        f"tags.`{PARENT_TAG}` = '{sweep.info.run_id}' and tags.`{KIND_TAG}` = '{KIND_TRIAL}'"
        " and attributes.status != 'KILLED'",
        order_by=["attributes.start_time ASC"],
    )
    if not trials:
        raise OverlapError(
            f"sweep run {sweep.info.run_id} in experiment {experiment!r} has no trial runs"
        )
    trials = _latest_attempts(trials)
    # Concurrent trials start in any order; sort by label so tables are stable.
    trials.sort(key=lambda r: (run_label(r), r.info.run_id))
    return exp, sweep, trials


def _latest_attempts(trials: list[Any]) -> list[Any]:
    """Drop a trial's failed attempts once the same label has a FINISHED run: a resumed sweep
    runs a trial that failed before its first checkpoint again, into a new run (the failed
    run stays, as the record of that attempt). A label with no FINISHED run keeps its runs,
    so the analysis names the failure."""
    finished = {run_label(r) for r in trials if r.info.status == "FINISHED"}
    return [r for r in trials if r.info.status == "FINISHED" or run_label(r) not in finished]


def run_label(run: Any) -> str:
    """Tag rlsparsity.label, else algorithm/dataset/s<seed>, else the run name or id."""
    tags = run.data.tags
    if tags.get(LABEL_TAG):
        return tags[LABEL_TAG]
    parts = [
        tags.get("algorithm"),
        tags.get("dataset"),
        f"s{tags['seed']}" if "seed" in tags else None,
    ]
    if any(parts):
        return "/".join(p for p in parts if p)
    return run.info.run_name or run.info.run_id[:8]


def _unique(labels: list[str], ids: list[str]) -> list[str]:
    out = []
    for lab, rid in zip(labels, ids, strict=True):
        out.append(f"{lab}#{rid[:6]}" if labels.count(lab) > 1 else lab)
    return out


def _grid_axes(sweep: Any, trials: Sequence[Any]) -> list[str]:
    keys = list(DEFAULT_FACTORS)
    for run in (sweep, *trials):
        raw = run.data.tags.get(GRID_AXES_TAG)
        if not raw:
            continue
        try:
            axes = json.loads(raw)
        except json.JSONDecodeError:
            continue
        if isinstance(axes, list):
            keys.extend(str(a) for a in axes if str(a) not in keys)
    return keys


def _factors(run: Any, keys: Sequence[str]) -> dict[str, Any]:
    tags, params = run.data.tags, run.data.params
    return {k: tags.get(k, params.get(k)) for k in keys}


def _listed(client: Any, run: Any, label: str, artifact: str) -> Any:
    """The artifact's listing entry (size), or OverlapError naming what the run holds."""
    run_id = run.info.run_id
    folder, _, name = artifact.rpartition("/")
    try:
        listing = {
            Path(f.path).name: f for f in client.list_artifacts(run_id, folder) if not f.is_dir
        }
    except Exception as e:  # noqa: BLE001 - backend-specific errors all mean "cannot list"
        raise OverlapError(
            f"trial {label} (run {run_id}): cannot list artifacts under {folder}/: {e}"
        ) from e
    info = listing.get(name)
    if info is None:
        have = ", ".join(sorted(listing)) or "nothing"
        raise OverlapError(
            f"trial {label} (run {run_id}) has no artifact {artifact} ({folder}/ holds {have})"
        )
    return info


def locate_mask(client: Any, tracking_uri: str, run: Any, label: str, artifact: str) -> str | None:
    """Where the tasks read a trial's mask in place (``s3://``, a server URL, a path), or
    None when its artifact store can only be downloaded from."""
    _listed(client, run, label, artifact)
    return artifact_location(run.info.artifact_uri, artifact, tracking_uri)


def fetch_mask(
    client: Any,
    tracking_uri: str,
    run: Any,
    label: str,
    artifact: str,
    cache_root: Path | None,
    tmp: Path,
) -> Path:
    """Local path of a trial's mask artifact, downloaded through MLflow (cached by run id):
    for artifact stores the tasks cannot read in place."""
    import mlflow.artifacts

    run_id = run.info.run_id
    info = _listed(client, run, label, artifact)
    if cache_root is not None:
        # Artifacts of a finished run do not change: keep one local copy per run id, so
        # re-running the analysis downloads (and reads) nothing.
        local = cache_root / run_id / artifact
        if local.exists() and (info.file_size is None or local.stat().st_size == info.file_size):
            return local
        dst = cache_root / run_id / f".dl-{uuid.uuid4().hex[:8]}"
    else:
        local = None
        dst = tmp / run_id
    try:
        got = Path(
            mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=artifact, dst_path=str(dst), tracking_uri=tracking_uri
            )
        )
    except Exception as e:  # noqa: BLE001
        raise OverlapError(
            f"trial {label} (run {run_id}): downloading {artifact} failed: {e}"
        ) from e
    if local is None:
        return got
    local.parent.mkdir(parents=True, exist_ok=True)
    os.replace(got, local)  # atomic: a half-downloaded file never sits under the cached name
    shutil.rmtree(dst, ignore_errors=True)
    return local


def run_overlap_analysis(
    tracking_uri: str,
    experiment: str,
    *,
    sweep_run_id: str | None = None,
    step: int | None = None,
    log: bool = True,
    use_ray: bool = True,
    workers: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    progress: bool = False,
    console: Any = None,
    quiet: bool = False,
) -> OverlapResult:
    """Overlap of the masks of a sweep's trials; logs an analysis run unless ``log=False``.

    The sweep is ``sweep_run_id`` or the experiment's latest run tagged
    ``rlsparsity.kind=sweep``; its trials are the runs tagged ``rlsparsity.kind=trial``
    with ``mlflow.parentRunId`` = the sweep. Masks: ``masks/final.arrow``, or
    ``masks/step_{step:06d}.arrow``. Raises OverlapError / MaskError; the analysis run
    is then marked FAILED.
    """
    client = _client(tracking_uri)
    exp, sweep, trials = find_sweep_and_trials(client, experiment, sweep_run_id)
    sweep_id = sweep.info.run_id
    artifact = mask_artifact_path(step)
    run_id = None
    if log:
        tags = {
            KIND_TAG: KIND_ANALYSIS,
            SWEEP_RUN_TAG: sweep_id,
            PARENT_TAG: sweep_id,
            ANALYSIS_TAG: "overlap",
            MASK_ARTIFACT_TAG: artifact,
        }
        run = client.create_run(
            exp.experiment_id,
            tags=tags,
            run_name="overlap" if step is None else f"overlap-step{step}",
        )
        run_id = run.info.run_id
    try:
        result = _analyse(
            client, tracking_uri, sweep, trials, artifact,
            use_ray=use_ray, workers=workers, cache_dir=cache_dir, use_cache=use_cache, progress=progress,
        )  # fmt: skip
        result.meta.update(
            experiment=experiment, sweep_run_id=sweep_id, step=step, analysis_run_id=run_id
        )
        if not quiet:
            from rlsparsity.analysis.report import print_report

            print_report(result, console)
            note = _reads_note(result.meta["mask_reads"])
            if note and console is not None:
                console.print(f"[yellow]{note}[/yellow]", highlight=False)
        if run_id is not None:
            _log_result(client, run_id, result, step)
            client.set_terminated(run_id, "FINISHED")
    except BaseException as e:
        if run_id is not None:
            try:
                client.set_tag(run_id, ERROR_TAG, f"{type(e).__name__}: {e}"[:4000])
            finally:
                client.set_terminated(
                    run_id, "FAILED" if not isinstance(e, KeyboardInterrupt) else "KILLED"
                )
        raise
    return result


def _analyse(
    client: Any,
    tracking_uri: str,
    sweep: Any,
    trials: list[Any],
    artifact: str,
    *,
    use_ray: bool,
    workers: int | None,
    cache_dir: str | os.PathLike | None,
    use_cache: bool,
    progress: bool,
) -> OverlapResult:
    ids = [t.info.run_id for t in trials]
    labels = _unique([run_label(t) for t in trials], ids)
    keys = _grid_axes(sweep, trials)
    factors = [_factors(t, keys) for t in trials]
    cache_root = Path(cache_dir or default_cache_dir())
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="rlsparsity-overlap-")))
        art_root = cache_root / "artifacts" if use_cache else None
        located = [
            locate_mask(client, tracking_uri, t, lab, artifact)
            for t, lab in zip(trials, labels, strict=True)
        ]
        served = [loc for loc in located if loc and read_through_server(loc)]
        ranged = not served or _supports_ranges(served[0])
        paths = [
            loc if loc and (ranged or not read_through_server(loc))
            else fetch_mask(client, tracking_uri, t, lab, artifact, art_root, tmp)
            for loc, t, lab in zip(located, trials, labels, strict=True)
        ]  # fmt: skip
        result = compute_overlap(
            paths, labels, use_ray=use_ray, workers=workers, factors=factors, factor_keys=keys,
            cache_dir=cache_root, use_cache=use_cache, progress=progress,
        )  # fmt: skip
    result.meta["run_ids"] = ids
    kinds = {_read_kind(str(p)) for p in paths}
    result.meta["mask_reads"] = sorted(kinds | ({"downloaded"} if not ranged else set()))
    return result


def _supports_ranges(location: str) -> bool:
    try:
        return supports_ranges(location)
    except StoreError as e:
        raise OverlapError(f"cannot read {location} through the MLflow server: {e}") from e


def _read_kind(location: str) -> str:
    if location.startswith("s3://"):
        return "s3"
    return "mlflow server" if read_through_server(location) else "local"


def _reads_note(kinds: list[str]) -> str | None:
    """What the user should know about how the masks were read, or None."""
    fix = (f"Set {DESTINATION_ENV} to the server's --artifacts-destination (and the store's "
           "credentials) so that the tasks read the store directly.")  # fmt: skip
    if "downloaded" in kinds:
        return ("The MLflow server does not answer Range requests for artifacts (MLflow 3.17 streams "
                "an artifact of a remote store whole), so the masks were downloaded to the driver; "
                f"on a multi-node cluster that needs a shared disk. {fix}")  # fmt: skip
    if "mlflow server" in kinds:
        return ("The masks were read through the MLflow server with Range requests; each costs the "
                f"server a read of its store. {fix}")  # fmt: skip
    return None


def _log_result(client: Any, run_id: str, result: OverlapResult, step: int | None) -> None:
    from rlsparsity.analysis.report import write_outputs

    with tempfile.TemporaryDirectory(prefix="rlsparsity-overlap-out-") as out:
        write_outputs(result, out)
        client.log_artifacts(run_id, out, artifact_path=OVERLAP_DIR)
    pairs = result.pairs()

    def mean(key: str) -> float | None:
        vals = [p[key] for p in pairs if p[key] is not None]
        return sum(vals) / len(vals) if vals else None

    # Each observed mean beside its chance value (random sets of the same sizes), overall
    # and per "what differs" group, so the run's metrics read as Table 4 does.
    metrics = {"runs": len(result.labels), "pairs": len(pairs)}
    for key in ("o_a", "o_b", "jaccard"):
        metrics[f"mean_{key}"], metrics[f"mean_{key}_chance"] = mean(key), mean(f"{key}_random")
    for row in result.summary():
        for key in ("o_a", "o_b", "jaccard"):
            metrics[f"by_factor/{row['differs']}/{key}"] = row[f"mean_{key}"]
            metrics[f"by_factor/{row['differs']}/{key}_chance"] = row[f"mean_{key}_random"]
    metrics.update({k: result.stats.get(k) for k in ("seconds", "bytes_read", "pairs_computed", "pairs_cached")})
    for k, v in metrics.items():
        if v is not None:
            client.log_metric(run_id, k, float(v))
    client.log_param(run_id, "n_params", result.n)
    client.log_param(run_id, "step", "final" if step is None else step)
