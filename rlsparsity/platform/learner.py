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

from rlsparsity.platform.algorithms import Models, PairBatch, StepBatch, get_algorithm
from rlsparsity.platform.batches import build_batch, token_logprobs
from rlsparsity.platform.config import TrialSpec
from rlsparsity.platform.mask_recorder import MaskRecorder
from rlsparsity.platform.models import load_model, load_tokenizer
from rlsparsity.platform.pairs import offline_pairs, rollout_pairs
from rlsparsity.platform.rollout import RolloutPool
from rlsparsity.platform.tasks import REWARDS, answer_correct, chat_prompts, get_task
from rlsparsity.platform.tracking import Tracker
from rlsparsity.platform.weight_sync import Bf16SyncState, choose_patch

REPORT_EVERY = 10  # steps between progress reports to Ray Train / Tune


def tied_groups(model: torch.nn.Module) -> list[list[str]]:
    """State-dict keys that share storage (e.g. lm_head tied to the embeddings); counted once."""
    by_ptr: dict[int, list[str]] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        by_ptr.setdefault(t.data_ptr(), []).append(name)
    return [names for names in by_ptr.values() if len(names) > 1]


def served_accuracy(pool: RolloutPool, tok, problems, max_new_tokens: int, score) -> dict[str, float]:
    """Test accuracy of what the rollout engines hold (the bf16 view), greedy decoding:
    `test_accuracy` by the reward (answer, then stop), `test_answer_accuracy` by the answer alone."""
    outs = pool.generate([p.prompt for p in problems], n=1, temperature=0.0, max_new_tokens=max_new_tokens, seed=0)
    texts = [tok.decode(o[0], skip_special_tokens=True) for o in outs]
    return {
        "test_accuracy": float(np.mean([score(x, p.answer) for x, p in zip(texts, problems, strict=True)])),
        "test_answer_accuracy": float(np.mean([answer_correct(x, p.answer) for x, p in zip(texts, problems, strict=True)])),
    }


def held_out_pairs(pool: RolloutPool, tok, problems, max_new_tokens: int, score, n: int = 8) -> list:
    """θ0's own (correct, wrong) sample pairs on test prompts where its k samples disagree:
    the pairs θ0 is unsure about, fixed for the trial."""
    outs = pool.generate([p.prompt for p in problems], n=n, temperature=1.0, max_new_tokens=max_new_tokens, seed=123)
    rewards = [[score(tok.decode(c, skip_special_tokens=True), p.answer) for c in cs] for cs, p in zip(outs, problems, strict=True)]
    return rollout_pairs([tok(p.prompt)["input_ids"] for p in problems], outs, rewards, "random_negative", seed=0)


def preference_accuracy(policy: torch.nn.Module, tok, pairs: list) -> float:
    """Share of `pairs` where the policy gives the correct sample the higher log-probability:
    the objective preference algorithms train, measured the same way for every algorithm."""
    if not pairs:
        return float("nan")
    prompts = [p for p, _, _ in pairs]
    scores = []
    for side in (1, 2):
        b = build_batch(prompts, [pair[side] for pair in pairs], tok.pad_token_id)
        with torch.no_grad():
            scores.append((token_logprobs(policy, b) * b.completion_mask).sum(1))
    return (scores[0] > scores[1]).float().mean().item()


def _formatted(problems: list, spec: TrialSpec, task, tok) -> list:
    return chat_prompts(task, problems, tok) if spec.training.prompt_format == "chat" else problems


def _step_problems(task, spec: TrialSpec, step: int, rank: int, world: int, tok) -> list:
    # Fresh train problems every step, seeded by (data seed, step): the same trial draws the
    # same batches, ranks take disjoint shares, and nothing is revisited to be memorised.
    n = spec.training.prompts_per_step * world
    return _formatted(task.problems("train", n, seed=spec.problem_seed * 1_000_003 + step)[rank::world], spec, task, tok)


