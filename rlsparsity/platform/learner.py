"""The learner: the per-worker loop that Ray Train's TorchTrainer runs for one trial.

float32 master weights; after every optimizer step rank 0 diffs the bf16 view, sends the
changed entries to the rollout actors, and every k steps writes the bf16 mask against θ0
to the trial's MLflow run. All ranks hold identical weights (DDP), so rank 0 speaks for them.
"""

from __future__ import annotations

import copy
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from rlsparsity.platform.algorithms import StepBatch, get_algorithm
from rlsparsity.platform.batches import build_batch
from rlsparsity.platform.config import TrialSpec
from rlsparsity.platform.mask_recorder import MaskRecorder
from rlsparsity.platform.models import load_model, load_tokenizer
from rlsparsity.platform.rollout import generate_sharded
from rlsparsity.platform.tasks import get_task, reward
from rlsparsity.platform.tracking import Tracker
from rlsparsity.platform.weight_sync import Bf16SyncState

REPORT_EVERY = 10  # steps between progress reports to Ray Train / Tune


def tied_groups(model: torch.nn.Module) -> list[list[str]]:
    """State-dict keys that share storage (e.g. lm_head tied to the embeddings); counted once."""
    by_ptr: dict[int, list[str]] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        by_ptr.setdefault(t.data_ptr(), []).append(name)
    return [names for names in by_ptr.values() if len(names) > 1]


def greedy_accuracy(actors: list, tok, problems, max_new_tokens: int) -> float:
    """Test accuracy of what the rollout engines hold (the bf16 view), greedy decoding."""
    outs = generate_sharded(actors, [p.prompt for p in problems], n=1, temperature=0.0, max_new_tokens=max_new_tokens, seed=0)
    return float(np.mean([reward(tok.decode(o[0], skip_special_tokens=True), p.answer) for o, p in zip(outs, problems, strict=True)]))


def _step_problems(task, spec: TrialSpec, step: int, rank: int, world: int) -> list:
    # Fresh train problems every step, seeded by (trial seed, step): the same trial draws the
    # same batches, ranks take disjoint shares, and nothing is revisited to be memorised.
    n = spec.training.prompts_per_step * world
    return task.problems("train", n, seed=spec.seed * 1_000_003 + step)[rank::world]


def _rollout_batch(spec: TrialSpec, step: int, rank: int, world: int, actors, tok, task) -> tuple[StepBatch, dict]:
    t = spec.training
    problems = _step_problems(task, spec, step, rank, world)
    outs = generate_sharded(
        actors, [p.prompt for p in problems], n=t.samples_per_prompt, temperature=t.temperature,
        max_new_tokens=t.max_new_tokens, seed=spec.seed * 100_003 + step * world + rank,
    )
    prompts, completions, rewards = [], [], []
    for p, samples in zip(problems, outs, strict=True):
        p_ids = tok(p.prompt)["input_ids"]
        for c in samples:
            prompts.append(p_ids)
            completions.append(c)
            rewards.append(reward(tok.decode(c, skip_special_tokens=True), p.answer))
    r = torch.tensor(rewards, dtype=torch.float32)
    batch = StepBatch(build_batch(prompts, completions, tok.pad_token_id), rewards=r, group_size=t.samples_per_prompt)
    return batch, {"reward": r.mean().item()}


