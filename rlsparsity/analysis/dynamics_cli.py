"""``rlsparsity dynamics``: how one trial's subnetwork formed over its mask steps.

rlsparsity dynamics --experiment NAME --trial prime/add/s0 [--out DIR]
rlsparsity dynamics RUN_ID | path/to/masks [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from rlsparsity.contracts.mask import MaskError
from rlsparsity.contracts.mlflow_layout import DEFAULT_TRACKING_URI, KIND_TAG, KIND_TRIAL, LABEL_TAG


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "dynamics",
        help="a trial's subnetwork over training: sparsity, consecutive changes, the never/reverted/final split",
        description="From a trial's cumulative, previous-step and ever-changed bf16 masks (training.masks.dynamics): "
        "sparsity over steps, the share of entries that differ between consecutive mask steps, the share "
        "of ever-updated entries that end back at θ0, the never / reverted / final split, and per-layer "
        "sparsity over steps (a heatmap). Writes dynamics.json, curves.png and layers.png to --out.",
    )
    p.add_argument("source", nargs="?", help="a trial's MLflow run id, or a local masks/ folder")
    p.add_argument("--experiment", "-e", help="with --trial: the sweep's MLflow experiment")
    p.add_argument("--trial", help="with --experiment: the trial's label, e.g. prime/add/s0 (its latest finished run)")
    p.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_TRACKING_URI),
                   help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or %(default)s)")
    p.add_argument("--out", type=Path, help="output folder (default: dynamics/<label>)")
    p.set_defaults(func=run)


def _find_trial(tracking_uri: str, experiment: str, label: str) -> str:
    from mlflow.tracking import MlflowClient

    from rlsparsity.analysis.mlflow_runs import search_all_runs

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise MaskError(f"no MLflow experiment {experiment!r} in {tracking_uri}")
    runs = search_all_runs(client, exp.experiment_id,
                           f"tags.`{KIND_TAG}` = '{KIND_TRIAL}' and tags.`{LABEL_TAG}` = '{label}' and attributes.status = 'FINISHED'",
                           order_by=["attributes.start_time DESC"])
    if not runs:
        raise MaskError(f"experiment {experiment!r} has no FINISHED trial labelled {label!r}")
    return runs[0].info.run_id


def run(args: argparse.Namespace) -> int:
    from rlsparsity.analysis.dynamics import dynamics_from_dir, dynamics_of_run, write_outputs

    if (args.source is None) == (args.experiment is None or args.trial is None):
        print("error: give a run id or masks folder, or --experiment with --trial", file=sys.stderr)
        return 2
    try:
        if args.source is not None and Path(args.source).is_dir():
            dyn = dynamics_from_dir(args.source)
        else:
            run_id = args.source or _find_trial(args.tracking_uri, args.experiment, args.trial)
            with tempfile.TemporaryDirectory(prefix="rlsparsity-dynamics-") as tmp:
                dyn = dynamics_of_run(run_id, args.tracking_uri, tmp)
    except (MaskError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    out = args.out or Path("dynamics") / dyn.label.replace("/", "_")
    files = write_outputs(dyn, out)
    print_dynamics(dyn, Console())
    print(f"wrote {', '.join(str(f) for f in files.values())}")
    return 0


def print_dynamics(dyn: Any, console: Console) -> None:
    table = Table(title=f"{dyn.label}: the bf16 view over mask steps (% of {dyn.total:,} entries)", title_justify="left")
    for col in ("step", "sparsity (unchanged vs θ0)", "changed since previous", "ever changed"):
        table.add_column(col, justify="right")
    for row in zip(dyn.steps, dyn.sparsity, dyn.consecutive_changed, dyn.ever_changed, strict=True):
        table.add_row(str(row[0]), *(f"{100 * x:.2f}" for x in row[1:]))
    console.print(table)
    console.print(f"at step {dyn.steps[-1]}: never updated {100 * dyn.never:.2f} %, updated but back at θ0 "
                  f"{100 * dyn.reverted:.2f} %, in the final subnetwork {100 * dyn.in_final:.2f} % "
                  f"(paper, PRIME: 72 / 8 / 20 %); ever-updated entries outside the final subnetwork "
                  f"{100 * dyn.reverted_of_ever:.2f} % (paper: 8.5 %)")
