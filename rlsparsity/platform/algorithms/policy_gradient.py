"""Online policy-gradient algorithms on rollouts scored by the task's reward: GRPO, RLOO, PPO, PRIME.

- ``grpo`` and ``rloo`` follow TRL 1.16's ``GRPOTrainer`` / ``RLOOTrainer`` (field names,
  defaults, advantages, aggregation); tests/test_parity_policy_gradient.py checks our losses
  and gradients against TRL's on the same model and batch.
- ``ppo`` is classic RLHF PPO (Ouyang et al. 2022; Schulman et al. 2017): a learned critic
  initialised from θ0's backbone, token rewards (outcome on the last token, minus a per-token
  KL penalty), GAE, clipped policy and value objectives. TRL has no counterpart to check against.
- ``prime`` is PRIME (Cui et al. 2025, "Process Reinforcement through Implicit Rewards"):
  an implicit process reward model trained online from outcome labels supplies dense rewards.

What must stay fixed across a step's update passes (advantages, values, token rewards,
reference log-probs) is computed once per step by each algorithm's ``prepare`` hook into
``batch.extras``. A loss called on a batch that did not go through ``prepare`` (a unit test)
runs it itself first.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from pydantic import Field, field_validator

from rlsparsity.platform.algorithms.common import kl_estimate, reference_logprobs
from rlsparsity.platform.algorithms.registry import (
    AlgorithmConfig,
    AuxModel,
    Models,
    StepBatch,
    register_algorithm,
)
from rlsparsity.platform.batches import TokenBatch, masked_mean, token_logprobs
from rlsparsity.platform.config import Strict

if TYPE_CHECKING:
    from rlsparsity.platform.config import TrainingSpec

Metrics = dict[str, float]
LossType = Literal["grpo", "bnpo", "dr_grpo", "dapo"]


class _Section(Strict):
    """A nested block of an algorithm config (strict like the config itself)."""


# --------------------------------------------------------------------------- shared pieces


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _all_ranks_sum(x: torch.Tensor) -> torch.Tensor:
    """`x` summed over the data-parallel ranks (a detached copy; `x` itself on one process).

    Every rank calls the same losses in the same order, so this collective cannot deadlock.
    """
    x = x.detach().clone()
    if _world_size() > 1:
        dist.all_reduce(x)
    return x


def _rows(tokens: TokenBatch, rows: torch.Tensor) -> TokenBatch:
    return TokenBatch(tokens.input_ids[rows], tokens.attention_mask[rows], tokens.completion_mask[rows])


@torch.no_grad()
def _logprobs_no_grad(model: torch.nn.Module, tokens: TokenBatch, chunks: int = 1) -> torch.Tensor:
    """`token_logprobs` without a graph, in `chunks` row blocks: `prepare` sees the whole step's
    batch, whose (B, T, vocab) logits can be far larger than one minibatch's."""
    blocks = torch.arange(len(tokens.input_ids)).tensor_split(max(1, chunks))
    return torch.cat([token_logprobs(model, _rows(tokens, r)) for r in blocks if len(r)])


def _with(batch: StepBatch, old_logps: torch.Tensor | None = None, **extras: torch.Tensor) -> StepBatch:
    """A copy of `batch` with more extras (and behaviour log-probs): callers' batches stay as given."""
    return dataclasses.replace(
        batch,
        old_logps=batch.old_logps if old_logps is None else old_logps,
        extras={**batch.extras, **extras},
    )


def _prepared(prepare: Callable, models: Models, batch: StepBatch, cfg, train: TrainingSpec) -> StepBatch:
    """The batch as the learner would hand it over: `prepare` already run (no gradients)."""
    if "advantages" in batch.extras:
        return batch
    with torch.no_grad():
        return prepare(models, batch, cfg, train)


def _behaviour_logps(models: Models, batch: StepBatch, cfg: AlgorithmConfig) -> torch.Tensor:
    """log π_old: the learner's (set when a step has several update passes) or computed now."""
    if batch.old_logps is not None:
        return batch.old_logps
    return _logprobs_no_grad(models.policy, batch.tokens, cfg.minibatches)


