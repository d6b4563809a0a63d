"""Pieces several losses share: the KL penalty to the frozen reference, reference log-probs."""

from __future__ import annotations

from typing import Literal

import torch

from rlsparsity.platform.algorithms.registry import Models
from rlsparsity.platform.batches import TokenBatch, token_logprobs

KLEstimator = Literal["k1", "k3"]


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
