"""Preference algorithms on (chosen, rejected) pairs: DPO (and IPO), KTO, ORPO, SimPO.

Each loss follows TRL 1.16 (`trl.DPOTrainer`, `trl.KTOTrainer`, `trl.experimental.orpo`,
`trl.experimental.cpo` with ``loss_type="simpo"``) to the token: the same sequence
log-probs (summed or averaged over completion tokens), the same reductions over the batch,
the same knob names and defaults. `tests/test_parity_preference.py` checks the losses (and
DPO's gradients) against TRL's trainers on one model and batch.

The pure loss math is in small functions on log-prob tensors; the registered wrappers run
the model and reduce. "Reward" in the metrics is each algorithm's implicit reward, as TRL
logs it: β·(log π − log π_ref) for DPO/KTO, β·(average log π) for ORPO/SimPO.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from rlsparsity.platform.algorithms.common import (
    forward_chunks,
    in_chunks,
    reference_logprobs,
    whole_share,
    with_extras,
)
from rlsparsity.platform.algorithms.registry import (
    AlgorithmConfig,
    Models,
    PairSource,
    StepBatch,
    register_algorithm,
)
from rlsparsity.platform.batches import TokenBatch, build_batch, masked_mean, token_logprobs

if TYPE_CHECKING:
    from rlsparsity.platform.config import TrainingSpec

Metrics = dict[str, float]


class PreferenceConfig(AlgorithmConfig):
    # No default: where the pairs come from changes what the run means, so a trial must say.
    pairs: PairSource = Field(description="where the (chosen, rejected) pairs come from")
    beta: float = Field(0.1, gt=0, description="inverse temperature of the implicit reward (TRL's `beta`)")


# --------------------------------------------------------------------------- shared pieces


def sequence_logps(token_logps: torch.Tensor, mask: torch.Tensor, average: bool = False) -> torch.Tensor:
    """Per-row log-prob of the masked tokens: their sum, or their mean with ``average``."""
    return masked_mean(token_logps, mask, dim=-1) if average else (token_logps * mask).sum(-1)


def stack_tokens(a: TokenBatch, b: TokenBatch) -> TokenBatch:
    """Rows of `a` then rows of `b`, right-padded to a common width.

    Chosen and rejected go through the model as one batch, as in TRL: one forward (and one
    DDP all-reduce) instead of two. Pad ids are never attended to nor scored, so 0 will do.
    """
    width = max(a.input_ids.shape[1], b.input_ids.shape[1])

    def pad(x: torch.Tensor, w: int) -> torch.Tensor:
        return F.pad(x, (0, w - x.shape[1]))

    return TokenBatch(
        torch.cat([pad(a.input_ids, width), pad(b.input_ids, width)]),
        torch.cat([pad(a.attention_mask, width), pad(b.attention_mask, width)]),
        torch.cat([pad(a.completion_mask, width - 1), pad(b.completion_mask, width - 1)]),
    )


def sequence_logratios(models: Models, tokens: TokenBatch) -> torch.Tensor:
    """log π(y|x) − log π_ref(y|x) per row, summed over the completion tokens."""
    mask = tokens.completion_mask
    return sequence_logps(token_logprobs(models.policy, tokens), mask) - sequence_logps(
        reference_logprobs(models, tokens), mask
    )


def _pair_stats(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> Metrics:
    c, r = chosen_rewards.detach(), rejected_rewards.detach()
    return {
        "chosen_reward": c.mean().item(),
        "rejected_reward": r.mean().item(),
        "reward_margin": (c - r).mean().item(),
        "preference_accuracy": (c > r).float().mean().item(),
    }


# --------------------------------------------------------------------------- DPO / IPO


class DPOConfig(PreferenceConfig):
    loss_type: Literal["sigmoid", "ipo"] = Field(
        "sigmoid", description="sigmoid: DPO's logistic loss; ipo: IPO's squared loss on per-token log-ratios"
    )


def dpo_loss(
    chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, beta: float, loss_type: str = "sigmoid"
) -> torch.Tensor:
    """Per-pair DPO / IPO loss from the log-ratios log π − log π_ref of each side."""
    margin = chosen_logratios - rejected_logratios
    if loss_type == "sigmoid":
        return -F.logsigmoid(beta * margin)
    if loss_type == "ipo":
        # IPO regresses the margin onto 1/(2β) (Eq. 17, β is the paper's τ).
        return (margin - 1 / (2 * beta)) ** 2
    raise ValueError(f"loss_type must be 'sigmoid' or 'ipo', got {loss_type!r}")


@register_algorithm("dpo", source="pairs", config=DPOConfig, uses_reference=True)
def dpo(models: Models, batch: StepBatch, cfg: DPOConfig, train: TrainingSpec) -> tuple[torch.Tensor, Metrics]:
    tokens = stack_tokens(batch.pairs.chosen, batch.pairs.rejected)
    logratios = sequence_logratios(models, tokens)
    # TRL (with the IPO authors) length-normalises IPO: summed log-ratios over the number of
    # completion tokens, so β means the same for short and long completions. The logged
    # rewards stay the summed ones, as TRL logs them.
    scored = logratios / tokens.completion_mask.sum(-1).clamp(min=1.0) if cfg.loss_type == "ipo" else logratios
    loss = dpo_loss(*scored.chunk(2), cfg.beta, cfg.loss_type).mean()
    chosen, rejected = logratios.chunk(2)
    return loss, _pair_stats(cfg.beta * chosen, cfg.beta * rejected)


# --------------------------------------------------------------------------- KTO


class KTOConfig(PreferenceConfig):
    desirable_weight: float = Field(1.0, ge=0, description="weight of the chosen (desirable) examples' losses")
    undesirable_weight: float = Field(1.0, ge=0, description="weight of the rejected (undesirable) examples' losses")


def kto_kl(kl_logratios: torch.Tensor) -> torch.Tensor:
    """KTO's reference point z0: the batch's KL(π‖π_ref) estimate, detached and clamped at 0.

    Estimated, as in TRL, on mismatched (prompt, completion) pairs, so it measures how far
    π drifted in general rather than on the completions being scored.
    """
    return kl_logratios.mean().detach().clamp(min=0)


def kto_loss(
    chosen_logratios: torch.Tensor,
    rejected_logratios: torch.Tensor,
    kl: torch.Tensor,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> torch.Tensor:
    """Per-example KTO losses (Eq. 7), desirable ones first, then undesirable ones."""
    return torch.cat([
        desirable_weight * (1 - torch.sigmoid(beta * (chosen_logratios - kl))),
        undesirable_weight * (1 - torch.sigmoid(beta * (kl - rejected_logratios))),
    ])


def mismatched_completions(tokens: TokenBatch) -> TokenBatch:
    """Row i's prompt with row i−1's completion (row 0 takes the last row's): KTO's KL batch.

    The same rotation TRL applies within a batch, so the mismatched completions are the very
    completions being scored, each under another prompt. Rows must be laid out as
    `build_batch` makes them: prompt, completion, then right padding.
    """
    prompts, completions = [], []
    for ids, attn, comp in zip(tokens.input_ids, tokens.attention_mask, tokens.completion_mask, strict=True):
        real, n = ids[attn.bool()].tolist(), int(comp.sum().item())
        prompts.append(real[: len(real) - n])
        completions.append(real[len(real) - n :])
    kl = build_batch(prompts, completions[-1:] + completions[:-1], pad_id=0)
    dev = tokens.input_ids.device
    return TokenBatch(kl.input_ids.to(dev), kl.attention_mask.to(dev), kl.completion_mask.to(dev))


def kto_prepare(models: Models, batch: StepBatch, cfg: KTOConfig, train: TrainingSpec) -> StepBatch:
    """z0 once per step, over the step's whole batch: micro-batches and minibatches share it."""
    tokens = stack_tokens(batch.pairs.chosen, batch.pairs.rejected)
    mismatched = mismatched_completions(tokens)
    kl = kto_kl(in_chunks(lambda t: sequence_logratios(models, t), mismatched, forward_chunks(len(batch), cfg, train)))
    return with_extras(batch, kto_kl=kl.expand(len(batch)))


@register_algorithm("kto", source="pairs", config=KTOConfig, uses_reference=True, prepare=kto_prepare)
def kto(models: Models, batch: StepBatch, cfg: KTOConfig, train: TrainingSpec) -> tuple[torch.Tensor, Metrics]:
    # KTO is unpaired: every chosen row is a desirable example, every rejected row an
    # undesirable one (TRL's `unpair_preference_dataset` gives the same layout).
    tokens = stack_tokens(batch.pairs.chosen, batch.pairs.rejected)
    logratios = sequence_logratios(models, tokens)
    if "kto_kl" in batch.extras:
        kl = batch.extras["kto_kl"][0]
    else:
        with torch.no_grad():  # z0 is a baseline, not a training signal
            kl = kto_kl(sequence_logratios(models, mismatched_completions(tokens)))
    chosen, rejected = logratios.chunk(2)
    loss = kto_loss(chosen, rejected, kl, cfg.beta, cfg.desirable_weight, cfg.undesirable_weight).mean()
    return loss, {**_pair_stats(cfg.beta * chosen, cfg.beta * rejected), "kl": kl.item()}


# --------------------------------------------------------------------------- ORPO


class ORPOConfig(PreferenceConfig):
    beta: float = Field(0.1, gt=0, description="λ, the weight of the odds-ratio term (TRL's `beta`)")
    nll_on_prompt: bool = Field(
        True, description="take the NLL term over prompt and completion tokens, as TRL does; False: completion only"
    )


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − eˣ) for x < 0, stable on both sides of −log 2 (Mächler, 2012)."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_log_odds_ratio(chosen_avg_logps: torch.Tensor, rejected_avg_logps: torch.Tensor) -> torch.Tensor:
    """log [odds(chosen) / odds(rejected)], odds = P/(1 − P).

    P = exp(average token log-prob of the completion), as in TRL.
    """
    return (chosen_avg_logps - rejected_avg_logps) - (log1mexp(chosen_avg_logps) - log1mexp(rejected_avg_logps))


