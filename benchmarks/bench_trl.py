"""GRPO step time on SmolLM2-135M-Instruct: the platform's learner against TRL's GRPOTrainer.

    python benchmarks/bench_trl.py [--steps 8] [--mask-every 4] [--threads 2] [--json out.json]

The same setting on both sides, in one process, one after the other: the model
(``smollm2:135m-instruct``, float32 masters whose θ0 is the bf16 checkpoint), the prompts
(``mul`` asked as a chat turn; the exact problems the learner draws at each step, fed to TRL
in that order, unshuffled), ``--prompts`` × ``--samples`` completions per step, at most
``--max-new-tokens`` new tokens, temperature 1, the learning rate, no KL term, TRL's default
loss (dapo) and reward scaling (group), one optimizer step per generation batch, the same
number of CPU threads, no gradient checkpointing (TRL's default is on; ``--trl-gradient-checkpointing``
turns it on), HF ``generate`` on both (TRL with ``use_vllm=False``; ours the ``hf``
engine in the learner's process, the Ray-free `LocalRollout`, so no Ray or object store in the
figures).

Per step it reports generation, the learner's share (scoring, log-probs, loss, backward,
optimizer) and, ours only, the sync (bf16 diff and patch applied to the engine) and the mask
steps (every ``--mask-every`` steps: every default mask series, the dynamics and the drift
diagnostic, as a trial writes them, into a local folder). Setup and the held-out evaluations
are outside the timed steps. Generation is timed around each side's generate call
(``LocalRollout.generate``, ``GRPOTrainer._generate``); a step is timed from TRL's
``on_step_begin`` to ``on_step_end`` and around ``Learner.step``.

After the last step both models' bf16 views are compared with θ0's: the share of entries
that did not change (the paper's sparsity), computed here by one function for both.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

MODEL_ID = "smollm2:135m-instruct"


def bf16_sparsity(model: torch.nn.Module, theta0: dict[str, torch.Tensor]) -> float:
    """Share of entries whose bf16 view equals θ0's (tied tensors once: named_parameters dedups)."""
    same = total = 0
    for name, p in model.named_parameters():
        a = p.detach().to(torch.bfloat16).view(torch.int16)
        b = theta0[name].to(torch.bfloat16).view(torch.int16)
        same += int((a == b).sum())
        total += a.numel()
    return same / total


def _spec(args: argparse.Namespace):
    from rlsparsity.sweeps.spec import SweepSpec

    (spec,) = SweepSpec({
        "model": MODEL_ID, "dataset": "mul", "algorithm": "grpo", "seed": args.seed,
        "training": {"steps": args.steps, "lr": args.lr, "prompts_per_step": args.prompts,
                     "samples_per_prompt": args.samples, "max_new_tokens": args.max_new_tokens,
                     "temperature": 1.0, "prompt_format": "chat", "reward": "last_number", "eval_problems": 4,
                     "max_grad_norm": 1.0, "masks": {"every": args.mask_every}},
    }).trials()
    return spec


def run_ours(args: argparse.Namespace, model_dir: Path, theta0: dict[str, torch.Tensor]) -> dict:
    from rlsparsity.platform.engines import HFEngine, LocalRollout
    from rlsparsity.platform.learner import Learner, LocalSink

    spec = _spec(args)
    gen_s: list[float] = []

    class TimedRollout(LocalRollout):
        def generate(self, prompts, **kw):
            t = time.perf_counter()
            out = super().generate(prompts, **kw)
            gen_s.append(time.perf_counter() - t)
            return out

    engine = HFEngine(model_dir, threads=args.threads)
    with tempfile.TemporaryDirectory(prefix="bench-trl-ours-") as out:
        learner = Learner(spec, model_dir, base={"id": MODEL_ID, "hash": "bench"}, threads=args.threads,
                          rollout=lambda named: TimedRollout(engine, named), sink=LocalSink(Path(out)))
        learner.setup()
        record = learner._record
        record_s: dict[int, float] = {}

        def timed_record(step, before):
            t = time.perf_counter()
            try:
                return record(step, before)
            finally:
                record_s[step] = time.perf_counter() - t

        learner._record = timed_record
        steps, rewards = [], []
        for step in range(1, args.steps + 1):
            gen_s.clear()
            t = time.perf_counter()
            m = learner.step(step)
            total = time.perf_counter() - t
            gen = sum(gen_s)
            sync = m["sync_diff_s"] + m["sync_send_s"]
            masks = record_s.get(step, 0.0)
            steps.append({"step": step, "total": total, "generation": gen, "sync": sync, "masks": masks,
                          "learner": total - gen - sync - masks})
            rewards.append(m["reward"])
            print(f"ours step {step}: {total:.2f} s (generation {gen:.2f}, sync {sync:.2f}, masks {masks:.2f}) "
                  f"reward {m['reward']:.3f}", flush=True)
        sparsity = bf16_sparsity(learner.policy, theta0)
        problems = [learner_problems(spec, learner, s) for s in range(1, args.steps + 1)]
    del learner  # the engine goes with this frame: free both before TRL loads its model
    gc.collect()
    return {"steps": steps, "rewards": rewards, "bf16_sparsity": sparsity, "problems": problems}


