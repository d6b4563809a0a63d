"""Online policy-gradient algorithms on rollouts scored by the task's reward: GRPO and RLOO.

``grpo`` and ``rloo`` follow TRL 1.16's ``GRPOTrainer`` / ``RLOOTrainer`` (field names,
defaults, advantages, aggregation); tests/test_parity_policy_gradient.py checks our losses
and gradients against TRL's on the same model and batch. PPO and PRIME, which also train a
side model, are in ``ppo_prime``.

What must stay fixed across a step's update passes (advantages, reference log-probs) is
computed once per step by each algorithm's ``prepare`` hook into ``batch.extras``. A loss
called on a batch that did not go through ``prepare`` (a unit test) runs it itself first.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch
from pydantic import Field, field_validator

from rlsparsity.platform.algorithms.common import (
    Metrics,
    all_ranks_sum,
    behaviour_logps,
    clipped_surrogate,
    kl_estimate,
    prepared,
    reference_logprobs,
    reference_logps,
    with_extras,
    world_size,
)
from rlsparsity.platform.algorithms.registry import (
    AlgorithmConfig,
    Models,
    StepBatch,
    register_algorithm,
)
from rlsparsity.platform.batches import masked_mean, token_logprobs

if TYPE_CHECKING:
    from rlsparsity.platform.config import TrainingSpec

LossType = Literal["grpo", "bnpo", "dr_grpo", "dapo"]


# --------------------------------------------------------------------------- GRPO (TRL 1.16)


def group_advantages(
    rewards: torch.Tensor,
    group_size: int,
    scale_rewards: Literal["group", "batch", "none"] = "group",
    eps: float = 1e-4,
) -> torch.Tensor:
    """GRPO's advantage, as TRL 1.16: the reward minus its group's mean, divided by
    (std + 1e-4) with the std (Bessel-corrected) of the group, of the whole batch (over every
    rank, as TRL gathers the rewards), or not at all (Dr. GRPO's recommendation)."""
    r = rewards.view(-1, group_size)
    centred = (r - r.mean(1, keepdim=True)).view(-1)
    if scale_rewards == "none":
        return centred
    if scale_rewards == "group":
        # One sample per group has no spread: TRL takes std = 0 there (so A = 0), not NaN.
        std = r.std(1, keepdim=True) if group_size > 1 else torch.zeros_like(r)
        return centred / (std.expand_as(r).reshape(-1) + eps)
    if scale_rewards == "batch":
        total = all_ranks_sum(torch.stack([rewards.sum(), torch.tensor(float(len(rewards)))]))
        mean = total[0] / total[1]
        sq = all_ranks_sum(((rewards - mean) ** 2).sum())
        std = torch.sqrt(sq / (total[1] - 1)) if total[1] > 1 else torch.zeros(())
        return centred / (std + eps)
    raise ValueError(f"scale_rewards must be 'group', 'batch' or 'none', got {scale_rewards!r}")


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, loss_type: LossType, max_completion_length: int) -> torch.Tensor:
    """Reduce per-token losses to the scalar loss, as TRL 1.16's GRPOTrainer does per loss_type.

    - grpo: mean over each completion's tokens, then over completions (length-biased);
    - bnpo: mean over this rank's minibatch tokens;
    - dr_grpo: sum / (rows × max_completion_length), a constant normaliser (Dr. GRPO);
    - dapo: sum / (completion tokens of the optimizer step over every rank / world size),
      so that DDP's gradient averaging yields a token mean over the global batch (DAPO).
      One optimizer step here is one minibatch, TRL's "accumulated batch".
    """
    total = (per_token * mask).sum()
    if loss_type == "grpo":
        return masked_mean(per_token, mask, dim=1).mean()
    if loss_type == "bnpo":
        return total / mask.sum().clamp(min=1.0)
    if loss_type == "dr_grpo":
        return total / (per_token.size(0) * max_completion_length)
    if loss_type == "dapo":
        return total / (all_ranks_sum(mask.sum()).clamp(min=1.0) / world_size())
    raise ValueError(f"unknown loss_type {loss_type!r}")


def grpo_mean_over(batch: StepBatch, cfg: GRPOConfig) -> torch.Tensor:
    """What `aggregate` averages over, as a micro-batch's size: rows for grpo and dr_grpo,
    completion tokens for bnpo, and for dapo every rank's completion tokens."""
    if cfg.loss_type in ("grpo", "dr_grpo"):
        return torch.tensor(float(len(batch)))
    tokens = batch.tokens.completion_mask.sum()
    return all_ranks_sum(tokens) if cfg.loss_type == "dapo" else tokens


class GRPOConfig(AlgorithmConfig):
    """TRL 1.16 GRPOConfig's loss knobs (same names and defaults; beta is `training.kl_coef`)."""

    epsilon: float = Field(0.2, gt=0, description="lower clip range of the ratio (and upper unless epsilon_high)")
    epsilon_high: float | None = Field(None, gt=0, description="upper clip range (DAPO's clip-higher, e.g. 0.28)")
    loss_type: LossType = Field("dapo", description="token-loss aggregation: grpo, bnpo, dr_grpo or dapo (TRL's default)")
    scale_rewards: Literal["group", "batch", "none"] = Field(
        "group", description="divide centred rewards by the group's or the batch's std, or not (true = group, false = none)"
    )
    use_bias_correction_kl: bool = Field(
        True, description="multiply the per-token KL by the importance ratio π/π_old (TRL's default)"
    )

    @field_validator("scale_rewards", mode="before")
    @classmethod
    def _bool_scale(cls, v: object) -> object:
        return {True: "group", False: "none"}.get(v, v) if isinstance(v, bool) else v


