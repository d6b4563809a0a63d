"""``rlsparsity diff BASE TUNED``: update sparsity of a checkpoint pair, streamed and exact.

rlsparsity diff allenai/Llama-3.1-Tulu-3-8B-SFT allenai/Llama-3.1-Tulu-3-8B-DPO
rlsparsity diff ./sft ./rl -c bitwise -c paper:1e-8,1e-7,1e-6,1e-5 --per-layer --json out.json
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from rlsparsity.analysis.checkpoints import CheckpointError
from rlsparsity.analysis.criteria import DEFAULT_CRITERIA, CriterionError, parse_criteria
from rlsparsity.contracts.layers import natural_key
from rlsparsity.contracts.mlflow_layout import DEFAULT_TRACKING_URI, DIFF_DIR, KIND_DIFF, KIND_TAG

DEFAULT_EXPERIMENT = "rlsparsity-diff"


def add_parser(subparsers: Any) -> None:
    """Register the ``diff`` subcommand on an ``argparse`` subparsers object."""
    from rlsparsity.analysis.rank import DEFAULT_MAX_DIM

    p = subparsers.add_parser(
        "diff",
        help="update sparsity of a checkpoint pair (base -> RL-tuned), streamed and exact",
        description=(
            "Compare two checkpoints tensor by tensor and count the changed elements under "
            "one or more criteria, in one streamed pass that never loads either model whole. "
            "n counts every stored tensor (embeddings, lm_head, norms), tied weights once. "
            "Shape mismatches and tensors present on one side only are errors unless "
            "--allow-mismatch. Pickle checkpoints (.bin/.pt) are refused."
        ),
        epilog=(
            "Criteria: 'bitwise' = stored bits differ (sides whose dtypes differ are compared "
            "in float32, or float64 for 64-bit data). 'abs:TOL' = |t1 - t0| > TOL exactly: the "
            "difference in float32 (float64 for 64-bit data), TOL as a real number. "
            "'paper:TOL' = the arithmetic of the paper's check_sparsity.py, to the element: both "
            "sides rounded to bf16 (as its torch_dtype=bfloat16 loading does), the difference "
            "rounded to bf16, and changed iff not torch.isclose(d, 0, atol=TOL) in bf16, whose "
            "tolerance is itself rounded to bf16 (1e-5 -> 1.001358e-5); NaN/inf weights count "
            "as changed. It differs from abs:TOL by those roundings and the NaN/inf rule (up to "
            "about 0.01 points of sparsity on real pairs); use it to match the paper's Tables 1 "
            "and 6: -c paper:1e-8,1e-7,1e-6,1e-5. 'rel:TOL' = |d| > TOL * max(|t0|, |t1|). "
            "-0 vs +0 is unchanged under abs, rel and paper. Identical bits are never changed "
            "under abs/rel; there NaN/inf compare by bits. "
            "Example: rlsparsity diff allenai/Llama-3.1-Tulu-3-8B-SFT "
            "allenai/Llama-3.1-Tulu-3-8B-DPO -c paper:1e-5  (the paper reports 81.4 % sparsity)"
        ),
    )
    p.add_argument("base", help="base/SFT side: model directory, .safetensors file, hub id, or s3:// prefix")
    p.add_argument(
        "target", metavar="tuned", help="RL-tuned side: model directory, .safetensors file, hub id, or s3:// prefix"
    )
    g = p.add_argument_group("checkpoints")
    g.add_argument("--revision", help="hub revision (branch, tag or commit) for both sides")
    g.add_argument("--base-revision", help="hub revision of the base side (overrides --revision)")
    g.add_argument("--target-revision", help="hub revision of the tuned side (overrides --revision)")
    g.add_argument("--cache-dir", help="Hugging Face cache directory for hub downloads (default: HF_HOME)")
    g.add_argument(
        "--allow-mismatch",
        action="store_true",
        help="exclude tensors whose shapes differ or that exist on one side only, list them "
        "under 'excluded' and leave them out of n (default: stop with an error naming them)",
    )
    g = p.add_argument_group("what to count")
    g.add_argument(
        "-c",
        "--criterion",
        action="append",
        dest="criteria",
        metavar="SPEC",
        help="bitwise | abs:TOL[,TOL...] | rel:TOL[,TOL...] | paper:TOL[,TOL...]; repeatable, all "
        "computed in one pass; the first one is the mask's "
        f"(default: {' '.join(str(c) for c in DEFAULT_CRITERIA)})",
    )
    g.add_argument("--rank", action="store_true", help="also compute the update rank of every 2-D matrix (Table 2)")
    g.add_argument(
        "--rank-max-dim",
        type=int,
        default=DEFAULT_MAX_DIM,
        metavar="N",
        help="skip (and list) matrices whose larger side exceeds N, to avoid huge SVDs; 0 = no limit (default: %(default)s)",
    )
    g = p.add_argument_group("output")
    g.add_argument("--per-tensor", action="store_true", help="print a table per tensor")
    g.add_argument("--per-layer", action="store_true", help="print a table per layer (tensors grouped by the number in the key)")
    g.add_argument("--json", dest="json_out", metavar="OUT", help="write the full result as JSON to OUT ('-' for stdout)")
    g.add_argument("--mask", metavar="OUT.arrow", help="write the mask of the first criterion (rlsparsity.mask/1)")
    g.add_argument("--hash", action="store_true", help="compute content hashes of both sides (implied by --mask and --mlflow)")
    g.add_argument("-q", "--quiet", action="store_true", help="print no tables (errors only)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = p.add_argument_group("tracking")
    g.add_argument("--mlflow", action="store_true", help="log the result as an MLflow run: params, metrics, mask and JSON artifacts")
    g.add_argument(
        "--tracking-uri",
        default=None,
        help=f"MLflow tracking URI (default: $MLFLOW_TRACKING_URI or {DEFAULT_TRACKING_URI})",
    )
    g.add_argument("--experiment", default=DEFAULT_EXPERIMENT, help="MLflow experiment (default: %(default)s)")
    g.add_argument("--run-name", help="MLflow run name (default: 'BASE -> TUNED')")
    g = p.add_argument_group("execution")
    g.add_argument("--workers", type=int, help="threads in parallel (default: the CPUs available to this process)")
    g.add_argument(
        "--ray",
        action="store_true",
        help="run on Ray tasks (multi-node: the files or --cache-dir must be visible on every node; "
        "s3:// sides are read by the workers, credentials from their environment)",
    )
    g.add_argument("--ray-address", help="Ray cluster address (default: $RAY_ADDRESS, else a local instance)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``rlsparsity diff``; returns the exit code (0 ok, 1 error, 2 unusable arguments)."""
    from rich.console import Console

    from rlsparsity.analysis.diff.plan import DiffError

    for flag, out in (("--mask", args.mask), ("--json", None if args.json_out == "-" else args.json_out)):
        problem = _unwritable(out) if out else None
        if problem:
            print(f"error: {flag} {out}: {problem}", file=sys.stderr)
            return 2

    to_stdout = args.json_out == "-"
    # Tables are wide; when piped, rich would wrap them at 80 columns.
    width = None if (sys.stderr if to_stdout else sys.stdout).isatty() else 160
    console = Console(stderr=to_stdout, width=width)
    err = Console(stderr=True)
    try:
        return _run(args, console, err)
    except Exception as e:
        mask_mod = sys.modules.get("rlsparsity.contracts.mask")  # imported only if a mask was written
        known = (CheckpointError, DiffError, CriterionError) + ((mask_mod.MaskError,) if mask_mod else ())
        if not isinstance(e, known):
            raise
        print(f"error: {e}", file=sys.stderr)  # plain: rich would re-wrap the message
        return 1


