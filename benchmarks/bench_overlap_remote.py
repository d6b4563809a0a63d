"""Benchmark: the overlap of masks read from an S3-compatible store against the same masks
read from local files (issue 16). One command:

    .venv/bin/python benchmarks/bench_overlap_remote.py      # N = 8 masks of ~5.2e7 elements

It starts SeaweedFS's S3 gateway on 127.0.0.1 (infra/tracking_stack.py, the object store
alone), writes N masks in the real format once (bench_overlap's generator with a small
Llama layout: d = 512, ffn = 1408, vocab 32000, 6 layers, 57 tensors), uploads them, and
then, in this one process (tasks in-process, so both sides run the same code on one core):

- ``compute_overlap`` of the local files and of their ``s3://`` URIs, each on a first,
  verified read and preverified (``verify=False``), best of ``--repeat``;
- where the remote time goes: requests and bytes by phase (footers, layouts, the tasks'
  rows) and time by phase (the driver's metadata and layout reads, the task's waits on
  the store, the task's compute);
- the store's own speed: every object read whole (8 threads), and the latency of one
  small ranged read;
- the checksum's cost: BLAKE2b over N·P/8 bytes at the single-core rate.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench_overlap import ensure_masks, hash_rate

from rlsparsity.analysis.object_store import open_source
from rlsparsity.analysis.overlap import compute_overlap
from rlsparsity.contracts.mask import read_meta

ROOT = Path(__file__).resolve().parents[1]
SMALL_LLAMA = (512, 1408, 32000)


def _stack_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("tracking_stack", ROOT / "infra" / "tracking_stack.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["tracking_stack"] = mod
    spec.loader.exec_module(mod)
    return mod


def _run(locations: list[str], verify: bool) -> tuple[float, float, dict]:
    """Wall and CPU seconds of this process (the fetching threads' included)."""
    t, c = time.perf_counter(), time.process_time()
    res = compute_overlap(locations, [f"m{k}" for k in range(len(locations))], use_ray=False,
                          use_cache=False, verify=verify)  # fmt: skip
    return time.perf_counter() - t, time.process_time() - c, res


def _store_speed(uris: list[str]) -> dict:
    """Whole-object reads (8 threads) and small ranged reads: what the store itself gives."""

    def whole(uri: str) -> int:
        with open_source(uri) as src:
            return src.read(0, src.size).size

    t = time.perf_counter()
    with ThreadPoolExecutor(8) as ex:
        total = sum(ex.map(whole, uris))
    whole_s = time.perf_counter() - t
    lat = []
    with open_source(uris[0]) as src:
        for i in range(50):
            t = time.perf_counter()
            src.read(4096 * i, 4096)
            lat.append(time.perf_counter() - t)
    return {"whole_bytes": total, "whole_s": whole_s, "whole_bytes_per_s": total / whole_s,
            "ranged_4k_median_s": statistics.median(lat)}  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=8, help="masks")
    ap.add_argument("--elems", type=float, default=5.0e7, help="elements per mask (at least; whole layers)")
    ap.add_argument("--repeat", type=int, default=5, help="best of this many runs (the machine is shared)")
    ap.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "rlsparsity-bench-overlap-remote")
    ap.add_argument("--out", type=Path, help="write the results as JSON")
    args = ap.parse_args()

    paths = ensure_masks(args.data / "masks", args.n, args.elems, SMALL_LLAMA)
    meta = read_meta(paths[0])
    stack_mod = _stack_module()
    stack_dir = Path(tempfile.mkdtemp(prefix="rls-bench-s3-", dir="/tmp"))
    t = time.perf_counter()
    stack = stack_mod.start(stack_dir, s3_only=True)
    print(f"S3 gateway up in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    try:
        os.environ.update({k: v for k, v in stack.env().items() if k != "MLFLOW_TRACKING_URI"})
        import boto3

        s3 = boto3.client("s3", endpoint_url=stack.s3_endpoint, region_name="us-east-1")
        uris = []
        for p in paths:
            s3.upload_file(str(p), stack_mod.BUCKET, f"bench/{p.name}")
            uris.append(f"s3://{stack_mod.BUCKET}/bench/{p.name}")
        res: dict = {"N": args.n, "P": int(meta["total_elems"]), "tensors": None,
                     "bytes_per_mask": paths[0].stat().st_size, "loadavg_start": os.getloadavg(),
                     "hash_bytes_per_s": hash_rate()}  # fmt: skip
        locs = {"local": [str(p) for p in paths], "s3": uris}
        for verify in (True, False):
            for where, loc in locs.items():
                wall, cpu, r = min((_run(loc, verify) for _ in range(args.repeat)), key=lambda x: x[0])
                res[f"{where}_{'verified' if verify else 'preverified'}"] = {
                    "wall_s": wall, "cpu_s": cpu, "task_s": r.stats["task_s"], "task_cpu_s": r.stats["task_cpu_s"],
                    "bytes_read": r.stats["bytes_read"], "remote": r.stats.get("remote"),
                }  # fmt: skip
                res["tensors"] = len(r.tensor_names)
        res["store"] = _store_speed(uris)
        res["loadavg_end"] = os.getloadavg()
    finally:
        stack_mod.stop(stack_dir)
        import shutil

        shutil.rmtree(stack_dir, ignore_errors=True)
    _print(res)
    if args.out:
        args.out.write_text(json.dumps(res, indent=1, default=float))
    return 0


def _print(res: dict) -> None:
    n, P = res["N"], res["P"]
    bits = n * P / 8
    print(f"N = {n} masks of P = {P:,} elements ({res['tensors']} tensors, {res['bytes_per_mask'] / 1e6:.1f} MB "
          f"each); load average {res['loadavg_start'][0]:.1f} -> {res['loadavg_end'][0]:.1f}")  # fmt: skip
    print(f"store: whole objects {res['store']['whole_bytes_per_s'] / 1e6:.0f} MB/s (8 threads), "
          f"4 KiB ranged read {res['store']['ranged_4k_median_s'] * 1e3:.1f} ms (median)")  # fmt: skip
    print(f"checksum: BLAKE2b {res['hash_bytes_per_s'] / 1e9:.2f} GB/s -> {bits / res['hash_bytes_per_s']:.3f} s "
          f"for N*P/8 = {bits / 1e6:.1f} MB")  # fmt: skip
    print("| read | local s (CPU s) | S3 s (CPU s) | S3 / local |\n|---|---:|---:|---:|")
    for kind in ("verified", "preverified"):
        a, b = res[f"local_{kind}"], res[f"s3_{kind}"]
        print(f"| {kind} | {a['wall_s']:.3f} ({a['cpu_s']:.3f}) | {b['wall_s']:.3f} ({b['cpu_s']:.3f}) | "
              f"{b['wall_s'] / a['wall_s']:.2f} |")  # fmt: skip
    for kind in ("verified", "preverified"):
        rem, loc = res[f"s3_{kind}"]["remote"], res[f"local_{kind}"]
        s3 = res[f"s3_{kind}"]
        print(f"S3 {kind}: footers {rem['meta_requests']} requests {rem['meta_bytes'] / 1e6:.2f} MB "
              f"{rem['meta_s']:.3f} s; layouts {rem['layout_requests']} requests {rem['layout_bytes'] / 1e6:.2f} MB "
              f"{rem['layout_s']:.3f} s; rows {rem['task_requests']} requests {rem['task_bytes'] / 1e6:.1f} MB "
              f"(bits {rem['task_bits'] / 1e6:.1f} MB), task {s3['task_s']:.3f} s of which waiting "
              f"{rem['task_wait_s']:.3f} s (local task {loc['task_s']:.3f} s)")  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