def _sample(spec: TrialSpec, step: int, rank: int, world: int, pool: RolloutPool, tok, task) -> tuple[list, list, list]:
    """This rank's prompts for the step, k samples each, and their rewards."""
    t = spec.training
    problems = _step_problems(task, spec, step, rank, world, tok)
    outs = pool.generate(
        [p.prompt for p in problems], n=t.samples_per_prompt, temperature=t.temperature,
        max_new_tokens=t.max_new_tokens, seed=spec.seed * 100_003 + step * world + rank,
    )
    score = REWARDS[t.reward]
    rewards = [[score(tok.decode(c, skip_special_tokens=True), p.answer) for c in samples] for p, samples in zip(problems, outs, strict=True)]
    return [tok(p.prompt)["input_ids"] for p in problems], outs, rewards


def _rollout_batch(spec: TrialSpec, step: int, rank: int, world: int, pool: RolloutPool, tok, task) -> tuple[StepBatch, dict]:
    prompt_ids, outs, rewards = _sample(spec, step, rank, world, pool, tok, task)
    k = spec.training.samples_per_prompt
    prompts = [p for p in prompt_ids for _ in range(k)]
    r = torch.tensor(rewards, dtype=torch.float32).view(-1)
    batch = StepBatch(build_batch(prompts, [c for cs in outs for c in cs], tok.pad_token_id), rewards=r, group_size=k)
    return batch, {"reward": r.mean().item()}


def _pair_batch(spec: TrialSpec, step: int, rank: int, world: int, pool: RolloutPool, tok, task) -> tuple[StepBatch, dict]:
    source = spec.algo_config.pairs
    metrics = {}
    if source == "offline":
        encode = lambda text, special: tok(text, add_special_tokens=special)["input_ids"]  # noqa: E731
        pairs = offline_pairs(_step_problems(task, spec, step, rank, world, tok), encode, tok.eos_token_id, seed=spec.problem_seed * 1_000_003 + step)
    else:
        prompt_ids, outs, rewards = _sample(spec, step, rank, world, pool, tok, task)
        pairs = rollout_pairs(prompt_ids, outs, rewards, source, seed=spec.seed * 1_000_003 + step)
        metrics["reward"] = float(np.mean(rewards))
    metrics["pairs"] = len(pairs)
    if not pairs:
        # No reward gap in any group. Every DDP rank must still run forward and backward, so
        # train on a (sample, itself) pair with a zero weight; the step changes nothing.
        pairs = [(prompt_ids[0], outs[0][0], outs[0][0])]
    prompts = [p for p, _, _ in pairs]
    chosen = build_batch(prompts, [c for _, c, _ in pairs], tok.pad_token_id)
    rejected = build_batch(prompts, [r for _, _, r in pairs], tok.pad_token_id)
    return StepBatch(pairs=PairBatch(chosen, rejected)), metrics