def orpo_loss(chosen_avg_logps: torch.Tensor, rejected_avg_logps: torch.Tensor, nll: torch.Tensor, beta: float) -> torch.Tensor:
    """ORPO: the chosen NLL plus λ·(−log σ(log odds ratio)), averaged over pairs."""
    return nll - beta * F.logsigmoid(orpo_log_odds_ratio(chosen_avg_logps, rejected_avg_logps)).mean()


def orpo_nll_tokens(chosen: TokenBatch, cfg: ORPOConfig) -> torch.Tensor:
    """How many tokens ORPO's NLL averages over in `chosen` (see `orpo`)."""
    return chosen.attention_mask[:, 1:].sum() if cfg.nll_on_prompt else chosen.completion_mask.sum()


# A token mean (the NLL) plus a pair mean (the odds ratio): each is scaled to the minibatch.
@register_algorithm("orpo", source="pairs", config=ORPOConfig, mean_over="whole")
def orpo(models: Models, batch: StepBatch, cfg: ORPOConfig, train: TrainingSpec) -> tuple[torch.Tensor, Metrics]:
    tokens = stack_tokens(batch.pairs.chosen, batch.pairs.rejected)
    logp = token_logprobs(models.policy, tokens)
    chosen_avg, rejected_avg = sequence_logps(logp, tokens.completion_mask, average=True).chunk(2)
    # TRL's NLL is one token-mean over all chosen rows (not a mean of per-row means), and by
    # default over the prompt too: every attended token but the first, which nothing predicts.
    n = len(batch.pairs.chosen.input_ids)
    nll_mask = tokens.attention_mask[:n, 1:].float() if cfg.nll_on_prompt else tokens.completion_mask[:n]
    nll = -masked_mean(logp[:n], nll_mask)
    whole = batch.whole or batch
    odds_term = orpo_loss(chosen_avg, rejected_avg, torch.zeros(()), cfg.beta)
    loss = (nll * whole_share(nll_mask.sum(), orpo_nll_tokens(whole.pairs.chosen, cfg))
            + odds_term * whole_share(n, len(whole)))
    log_odds = orpo_log_odds_ratio(chosen_avg, rejected_avg).detach()
    return loss, {**_pair_stats(cfg.beta * chosen_avg, cfg.beta * rejected_avg), "nll": nll.item(),
                  "log_odds_ratio": log_odds.mean().item()}