def _reference_logps(models: Models, batch: StepBatch, cfg: AlgorithmConfig) -> torch.Tensor:
    if models.reference is None:
        raise ValueError("this algorithm needs the frozen reference model, but the learner built none")
    return _logprobs_no_grad(models.reference, batch.tokens, cfg.minibatches)


def clipped_surrogate(
    logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, eps_low: float, eps_high: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO's clipped objective as a loss: −min(ρA, clip(ρ, 1−ε_low, 1+ε_high)A), ρ = π/π_old.

    Returns (loss, ρ, clipped) where `clipped` marks where the clip is active (TRL's
    "region clipped": ρ below the range with A < 0, or above it with A > 0), i.e. no gradient.
    """
    ratio = torch.exp(logp - old_logp)
    bounded = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    loss = -torch.minimum(ratio * adv, bounded * adv)
    clipped = ((ratio < 1 - eps_low) & (adv < 0)) | ((ratio > 1 + eps_high) & (adv > 0))
    return loss, ratio, clipped


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x − mean) / std over the masked entries (unbiased variance, as TRL's/verl's `masked_whiten`)."""
    mean = masked_mean(x, mask)
    n = mask.sum()
    var = masked_mean((x - mean) ** 2, mask) * n / (n - 1).clamp(min=1.0)
    return (x - mean) * torch.rsqrt(var + eps) * mask


def last_token_mask(mask: torch.Tensor) -> torch.Tensor:
    """1 at each row's last completion token (rows are right-padded, completions contiguous)."""
    last = mask.shape[1] - 1 - mask.flip(1).argmax(1)
    out = torch.zeros_like(mask)
    out[torch.arange(len(mask)), last] = 1.0
    return out * mask


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
        total = _all_ranks_sum(torch.stack([rewards.sum(), torch.tensor(float(len(rewards)))]))
        mean = total[0] / total[1]
        sq = _all_ranks_sum(((rewards - mean) ** 2).sum())
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
        return total / (_all_ranks_sum(mask.sum()).clamp(min=1.0) / _world_size())
    raise ValueError(f"unknown loss_type {loss_type!r}")


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
        extras["ref_logps"] = _reference_logps(models, batch, cfg)
    return _with(batch, **extras)


@register_algorithm("grpo", source="rollouts", config=GRPOConfig, prepare=grpo_prepare, kl_penalty=True)
def grpo_loss(models: Models, batch: StepBatch, cfg: GRPOConfig, train: TrainingSpec) -> tuple[torch.Tensor, Metrics]:
    batch = _prepared(grpo_prepare, models, batch, cfg, train)
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
    old = _behaviour_logps(models, batch, cfg)
    rewards, extras = batch.rewards, {}
    if train.kl_coef > 0:
        # TRL's RLOO puts the KL in the reward, summed over the sequence and measured on the
        # behaviour policy's log-probs (a constant, like the reward), as the RLOO paper does.
        seq_kl = (kl_estimate(old, _reference_logps(models, batch, cfg), train.kl_estimator) * mask).sum(1)
        rewards = rewards - train.kl_coef * seq_kl
        extras["seq_kl"] = seq_kl
    adv = rloo_advantages(rewards, batch.group_size)
    if cfg.normalize_advantages:
        n = _all_ranks_sum(torch.tensor(float(len(adv))))
        mean = _all_ranks_sum(adv.sum()) / n
        std = torch.sqrt(_all_ranks_sum(((adv - mean) ** 2).sum()) / (n - 1).clamp(min=1.0))
        adv = (adv - mean) / (std + 1e-4)
    return _with(batch, old_logps=old, advantages=adv, **extras)


@register_algorithm("rloo", source="rollouts", config=RLOOConfig, prepare=rloo_prepare, kl_penalty=True)
def rloo_loss(models: Models, batch: StepBatch, cfg: RLOOConfig, train: TrainingSpec) -> tuple[torch.Tensor, Metrics]:
    batch = _prepared(rloo_prepare, models, batch, cfg, train)
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


# --------------------------------------------------------------------------- PPO


class CriticConfig(_Section):
    """PPO's value model: its own optimizer settings and its loss terms."""

    lr: float = Field(gt=0, description="the critic's AdamW learning rate (required)")
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0, description="critic gradient clipping; null disables it")
    vf_coef: float = Field(0.1, gt=0, description="weight of the value loss in the summed loss")
    cliprange_value: float = Field(0.2, gt=0, description="value clipping around the rollout-time values")


