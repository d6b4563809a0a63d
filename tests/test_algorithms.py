"""GRPO and SFT losses against hand-derived values on a tiny batch."""

from __future__ import annotations

import math

import pytest
import torch

from rlsparsity.platform.algorithms import (
    ALGORITHMS,
    StepBatch,
    get_algorithm,
    group_advantages,
    kl_k3,
    register_algorithm,
)
from rlsparsity.platform.batches import build_batch, token_logprobs
from rlsparsity.platform.config import TrainingSpec


class Unigram(torch.nn.Module):
    """Logits depend only on a learned vector: log-probs are easy to derive by hand."""

    def __init__(self, vocab: int = 5) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.linspace(-1, 1, vocab))

    def forward(self, input_ids, attention_mask=None):
        return type("Out", (), {"logits": self.w.expand(*input_ids.shape, -1)})()


def test_group_advantages_standardise_within_groups():
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0]), group_size=3)
    # group 1: mean 1/3, unbiased std sqrt(1/3); group 2 mirrors it
    s = math.sqrt(1 / 3)
    want = [(2 / 3) / (s + 1e-4), (-1 / 3) / (s + 1e-4), (-1 / 3) / (s + 1e-4)]
    torch.testing.assert_close(adv, torch.tensor(want + [-w for w in want]))


def test_kl_k3_is_zero_at_equality_and_positive_otherwise():
    lp = torch.tensor([-1.0, -2.0])
    assert torch.equal(kl_k3(lp, lp), torch.zeros(2))
    assert (kl_k3(lp, lp - 0.3) > 0).all()


def test_grpo_loss_on_policy_equals_minus_mean_advantage_weighted_ratio():
    model = Unigram()
    batch = build_batch([[0, 1], [0, 1]], [[2, 3], [4]], pad_id=0)
    sb = StepBatch(batch, rewards=torch.tensor([1.0, 0.0]), group_size=2)
    loss, _ = get_algorithm("grpo").loss(model, None, sb, TrainingSpec())
    # On-policy the ratio is 1, so the value is -mean_i A_i; with A = (+a, -a) that is 0,
    # and the gradient is -(1/2) Σ_i A_i · mean_t ∇log π(y_t).
    assert abs(loss.item()) < 1e-6
    loss.backward()
    logp = torch.log_softmax(torch.linspace(-1, 1, 5), 0)
    a = group_advantages(torch.tensor([1.0, 0.0]), 2)
    probs = logp.exp()
    grad = torch.zeros(5)
    for adv, toks in zip(a, [[2, 3], [4]], strict=True):
        g = torch.zeros(5)
        for tok in toks:
            g += torch.nn.functional.one_hot(torch.tensor(tok), 5).float() - probs
        grad += -adv * g / len(toks) / 2
    torch.testing.assert_close(model.w.grad, grad)


def test_grpo_clips_the_ratio_beyond_the_range():
    model = Unigram()
    batch = build_batch([[0]], [[1]], pad_id=0)
    logp = token_logprobs(model, batch).detach()
    # behaviour policy much less likely -> ratio e^1 > 1.2; positive advantage gets clipped
    sb = StepBatch(build_batch([[0], [0]], [[1], [1]], 0), rewards=torch.tensor([1.0, 0.0]), group_size=2,
                   old_logps=torch.cat([logp, logp]) - 1.0)
    loss, m = get_algorithm("grpo").loss(model, None, sb, TrainingSpec(clip_eps=0.2))
    a = group_advantages(torch.tensor([1.0, 0.0]), 2)
    want = -(min(math.e * a[0], 1.2 * a[0]) + min(math.e * a[1], 1.2 * a[1])) / 2
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    assert m["clip_frac"] == 1.0


def test_sft_loss_is_token_mean_nll():
    model = Unigram()
    sb = StepBatch(build_batch([[0], [0, 1]], [[2, 3], [4]], pad_id=0))
    loss, _ = get_algorithm("sft").loss(model, None, sb, TrainingSpec())
    logp = torch.log_softmax(torch.linspace(-1, 1, 5), 0)
    assert loss.item() == pytest.approx(-(logp[2] + logp[3] + logp[4]).item() / 3, rel=1e-6)


def test_registry_rejects_duplicates_and_unknown_names():
    with pytest.raises(ValueError, match="already registered"):
        register_algorithm("grpo", source="rollouts")(lambda *a: None)
    with pytest.raises(ValueError, match="allowed: grpo, sft"):
        get_algorithm("nope")
    assert set(ALGORITHMS) >= {"grpo", "sft"}


def test_readme_example_registers_a_usable_algorithm():
    """The README's one-function algorithm is accepted by the registry and the spec."""
    from rlsparsity.platform.algorithms import masked_mean
    from rlsparsity.sweeps.spec import SweepSpec

    @register_algorithm("reinforce_readme", source="rollouts")
    def reinforce(policy, reference, batch, cfg):
        logp = token_logprobs(policy, batch.tokens)
        adv = (batch.rewards - batch.rewards.mean())[:, None]
        return -masked_mean(logp * adv, batch.tokens.completion_mask), {}

    try:
        sb = StepBatch(build_batch([[0], [0]], [[1], [2]], 0), rewards=torch.tensor([1.0, 0.0]), group_size=2)
        loss, _ = get_algorithm("reinforce_readme").loss(Unigram(), None, sb, TrainingSpec())
        assert torch.isfinite(loss)
        assert SweepSpec({"algorithm": ["grpo", "reinforce_readme"]}).trials()[1].algorithm == "reinforce_readme"
    finally:
        ALGORITHMS.pop("reinforce_readme")
