"""Micro-batching: the peak memory and the time of one GRPO backward over a step's batch,
whole (the baseline) and in micro-batches (`training.micro_batch_size`), on SmolLM2-135M.

Each configuration runs in its own process: the host's peak resident memory is reset
(`/proc/self/clear_refs`) after the model and batch are built, so the figure is what the
step adds (activations, logits, gradients). The gradients are kept and compared with the
whole batch's. Configurations alternate, repeated, and the report gives medians and the
ratios to the whole-batch run of the same repeat.

    python benchmarks/bench_micro_batches.py               # 32 sequences, micro 8 and 4
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODEL_ID = "smollm2:135m-instruct"


def _peak_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status")


def one(micro: int | None, rows: int, out: Path) -> dict:
    import torch
    from safetensors.torch import save_file

    from rlsparsity.platform.algorithms import Models, StepBatch, get_algorithm
    from rlsparsity.platform.batches import build_batch
    from rlsparsity.platform.config import TrainingSpec
    from rlsparsity.platform.micro_batches import accumulate_gradients
    from rlsparsity.platform.models import load_model, resolve_model

    torch.set_num_threads(2)
    policy = load_model(resolve_model(MODEL_ID), dtype=torch.float32)
    vocab = policy.config.vocab_size
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(10, vocab, (32,), generator=g).tolist() for _ in range(rows // 8) for _ in range(8)]
    completions = [torch.randint(10, vocab, (int(torch.randint(32, 97, (1,), generator=g)),), generator=g).tolist()
                   for _ in range(rows)]
    rewards = torch.randint(0, 2, (rows,), generator=g).float()
    batch = StepBatch(build_batch(prompts, completions, pad_id=0), rewards=rewards, group_size=8)
    algo = get_algorithm("grpo")
    cfg, train = algo.config(), TrainingSpec(micro_batch_size=micro, samples_per_prompt=8, max_new_tokens=96)
    with torch.no_grad():
        batch = algo.prepare(Models(policy), batch, cfg, train)
    Path("/proc/self/clear_refs").write_text("5")  # the peak from here on
    before = _peak_kib()
    t = time.perf_counter()
    loss, _ = accumulate_gradients(algo, Models(policy), batch, cfg, train)
    seconds = time.perf_counter() - t
    added = (_peak_kib() - before) / 2**20
    save_file({n: p.grad.contiguous() for n, p in policy.named_parameters() if p.grad is not None}, str(out))
    return {"micro": micro, "seconds": seconds, "peak_added_gib": added, "loss": float(loss),
            "tokens": int(batch.tokens.completion_mask.sum())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=32, help="sequences in the step (8 per prompt)")
    ap.add_argument("--micro", type=int, nargs="+", default=[8, 4], help="micro-batch sizes against the whole batch")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)  # a child: 0 is the whole batch
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one is not None:
        print(json.dumps(one(args.one or None, args.rows, args.out)))
        return 0

    from safetensors.torch import load_file

    runs: dict[int, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for micro in [0, *args.micro]:
                out = Path(tmp) / f"{micro}-{r}.safetensors"
                child = subprocess.run([sys.executable, __file__, "--one", str(micro), "--rows", str(args.rows), "--out", str(out)],
                                       capture_output=True, text=True, check=True)
                runs.setdefault(micro, []).append(json.loads(child.stdout.strip().splitlines()[-1]))
        whole = load_file(str(Path(tmp) / "0-0.safetensors"))
        apart = {m: max(((load_file(str(Path(tmp) / f"{m}-0.safetensors"))[n] - w).abs().max() / w.abs().max()).item()
                        for n, w in whole.items()) for m in args.micro}
    base = runs[0]
    print(f"SmolLM2-135M, float32, GRPO (dapo) backward over {args.rows} sequences "
          f"({base[0]['tokens']} completion tokens), {args.repeats} repeats, torch threads 2")
    print("| micro-batch | peak added (GiB) | ratio | backward (s) | ratio | largest grad difference / tensor's max |")
    print("|---|---|---|---|---|---|")
    for micro, rs in runs.items():
        peak = statistics.median(r["peak_added_gib"] for r in rs)
        secs = statistics.median(r["seconds"] for r in rs)
        peak_ratio = statistics.median(r["peak_added_gib"] / b["peak_added_gib"] for r, b in zip(rs, base, strict=True))
        time_ratio = statistics.median(r["seconds"] / b["seconds"] for r, b in zip(rs, base, strict=True))
        diff = "(baseline)" if micro == 0 else f"{apart[micro]:.1e}"
        print(f"| {micro or 'whole'} | {peak:.2f} | {peak_ratio:.2f}x | {secs:.1f} | {time_ratio:.2f}x | {diff} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