class PPOConfig(AlgorithmConfig):
    critic: CriticConfig = Field(description="the critic's settings (required: PPO has no default critic lr)")
    gamma: float = Field(1.0, ge=0, le=1, description="discount")
    lam: float = Field(0.95, ge=0, le=1, description="GAE λ")
    epsilon: float = Field(0.2, gt=0, description="policy ratio clip range (the name GRPO and RLOO use)")
    whiten_advantages: bool = Field(True, description="whiten GAE advantages over the step's batch")


class ValueModel(torch.nn.Module):
    """θ0's transformer backbone (a copy) with a fresh scalar head: V(x_≤t) at every position t."""

    def __init__(self, policy: torch.nn.Module) -> None:
        super().__init__()
        self.backbone = copy.deepcopy(policy.base_model)  # LlamaModel of a LlamaForCausalLM
        hidden = policy.config.get_text_config().hidden_size
        # Zero-initialised head: V ≡ 0 at first, so the first advantages are the plain GAE of
        # the rewards rather than of a random value function.
        self.head = torch.nn.Linear(hidden, 1, dtype=next(policy.parameters()).dtype)
        torch.nn.init.zeros_(self.head.weight)
        torch.nn.init.zeros_(self.head.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.head(hidden).squeeze(-1).float()  # (B, T)


def critic_values(critic: torch.nn.Module, tokens: TokenBatch) -> torch.Tensor:
    """V(s_t) aligned with `completion_mask`: position t is the state predicting token t+1."""
    return critic(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask)[:, :-1]


def ppo_aux(policy: torch.nn.Module, cfg: PPOConfig, train: TrainingSpec) -> dict[str, AuxModel]:
    c = cfg.critic
    return {"critic": AuxModel(ValueModel(policy), lr=c.lr, weight_decay=c.weight_decay, max_grad_norm=c.max_grad_norm)}


def token_rewards(rewards: torch.Tensor, mask: torch.Tensor, kl: torch.Tensor | None = None, kl_coef: float = 0.0) -> torch.Tensor:
    """Classic RLHF token rewards: the outcome reward on the last completion token, minus
    kl_coef × the per-token KL estimate on every completion token."""
    r = rewards[:, None] * last_token_mask(mask)
    if kl is not None and kl_coef > 0:
        r = r - kl_coef * kl * mask
    return r * mask


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over each row's completion tokens.

    δ_t = r_t + γ V_{t+1} − V_t, A_t = δ_t + γλ A_{t+1}; V and A are 0 past the last
    completion token (the episode ends there). Returns (advantages, returns = A + V), 0 off-mask.
    """
    values = values * mask
    adv = torch.zeros_like(rewards)
    next_value = next_adv = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv[:, t] = (delta + gamma * lam * next_adv) * mask[:, t]
        next_value, next_adv = values[:, t], adv[:, t]
    return adv, (adv + values) * mask


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip: float) -> torch.Tensor:
    """PPO's clipped value loss: ½·mean max((V − R)², (V_old + clip(V − V_old, ±c) − R)²)."""
    clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    return 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask)


