"""``rlsparsity overlap``: pairwise overlap of update masks (a sweep's, or given files/URIs).

rlsparsity overlap --experiment NAME [--step N] [--sweep-run-id ID] [--json OUT]
rlsparsity overlap a.arrow b.arrow runs:/<run_id>/masks/final.arrow --labels a,b,c
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from rlsparsity.analysis.overlap import OverlapError
from rlsparsity.contracts.mask import MaskError
from rlsparsity.contracts.mlflow_layout import DEFAULT_TRACKING_URI


def add_parser(subparsers: Any) -> None:
    """Register the ``overlap`` subcommand on an ``argparse`` subparsers object."""
    p = subparsers.add_parser(
        "overlap",
        help="pairwise overlap of update masks (Table 4), on Ray",
        description=(
            "Pairwise overlap of the update masks of a sweep's trials (--experiment) or of "
            "mask files/URIs, per layer and matrix type, against random baselines. With "
            "--experiment the result is logged as an MLflow analysis run under the sweep."
        ),
    )
    p.add_argument(
        "masks",
        nargs="*",
        help="mask files or artifact URIs (runs:/, s3://, mlflow-artifacts:/, file://), read in place",
    )
    p.add_argument(
        "--experiment",
        "-e",
        help="MLflow experiment (one per sweep) whose trials' masks to compare",
    )
    p.add_argument(
        "--tracking-uri",
        default=os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_TRACKING_URI),
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or %(default)s)",
    )
    p.add_argument(
        "--sweep-run-id", help="sweep parent run (default: the experiment's latest sweep run)"
    )
    p.add_argument(
        "--step", type=int, help="use masks/step_NNNNNN.arrow instead of masks/final.arrow"
    )
    p.add_argument(
        "--labels", help="comma-separated labels for the mask files (default: file names)"
    )
    p.add_argument(
        "--json",
        dest="json_out",
        metavar="OUT",
        help="write the result as JSON to OUT ('-' for stdout)",
    )
    p.add_argument(
        "--out", metavar="DIR", help="also write tables (Arrow), result.json and plots to DIR"
    )
    p.add_argument("--no-log", action="store_true", help="do not record an MLflow analysis run")
    p.add_argument("--workers", type=int, help="Ray tasks in flight (default: the cluster's CPUs)")
    p.add_argument("--local", action="store_true", help="run in this process instead of on Ray")
    p.add_argument(
        "--cache-dir", help="incremental result cache (default ~/.cache/rlsparsity/overlap)"
    )
    p.add_argument("--no-cache", action="store_true", help="recompute every pair and cache nothing")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--quiet", "-q", action="store_true", help="no tables in the terminal")
    p.set_defaults(func=run)


def _fetch_uri(uri: str, tmp: Path, tracking_uri: str, k: int) -> str:
    """Where the tasks read a mask given on the command line: in place (a path, ``s3://``,
    an MLflow server; ``runs:/`` and ``mlflow-artifacts:/`` resolved), or downloaded."""
    from rlsparsity.analysis.artifact_locations import read_through_server, uri_location
    from rlsparsity.analysis.object_store import supports_ranges

    try:
        located = uri_location(uri, tracking_uri)
        # A server that ignores Range requests (see artifact_locations): download instead.
        if located is not None and (not read_through_server(located) or supports_ranges(located)):
            return located
    except Exception as e:  # noqa: BLE001 - MLflow raises its own errors for bad runs:/ URIs
        raise OverlapError(f"cannot resolve {uri}: {e}") from e
    import mlflow.artifacts

    try:
        return mlflow.artifacts.download_artifacts(
            artifact_uri=uri, dst_path=str(tmp / str(k)), tracking_uri=tracking_uri
        )
    except Exception as e:  # noqa: BLE001 - every backend raises its own errors
        raise OverlapError(f"cannot fetch {uri}: {e}") from e


def _default_labels(masks: list[str]) -> list[str]:
    stems = [Path(m.rstrip("/")).stem for m in masks]
    return [s if stems.count(s) == 1 else m for s, m in zip(stems, masks, strict=True)]


def run(args: argparse.Namespace) -> int:
    """Run the subcommand; returns the exit status (0 ok, 2 on any analysis error)."""
    from rich.console import Console

    to_stdout = args.json_out == "-"
    console = Console(stderr=to_stdout)  # keep stdout pure JSON when it carries the result
    err = Console(stderr=True)
    try:
        if bool(args.experiment) == bool(args.masks):
            raise OverlapError(
                "give either --experiment NAME or mask files, not both and not neither"
            )
        if args.masks and (args.step is not None or args.sweep_run_id):
            raise OverlapError("--step and --sweep-run-id only apply with --experiment")
        common = {
            "use_ray": not args.local,
            "workers": args.workers,
            "cache_dir": args.cache_dir,
            "use_cache": not args.no_cache,
            "progress": not args.no_progress,
        }
        if args.experiment:
            from rlsparsity.analysis.job import run_overlap_analysis

            result = run_overlap_analysis(
                args.tracking_uri,
                args.experiment,
                sweep_run_id=args.sweep_run_id,
                step=args.step,
                log=not args.no_log,
                console=console,
                quiet=args.quiet,
                **common,
            )
        else:
            from rlsparsity.analysis.overlap import compute_overlap
            from rlsparsity.analysis.report import print_report

            labels = (
                [s.strip() for s in args.labels.split(",")]
                if args.labels
                else _default_labels(args.masks)
            )
            if len(labels) != len(args.masks):
                raise OverlapError(
                    f"--labels gives {len(labels)} labels for {len(args.masks)} masks"
                )
            with tempfile.TemporaryDirectory(prefix="rlsparsity-overlap-") as tmp:
                paths = [
                    _fetch_uri(m, Path(tmp), args.tracking_uri, k) for k, m in enumerate(args.masks)
                ]
                result = compute_overlap(paths, labels, **common)
            if not args.quiet:
                print_report(result, console)
        if args.out:
            from rlsparsity.analysis.report import write_outputs

            write_outputs(result, args.out)
        if args.json_out:
            from rlsparsity.analysis.report import json_default

            text = json.dumps(result.to_json(), indent=1, default=json_default)
            if to_stdout:
                sys.stdout.write(text + "\n")
            else:
                Path(args.json_out).write_text(text + "\n")
    except (OverlapError, MaskError) as e:
        err.print(f"[bold red]rlsparsity overlap: error:[/bold red] {e}", highlight=False)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (the project CLI registers ``add_parser`` instead)."""
    parser = argparse.ArgumentParser(prog="rlsparsity")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