def _run(args: argparse.Namespace, console: Any, err: Any) -> int:
    from rlsparsity.analysis.checkpoints import open_checkpoint
    from rlsparsity.analysis.diff.engine import diff_checkpoints
    from rlsparsity.analysis.parallel import byte_progress

    criteria = parse_criteria(args.criteria) if args.criteria else list(DEFAULT_CRITERIA)
    base = open_checkpoint(args.base, revision=args.base_revision or args.revision, cache_dir=args.cache_dir, label="base")
    target = open_checkpoint(args.target, revision=args.target_revision or args.revision, cache_dir=args.cache_dir, label="target")

    tmp = tempfile.TemporaryDirectory(prefix="rlsparsity-diff-") if args.mlflow else None
    try:
        mask_path = args.mask or (str(Path(tmp.name) / "mask.arrow") if tmp else None)
        kwargs = dict(
            allow_mismatch=args.allow_mismatch,
            workers=args.workers,
            mask_path=mask_path,
            content_hash=bool(args.hash or mask_path),
            rank=args.rank,
            rank_max_dim=args.rank_max_dim,
            use_ray=args.ray,
            ray_address=args.ray_address,
        )
        show_progress = not (args.quiet or args.no_progress) and err.is_terminal
        with byte_progress(show_progress, base.nbytes + target.nbytes, "diff", console=err, transient=True) as advance:
            result = diff_checkpoints(base, target, criteria, progress=advance if show_progress else None, **kwargs)

        text = result.to_json()
        if args.json_out == "-":
            sys.stdout.write(text + "\n")
        elif args.json_out:
            Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json_out).write_text(text + "\n")
        run_id = None
        if args.mlflow:
            json_path = Path(tmp.name) / "result.json"
            json_path.write_text(text + "\n")
            run_id = log_mlflow(result, args, json_path=json_path, mask_path=Path(mask_path))
        if not args.quiet:
            print_result(result, console, per_tensor=args.per_tensor, per_layer=args.per_layer)
            if run_id:
                console.print(f"MLflow run {run_id} in experiment {args.experiment!r}")
    finally:
        if tmp is not None:
            tmp.cleanup()
    return 0