def ppo_prepare(models: Models, batch: StepBatch, cfg: PPOConfig, train: TrainingSpec) -> StepBatch:
    mask = batch.tokens.completion_mask
    old, kl = batch.old_logps, None
    if train.kl_coef > 0:
        old = _behaviour_logps(models, batch, cfg)
        kl = kl_estimate(old, _reference_logps(models, batch, cfg), train.kl_estimator)
    rewards = token_rewards(batch.rewards, mask, kl, train.kl_coef)
    values = critic_values(models.aux["critic"], batch.tokens) * mask
    adv, returns = gae(rewards, values, mask, cfg.gamma, cfg.lam)
    if cfg.whiten_advantages:
        adv = masked_whiten(adv, mask)
    extras = {"advantages": adv, "returns": returns, "values": values, "token_rewards": rewards}
    if kl is not None:
        extras["kl"] = kl
    return _with(batch, old_logps=old, **extras)


def _policy_surrogate(models: Models, batch: StepBatch, epsilon: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token log-probs, the clipped surrogate on the prepared advantages, and the clip mask."""
    logp = token_logprobs(models.policy, batch.tokens)
    old = batch.old_logps if batch.old_logps is not None else logp.detach()
    per_token, _, clipped = clipped_surrogate(logp, old, batch.extras["advantages"], epsilon, epsilon)
    return logp, per_token, clipped


@register_algorithm("ppo", source="rollouts", config=PPOConfig, aux=ppo_aux, prepare=ppo_prepare, kl_penalty=True)
def ppo_loss(models: Models, batch: StepBatch, cfg: PPOConfig, train: TrainingSpec) -> tuple[torch.Tensor, Metrics]:
    batch = _prepared(ppo_prepare, models, batch, cfg, train)
    mask, ex = batch.tokens.completion_mask, batch.extras
    logp, per_token, clipped = _policy_surrogate(models, batch, cfg.epsilon)
    pg_loss = masked_mean(per_token, mask)
    values = critic_values(models.aux["critic"], batch.tokens)
    vf_loss = value_loss(values, ex["values"], ex["returns"], mask, cfg.critic.cliprange_value)
    # The critic is a separate model with its own optimizer: summing only routes each
    # gradient to its own parameters; vf_coef scales the critic's.
    loss = pg_loss + cfg.critic.vf_coef * vf_loss
    metrics = {
        "pg_loss": pg_loss.item(),
        "vf_loss": vf_loss.item(),
        "clip_frac": masked_mean(clipped.float(), mask).item(),
        "value_mean": masked_mean(values.detach(), mask).item(),
    }
    if "kl" in ex:
        metrics["kl"] = masked_mean(ex["kl"], mask).item()
    return loss, metrics


# --------------------------------------------------------------------------- PRIME


class PRMConfig(_Section):
    """PRIME's implicit process reward model (a causal LM initialised from θ0)."""

    lr: float = Field(1e-6, gt=0, description="the PRM's AdamW learning rate (PRIME's 1e-6)")
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0)
    beta: float = Field(0.05, gt=0, description="β of r_t = β·log(π_prm/π_ref) (PRIME's 0.05)")
    loss_coef: float = Field(1.0, gt=0, description="weight of the PRM's cross-entropy in the summed loss")


class PRIMEConfig(AlgorithmConfig):
    prm: PRMConfig = PRMConfig()
    epsilon: float = Field(0.2, gt=0, description="policy ratio clip range (the name GRPO and RLOO use)")
    process_coef: float = Field(1.0, ge=0, description="weight of the implicit process rewards' advantage")
    outcome_coef: float = Field(1.0, ge=0, description="weight of the outcome reward's advantage")
    correct_threshold: float = Field(1.0, description="reward ≥ this labels a sample correct for the PRM")
    whiten_advantages: bool = Field(True, description="whiten the returns over the step's batch (verl's PRIME)")


def prime_aux(policy: torch.nn.Module, cfg: PRIMEConfig, train: TrainingSpec) -> dict[str, AuxModel]:
    p = cfg.prm
    prm = copy.deepcopy(policy).train().requires_grad_(True)
    return {"prm": AuxModel(prm, lr=p.lr, weight_decay=p.weight_decay, max_grad_norm=p.max_grad_norm)}