def _dataset_batch(spec: TrialSpec, step: int, rank: int, world: int, tok, task) -> tuple[StepBatch, dict]:
    examples = [task.render(p, spec.training.sft_style) for p in _step_problems(task, spec, step, rank, world, tok)]
    prompts = [tok(prompt)["input_ids"] for prompt, _ in examples]
    completions = [tok(c, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for _, c in examples]
    return StepBatch(build_batch(prompts, completions, tok.pad_token_id)), {}


def _minibatch_rows(n_rows: int, n_minibatches: int, group: int, gen: torch.Generator) -> list[torch.Tensor]:
    """Shuffled row indices per minibatch; a prompt's group of samples stays together."""
    n_groups = n_rows // group
    if n_minibatches > n_groups:
        raise ValueError(f"minibatches={n_minibatches} but the step has only {n_groups} groups of rows")
    order = torch.randperm(n_groups, generator=gen)
    return [(g[:, None] * group + torch.arange(group)).view(-1) for g in order.tensor_split(n_minibatches)]


def _lr_lambda(t) -> callable:
    def factor(i: int) -> float:
        if i < t.warmup_steps:
            return (i + 1) / (t.warmup_steps + 1)
        frac = (i - t.warmup_steps) / max(1, t.steps - t.warmup_steps)
        return {"constant": 1.0, "linear": 1.0 - frac, "cosine": 0.5 * (1 + np.cos(np.pi * frac))}[t.lr_schedule]

    return factor


def train_loop(cfg: dict[str, Any]) -> None:
    """cfg: spec (TrialSpec), model_path, base (id/hash), run_id, tracking_uri, rollout_actors, threads."""
    spec: TrialSpec = cfg["spec"]
    t = spec.training
    # Ray Train logs every report at INFO; the per-step metrics already go to Tune and MLflow.
    # Train V2's report logger is named by its file path, outside the "ray.train" tree.
    from ray.train.v2._internal.execution import context as train_context

    for name in ("ray.train", train_context.__file__):
        logging.getLogger(name).setLevel(logging.WARNING)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(cfg["threads"])
    torch.manual_seed(spec.seed)
    tok = load_tokenizer(cfg["model_path"])
    task = get_task(spec.dataset)
    algo = get_algorithm(spec.algorithm)

    acfg = spec.algo_config

    policy = load_model(cfg["model_path"], dtype=torch.float32)
    with torch.no_grad():  # θ0 is the bf16 view of the checkpoint, as the rollout engines hold it
        for p in policy.parameters():
            p.copy_(p.to(torch.bfloat16))
    # One frozen θ0 per learner serves every use (KL penalty, DPO's reference, PRIME's PRM).
    reference = copy.deepcopy(policy).eval().requires_grad_(False) if t.kl_coef > 0 or algo.uses_reference else None
    aux = algo.aux(policy, acfg, t) if algo.aux else {}
    named = list(policy.named_parameters())
    pool = RolloutPool(cfg["rollout_actors"], named)

    def wrap(m: torch.nn.Module) -> torch.nn.Module:
        return ray.train.torch.prepare_model(m, move_to_device=False) if world > 1 else m

    models = Models(wrap(policy), reference, {k: wrap(a.module) for k, a in aux.items()})
    # (parameters, optimizer, max grad norm): the policy's, then each side model's own.
    optimizers = [(list(policy.parameters()), torch.optim.AdamW(policy.parameters(), lr=t.lr, weight_decay=t.weight_decay), t.max_grad_norm)]
    optimizers += [
        (list(a.module.parameters()), torch.optim.AdamW(a.module.parameters(), lr=a.lr, weight_decay=a.weight_decay), a.max_grad_norm)
        for a in aux.values()
    ]
    # Linear warmup: Adam's first steps move every weight by about lr whatever the gradient's
    # size, which on noisy policy gradients is a random kick to the whole model.
    schedules = [torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(t)) for _, opt, _ in optimizers]
    updates = acfg.epochs * acfg.minibatches
    shuffle = torch.Generator().manual_seed(spec.seed)

    if rank == 0:
        run_id = cfg["run_id"]
        tracker = Tracker(cfg["tracking_uri"], spec.tracking.artifact_location)
        sync = Bf16SyncState(named)
        recorder = MaskRecorder(named, base=cfg["base"], tied=tied_groups(policy))
        test = _formatted(task.problems("test", t.eval_problems, seed=10_000), spec, task, tok)
        acc_before = served_accuracy(pool, tok, test, t.max_new_tokens, REWARDS[t.reward])
        pref_pairs = held_out_pairs(pool, tok, test, t.max_new_tokens, REWARDS[t.reward])
        acc_before["test_preference_accuracy"] = preference_accuracy(policy, tok, pref_pairs)
        acc_before["test_preference_pairs"] = len(pref_pairs)
        tracker.log_metrics(run_id, {f"{k}_before": v for k, v in acc_before.items()}, step=0)
        sync_bytes = dense_bytes = 0
        # Per step, for the first-vs-last summary: the sampled reward (online sources) and
        # the loss (every algorithm; SFT's own objective).
        curves: dict[str, list[float]] = {"reward": [], "loss": []}

    for step in range(1, t.steps + 1):
        t0 = time.perf_counter()
        if algo.source == "rollouts":
            batch, metrics = _rollout_batch(spec, step, rank, world, pool, tok, task)
        elif algo.source == "pairs":
            batch, metrics = _pair_batch(spec, step, rank, world, pool, tok, task)
        else:
            batch, metrics = _dataset_batch(spec, step, rank, world, tok, task)
        with torch.no_grad():
            if updates > 1 and batch.tokens is not None:  # the behaviour policy of later passes
                batch.old_logps = token_logprobs(policy, batch.tokens)
            if algo.prepare:
                batch = algo.prepare(models, batch, acfg, t)
        zero_weight = metrics.get("pairs", 1) == 0
        for _ in range(acfg.epochs):
            for rows in _minibatch_rows(len(batch), acfg.minibatches, batch.group_size, shuffle):
                loss, loss_metrics = algo.loss(models, batch.select(rows) if updates > 1 else batch, acfg, t)
                for _, opt, _ in optimizers:
                    opt.zero_grad(set_to_none=True)
                (loss * 0 if zero_weight else loss).backward()
                for i, (params, opt, max_norm) in enumerate(optimizers):
                    if max_norm is not None:
                        norm = torch.nn.utils.clip_grad_norm_(params, max_norm).item()
                        metrics["grad_norm" if i == 0 else f"grad_norm_aux{i}"] = norm
                    opt.step()
        for sched in schedules:
            sched.step()
        metrics.update(loss=loss.item(), lr=schedules[0].get_last_lr()[0], **loss_metrics)

        if rank == 0:
            r = spec.rollout.sync
            t_diff = time.perf_counter()
            patch = choose_patch(sync.diff(named), named, r.mode, r.dense_above)
            t_send = time.perf_counter()
            pool.sync(patch, version=step)
            sync_bytes += patch.nbytes
            dense_bytes += patch.dense_bytes
            # diff: the learner finding the changed bf16 entries; send: object store, apply in
            # every engine and the round trip, until all engines hold the new weights.
            metrics.update(sync_bytes=patch.nbytes, sync_dense_bytes=patch.dense_bytes,
                           step_changed_frac_bf16=patch.changed / (patch.dense_bytes / 2),
                           sync_diff_s=t_send - t_diff, sync_send_s=time.perf_counter() - t_send)
            if step % t.masks.every == 0 or step == t.steps:
                name = "final.arrow" if step == t.steps else f"step_{step:06d}.arrow"
                with tempfile.TemporaryDirectory(prefix="rlsparsity-mask-") as workdir:
                    stats = recorder.record(named, Path(workdir) / name, target={"run_id": run_id, "step": step})
                    tracker.log_artifact(run_id, Path(workdir) / name, "masks")
                metrics.update(stats.metrics())
            metrics["rollout_restarts"] = pool.restarts
            metrics["step_time_s"] = time.perf_counter() - t0
            tracker.log_metrics(run_id, metrics, step=step)
            for key, curve in curves.items():
                if key in metrics:
                    curve.append(metrics[key])
        if world > 1:
            dist.barrier()  # nobody samples from the engines before rank 0 has synced them
        if step % REPORT_EVERY == 0 or step == t.steps:
            # A report waits for Ray Train's controller to collect the previous one (about 2 s
            # here), so per-step reports would dominate a fast step; MLflow gets every step.
            ray.train.report({"step": step, **{k: v for k, v in metrics.items() if "/" not in k}})

    if rank == 0:
        acc_after = served_accuracy(pool, tok, test, t.max_new_tokens, REWARDS[t.reward])
        acc_after["test_preference_accuracy"] = preference_accuracy(policy, tok, pref_pairs)
        summary = {f"{k}_after": v for k, v in acc_after.items()}
        for key, curve in curves.items():
            if curve:  # the mean over the first and the last (up to) ten steps
                w = max(1, min(10, len(curve) // 4))
                summary.update({f"train_{key}_first": float(np.mean(curve[:w])), f"train_{key}_last": float(np.mean(curve[-w:]))})
        tracker.log_metrics(run_id, {
            **summary, "sync_bytes_total": sync_bytes, "sync_dense_bytes_total": dense_bytes,
            **stats.metrics("final/"),
        }, step=t.steps)
