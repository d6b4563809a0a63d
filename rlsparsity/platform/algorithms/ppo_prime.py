"""The policy-gradient algorithms that train a side model next to the policy: PPO and PRIME.

- ``ppo`` is classic RLHF PPO (Ouyang et al. 2022; Schulman et al. 2017): a learned critic
  initialised from θ0's backbone, token rewards (outcome on the last token, minus a per-token
  KL penalty), GAE, clipped policy and value objectives. TRL has no counterpart to check against.
- ``prime`` is PRIME (Cui et al. 2025, "Process Reinforcement through Implicit Rewards"):
  an implicit process reward model trained online from outcome labels supplies dense rewards.

Values, token rewards and reference log-probs are computed once per step by ``prepare``,
as for GRPO (``policy_gradient``).
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from pydantic import Field

from rlsparsity.platform.algorithms.common import (
    Metrics,
    Section,
    behaviour_logps,
    clipped_surrogate,
    forward_chunks,
    in_chunks,
    kl_estimate,
    last_token_mask,
    logprobs_no_grad,
    masked_whiten,
    prepared,
    reference_logps,
    whole_share,
    with_extras,
)
from rlsparsity.platform.algorithms.registry import (
    AlgorithmConfig,
    AuxModel,
    Models,
    StepBatch,
    register_algorithm,
)
from rlsparsity.platform.batches import TokenBatch, masked_mean, token_logprobs

if TYPE_CHECKING:
    from rlsparsity.platform.config import TrainingSpec


# --------------------------------------------------------------------------- PPO


class CriticConfig(Section):
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
        old = behaviour_logps(models, batch, cfg, train)
        kl = kl_estimate(old, reference_logps(models, batch, cfg, train), train.kl_estimator)
    rewards = token_rewards(batch.rewards, mask, kl, train.kl_coef)
    chunks = forward_chunks(len(batch), cfg, train)
    values = in_chunks(lambda t: critic_values(models.aux["critic"], t), batch.tokens, chunks) * mask
    adv, returns = gae(rewards, values, mask, cfg.gamma, cfg.lam)
    if cfg.whiten_advantages:
        adv = masked_whiten(adv, mask)
    extras = {"advantages": adv, "returns": returns, "values": values, "token_rewards": rewards}
    if kl is not None:
        extras["kl"] = kl
    return with_extras(batch, old_logps=old, **extras)


def _policy_surrogate(models: Models, batch: StepBatch, epsilon: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token log-probs, the clipped surrogate on the prepared advantages, and the clip mask."""
    logp = token_logprobs(models.policy, batch.tokens)
    old = batch.old_logps if batch.old_logps is not None else logp.detach()
    per_token, _, clipped = clipped_surrogate(logp, old, batch.extras["advantages"], epsilon, epsilon)
    return logp, per_token, clipped


# Both terms are means over the same completion tokens.
@register_algorithm("ppo", source="rollouts", config=PPOConfig, aux=ppo_aux, prepare=ppo_prepare, kl_penalty=True,
                    mean_over="completion_tokens")
def ppo_loss(models: Models, batch: StepBatch, cfg: PPOConfig, train: TrainingSpec) -> tuple[torch.Tensor, Metrics]:
    batch = prepared(ppo_prepare, models, batch, cfg, train)
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


class PRMConfig(Section):
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
    ref = reference_logps(models, batch, cfg, train)
    # Dense rewards from the PRM as it is before this step's update (PRIME's single-forward variant).
    process = implicit_rewards(logprobs_no_grad(models.aux["prm"], batch.tokens, forward_chunks(len(batch), cfg, train)), ref, mask, cfg.prm.beta)
    last = last_token_mask(mask)
    outcome = batch.rewards[:, None] * last
    adv_tokens = cfg.process_coef * leave_one_out_token_advantages(process, mask, batch.group_size)
    adv_tokens = adv_tokens + cfg.outcome_coef * leave_one_out_token_advantages(outcome, last, batch.group_size)
    # γ = 1 returns: each token is credited with every later token's (baselined) reward.
    returns = (adv_tokens * mask).flip(1).cumsum(1).flip(1) * mask
    adv = masked_whiten(returns, mask) if cfg.whiten_advantages else returns
    return with_extras(batch, advantages=adv, returns=returns, token_rewards=process, ref_logps=ref)


# A token mean (the policy's) plus a row mean (the PRM's): each is scaled to the minibatch.
@register_algorithm("prime", source="rollouts", config=PRIMEConfig, uses_reference=True, aux=prime_aux,
                    prepare=prime_prepare, kl_penalty=True, mean_over="whole")
def prime_loss(models: Models, batch: StepBatch, cfg: PRIMEConfig, train: TrainingSpec) -> tuple[torch.Tensor, Metrics]:
    batch = prepared(prime_prepare, models, batch, cfg, train)
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
    whole = batch.whole or batch
    tokens_share = whole_share(mask.sum(), whole.tokens.completion_mask.sum())
    loss = pg_loss * tokens_share + cfg.prm.loss_coef * prm_loss * whole_share(len(batch), len(whole))
    metrics.update(
        pg_loss=pg_loss.item(),
        prm_loss=prm_loss.item(),
        prm_acc=((score.detach() > 0).float() == labels).float().mean().item(),
        clip_frac=masked_mean(clipped.float(), mask).item(),
        process_reward_mean=masked_mean(ex["token_rewards"], mask).item(),
    )
    return loss, metrics