def learner_problems(spec, learner, step: int) -> list[dict[str, str]]:
    """The problems (chat prompt, answer) the learner drew at `step`, as its batch source does."""
    from rlsparsity.platform.sources import StepContext

    ctx = StepContext(spec, step, 0, 1, None, learner.tok, learner.task)
    return [{"prompt": p.prompt, "answer": p.answer} for p in ctx.problems()]


def run_trl(args: argparse.Namespace, model_dir: Path, theta0: dict[str, torch.Tensor], problems: list[list[dict]]) -> dict:
    import datasets
    import trl
    from transformers import TrainerCallback

    from rlsparsity.platform.tasks import REWARDS

    score = REWARDS["last_number"]

    def reward(prompts, completions, answer, **kwargs):
        return [score(c, a) for c, a in zip(completions, answer, strict=True)]

    rows = [row for step in problems for row in step]
    with tempfile.TemporaryDirectory(prefix="bench-trl-") as out:
        cfg = trl.GRPOConfig(
            output_dir=out, report_to=[], use_cpu=True, bf16=False, save_strategy="no", logging_steps=1,
            disable_tqdm=True, seed=args.seed, max_steps=args.steps, learning_rate=args.lr, lr_scheduler_type="constant",
            warmup_steps=0, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=1.0,
            per_device_train_batch_size=args.prompts * args.samples, num_generations=args.samples,
            gradient_accumulation_steps=1, max_completion_length=args.max_new_tokens, temperature=1.0, top_p=1.0,
            beta=0.0, shuffle_dataset=False, use_vllm=False, model_init_kwargs={"dtype": torch.float32},
            dataloader_num_workers=0,
            # TRL's default (True) recomputes activations in the backward: our learner does not.
            gradient_checkpointing=args.trl_gradient_checkpointing,
        )
        trainer = trl.GRPOTrainer(model=str(model_dir), reward_funcs=reward, args=cfg,
                                  train_dataset=datasets.Dataset.from_list(rows))
        gen_s: list[float] = []
        generate = trainer._generate

        def timed_generate(*a, **kw):
            t = time.perf_counter()
            try:
                return generate(*a, **kw)
            finally:
                gen_s.append(time.perf_counter() - t)

        trainer._generate = timed_generate
        steps: list[dict] = []

        class StepTimer(TrainerCallback):
            def on_step_begin(self, *a, **kw):
                gen_s.clear()
                self.t = time.perf_counter()

            def on_step_end(self, *a, **kw):
                total, gen = time.perf_counter() - self.t, sum(gen_s)
                steps.append({"step": len(steps) + 1, "total": total, "generation": gen, "learner": total - gen})
                print(f"trl  step {len(steps)}: {total:.2f} s (generation {gen:.2f})", flush=True)

        trainer.add_callback(StepTimer())
        torch.set_num_threads(args.threads)
        trainer.train()
        rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
        sparsity = bf16_sparsity(trainer.model, theta0)
    del trainer
    gc.collect()
    return {"steps": steps, "rewards": rewards, "bf16_sparsity": sparsity}


def _median(steps: list[dict], key: str, skip_first: bool) -> float:
    values = [s.get(key, 0.0) for s in (steps[1:] if skip_first and len(steps) > 1 else steps)]
    return statistics.median(values)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--mask-every", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trl-gradient-checkpointing", action="store_true",
                   help="TRL's default; off by default here, as the platform's learner does not checkpoint")
    p.add_argument("--json", type=Path, help="write every figure here")
    args = p.parse_args(argv)

    from rlsparsity.platform.models import load_model, resolve_model

    model_dir = resolve_model(MODEL_ID)
    theta0 = {n: t.detach().clone() for n, t in load_model(model_dir, dtype=torch.float32).named_parameters()}
    torch.set_num_threads(args.threads)
    ours = run_ours(args, model_dir, theta0)
    theirs = run_trl(args, model_dir, theta0, ours.pop("problems"))

    keys = ("total", "generation", "learner", "sync", "masks")
    print(f"\n{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"{args.steps} steps of {args.prompts} prompts x {args.samples} samples, {args.max_new_tokens} new tokens, "
          f"lr {args.lr:g}, masks every {args.mask_every}")
    print("median s/step (all steps)  " + "  ".join(f"{k:>10}" for k in keys))
    for name, r in (("ours", ours), ("trl", theirs)):
        print(f"{name:<26} " + "  ".join(f"{_median(r['steps'], k, False):10.2f}" for k in keys))
    mean = {name: statistics.mean(s["total"] for s in r["steps"]) for name, r in (("ours", ours), ("trl", theirs))}
    share = {k: sum(s[k] for s in ours["steps"]) / sum(s["total"] for s in ours["steps"]) for k in ("sync", "masks")}
    print(f"mean s/step: ours {mean['ours']:.2f}, trl {mean['trl']:.2f}; trl/ours throughput ratio "
          f"{mean['trl'] / mean['ours']:.2f} (above 1: ours is faster)")
    print(f"ours: sync {100 * share['sync']:.1f} % and masks {100 * share['masks']:.1f} % of the step time")
    print(f"bf16 sparsity after {args.steps} steps: ours {100 * ours['bf16_sparsity']:.2f} %, "
          f"trl {100 * theirs['bf16_sparsity']:.2f} %")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "ours": ours,
                                         "trl": theirs, "mean_step_s": mean, "ours_share": share}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
