"""Benchmark the learner-side diff of sparse weight sync: fused numba kernel vs torch ops.

    python benchmarks/bench_sync_diff.py [--repeat 5] [--threads 1]

Tensors in SmolLM2-135M's shapes (134.5M float32 master weights), and per "step" a random
share of the entries moved by a relative 1e-4 or 1e-2 (so that about 0.7 % or 20 % of the
bf16 view changes, as at lr 3e-6 and 1e-4 in the GRPO runs of BENCHMARKS.md). Each step is
diffed by both paths (`Bf16SyncState.diff` with ``fused=True`` and ``fused=False``), which
must give the same patch; the figure is the median over ``--repeat`` steps, and the ratio
torch / fused. The learner runs with one thread per CPU it holds (1 in the sweeps here).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import numpy as np
import torch

from rlsparsity.platform.weight_sync import Bf16SyncState

# SmolLM2-135M: vocab 49152, hidden 576, 30 layers, 9 heads of 64 (3 KV heads), MLP 1536.
SHAPES = [(49152, 576)] + 30 * [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536), (576,), (576,)] + [(576,)]


def run(repeat: int, rel_step: float, moved: float) -> dict[str, float]:
    gen = torch.Generator().manual_seed(0)
    params = [(f"t{i}", torch.randn(s, generator=gen) * 0.05) for i, s in enumerate(SHAPES)]
    fused, plain = Bf16SyncState(params), Bf16SyncState(params)
    times: dict[str, list[float]] = {"fused": [], "torch": []}
    changed = []
    for _ in range(repeat):
        with torch.no_grad():
            for _, p in params:
                p.add_(p * rel_step * torch.randn(p.shape, generator=gen) * (torch.rand(p.shape, generator=gen) < moved))
        t0 = time.perf_counter()
        a = fused.diff(params)
        t1 = time.perf_counter()
        b = plain.diff(params, fused=False)
        t2 = time.perf_counter()
        assert a.changed == b.changed and a.tensors.keys() == b.tensors.keys(), "fused and torch patches differ"
        times["fused"].append(t1 - t0)
        times["torch"].append(t2 - t1)
        changed.append(a.changed / a.dense_bytes * 2)
    f, t = statistics.median(times["fused"]), statistics.median(times["torch"])
    return {"changed": statistics.mean(changed), "fused_s": f, "torch_s": t, "ratio": t / f}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    n = sum(int(np.prod(s)) for s in SHAPES)
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} thread(s), "
          f"{n / 1e6:.1f}M float32 parameters, median of {args.repeat} steps")
    print("| bf16 changed per step | torch ops, s | fused kernel, s | torch / fused |")
    print("|---:|---:|---:|---:|")
    for rel_step, moved in ((1e-4, 0.5), (1e-2, 0.25)):
        r = run(args.repeat, rel_step, moved)
        print(f"| {100 * r['changed']:.2f} % | {r['torch_s']:.3f} | {r['fused_s']:.3f} | **{r['ratio']:.2f}×** |")


if __name__ == "__main__":
    main()