# --------------------------------------------------------------------------- SimPO


class SimPOConfig(PreferenceConfig):
    gamma: float = Field(0.5, description="target reward margin γ (TRL's `simpo_gamma`)")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="probability that a pair's labels are flipped")
    cpo_alpha: float = Field(
        0.0, ge=0, description="weight of an NLL term on the chosen completions; 0 is SimPO proper (CPO-SimPO: > 0)"
    )


def simpo_loss(
    chosen_avg_logps: torch.Tensor,
    rejected_avg_logps: torch.Tensor,
    beta: float,
    gamma: float,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Per-pair SimPO loss: −log σ(β·(avg log π(y_w) − avg log π(y_l)) − γ), label-smoothed."""
    # TRL's form: logits = margin − γ/β, scaled by β below, which is the same as β·margin − γ.
    logits = (chosen_avg_logps - rejected_avg_logps) - gamma / beta
    return -F.logsigmoid(beta * logits) * (1 - label_smoothing) - F.logsigmoid(-beta * logits) * label_smoothing


# A pair mean, plus with cpo_alpha a token mean (the NLL): each is scaled to the minibatch.
@register_algorithm("simpo", source="pairs", config=SimPOConfig, mean_over="whole")
def simpo(models: Models, batch: StepBatch, cfg: SimPOConfig, train: TrainingSpec) -> tuple[torch.Tensor, Metrics]:
    tokens = stack_tokens(batch.pairs.chosen, batch.pairs.rejected)
    logp = token_logprobs(models.policy, tokens)
    # Length-normalised log-probs are SimPO's reward: no reference model, no length bias.
    chosen_avg, rejected_avg = sequence_logps(logp, tokens.completion_mask, average=True).chunk(2)
    whole = batch.whole or batch
    loss = simpo_loss(chosen_avg, rejected_avg, cfg.beta, cfg.gamma, cfg.label_smoothing).mean()
    loss = loss * whole_share(len(batch), len(whole))
    metrics = _pair_stats(cfg.beta * chosen_avg, cfg.beta * rejected_avg)
    if cfg.cpo_alpha > 0:
        # CPO's NLL: one token-mean over the chosen completions of the whole batch.
        n = len(batch.pairs.chosen.input_ids)
        nll = -masked_mean(logp[:n], tokens.completion_mask[:n])
        nll_share = whole_share(tokens.completion_mask[:n].sum(), whole.pairs.chosen.completion_mask.sum())
        loss = loss + cfg.cpo_alpha * nll * nll_share
        metrics["nll"] = nll.item()
    return loss, metrics


__all__ = [
    "DPOConfig",
    "KTOConfig",
    "ORPOConfig",
    "PreferenceConfig",
    "SimPOConfig",
    "dpo_loss",
    "kto_kl",
    "kto_loss",
    "log1mexp",
    "mismatched_completions",
    "orpo_log_odds_ratio",
    "orpo_loss",
    "sequence_logps",
    "sequence_logratios",
    "simpo_loss",
    "stack_tokens",
]
