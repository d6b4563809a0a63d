"""Benchmark of the overlap analysis (issue 4). One command:

    .venv/bin/python benchmarks/bench_overlap.py            # N in {8, 32}, P ~ 5.4e8, 1 and 2 workers

What it measures, all in the same run on the local Ray cluster:
- the single-core bounds: the AND+popcount kernel on a cache-resident (N, 16384) uint64
  block (word-pairs/s) and BLAKE2b over 128 KiB rows (bytes/s);
- ``compute_overlap`` on synthetic masks in the real format (``MaskWriter``), with 1 and 2
  workers: wall time, bytes/s, ratio to the bound;
- a naive baseline: every mask read (verified) into one packed uint64 array, then a
  Python loop over pairs with ``np.bitwise_count(a & b).sum()``;
- incremental: a 32-run analysis cached, then one run added (32 new pairs), then a re-run
  with nothing new.

The masks are generated once into ``--data`` (about 2.3 GB for 33 masks) and reused.
They are read from the page cache: this measures compute, not the disk.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from rlsparsity.analysis.overlap import compute_overlap, pair_counts
from rlsparsity.analysis.overlap.kernels import _numba_kernels
from rlsparsity.contracts.mask import MaskWriter, read_mask

GEN_VERSION = 1


LLAMA_1B = (2048, 5632, 32000)  # d, ffn, vocab


def model_layout(target_elems: float, dims: tuple[int, int, int] = LLAMA_1B) -> list[tuple[str, tuple[int, ...]]]:
    """A Llama-like state dict (d, ffn, vocab = ``dims``) with enough layers for target_elems."""
    d, ffn, vocab = dims
    per_layer = 4 * d * d + 3 * d * ffn + 2 * d
    fixed = 2 * vocab * d + d
    layers = max(1, math.ceil((target_elems - fixed) / per_layer))
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, d))]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [
            (p + "self_attn.q_proj.weight", (d, d)),
            (p + "self_attn.k_proj.weight", (d, d)),
            (p + "self_attn.v_proj.weight", (d, d)),
            (p + "self_attn.o_proj.weight", (d, d)),
            (p + "mlp.gate_proj.weight", (ffn, d)),
            (p + "mlp.up_proj.weight", (ffn, d)),
            (p + "mlp.down_proj.weight", (d, ffn)),
            (p + "input_layernorm.weight", (d,)),
            (p + "post_attention_layernorm.weight", (d,)),
        ]
    out += [("model.norm.weight", (d,)), ("lm_head.weight", (vocab, d))]
    return out


def _write_one(args: tuple[str, int, float, tuple[int, int, int]]) -> str:
    path, seed, target, dims = args
    rng = np.random.default_rng(seed)
    # Densities of 10-40 % (sparsity 60-90 %, the paper's range); the kernel's speed
    # does not depend on the data.
    thr = int(256 * rng.uniform(0.1, 0.4))
    with MaskWriter(
        path,
        criterion={"mode": "bitwise"},
        dtype="bfloat16",
        base={"id": "synthetic", "hash": "bench"},
        target={"id": f"synthetic-{seed}"},
    ) as w:
        for name, shape in model_layout(target, dims):
            w.add(name, shape, rng.integers(0, 256, size=shape, dtype=np.uint8) < thr)
    return path


def ensure_masks(data: Path, count: int, target: float, dims: tuple[int, int, int] = LLAMA_1B) -> list[Path]:
    data.mkdir(parents=True, exist_ok=True)
    manifest = data / "manifest.json"
    want = {"version": GEN_VERSION, "target": target, **({"dims": list(dims)} if dims != LLAMA_1B else {})}
    have = json.loads(manifest.read_text()) if manifest.exists() else {}
    if {k: have.get(k) for k in want} != want:
        for f in data.glob("*.arrow"):
            f.unlink()
    paths = [data / f"run{k:02d}.arrow" for k in range(count)]
    todo = [(str(p), k, target, dims) for k, p in enumerate(paths) if not p.exists()]
    if todo:
        t = time.perf_counter()
        print(
            f"generating {len(todo)} masks of ~{target:.3g} elements into {data} ...",
            file=sys.stderr,
        )
        with ProcessPoolExecutor(2) as ex:
            list(ex.map(_write_one, todo))
        print(f"  {time.perf_counter() - t:.0f} s", file=sys.stderr)
        manifest.write_text(json.dumps(want))
    return paths


def kernel_rate(n: int, seconds: float = 1.0, backend: str = "auto") -> float:
    """Single-core AND+popcount word-pairs/s on a cache-resident block (the bound).

    ``backend``: "auto" is the engine's kernel (numba when installed), "numpy" the
    numpy reference kernel (the engine's kernel before numba).
    """
    rng = np.random.default_rng(0)
    X = rng.integers(0, 2**63, size=(n, 16384), dtype=np.uint64)
    tmp, cnt = np.empty_like(X), np.empty(X.shape, np.uint8)
    pair_counts(X, n, None, tmp, cnt, backend=backend)
    best = 0.0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        pair_counts(X, n, None, tmp, cnt, backend=backend)
        best = max(best, n * (n + 1) / 2 * X.shape[1] / (time.perf_counter() - t))
    return best


def hash_rate(seconds: float = 0.5) -> float:
    buf = np.random.default_rng(0).integers(0, 256, size=1 << 17, dtype=np.uint8).tobytes()
    best = 0.0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        for _ in range(32):
            hashlib.blake2b(buf, digest_size=16).digest()
        best = max(best, 32 * len(buf) / (time.perf_counter() - t))
    return best


def naive(paths: list[Path], dtype: type = np.uint64) -> tuple[float, float, np.ndarray]:
    """Read every mask (verified) into one packed array, then loop over pairs with numpy.

    ``dtype`` uint64: popcounts over 64-bit words (the strong baseline); uint8: over the
    bytes as ``np.packbits`` gives them (what a first implementation usually does).
    """
    t, c = time.perf_counter(), time.process_time()
    arrays = []
    for p in paths:
        m = read_mask(p)  # verifies the checksum
        raw = b"".join(
            bytes(b.as_buffer()) + b"\0" * (-len(b.as_buffer()) % 8) for b in m.table.column("bits")
        )
        arrays.append(np.frombuffer(raw, dtype=dtype))
    n = len(arrays)
    inter = np.zeros((n, n), dtype=np.int64)
    for i in range(n):
        for j in range(i, n):
            inter[i, j] = inter[j, i] = int(np.bitwise_count(arrays[i] & arrays[j]).sum())
    return time.perf_counter() - t, time.process_time() - c, inter


def best_of(repeat: int, fn):
    runs = [fn() for _ in range(repeat)]
    return min(runs, key=lambda r: r[0])


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--elems",
        type=float,
        default=5.0e8,
        help="elements per mask (at least; rounded up to whole layers)",
    )
    ap.add_argument("--ns", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument(
        "--repeat",
        type=int,
        default=2,
        help="best of this many runs per point (the machine is shared)",
    )
    ap.add_argument(
        "--data", type=Path, default=Path(tempfile.gettempdir()) / "rlsparsity-bench-overlap"
    )
    ap.add_argument("--no-naive", action="store_true")
    ap.add_argument("--no-incremental", action="store_true")
    ap.add_argument("--out", type=Path, help="write the results as JSON")
    args = ap.parse_args()

    import ray

    nmax = max(args.ns)
    paths = ensure_masks(args.data, nmax + (0 if args.no_incremental else 1), args.elems)
    P = read_mask(paths[0], verify=False).total_elems
    res: dict = {
        "P": P,
        "bytes_per_mask": math.ceil(P / 8),
        "cpus": os.cpu_count(),
        "loadavg_start": os.getloadavg(),
    }

    ray.init(num_cpus=max(args.workers), include_dashboard=False, log_to_driver=False)
    # Warm up: start the worker processes and import the module in them.
    compute_overlap(paths[:2], ["a", "b"], use_ray=True, workers=max(args.workers), use_cache=False)

    res["hash_bytes_per_s"] = hash_rate()
    res["points"] = []
    for n in args.ns:
        rate = kernel_rate(n)
        rate_np = kernel_rate(n, backend="numpy")
        pair_words = n * (n + 1) / 2 * math.ceil(P / 64)
        nbytes = n * math.ceil(P / 8)
        bound = pair_words / rate
        bound_v = bound + nbytes / res["hash_bytes_per_s"]
        point = {"N": n, "kernel": "numba" if _numba_kernels() else "numpy",
                 "kernel_word_pairs_per_s": rate, "kernel_numpy_word_pairs_per_s": rate_np,
                 "bytes": nbytes, "pair_words": pair_words,
                 "bound_1core_s": bound, "bound_1core_with_verify_s": bound_v, "runs": {}}  # fmt: skip
        ref = None
        for w in args.workers:
            for verify in (True, False):
                t, r = best_of(
                    args.repeat, lambda n=n, w=w, verify=verify: _timed(paths[:n], w, verify)
                )
                ref = r.inter if ref is None else ref
                assert np.array_equal(r.inter, ref)
                point["runs"][f"w{w}{'' if verify else '-preverified'}"] = {
                    "workers": w,
                    "verify": verify,
                    "wall_s": t,
                    "bytes_per_s": nbytes / t,
                    "tasks": r.stats["tasks"],
                    # CPU seconds the tasks got: on a shared machine, cpu/wall shows how
                    # many cores the run actually had.
                    "task_cpu_s": r.stats["task_cpu_s"],
                    "cores_used": r.stats["task_cpu_s"] / t,
                    "ratio_to_bound": t / (bound / w),
                    "ratio_to_bound_with_verify": t / ((bound_v if verify else bound) / w),
                }
        if not args.no_naive:
            t, cpu, inter = naive(paths[:n])
            assert np.array_equal(inter, ref)
            point["naive_s"] = t
            point["naive_cpu_s"] = cpu
            t, cpu, inter = naive(paths[:n], np.uint8)
            assert np.array_equal(inter, ref)
            point["naive_u8_s"] = t
            point["naive_u8_cpu_s"] = cpu
        res["points"].append(point)
        print(json.dumps(point, indent=1), file=sys.stderr)

    if not args.no_incremental:
        # Add run number nmax+1 to analyses of 8, 16, ... nmax runs: the added work is
        # N new pairs plus reading the N old masks once, so the time grows with N, while a
        # full recompute grows with N^2 / 2.
        res["incremental"] = []
        w = max(args.workers)
        bases = sorted({b for b in (8, 16, nmax) if b <= nmax})
        for nb in bases:
            cache = Path(tempfile.mkdtemp(prefix="rlsparsity-bench-cache-"))
            try:
                sel = [*paths[:nb], paths[nmax]]
                labels = [p.stem for p in sel]
                t0 = time.perf_counter()
                base = compute_overlap(sel[:nb], labels[:nb], workers=w, cache_dir=cache)
                t_base = time.perf_counter() - t0
                t0 = time.perf_counter()
                inc = compute_overlap(sel, labels, workers=w, cache_dir=cache)
                t_inc = time.perf_counter() - t0
                t0 = time.perf_counter()
                again = compute_overlap(sel, labels, workers=w, cache_dir=cache)
                t_again = time.perf_counter() - t0
                t0 = time.perf_counter()
                full = compute_overlap(sel, labels, workers=w, use_cache=False)
                t_full = time.perf_counter() - t0
                assert np.array_equal(inc.inter, full.inter) and np.array_equal(
                    again.inter, full.inter
                )
                row = {
                    "runs_before": nb,
                    "first_s": t_base,
                    "pairs_first": base.stats["pairs_computed"],
                    "add_one_s": t_inc,
                    "add_one_cpu_s": inc.stats["task_cpu_s"],
                    "pairs_added": inc.stats["pairs_computed"],
                    "bytes_add_one": inc.stats["bytes_read"],
                    "full_recompute_s": t_full,
                    "full_recompute_cpu_s": full.stats["task_cpu_s"],
                    "pairs_full": full.stats["pairs_computed"],
                    "nothing_new_s": t_again,
                    "bytes_nothing_new": again.stats["bytes_read"],
                }
                res["incremental"].append(row)
                print(json.dumps(row, indent=1), file=sys.stderr)
            finally:
                shutil.rmtree(cache, ignore_errors=True)
    res["loadavg_end"] = os.getloadavg()
    ray.shutdown()
    _print_table(res)
    if args.out:
        args.out.write_text(json.dumps(res, indent=1))
    return 0


def _timed(paths: list[Path], workers: int, verify: bool):
    t = time.perf_counter()
    r = compute_overlap(
        paths,
        [p.stem for p in paths],
        use_ray=True,
        workers=workers,
        use_cache=False,
        verify=verify,
    )
    return time.perf_counter() - t, r


def _naive(p: dict) -> str:
    if p.get("naive_s") is None:
        return ""
    return f"{p['naive_s']:.1f} ({p['naive_cpu_s']:.1f}); bytes: {p['naive_u8_s']:.1f} ({p['naive_u8_cpu_s']:.1f})"


def _print_table(res: dict) -> None:
    print(f"P = {res['P']:,} elements per mask ({res['bytes_per_mask'] / 1e6:.1f} MB); "
          f"BLAKE2b {res['hash_bytes_per_s'] / 1e9:.2f} GB/s/core; load average {res['loadavg_start'][0]:.1f} -> {res['loadavg_end'][0]:.1f}")  # fmt: skip
    print(
        "| N | kernel Gword-pairs/s/core | run | wall s | GB/s | tasks | task CPU s | cores used | × bound (AND+popcount) | × bound (+verify) | naive s (CPU s) | speedup vs naive |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for p in res["points"]:
        print(
            f"N = {p['N']}: engine kernel ({p.get('kernel', 'numpy')}) "
            f"{1e9 / p['kernel_word_pairs_per_s']:.3f} ns/word-pair, numpy kernel "
            f"{1e9 / p['kernel_numpy_word_pairs_per_s']:.3f} ns/word-pair (same run)"
        )
    for p in res["points"]:
        for name, r in p["runs"].items():
            naive_s = p.get("naive_s")
            print(
                f"| {p['N']} | {p['kernel_word_pairs_per_s'] / 1e9:.2f} | {name} | {r['wall_s']:.2f} | "
                f"{r['bytes_per_s'] / 1e9:.2f} | {r['tasks']} | {r['task_cpu_s']:.2f} | {r['cores_used']:.2f} | "
                f"{r['ratio_to_bound']:.2f} | "
                f"{r['ratio_to_bound_with_verify']:.2f} | {_naive(p)} | "
                f"{'' if naive_s is None else format(naive_s / r['wall_s'], '.1f') + '; bytes: ' + format(p['naive_u8_s'] / r['wall_s'], '.1f')} |"
            )
        w = {r["workers"]: r["wall_s"] for r in p["runs"].values() if r["verify"]}
        if 1 in w and 2 in w:
            print(f"| {p['N']} | | speedup 1 -> 2 workers: {w[1] / w[2]:.2f}x | | | | | | | | | |")
    if res.get("incremental"):
        print()
        print(
            "| runs before | +1 run: new pairs | +1 run: s (task CPU s) | full recompute: pairs | full: s (task CPU s) | nothing new: ms, bytes read |"
        )
        print("|---|---|---|---|---|---|")
        for r in res["incremental"]:
            print(
                f"| {r['runs_before']} | {r['pairs_added']} | {r['add_one_s']:.2f} ({r['add_one_cpu_s']:.2f}) | "
                f"{r['pairs_full']} | {r['full_recompute_s']:.2f} ({r['full_recompute_cpu_s']:.2f}) | "
                f"{r['nothing_new_s'] * 1e3:.0f}, {r['bytes_nothing_new']} |"
            )


if __name__ == "__main__":
    raise SystemExit(main())
