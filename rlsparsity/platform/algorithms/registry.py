"""Algorithms registered by name. Adding one is one decorated loss function.

A loss takes the policy, the frozen reference (None when no KL term is used), a
`StepBatch` and the trial's `TrainingSpec`, and returns (loss, metrics). `source` says
where its batches come from: `rollouts` (sampled from the rollout actors and scored by
the task's reward) or `dataset` (supervised examples).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

from rlsparsity.platform.batches import TokenBatch, masked_mean, token_logprobs

if TYPE_CHECKING:
    from rlsparsity.sweeps.spec import TrainingSpec


@dataclass
class StepBatch:
    tokens: TokenBatch
    rewards: torch.Tensor | None = None  # (B,), rollouts only
    group_size: int = 1  # samples per prompt; rows of one group are contiguous
    old_logps: torch.Tensor | None = None  # (B, T-1) behaviour log-probs; None = on-policy


LossFn = Callable[[torch.nn.Module, "torch.nn.Module | None", StepBatch, "TrainingSpec"], tuple[torch.Tensor, dict[str, float]]]


@dataclass(frozen=True)
class Algorithm:
    name: str
    source: Literal["rollouts", "dataset"]
    loss: LossFn
    uses_reference: bool = False  # True when it needs θ0 even without a KL penalty


ALGORITHMS: dict[str, Algorithm] = {}


def register_algorithm(name: str, *, source: Literal["rollouts", "dataset"]) -> Callable[[LossFn], LossFn]:
    def deco(fn: LossFn) -> LossFn:
        if name in ALGORITHMS:
            raise ValueError(f"algorithm {name!r} is already registered")
        ALGORITHMS[name] = Algorithm(name, source, fn)
        return fn

    return deco


def get_algorithm(name: str) -> Algorithm:
    if name not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {name!r}; allowed: {', '.join(sorted(ALGORITHMS))}")
    return ALGORITHMS[name]


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """GRPO's advantage: reward standardised within each prompt's group of samples."""
    r = rewards.view(-1, group_size)
    return ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + eps)).view(-1)


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(π || π_ref): unbiased and always ≥ 0."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


@register_algorithm("grpo", source="rollouts")
def grpo_loss(policy, reference, batch: StepBatch, cfg: TrainingSpec) -> tuple[torch.Tensor, dict[str, float]]:
    mask = batch.tokens.completion_mask
    logp = token_logprobs(policy, batch.tokens)
    old = batch.old_logps if batch.old_logps is not None else logp.detach()
    adv = group_advantages(batch.rewards, batch.group_size)[:, None]
    ratio = torch.exp(logp - old)
    clipped = torch.clamp(ratio, 1 - cfg.clip_eps, 1 + cfg.clip_eps)
    per_token = -torch.minimum(ratio * adv, clipped * adv)
    metrics = {}
    if cfg.kl_coef > 0:
        with torch.no_grad():
            ref_logp = token_logprobs(reference, batch.tokens)
        kl = kl_k3(logp, ref_logp)
        per_token = per_token + cfg.kl_coef * kl
        metrics["kl"] = masked_mean(kl.detach(), mask).item()
    # GRPO's aggregation: mean over each completion's tokens, then over completions.
    loss = masked_mean(per_token, mask, dim=1).mean()
    metrics["clip_frac"] = masked_mean(((ratio - clipped).abs() > 0).float(), mask).item()
    return loss, metrics


@register_algorithm("sft", source="dataset")
def sft_loss(policy, reference, batch: StepBatch, cfg: TrainingSpec) -> tuple[torch.Tensor, dict[str, float]]:
    logp = token_logprobs(policy, batch.tokens)
    loss = -masked_mean(logp, batch.tokens.completion_mask)
    return loss, {"nll": loss.item()}