def _unwritable(path: str) -> str | None:
    """Why an output file cannot be written there (checked before the diff runs), or None."""
    parent = Path(path).expanduser().absolute().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return f"cannot create the directory {str(parent)!r} ({e.strerror})"
    if Path(path).is_dir():
        return "is a directory; give a file name"
    if not os.access(parent, os.W_OK):
        return f"the directory {str(parent)!r} is not writable"
    return None


def _pct(x: float) -> str:
    return f"{100 * x:.3f}"


def print_result(result: Any, console: Any, *, per_tensor: bool = False, per_layer: bool = False) -> None:
    """The human-readable summary (and optional breakdowns) of a DiffResult."""
    from rich.table import Table

    keys = [str(c) for c in result.criteria]
    b, t = result.base, result.target
    rev = lambda m: f" @ {m['commit'][:12]}" if m.get("commit") else ""  # noqa: E731
    console.print(f"[bold]base[/]   {b['id']}{rev(b)}", highlight=False)
    console.print(f"[bold]tuned[/]  {t['id']}{rev(t)}", highlight=False)
    total = result.total
    console.print(f"n = {total:,} elements in {len(result.tensors)} tensors (every stored tensor, tied weights once)")

    if per_tensor:
        tab = Table(title="per tensor: sparsity % by criterion", title_justify="left")
        tab.add_column("tensor", overflow="fold")
        for col in ("shape", "dtype", "numel"):
            tab.add_column(col, justify="right" if col == "numel" else "left", no_wrap=True)
        for k in keys:
            tab.add_column(k, justify="right", no_wrap=True)
        for r in sorted(result.tensors, key=lambda r: natural_key(r.name)):
            dt = r.base_dtype if r.base_dtype == r.target_dtype else f"{r.base_dtype}->{r.target_dtype}"
            tab.add_row(r.name, "x".join(map(str, r.shape)), dt, f"{r.numel:,}", *(_pct(1 - r.changed[k] / r.numel if r.numel else 1) for k in keys))
        console.print(tab)
    if per_layer:
        tab = Table(title="per layer: sparsity % by criterion", title_justify="left")
        tab.add_column("layer", overflow="fold")
        tab.add_column("tensors", justify="right")
        tab.add_column("numel", justify="right", no_wrap=True)
        for k in keys:
            tab.add_column(k, justify="right", no_wrap=True)
        for g in result.per_layer():
            tab.add_row(g["group"], str(g["tensors"]), f"{g['numel']:,}", *(_pct(g["sparsity"][k]) for k in keys))
        console.print(tab)

    tab = Table(title="update sparsity", title_justify="left")
    for col, just in (("criterion", "left"), ("changed", "right"), ("total n", "right"), ("sparsity %", "right")):
        tab.add_column(col, justify=just, no_wrap=True)
    for k in keys:
        ch = result.changed(k)
        tab.add_row(k, f"{ch:,}", f"{total:,}", _pct(result.sparsity(k)))
    console.print(tab)

    for a, h in result.tied:
        console.print(f"tied: {h} = {a} (counted once)", highlight=False)
    if result.excluded:
        console.print(
            f"[bold yellow]excluded {len(result.excluded)} tensor(s) (--allow-mismatch), not counted in n:[/]",
            highlight=False,
        )
        for e in result.excluded:
            console.print(f"  {e.name}: {e.reason}", highlight=False)
    for note in result.notes:
        console.print(f"note: {note}", highlight=False)
    if result.rank is not None:
        r = result.rank
        mean = "n/a" if r.mean is None else _pct(r.mean) + " %"
        console.print(f"update rank: mean {mean} of full rank over {len(r.matrices)} matrices ({len(r.skipped)} skipped)")
        if per_tensor:
            for m in r.matrices:
                console.print(f"  {m.name}: {m.rank}/{m.max_rank} = {_pct(m.fraction)} %", highlight=False)
        for s in r.skipped:
            if "norm" not in s["reason"] and "-D" not in s["reason"]:
                console.print(f"  rank skipped {s['name']}: {s['reason']}", highlight=False)
    tm = result.timing
    if tm.get("wall_s"):
        console.print(
            f"read {tm['bytes_read'] / 1e9:.2f} GB in {tm['wall_s']:.2f} s "
            f"({tm['bytes_read'] / tm['wall_s'] / 1e9:.2f} GB/s, {tm['workers']} workers, {tm['backend']})"
        )
    if result.mask:
        console.print(f"mask ({keys[0]}) -> {result.mask}", highlight=False)


