"""Batch sources, registered by name: where a learner step's batch comes from.

An algorithm names its source (`register_algorithm(..., source=NAME)`); the learner calls
that source once per step with the step's `StepContext`. A new source is one function:

    @register_source("my_source")
    def my_source(ctx: StepContext) -> tuple[StepBatch, dict[str, float]]:
        problems = ctx.problems()  # this rank's fresh training problems
        ...
        return StepBatch(...), {"some_metric": value}

Built in: ``rollouts`` (k samples per prompt from the rollout engines, scored by the
task's reward), ``pairs`` (preference pairs from `algorithm_config.<name>.pairs`) and
``dataset`` (supervised examples rendered by the task).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from rlsparsity.platform.algorithms import PairBatch, StepBatch
from rlsparsity.platform.batches import build_batch
from rlsparsity.platform.engines import Rollout
from rlsparsity.platform.pairs import offline_pairs, rollout_pairs
from rlsparsity.platform.tasks import REWARDS, Problem, TaskLike, chat_prompts

if TYPE_CHECKING:  # trial_spec checks algorithms' sources against SOURCES
    from rlsparsity.platform.trial_spec import TrialSpec


def formatted(problems: list[Problem], spec: TrialSpec, task: TaskLike, tokenizer: Any) -> list[Problem]:
    """Problems as the trial prompts them: native, or a user turn of the chat template."""
    return chat_prompts(task, problems, tokenizer) if spec.training.prompt_format == "chat" else problems


@dataclass(frozen=True)
class StepContext:
    """Everything a batch source may use at one step, on one learner rank."""

    spec: TrialSpec
    step: int
    rank: int
    world: int
    rollout: Rollout
    tokenizer: Any
    task: TaskLike

    @property
    def data_seed(self) -> int:
        """Seeds this step's problems (and offline pairs): the same for every trial of a data seed."""
        return self.spec.problem_seed * 1_000_003 + self.step

    def problems(self) -> list[Problem]:
        # Fresh train problems every step, seeded by (data seed, step): the same trial draws
        # the same batches, ranks take disjoint shares, and nothing is revisited to be memorised.
        n = self.spec.training.prompts_per_step * self.world
        drawn = self.task.problems("train", n, seed=self.data_seed)[self.rank :: self.world]
        return formatted(drawn, self.spec, self.task, self.tokenizer)

    def sample(self) -> tuple[list[list[int]], list[list[list[int]]], list[list[float]]]:
        """This rank's prompts (token ids), k sampled completions each, and their rewards."""
        t = self.spec.training
        problems = self.problems()
        outs = self.rollout.generate(
            [p.prompt for p in problems], n=t.samples_per_prompt, temperature=t.temperature,
            max_new_tokens=t.max_new_tokens, seed=self.spec.seed * 100_003 + self.step * self.world + self.rank,
        )
        score, tok = REWARDS[t.reward], self.tokenizer
        rewards = [[score(tok.decode(c, skip_special_tokens=True), p.answer) for c in samples] for p, samples in zip(problems, outs, strict=True)]
        return [tok(p.prompt)["input_ids"] for p in problems], outs, rewards


SourceFn = Callable[[StepContext], tuple[StepBatch, dict[str, float]]]
SOURCES: dict[str, SourceFn] = {}


def register_source(name: str) -> Callable[[SourceFn], SourceFn]:
    def deco(fn: SourceFn) -> SourceFn:
        if name in SOURCES:
            raise ValueError(f"batch source {name!r} is already registered")
        SOURCES[name] = fn
        return fn

    return deco


def get_source(name: str) -> SourceFn:
    if name not in SOURCES:
        raise ValueError(f"unknown batch source {name!r}; allowed: {', '.join(sorted(SOURCES))}")
    return SOURCES[name]


@register_source("rollouts")
def rollouts(ctx: StepContext) -> tuple[StepBatch, dict[str, float]]:
    prompt_ids, outs, rewards = ctx.sample()
    k = ctx.spec.training.samples_per_prompt
    prompts = [p for p in prompt_ids for _ in range(k)]
    r = torch.tensor(rewards, dtype=torch.float32).view(-1)
    batch = StepBatch(build_batch(prompts, [c for cs in outs for c in cs], ctx.tokenizer.pad_token_id), rewards=r, group_size=k)
    return batch, {"reward": r.mean().item()}


@register_source("pairs")
def pairs(ctx: StepContext) -> tuple[StepBatch, dict[str, float]]:
    source, tok = ctx.spec.algo_config.pairs, ctx.tokenizer
    metrics: dict[str, float] = {}
    if source == "offline":
        encode = lambda text, special: tok(text, add_special_tokens=special)["input_ids"]  # noqa: E731
        found = offline_pairs(ctx.problems(), encode, tok.eos_token_id, seed=ctx.data_seed)
    else:
        prompt_ids, outs, rewards = ctx.sample()
        found = rollout_pairs(prompt_ids, outs, rewards, source, seed=ctx.spec.seed * 1_000_003 + ctx.step)
        metrics["reward"] = float(np.mean(rewards))
    metrics["pairs"] = len(found)
    if not found:
        # No reward gap in any group. Every DDP rank must still run forward and backward, so
        # train on a (sample, itself) pair with a zero weight (the learner sees pairs == 0).
        found = [(prompt_ids[0], outs[0][0], outs[0][0])]
    prompts = [p for p, _, _ in found]
    chosen = build_batch(prompts, [c for _, c, _ in found], tok.pad_token_id)
    rejected = build_batch(prompts, [r for _, _, r in found], tok.pad_token_id)
    return StepBatch(pairs=PairBatch(chosen, rejected)), metrics


@register_source("dataset")
def dataset(ctx: StepContext) -> tuple[StepBatch, dict[str, float]]:
    tok = ctx.tokenizer
    examples = [ctx.task.render(p, ctx.spec.training.sft_style) for p in ctx.problems()]
    prompts = [tok(prompt)["input_ids"] for prompt, _ in examples]
    completions = [tok(c, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for _, c in examples]
    return StepBatch(build_batch(prompts, completions, tok.pad_token_id)), {}
