"""GRPO and SFT losses against hand-derived values on a tiny batch."""

from __future__ import annotations

import math

import pytest
import torch

from rlsparsity.platform.algorithms import (
    ALGORITHMS,
    Models,
    StepBatch,
    get_algorithm,
    register_algorithm,
)
from rlsparsity.platform.algorithms.common import kl_estimate
from rlsparsity.platform.algorithms.policy_gradient import GRPOConfig, group_advantages
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
    assert torch.equal(kl_estimate(lp, lp, "k3"), torch.zeros(2))
    assert (kl_estimate(lp, lp - 0.3, "k3") > 0).all()


def test_grpo_loss_on_policy_equals_minus_mean_advantage_weighted_ratio():
    model = Unigram()
    batch = build_batch([[0, 1], [0, 1]], [[2, 3], [4]], pad_id=0)
    sb = StepBatch(batch, rewards=torch.tensor([1.0, 0.0]), group_size=2)
    loss, _ = get_algorithm("grpo").loss(Models(model), sb, GRPOConfig(loss_type="grpo"), TrainingSpec())
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
    loss, m = get_algorithm("grpo").loss(Models(model), sb, GRPOConfig(epsilon=0.2, loss_type="grpo"), TrainingSpec())
    a = group_advantages(torch.tensor([1.0, 0.0]), 2)
    want = -(min(math.e * a[0], 1.2 * a[0]) + min(math.e * a[1], 1.2 * a[1])) / 2
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    # Only row 0 (A > 0, ratio above 1 + ε) sits in the clipped region; row 1 (A < 0) keeps
    # the unclipped ratio, which is the smaller objective there.
    assert m["clip_frac"] == 0.5


def test_sft_loss_is_token_mean_nll():
    model = Unigram()
    sb = StepBatch(build_batch([[0], [0, 1]], [[2, 3], [4]], pad_id=0))
    loss, _ = get_algorithm("sft").loss(Models(model), sb, None, TrainingSpec())
    logp = torch.log_softmax(torch.linspace(-1, 1, 5), 0)
    assert loss.item() == pytest.approx(-(logp[2] + logp[3] + logp[4]).item() / 3, rel=1e-6)


def test_registry_rejects_duplicates_and_unknown_names():
    with pytest.raises(ValueError, match="already registered"):
        register_algorithm("grpo", source="rollouts")(lambda *a: None)
    with pytest.raises(ValueError, match="allowed: .*grpo.*sft"):
        get_algorithm("nope")
    assert set(ALGORITHMS) >= {"grpo", "rloo", "ppo", "prime", "raft", "raftpp", "sft"}


def test_readme_example_registers_a_usable_algorithm():
    """The README's algorithm example, executed as written: the registry, the loss
    signature and the spec's algorithm_config all accept it."""
    import re
    from pathlib import Path

    from rlsparsity.sweeps.spec import SweepSpec

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    (code,) = [b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if '@register_algorithm("reinforce"' in b]
    namespace: dict = {}
    exec(code, namespace)
    try:
        algo = get_algorithm("reinforce")
        sb = StepBatch(build_batch([[0], [0]], [[1], [2]], 0), rewards=torch.tensor([1.0, 0.0]), group_size=2)
        loss, _ = algo.loss(Models(Unigram()), sb, algo.config(), TrainingSpec())
        loss.backward()
        assert torch.isfinite(loss)
        trials = SweepSpec({"algorithm": ["grpo", "reinforce"], "algorithm_config": {"reinforce": {"baseline": False}}}).trials()
        assert trials[1].algo_config.baseline is False
    finally:
        ALGORITHMS.pop("reinforce")
