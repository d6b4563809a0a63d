"""``rlsparsity report``: the reproduction report of some experiments' runs.

rlsparsity report table4_overlap table5_causes precision dynamics rq2_subnetwork --out docs/reproduction
"""

from __future__ import annotations

import argparse
import os
import subprocess
from pathlib import Path
from typing import Any

from rlsparsity.contracts.mlflow_layout import DEFAULT_TRACKING_URI


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "report",
        help="one reproduction report: each claim of the paper and its follow-ups beside the measured number",
        description="Reads the finished trials, overlap analyses and subnetwork studies of the given MLflow "
        "experiments and writes REPRODUCTION.md plus figures into --out: for every claim the published "
        "number, the measured one per setting (mean and range over seeds), the rule and the verdict "
        "(reproduced / not reproduced / depends on ... / not run). Also logged as an MLflow run (kind report).",
    )
    p.add_argument("experiments", nargs="+", help="MLflow experiment names (one per sweep)")
    p.add_argument("--out", type=Path, default=Path("reproduction"), help="output folder (default: %(default)s)")
    p.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_TRACKING_URI),
                   help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or %(default)s)")
    p.add_argument("--no-log", action="store_true", help="do not log the report as an MLflow run")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rlsparsity.analysis.reproduction import report

    # The code's commit (of the checkout the package runs from), as the trials' git_commit tag has it.
    here = Path(__file__).resolve().parent
    commit = subprocess.run(["git", "-C", str(here), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    result = report(args.experiments, args.out, tracking_uri=args.tracking_uri, log=not args.no_log, commit=commit,
                    command="rlsparsity report " + " ".join(args.experiments))
    width = max(len(v.claim.id) for v in result.verdicts)
    for v in result.verdicts:
        print(f"{v.claim.id:<{width}}  {v.verdict}")
    print(f"wrote {result.path}")
    return 0