def implicit_rewards(prm_logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor, beta: float) -> torch.Tensor:
    """PRIME's implicit process reward r_t = β·log(π_prm(y_t|y_<t) / π_ref(y_t|y_<t))."""
    return beta * (prm_logp - ref_logp) * mask


def leave_one_out_token_advantages(token_r: torch.Tensor, mask: torch.Tensor, group_size: int) -> torch.Tensor:
    """PRIME's RLOO on dense rewards: r_{i,t} − (1/(K−1))·Σ_{j≠i} mean_t r_{j,t}.

    The baseline of sample i averages its siblings' per-token mean rewards (r_φ(y_j)/|y_j| in
    the paper's Eq. 5); an outcome reward sits on one token per row, so the same function gives
    its leave-one-out advantage with the reward's mask being the last token.
    """
    if group_size < 2:
        return torch.zeros_like(token_r)
    per_row = masked_mean(token_r, mask, dim=1).view(-1, group_size)
    others = ((per_row.sum(1, keepdim=True) - per_row) / (group_size - 1)).view(-1, 1)
    return (token_r - others) * mask


def prime_prepare(models: Models, batch: StepBatch, cfg: PRIMEConfig, train: TrainingSpec) -> StepBatch:
    mask = batch.tokens.completion_mask
    ref = _reference_logps(models, batch, cfg)
    # Dense rewards from the PRM as it is before this step's update (PRIME's single-forward variant).
    process = implicit_rewards(_logprobs_no_grad(models.aux["prm"], batch.tokens, cfg.minibatches), ref, mask, cfg.prm.beta)
    last = last_token_mask(mask)
    outcome = batch.rewards[:, None] * last
    adv_tokens = cfg.process_coef * leave_one_out_token_advantages(process, mask, batch.group_size)
    adv_tokens = adv_tokens + cfg.outcome_coef * leave_one_out_token_advantages(outcome, last, batch.group_size)
    # γ = 1 returns: each token is credited with every later token's (baselined) reward.
    returns = (adv_tokens * mask).flip(1).cumsum(1).flip(1) * mask
    adv = masked_whiten(returns, mask) if cfg.whiten_advantages else returns
    return _with(batch, advantages=adv, returns=returns, token_rewards=process, ref_logps=ref)


@register_algorithm("prime", source="rollouts", config=PRIMEConfig, uses_reference=True, aux=prime_aux, prepare=prime_prepare, kl_penalty=True)
def prime_loss(models: Models, batch: StepBatch, cfg: PRIMEConfig, train: TrainingSpec) -> tuple[torch.Tensor, Metrics]:
    batch = _prepared(prime_prepare, models, batch, cfg, train)
    mask, ex = batch.tokens.completion_mask, batch.extras
    logp, per_token, clipped = _policy_surrogate(models, batch, cfg.epsilon)
    metrics: Metrics = {}
    if train.kl_coef > 0:
        kl = kl_estimate(logp, ex["ref_logps"], train.kl_estimator)
        per_token = per_token + train.kl_coef * kl
        metrics["kl"] = masked_mean(kl.detach(), mask).item()
    pg_loss = masked_mean(per_token, mask)
    # The PRM learns from outcome labels only: its sequence reward β·Σ_t log(π_prm/π_ref) is
    # the logit of P(correct) (PRIME's cross-entropy loss).
    prm_logp = token_logprobs(models.aux["prm"], batch.tokens)
    score = cfg.prm.beta * ((prm_logp - ex["ref_logps"]) * mask).sum(1)
    labels = (batch.rewards >= cfg.correct_threshold).float()
    prm_loss = F.binary_cross_entropy_with_logits(score, labels)
    loss = pg_loss + cfg.prm.loss_coef * prm_loss
    metrics.update(
        pg_loss=pg_loss.item(),
        prm_loss=prm_loss.item(),
        prm_acc=((score.detach() > 0).float() == labels).float().mean().item(),
        clip_frac=masked_mean(clipped.float(), mask).item(),
        process_reward_mean=masked_mean(ex["token_rewards"], mask).item(),
    )
    return loss, metrics
