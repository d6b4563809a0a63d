"""Pieces several losses share: the KL penalty to the frozen reference, reference log-probs,
and the policy-gradient family's batch handling (rows, no-grad log-probs, `prepare`'s
extras, the clipped surrogate, whitening, cross-rank sums)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Literal

import torch
import torch.distributed as dist

from rlsparsity.platform.algorithms.registry import AlgorithmConfig, Models, StepBatch
from rlsparsity.platform.batches import TokenBatch, masked_mean, token_logprobs
from rlsparsity.platform.config import Strict

if TYPE_CHECKING:
    from rlsparsity.platform.config import TrainingSpec

KLEstimator = Literal["k1", "k3"]
Metrics = dict[str, float]


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: KLEstimator = "k3") -> torch.Tensor:
    """Per-token estimate of KL(π || π_ref) from samples of π (Schulman's k1 / k3).

    k1 = log π − log π_ref is unbiased but can be negative; k3 = r − log r − 1 with
    r = π_ref/π is unbiased and always ≥ 0.
    """
    d = ref_logp - logp
    if estimator == "k1":
        return -d
    if estimator == "k3":
        return torch.exp(d) - d - 1
    raise ValueError(f"kl_estimator must be 'k1' or 'k3', got {estimator!r}")


def reference_logprobs(models: Models, tokens: TokenBatch) -> torch.Tensor:
    if models.reference is None:
        raise ValueError("this loss needs the frozen reference model, but the learner built none")
    with torch.no_grad():
        return token_logprobs(models.reference, tokens)


class Section(Strict):
    """A nested block of an algorithm config (strict like the config itself)."""


# --------------------------------------------------------------------- policy-gradient pieces


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_ranks_sum(x: torch.Tensor) -> torch.Tensor:
    """`x` summed over the data-parallel ranks (a detached copy; `x` itself on one process).

    Every rank calls the same losses in the same order, so this collective cannot deadlock.
    """
    x = x.detach().clone()
    if world_size() > 1:
        dist.all_reduce(x)
    return x


def whole_share(part: torch.Tensor | float, whole: torch.Tensor | float) -> float:
    """A micro-batch's share of its minibatch in some count (exactly 1.0 for an unsplit
    batch): a loss with mean_over="whole" multiplies each of its means by its count's share."""
    whole = float(whole)
    return float(part) / whole if whole > 0 else 0.0


def forward_chunks(rows: int, cfg: AlgorithmConfig, train: TrainingSpec) -> int:
    """How many row blocks a no-grad forward over `rows` rows runs in: one per minibatch, and
    no block larger than `training.micro_batch_size`."""
    micro = train.micro_batch_size
    return max(cfg.minibatches, 1 if micro is None else -(-rows // micro))


def select_rows(tokens: TokenBatch, rows: torch.Tensor) -> TokenBatch:
    return TokenBatch(tokens.input_ids[rows], tokens.attention_mask[rows], tokens.completion_mask[rows])


@torch.no_grad()
def in_chunks(forward: Callable[[TokenBatch], torch.Tensor], tokens: TokenBatch, chunks: int = 1) -> torch.Tensor:
    """A per-row `forward` without a graph, in `chunks` row blocks: `prepare` sees the whole
    step's batch, whose (B, T, vocab) logits can be far larger than one minibatch's."""
    blocks = torch.arange(len(tokens.input_ids)).tensor_split(max(1, chunks))
    return torch.cat([forward(select_rows(tokens, r)) for r in blocks if len(r)])


def logprobs_no_grad(model: torch.nn.Module, tokens: TokenBatch, chunks: int = 1) -> torch.Tensor:
    """`token_logprobs` without a graph, in `chunks` row blocks."""
    return in_chunks(lambda t: token_logprobs(model, t), tokens, chunks)


def with_extras(batch: StepBatch, old_logps: torch.Tensor | None = None, **extras: torch.Tensor) -> StepBatch:
    """A copy of `batch` with more extras (and behaviour log-probs): callers' batches stay as given."""
    return dataclasses.replace(
        batch,
        old_logps=batch.old_logps if old_logps is None else old_logps,
        extras={**batch.extras, **extras},
    )


def prepared(prepare: Callable, models: Models, batch: StepBatch, cfg, train: TrainingSpec) -> StepBatch:
    """The batch as the learner would hand it over: `prepare` already run (no gradients)."""
    if "advantages" in batch.extras:
        return batch
    with torch.no_grad():
        return prepare(models, batch, cfg, train)


def behaviour_logps(models: Models, batch: StepBatch, cfg: AlgorithmConfig, train: TrainingSpec) -> torch.Tensor:
    """log π_old: the learner's (set when a step has several update passes) or computed now."""
    if batch.old_logps is not None:
        return batch.old_logps
    return logprobs_no_grad(models.policy, batch.tokens, forward_chunks(len(batch), cfg, train))


def reference_logps(models: Models, batch: StepBatch, cfg: AlgorithmConfig, train: TrainingSpec) -> torch.Tensor:
    if models.reference is None:
        raise ValueError("this algorithm needs the frozen reference model, but the learner built none")
    return logprobs_no_grad(models.reference, batch.tokens, forward_chunks(len(batch), cfg, train))


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