def grpo_prepare(models: Models, batch: StepBatch, cfg: GRPOConfig, train: TrainingSpec) -> StepBatch:
    # Advantages over the whole step: "batch" scaling needs every row, and minibatches of
    # later passes must see the same values.
    extras = {"advantages": group_advantages(batch.rewards, batch.group_size, cfg.scale_rewards)}
    if train.kl_coef > 0:
        extras["ref_logps"] = reference_logps(models, batch, cfg, train)
    return with_extras(batch, **extras)


@register_algorithm("grpo", source="rollouts", config=GRPOConfig, prepare=grpo_prepare, kl_penalty=True,
                    mean_over=grpo_mean_over)
def grpo_loss(models: Models, batch: StepBatch, cfg: GRPOConfig, train: TrainingSpec) -> tuple[torch.Tensor, Metrics]:
    batch = prepared(grpo_prepare, models, batch, cfg, train)
    mask = batch.tokens.completion_mask
    logp = token_logprobs(models.policy, batch.tokens)
    # One pass on fresh samples: π_old = π, and TRL skips the extra forward the same way.
    old = batch.old_logps if batch.old_logps is not None else logp.detach()
    adv = batch.extras["advantages"][:, None]
    eps_high = cfg.epsilon_high if cfg.epsilon_high is not None else cfg.epsilon
    per_token, ratio, clipped = clipped_surrogate(logp, old, adv, cfg.epsilon, eps_high)
    metrics: Metrics = {}
    if train.kl_coef > 0:
        ref = batch.extras.get("ref_logps")
        kl = kl_estimate(logp, ref if ref is not None else reference_logprobs(models, batch.tokens), train.kl_estimator)
        metrics["kl"] = masked_mean(kl.detach(), mask).item()
        if cfg.use_bias_correction_kl:
            # The samples come from π_old, so an unbiased estimate of KL(π‖π_ref) reweights by π/π_old.
            kl = kl * ratio
        per_token = per_token + train.kl_coef * kl
    loss = aggregate(per_token, mask, cfg.loss_type, train.max_new_tokens)
    metrics["clip_frac"] = masked_mean(clipped.float(), mask).item()
    return loss, metrics


# --------------------------------------------------------------------------- RLOO (TRL 1.16)


def rloo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """REINFORCE leave-one-out (Ahmadian et al. 2024): r_i − mean of the group's other rewards."""
    if group_size < 2:
        return torch.zeros_like(rewards)
    r = rewards.view(-1, group_size)
    baseline = (r.sum(1, keepdim=True) - r) / (group_size - 1)
    return (r - baseline).view(-1)


class RLOOConfig(AlgorithmConfig):
    """TRL 1.16 RLOOConfig's loss knobs (beta is `training.kl_coef`; TRL's RLOO KL is k1)."""

    epsilon: float = Field(0.2, gt=0, description="lower clip range of the sequence ratio")
    epsilon_high: float | None = Field(None, gt=0, description="upper clip range; default epsilon")
    normalize_advantages: bool = Field(False, description="whiten advantages over the step's batch")


def rloo_prepare(models: Models, batch: StepBatch, cfg: RLOOConfig, train: TrainingSpec) -> StepBatch:
    mask = batch.tokens.completion_mask
    old = behaviour_logps(models, batch, cfg, train)
    rewards, extras = batch.rewards, {}
    if train.kl_coef > 0:
        # TRL's RLOO puts the KL in the reward, summed over the sequence and measured on the
        # behaviour policy's log-probs (a constant, like the reward), as the RLOO paper does.
        seq_kl = (kl_estimate(old, reference_logps(models, batch, cfg, train), train.kl_estimator) * mask).sum(1)
        rewards = rewards - train.kl_coef * seq_kl
        extras["seq_kl"] = seq_kl
    adv = rloo_advantages(rewards, batch.group_size)
    if cfg.normalize_advantages:
        n = all_ranks_sum(torch.tensor(float(len(adv))))
        mean = all_ranks_sum(adv.sum()) / n
        std = torch.sqrt(all_ranks_sum(((adv - mean) ** 2).sum()) / (n - 1).clamp(min=1.0))
        adv = (adv - mean) / (std + 1e-4)
    return with_extras(batch, old_logps=old, advantages=adv, **extras)


@register_algorithm("rloo", source="rollouts", config=RLOOConfig, prepare=rloo_prepare, kl_penalty=True)
def rloo_loss(models: Models, batch: StepBatch, cfg: RLOOConfig, train: TrainingSpec) -> tuple[torch.Tensor, Metrics]:
    batch = prepared(rloo_prepare, models, batch, cfg, train)
    mask = batch.tokens.completion_mask
    logp = token_logprobs(models.policy, batch.tokens)
    # RLOO treats a completion as one action: a sequence-level ratio, one term per completion.
    seq_logp, seq_old = (logp * mask).sum(1), (batch.old_logps * mask).sum(1)
    eps_high = cfg.epsilon_high if cfg.epsilon_high is not None else cfg.epsilon
    per_seq, _, clipped = clipped_surrogate(seq_logp, seq_old, batch.extras["advantages"], cfg.epsilon, eps_high)
    metrics = {"clip_frac": clipped.float().mean().item()}
    if "seq_kl" in batch.extras:
        metrics["kl"] = (batch.extras["seq_kl"].sum() / mask.sum().clamp(min=1.0)).item()
    return per_seq.mean(), metrics
