"""The GPU check: what a bare CUDA machine (torch and transformers; no Ray, vLLM or MLflow,
no network) can tell about the platform's GPU path, in a few minutes. `make gpu-check`.

1. The Ray-free Learner trains on CUDA with bf16 autocast over float32 masters
   (`training.precision: amp`): GRPO steps on the embedded model in micro-batches, its
   engine synced.
2. On the same weights, the sync patch and the training masks computed on CUDA equal the
   CPU ones bit for bit (every criterion, the dynamics' previous-step mask).
3. The sync diff on the GPU for a 0.5B-parameter model (Qwen2.5-0.5B's shapes, random
   weights, an Adam-sized step of about lr = 1e-6 of each weight's scale): time per step,
   and the patch's bytes against the dense bf16 bytes.
It prints one line per check and exits 1 on the first failure. Besides torch and
transformers it needs numpy, safetensors, tokenizers, pydantic, pyyaml and pyarrow.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout, without installing it

NEEDS = ("torch", "transformers", "numpy", "safetensors", "tokenizers", "pydantic", "yaml", "pyarrow")


def fail(msg: str) -> None:
    print(f"FAIL {msg}", flush=True)
    sys.exit(1)


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _same_entry(a, b) -> bool:
    """Two sync-patch entries ((flat indices or None, bf16 bits) or None) are equal."""
    if a is None or b is None:
        return a is None and b is None
    return all((x is None and y is None) or (x is not None and y is not None and x.shape == y.shape and (x == y).all())
               for x, y in zip(a, b, strict=True))


def check_learner(device: str, steps: int, out: Path) -> None:
    import torch

    from rlsparsity.analysis.criteria import BITWISE, compare
    from rlsparsity.platform.config import parse_training_criteria
    from rlsparsity.platform.engines import HFEngine, LocalRollout
    from rlsparsity.platform.learner import Learner, LocalSink
    from rlsparsity.platform.models import ensure_embedded_model
    from rlsparsity.platform.weight_sync import Bf16SyncState
    from rlsparsity.sweeps.spec import SweepSpec

    t0 = time.perf_counter()
    model_dir = ensure_embedded_model("tiny-arith")
    print(f"ok   embedded θ0 at {model_dir} ({time.perf_counter() - t0:.0f} s)", flush=True)
    (spec,) = SweepSpec({"algorithm": "grpo", "training": {"steps": steps, "precision": "amp", "prompts_per_step": 8,
                                                           "samples_per_prompt": 4, "eval_problems": 32, "micro_batch_size": 8,
                                                           "masks": {"every": steps, "drift": False}}}).trials()
    engine = HFEngine(model_dir)
    learner = Learner(spec, model_dir, base={"id": "embedded", "hash": "gpu-check"}, device=device,
                      rollout=lambda named: LocalRollout(engine, named), sink=LocalSink(out))
    learner.setup()
    times = []
    for step in range(1, steps + 1):
        t = time.perf_counter()
        m = learner.step(step)
        _sync(device)
        times.append(time.perf_counter() - t)
        if not torch.isfinite(torch.tensor(m["loss"])):
            fail(f"learner step {step}: loss {m['loss']}")
    dev = {p.device.type for p in learner.policy.parameters()}
    if dev != {torch.device(device).type}:
        fail(f"the policy's parameters are on {dev}, not {device}")
    served = engine.weights_bf16()
    for name, p in learner.policy.named_parameters():
        if not torch.equal(served[name], p.detach().to(torch.bfloat16).view(torch.int16).cpu()):
            fail(f"the engine's {name} differs from the learner's bf16 view after the last sync")
    print(f"ok   {steps} GRPO steps on {device} with bf16 autocast in micro-batches of 8; median step {sorted(times)[len(times) // 2]:.2f} s; "
          f"engine holds the bf16 view", flush=True)

    # The same weights on CPU and on the device: a sync diff and every training mask, bit for bit.
    named_gpu = list(learner.policy.named_parameters())
    theta0 = {n: t.clone() for n, t in learner.recorder.base_master.items()}
    named_cpu = [(n, p.detach().cpu()) for n, p in named_gpu]
    for (n, p_gpu), (_, p_cpu) in zip(named_gpu, named_cpu, strict=True):
        on_gpu = Bf16SyncState([(n, theta0[n])]).diff([(n, p_gpu)]).tensors.get(n)
        on_cpu = Bf16SyncState([(n, theta0[n].cpu())]).diff([(n, p_cpu)]).tensors.get(n)
        if not _same_entry(on_gpu, on_cpu):
            fail(f"sync patch of {n} differs between {device} and cpu")
    criteria = [c.criterion for c in parse_training_criteria("bitwise abs:1e-5 rel:1e-3 paper:1e-5")]
    for (n, p_gpu), (_, p_cpu) in zip(named_gpu, named_cpu, strict=True):
        a = compare(theta0[n].to(torch.bfloat16), p_gpu.detach().to(torch.bfloat16), criteria, masks=range(4), packed=True)
        b = compare(theta0[n].cpu().to(torch.bfloat16), p_cpu.to(torch.bfloat16), criteria, masks=range(4), packed=True)
        if a.counts != b.counts or any((a.masks[i] != b.masks[i]).any() for i in range(4)):
            fail(f"training masks of {n} differ between {device} ({a.kernel}) and cpu ({b.kernel})")
        m = compare(theta0[n], p_gpu.detach(), [BITWISE], masks=[0], packed=True).masks[0]
        if (m != compare(theta0[n].cpu(), p_cpu, [BITWISE], masks=[0], packed=True).masks[0]).any():
            fail(f"masters mask of {n} differs between {device} and cpu")
    print(f"ok   sync patches and the bitwise, abs:1e-5, rel:1e-3, paper:1e-5 and masters masks: {device} == cpu, bit for bit",
          flush=True)


def check_diff_speed(device: str, steps: int) -> None:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from rlsparsity.platform.weight_sync import Bf16SyncState

    cfg = Qwen2Config(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                      num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True)
    with torch.device(device):
        model = Qwen2ForCausalLM(cfg).float()
    named = list(model.named_parameters())
    n = sum(p.numel() for _, p in named)
    state = Bf16SyncState(named)
    gen = torch.Generator(device=device).manual_seed(0)
    times, sent = [], []
    with torch.no_grad():
        for _ in range(steps):
            for _, p in named:  # an Adam-like step: about 1e-6 of each weight's scale, random sign
                p.add_(torch.randn(p.shape, generator=gen, device=device) * 1e-6 * p.abs().mean())
            _sync(device)
            t = time.perf_counter()
            patch = state.diff(named, fused=False)  # the torch path, as on a GPU
            _sync(device)
            times.append(time.perf_counter() - t)
            sent.append(patch.nbytes / patch.dense_bytes)
    med = sorted(times)[len(times) // 2]
    print(f"ok   sync diff of a {n / 1e9:.2f}B-parameter model on {device}: median {1e3 * med:.0f} ms per step "
          f"({2 * n / med / 1e9:.1f} GB/s of bf16 view); patch {100 * sorted(sent)[len(sent) // 2]:.2f} % of the "
          f"dense {2 * n / 1e9:.2f} GB", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=6, help="learner steps (default %(default)s)")
    ap.add_argument("--diff-steps", type=int, default=10, help="timed sync diffs of the 0.5B model")
    ap.add_argument("--device", default="cuda", help="cuda (default); cpu runs the same checks on the CPU, to try the "
                    "script where there is no GPU")
    args = ap.parse_args()
    missing = [m for m in NEEDS if importlib.util.find_spec(m) is None]
    if missing:
        fail(f"missing Python packages: {', '.join(missing)} (pip install {' '.join(missing)})")
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        fail("no CUDA device: this check runs where a GPU is (CI has none; the CPU path is the test suite)")
    name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu"
    print(f"torch {torch.__version__}, {name}", flush=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="rlsparsity-gpu-check-") as out:
        check_learner(args.device, args.steps, Path(out))
    check_diff_speed(args.device, args.diff_steps)
    print(f"gpu-check passed in {time.perf_counter() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