def _dataset_batch(spec: TrialSpec, step: int, rank: int, world: int, tok, task) -> tuple[StepBatch, dict]:
    examples = [task.render(p, spec.training.sft_style) for p in _step_problems(task, spec, step, rank, world)]
    prompts = [tok(prompt)["input_ids"] for prompt, _ in examples]
    completions = [tok(c, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for _, c in examples]
    return StepBatch(build_batch(prompts, completions, tok.pad_token_id)), {}


def train_loop(cfg: dict[str, Any]) -> None:
    """cfg: spec (TrialSpec), model_path, base (id/hash), run_id, tracking_uri, rollout_actors, threads."""
    spec: TrialSpec = cfg["spec"]
    t = spec.training
    # Ray Train logs every report at INFO; the per-step metrics already go to Tune and MLflow.
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(cfg["threads"])
    torch.manual_seed(spec.seed)
    actors = cfg["rollout_actors"]
    tok = load_tokenizer(cfg["model_path"])
    task = get_task(spec.dataset)
    algo = get_algorithm(spec.algorithm)

    policy = load_model(cfg["model_path"], dtype=torch.float32)
    with torch.no_grad():  # θ0 is the bf16 view of the checkpoint, as the rollout engines hold it
        for p in policy.parameters():
            p.copy_(p.to(torch.bfloat16))
    reference = copy.deepcopy(policy).eval().requires_grad_(False) if t.kl_coef > 0 or algo.uses_reference else None
    named = list(policy.named_parameters())
    model = ray.train.torch.prepare_model(policy, move_to_device=False) if world > 1 else policy
    opt = torch.optim.AdamW(policy.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    # Linear warmup: Adam's first steps move every weight by about lr whatever the gradient's
    # size, which on noisy policy gradients is a random kick to the whole model.
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / (t.warmup_steps + 1)))

    if rank == 0:
        run_id = cfg["run_id"]
        tracker = Tracker(cfg["tracking_uri"], spec.tracking.artifact_location)
        sync = Bf16SyncState(named)
        recorder = MaskRecorder(named, base=cfg["base"], tied=tied_groups(policy))
        test = task.problems("test", t.eval_problems, seed=10_000)
        acc_before = greedy_accuracy(actors, tok, test, t.max_new_tokens)
        tracker.log_metrics(run_id, {"test_accuracy_before": acc_before}, step=0)
        sync_bytes = dense_bytes = 0

    for step in range(1, t.steps + 1):
        t0 = time.perf_counter()
        if algo.source == "rollouts":
            batch, metrics = _rollout_batch(spec, step, rank, world, actors, tok, task)
        else:
            batch, metrics = _dataset_batch(spec, step, rank, world, tok, task)
        loss, loss_metrics = algo.loss(model, reference, batch, t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if t.max_grad_norm is not None:
            metrics["grad_norm"] = torch.nn.utils.clip_grad_norm_(policy.parameters(), t.max_grad_norm).item()
        opt.step()
        schedule.step()
        metrics.update(loss=loss.item(), lr=schedule.get_last_lr()[0], **loss_metrics)

        if rank == 0:
            patch = sync.diff(named)
            ray.get([a.apply_patch.remote(patch) for a in actors])
            sync_bytes += patch.nbytes
            dense_bytes += patch.dense_bytes
            metrics.update(sync_bytes=patch.nbytes, sync_dense_bytes=patch.dense_bytes,
                           step_changed_frac_bf16=patch.changed / (patch.dense_bytes / 2))
            if step % t.masks.every == 0 or step == t.steps:
                name = "final.arrow" if step == t.steps else f"step_{step:06d}.arrow"
                with tempfile.TemporaryDirectory(prefix="rlsparsity-mask-") as workdir:
                    stats = recorder.record(named, Path(workdir) / name, target={"run_id": run_id, "step": step})
                    tracker.log_artifact(run_id, Path(workdir) / name, "masks")
                metrics.update(stats.metrics())
            metrics["step_time_s"] = time.perf_counter() - t0
            tracker.log_metrics(run_id, metrics, step=step)
        if world > 1:
            dist.barrier()  # nobody samples from the engines before rank 0 has synced them
        if step % REPORT_EVERY == 0 or step == t.steps:
            # A report waits for Ray Train's controller to collect the previous one (about 2 s
            # here), so per-step reports would dominate a fast step; MLflow gets every step.
            ray.train.report({"step": step, **{k: v for k, v in metrics.items() if "/" not in k}})

    if rank == 0:
        acc_after = greedy_accuracy(actors, tok, test, t.max_new_tokens)
        tracker.log_metrics(run_id, {
            "test_accuracy_after": acc_after, "sync_bytes_total": sync_bytes, "sync_dense_bytes_total": dense_bytes,
            **stats.metrics("final/"),
        }, step=t.steps)
