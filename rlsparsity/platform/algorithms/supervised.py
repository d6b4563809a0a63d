"""Supervised baselines: SFT on a dataset, and rejection-sampling fine-tuning on the policy's
own correct samples (RAFT, RAFT++)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from pydantic import Field

from rlsparsity.platform.algorithms.registry import (
    AlgorithmConfig,
    Models,
    StepBatch,
    register_algorithm,
)
from rlsparsity.platform.batches import masked_mean, token_logprobs

if TYPE_CHECKING:
    from rlsparsity.platform.config import TrainingSpec


@register_algorithm("sft", source="dataset", mean_over="completion_tokens")
def sft_loss(models: Models, batch: StepBatch, cfg: AlgorithmConfig, train: TrainingSpec) -> tuple[torch.Tensor, dict[str, float]]:
    logp = token_logprobs(models.policy, batch.tokens)
    loss = -masked_mean(logp, batch.tokens.completion_mask)
    return loss, {"nll": loss.item()}


class RAFTConfig(AlgorithmConfig):
    reward_threshold: float = Field(1.0, description="a sample is kept (correct) when its reward ≥ this")


class RAFTPlusPlusConfig(RAFTConfig):
    epsilon: float = Field(0.2, gt=0, description="ratio clip range (PPO's ε)")
    # The iterative variant: each step's samples feed several optimizer steps, which is what
    # the importance ratio and the clip are for (with one pass RAFT++ equals RAFT exactly).
    # On the embedded model at lr 1e-4, 2 learned on both seeds; 4 degraded one of two.
    minibatches: int = Field(2, ge=1, description="optimizer steps per pass over a step's samples")


def _kept_tokens(batch: StepBatch, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-row keep flags, completion mask restricted to the kept rows)."""
    keep = (batch.rewards >= threshold).float()
    return keep, batch.tokens.completion_mask * keep[:, None]


def _keep_metrics(keep: torch.Tensor) -> dict[str, float]:
    return {"kept_frac": keep.mean().item()}


def kept_tokens(batch: StepBatch, cfg: RAFTConfig) -> torch.Tensor:
    """What RAFT's token mean is over: the completion tokens of the kept rows."""
    return _kept_tokens(batch, cfg.reward_threshold)[1].sum()


@register_algorithm("raft", source="rollouts", config=RAFTConfig, mean_over=kept_tokens)
def raft_loss(models: Models, batch: StepBatch, cfg: RAFTConfig, train: TrainingSpec) -> tuple[torch.Tensor, dict[str, float]]:
    """RAFT (Dong et al. 2023, "RAFT: Reward rAnked FineTuning"; as the baseline of Xiong et al.
    2025): SFT — token-mean NLL — on the step's samples whose reward clears the threshold."""
    logp = token_logprobs(models.policy, batch.tokens)
    keep, mask = _kept_tokens(batch, cfg.reward_threshold)
    if mask.sum() == 0:
        # Nothing correct: a zero that still touches every parameter, so DDP's all-reduce
        # sees the same graph on every rank.
        return (logp * 0).sum(), {**_keep_metrics(keep), "nll": 0.0}
    loss = -masked_mean(logp, mask)
    return loss, {**_keep_metrics(keep), "nll": loss.item()}


@register_algorithm("raftpp", source="rollouts", config=RAFTPlusPlusConfig, mean_over=kept_tokens)
def raft_plus_plus_loss(models: Models, batch: StepBatch, cfg: RAFTPlusPlusConfig, train: TrainingSpec) -> tuple[torch.Tensor, dict[str, float]]:
    """RAFT++ (Xiong et al. 2025, "A Minimalist Approach to LLM Reasoning: from Rejection
    Sampling to Reinforce", arXiv:2504.11343, §2): RAFT with PPO's importance sampling and
    clipping, so that samples drawn by π_old can be reused over several update passes:

        L(θ) = −mean_{kept tokens} min(s_t(θ), clip(s_t(θ), 1−ε, 1+ε)),  s_t = π_θ(a_t|·)/π_old(a_t|·),

    i.e. the PPO surrogate with advantage 1 on correct samples and 0 on the rest. At s ≡ 1
    (one pass on fresh samples) its gradient is exactly RAFT's.
    """
    logp = token_logprobs(models.policy, batch.tokens)
    keep, mask = _kept_tokens(batch, cfg.reward_threshold)
    if mask.sum() == 0:
        return (logp * 0).sum(), {**_keep_metrics(keep), "clip_frac": 0.0}
    old = batch.old_logps if batch.old_logps is not None else logp.detach()
    ratio = torch.exp(logp - old)
    # A = +1: the clipped branch is the upper one, min(s, clip(s)) = min(s, 1+ε).
    surrogate = torch.minimum(ratio, torch.clamp(ratio, 1 - cfg.epsilon, 1 + cfg.epsilon))
    loss = -masked_mean(surrogate, mask)
    clipped = (ratio > 1 + cfg.epsilon).float()
    return loss, {**_keep_metrics(keep), "clip_frac": masked_mean(clipped, mask).item(),
                  "nll": -masked_mean(logp.detach(), mask).item()}
