"""`rlsparsity sweep | diff | overlap | upload`."""

from __future__ import annotations

import argparse
import os
import shlex
import sys

from rich.console import Console


def _add_sweep(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sweep",
        help="run a seed x dataset x algorithm grid on Ray Tune, log masks to MLflow, analyse overlap",
        description="Run a sweep spec (YAML). Any field may be a list: each list is a grid axis.",
    )
    p.add_argument("spec", help="sweep spec YAML, e.g. sweeps/quickstart.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override, parsed as YAML, e.g. --set training.steps=10 --set seed=[0,1,2]")
    p.add_argument("--dry-run", action="store_true", help="validate and print the grid, run nothing")
    p.add_argument("--resume", action="store_true",
                   help="continue the experiment's latest unfinished sweep run of this spec (after Ctrl-C, SIGTERM "
                        "or a dead driver): only its unfinished trials run, into the same MLflow run")
    p.set_defaults(func=_run_sweep)


def _dry_run(args: argparse.Namespace, console: Console) -> int:
    """The trial labels on stdout; on stderr what each trial reserves, and what could not be
    checked here (a hub model or dataset with the hub offline)."""
    from rlsparsity.sweeps.spec import SweepSpec

    spec = SweepSpec.load(args.spec, args.overrides, offline_ok=True)
    trials = spec.trials()
    if spec.stages is not None:
        from rlsparsity.sweeps.study import stage_spec

        trials = [t for kind in ("full", *spec.stages.kinds) for t in stage_spec(spec, kind).trials()]
    for t in trials:
        console.print(t.label)
    first = trials[0]
    print(f"model {first.model}; datasets {', '.join(sorted({t.dataset_label for t in trials}))}", file=sys.stderr)
    for line in sorted({t.describe_resources() for t in trials}):
        print(f"resources: {line}", file=sys.stderr)
    for note in spec.unchecked:
        print(f"not checked: {note}", file=sys.stderr)
    return 0


def _run_sweep(args: argparse.Namespace) -> int:
    from rlsparsity.analysis.overlap import OverlapError
    from rlsparsity.platform.tracking import TrackingUnavailable
    from rlsparsity.sweeps.interrupt import interrupt_in
    from rlsparsity.sweeps.run import SweepFailed, SweepInterrupted, load_spec, sweep

    # Piped output (CI logs, `ray job` logs) would otherwise wrap the tables at 80 columns.
    console = Console() if sys.stdout.isatty() else Console(width=160)
    if args.dry_run:
        return _dry_run(args, console)
    spec = load_spec(args.spec, args.overrides)
    if spec.stages is not None and args.resume:
        print("error: --resume: a staged study resumes by running it again: its finished stages are reused",
              file=sys.stderr)
        return 2
    try:
        if spec.stages is not None:
            from rlsparsity.sweeps.study import run_study

            run_study(spec, console=console)
        else:
            sweep(spec, console=console, resume=args.resume)
    except SweepInterrupted as e:
        again = shlex.join(["rlsparsity", "sweep", args.spec, *(a for o in args.overrides for a in ("--set", o))])
        how = (f"run it again ({again}): its finished stages are reused" if spec.stages is not None
               else f"resume with: {again} --resume")
        print(f"interrupted: {e}\nTo finish the sweep, {how}", file=sys.stderr)
        return e.exit_code
    except (SweepFailed, TrackingUnavailable) as e:  # SweepTrackingLost names its spool
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OverlapError as e:  # the sweep's analysis run is FAILED, with the error as its tag
        print(f"error: the sweep's overlap analysis failed: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # last: SweepFailed and OverlapError are Exceptions too
        if (interrupt := interrupt_in(e)) is None:
            raise
        # A study interrupted between its stages: its run is KILLED, its finished stages kept.
        print(f"interrupted by {interrupt.signal_name}: the study's run is KILLED; run the same command again: "
              "its finished stages are reused", file=sys.stderr)
        return interrupt.exit_code
    return 0


def _add_upload(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "upload",
        help="send what a sweep kept locally while its tracking server was down",
        description="Send a sweep's spool folder (.rlsparsity/unsent/RUN_ID, named in the sweep's error) to its "
                    "tracking server: metrics, params and tags, then masks and weights, then each run's end status. "
                    "What is sent is deleted, so a failed upload can be run again.",
    )
    p.add_argument("spool", help="the spool folder the sweep's error named")
    p.add_argument("--tracking-uri", default=None, help="default: the server the spool was written for")
    p.set_defaults(func=_run_upload)


def _run_upload(args: argparse.Namespace) -> int:
    from rlsparsity.platform.tracking import TrackingUnavailable, upload_unsent

    try:
        sent = upload_unsent(args.spool, args.tracking_uri)
    except (TrackingUnavailable, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print("sent " + ", ".join(f"{v} {k}" for k, v in sent.items()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlsparsity", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_sweep(sub)
    from rlsparsity.analysis import dynamics_cli, overlap_cli, report_cli
    from rlsparsity.analysis.diff import cli as diff_cli

    diff_cli.add_parser(sub)
    overlap_cli.add_parser(sub)
    dynamics_cli.add_parser(sub)
    report_cli.add_parser(sub)
    _add_upload(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from rlsparsity.sweeps.spec import SpecError

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per mask is noise
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except SpecError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