def _metric_key(text: str) -> str:
    # MLflow metric names allow [A-Za-z0-9_-. /]; criteria contain ':'.
    return text.replace(":", "_")


def log_mlflow(result: Any, args: argparse.Namespace, *, json_path: Path, mask_path: Path) -> str:
    """Log a DiffResult as one MLflow run; returns the run id."""
    import mlflow

    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(args.experiment)
    b, t = result.base, result.target
    name = args.run_name or f"{b['id']} -> {t['id']}"
    with mlflow.start_run(run_name=name[:250]) as run:
        mlflow.set_tags(
            {
                KIND_TAG: KIND_DIFF,
                "base": b["id"],
                "target": t["id"],
                "base_hash": b.get("hash") or "",
                "target_hash": t.get("hash") or "",
            }
        )
        mlflow.log_params(
            {
                "base": b["id"],
                "target": t["id"],
                "base_revision": b.get("commit") or b.get("revision") or "",
                "target_revision": t.get("commit") or t.get("revision") or "",
                "criteria": ",".join(str(c) for c in result.criteria),
                "mask_criterion": str(result.criteria[0]),
                "allow_mismatch": bool(args.allow_mismatch),
                "excluded": len(result.excluded),
                "tied": ";".join("=".join(x) for x in result.tied) or "none",
            }
        )
        metrics = {"total": float(result.total), "tensors": float(len(result.tensors))}
        for c in result.criteria:
            metrics[_metric_key(f"changed/{c}")] = float(result.changed(c))
            metrics[_metric_key(f"sparsity/{c}")] = result.sparsity(c)
        if result.rank is not None and result.rank.mean is not None:
            metrics["rank/mean"] = result.rank.mean
        if result.timing.get("wall_s"):
            metrics["wall_s"] = result.timing["wall_s"]
            metrics["bytes_per_s"] = result.timing["bytes_per_s"] or 0.0
        mlflow.log_metrics(metrics)
        mlflow.log_artifact(str(json_path), artifact_path=DIFF_DIR)
        mlflow.log_artifact(str(mask_path), artifact_path=DIFF_DIR)
        return run.info.run_id


def main(argv: list[str] | None = None) -> int:
    """Standalone entry point (``python -m rlsparsity.analysis.diff.cli BASE TUNED ...``)."""
    parser = argparse.ArgumentParser(prog="rlsparsity")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser(sub)
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "diff":
        argv.insert(0, "diff")
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
