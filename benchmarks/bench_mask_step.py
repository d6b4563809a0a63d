"""Benchmark a mask step's parts on SmolLM2-135M-shaped masters: the recorder and the drift
diagnostic, fused numba pass against torch ops.

    python benchmarks/bench_mask_step.py [--repeat 3] [--threads 2]

134.5M float32 masters (SmolLM2-135M's shapes, random values), θ0 their bf16 view, and a step
that moves a random 5 % of the entries by a relative 1e-2 (so that the drift histograms fill
several bins). Per repeat: `MaskRecorder.record` with the default mask criteria and dynamics
(the six series' Arrow files and CSV tables, into a temporary folder), and `Drift.add` over
every tensor with ``fused=True`` and ``fused=False``, which must give the same histograms. The
figures are medians over ``--repeat``, and the ratio torch / fused.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_sync_diff import SHAPES  # noqa: E402

from rlsparsity.analysis.drift import Drift  # noqa: E402
from rlsparsity.platform.config import DEFAULT_MASK_CRITERIA, parse_training_criteria  # noqa: E402
from rlsparsity.platform.mask_recorder import MaskRecorder  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    named = [(f"model.layers.{i // 9}.t{i}", (torch.randn(s, generator=gen) * 0.05).to(torch.bfloat16).float())
             for i, s in enumerate(SHAPES)]
    n = sum(t.numel() for _, t in named)
    recorder = MaskRecorder(named, base={"id": "bench", "hash": "bench"}, tied=[],
                            criteria=parse_training_criteria(DEFAULT_MASK_CRITERIA), dynamics=True)
    times: dict[str, list[float]] = {"record": [], "drift fused": [], "drift torch": []}
    for step in range(1, args.repeat + 1):
        before = {name: t.clone() for name, t in named}
        with torch.no_grad():
            for _, t in named:
                t.add_(t * 1e-2 * torch.randn(t.shape, generator=gen) * (torch.rand(t.shape, generator=gen) < 0.05))
        with tempfile.TemporaryDirectory(prefix="bench-mask-step-") as out:
            t0 = time.perf_counter()
            recorder.record(named, Path(out), step, final=False, target={"run_id": "bench"})
            times["record"].append(time.perf_counter() - t0)
        drifts = {}
        for kind, fused in (("drift fused", True), ("drift torch", False)):
            d = Drift(step)
            t0 = time.perf_counter()
            for name, t in named:
                d.add(recorder.base_bf16(name), before[name], t, fused=fused)
            times[kind].append(time.perf_counter() - t0)
            drifts[kind] = d.to_json()
        if drifts["drift fused"] != drifts["drift torch"]:
            print("FAIL: the fused and torch drift histograms differ", file=sys.stderr)
            return 1
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{platform.machine()}, {args.threads} threads, torch {torch.__version__}; {n:,} float32 masters, "
          f"median of {args.repeat}")
    for k, v in med.items():
        print(f"{k:<12} {v:7.2f} s")
    print(f"drift: torch / fused {med['drift torch'] / med['drift fused']:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
