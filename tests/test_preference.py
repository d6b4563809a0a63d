"""Preference losses (DPO, IPO, KTO, ORPO, SimPO) against hand-derived values on tiny tensors.

Agreement with TRL's trainers is `test_parity_preference.py`; these pin the math itself and
the configs' validation.
"""

from __future__ import annotations

import math

import pytest
import torch

from rlsparsity.platform.algorithms import Models, PairBatch, StepBatch, get_algorithm
from rlsparsity.platform.algorithms.preference import (
    dpo_loss,
    kto_kl,
    kto_loss,
    log1mexp,
    mismatched_completions,
    orpo_log_odds_ratio,
    orpo_loss,
    sequence_logps,
    simpo_loss,
    stack_tokens,
)
from rlsparsity.platform.batches import build_batch
from rlsparsity.platform.config import TrainingSpec
from rlsparsity.platform.trial_spec import TrialSpec

torch.set_num_threads(1)


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x))


class Unigram(torch.nn.Module):
    """Logits depend only on a learned vector, so log π(token) = log_softmax(w)[token]."""

    def __init__(self, w: list[float]) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(w))

    def forward(self, input_ids, attention_mask=None):
        return type("Out", (), {"logits": self.w.expand(*input_ids.shape, -1)})()

    def lp(self, token: int) -> float:
        return torch.log_softmax(self.w.detach().double(), 0)[token].item()


POLICY = [-1.0, -0.5, 0.0, 0.5, 1.0]
REFERENCE = [0.3, 0.2, -0.4, 0.1, 0.0]


def pairs(prompts, chosen, rejected) -> PairBatch:
    return PairBatch(build_batch(prompts, chosen, pad_id=0), build_batch(prompts, rejected, pad_id=0))


def run(name: str, pb: PairBatch, **cfg):
    algo = get_algorithm(name)
    models = Models(Unigram(POLICY), Unigram(REFERENCE) if algo.uses_reference else None)
    return algo.loss(models, StepBatch(pairs=pb), algo.config(pairs="offline", **cfg), TrainingSpec())


# --------------------------------------------------------------------------- DPO / IPO


def test_dpo_sigmoid_is_minus_logsigmoid_of_beta_margin():
    got = dpo_loss(torch.tensor([1.0, -0.5]), torch.tensor([0.0, 0.5]), beta=0.5)
    torch.testing.assert_close(got, torch.tensor([-logsig(0.5), -logsig(-0.5)]))


def test_ipo_regresses_margin_onto_one_over_two_beta():
    # β = 0.25: target margin 1/(2β) = 2
    got = dpo_loss(torch.tensor([1.0, 3.0, 2.5]), torch.tensor([0.0, 0.0, 0.5]), beta=0.25, loss_type="ipo")
    torch.testing.assert_close(got, torch.tensor([1.0, 1.0, 0.0]))
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(torch.zeros(1), torch.zeros(1), beta=0.1, loss_type="hinge")


def test_registered_dpo_sums_completion_tokens_and_ipo_averages_them():
    pol, ref = Unigram(POLICY), Unigram(REFERENCE)
    # Prompt tokens (1, 4 / 1) must not count; chosen has 2 completion tokens, rejected 1.
    pb = pairs([[1, 4], [1]], [[2, 3], [3, 3]], [[4], [2]])

    def ratio(toks):
        return sum(pol.lp(t) - ref.lp(t) for t in toks)

    margins = [ratio([2, 3]) - ratio([4]), ratio([3, 3]) - ratio([2])]
    loss, metrics = run("dpo", pb, beta=0.3)
    assert loss.item() == pytest.approx(sum(-logsig(0.3 * m) for m in margins) / 2, rel=1e-6)
    assert metrics["reward_margin"] == pytest.approx(0.3 * sum(margins) / 2, rel=1e-6)
    assert metrics["preference_accuracy"] == sum(m > 0 for m in margins) / 2

    ipo_margins = [ratio([2, 3]) / 2 - ratio([4]), ratio([3, 3]) / 2 - ratio([2])]
    loss, _ = run("dpo", pb, beta=0.3, loss_type="ipo")
    assert loss.item() == pytest.approx(sum((m - 1 / 0.6) ** 2 for m in ipo_margins) / 2, rel=1e-6)


# --------------------------------------------------------------------------- KTO


def test_kto_loss_per_example_values():
    kl = torch.tensor(0.2)
    got = kto_loss(torch.tensor([1.0]), torch.tensor([-1.0, 0.5]), kl, beta=0.5,
                   desirable_weight=2.0, undesirable_weight=0.5)
    sig = torch.sigmoid
    want = torch.stack([
        2.0 * (1 - sig(torch.tensor(0.5 * (1.0 - 0.2)))),
        0.5 * (1 - sig(torch.tensor(0.5 * (0.2 + 1.0)))),
        0.5 * (1 - sig(torch.tensor(0.5 * (0.2 - 0.5)))),
    ])
    torch.testing.assert_close(got, want)


def test_kto_kl_is_a_detached_batch_mean_clamped_at_zero():
    logratios = torch.tensor([0.5, 0.1], requires_grad=True)
    kl = kto_kl(logratios)
    assert kl.item() == pytest.approx(0.3) and not kl.requires_grad
    assert kto_kl(torch.tensor([-1.0, 0.4])).item() == 0.0


def test_mismatched_completions_rotate_completions_by_one_row():
    tokens = build_batch([[1, 2], [3], [4, 4, 4]], [[5, 6], [7], [8, 9, 9]], pad_id=0)
    got = mismatched_completions(tokens)
    want = build_batch([[1, 2], [3], [4, 4, 4]], [[8, 9, 9], [5, 6], [7]], pad_id=0)
    for field in ("input_ids", "attention_mask", "completion_mask"):
        assert torch.equal(getattr(got, field), getattr(want, field)), field


def test_registered_kto_uses_the_kl_from_mismatched_pairs():
    pol, ref = Unigram(POLICY), Unigram(REFERENCE)
    pb = pairs([[1], [4]], [[3, 3], [4]], [[0], [2, 2]])
    # A unigram model ignores the prompt, so each mismatched row scores a completion of the
    # batch (rotated); the KL estimate is the mean summed log-ratio over all 4 completions.
    comps = [[3, 3], [4], [0], [2, 2]]
    ratios = [sum(pol.lp(t) - ref.lp(t) for t in c) for c in comps]
    kl = max(sum(ratios) / 4, 0.0)
    loss, metrics = run("kto", pb, beta=0.5)
    want = [1 - 1 / (1 + math.exp(-0.5 * (r - kl))) for r in ratios[:2]]
    want += [1 - 1 / (1 + math.exp(-0.5 * (kl - r))) for r in ratios[2:]]
    assert metrics["kl"] == pytest.approx(kl, rel=1e-6)
    assert loss.item() == pytest.approx(sum(want) / 4, rel=1e-6)


# --------------------------------------------------------------------------- ORPO


def test_log1mexp_is_log_of_one_minus_exp_on_both_branches():
    x = torch.tensor([-1e-6, -0.1, -0.69, -0.7, -3.0, -40.0], dtype=torch.float64)
    torch.testing.assert_close(log1mexp(x), torch.log(-torch.expm1(x)))
    assert torch.isfinite(log1mexp(torch.tensor([-1e-7, -60.0]))).all()


def test_orpo_odds_ratio_from_average_token_probabilities():
    # P(chosen) = 1/2 (odds 1), P(rejected) = 1/4 (odds 1/3): log odds ratio = log 3
    c, r = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    assert orpo_log_odds_ratio(c, r).item() == pytest.approx(math.log(3), rel=1e-6)
    loss = orpo_loss(c, r, nll=torch.tensor(1.5), beta=0.2)
    assert loss.item() == pytest.approx(1.5 + 0.2 * math.log1p(1 / 3), rel=1e-6)


def test_registered_orpo_nll_covers_the_prompt_unless_told_otherwise():
    pol = Unigram(POLICY)
    pb = pairs([[1, 4], [2]], [[2, 3], [3]], [[4], [0, 0]])
    avg = lambda toks: sum(pol.lp(t) for t in toks) / len(toks)  # noqa: E731
    lor = [orpo_log_odds_ratio(torch.tensor([avg(c)]), torch.tensor([avg(r)])).item()
           for c, r in [([2, 3], [4]), ([3], [0, 0])]]
    odds_term = -0.1 * sum(logsig(x) for x in lor) / 2
    # TRL: every token but the first of each chosen row, pooled over the batch.
    nll_all = -sum(pol.lp(t) for t in [4, 2, 3] + [3]) / 4
    nll_completion = -sum(pol.lp(t) for t in [2, 3, 3]) / 3
    loss, metrics = run("orpo", pb)
    assert metrics["nll"] == pytest.approx(nll_all, rel=1e-6)
    assert loss.item() == pytest.approx(nll_all + odds_term, rel=1e-6)
    loss, _ = run("orpo", pb, nll_on_prompt=False)
    assert loss.item() == pytest.approx(nll_completion + odds_term, rel=1e-6)


# --------------------------------------------------------------------------- SimPO


def test_simpo_loss_with_margin_gamma_and_label_smoothing():
    c, r = torch.tensor([-1.0]), torch.tensor([-2.0])
    # β·(avg_w − avg_l) − γ = 2·1 − 0.5 = 1.5
    assert simpo_loss(c, r, beta=2.0, gamma=0.5).item() == pytest.approx(-logsig(1.5), rel=1e-6)
    got = simpo_loss(c, r, beta=2.0, gamma=0.5, label_smoothing=0.1).item()
    assert got == pytest.approx(-0.9 * logsig(1.5) - 0.1 * logsig(-1.5), rel=1e-6)


def test_registered_simpo_normalises_by_completion_length():
    pol = Unigram(POLICY)
    short = pairs([[1]], [[3]], [[0]])
    long = pairs([[1]], [[3, 3, 3]], [[0, 0]])  # same tokens repeated: same per-token average
    want = -logsig(2.0 * (pol.lp(3) - pol.lp(0)) - 0.5)
    for pb in (short, long):
        loss, _ = run("simpo", pb, beta=2.0, gamma=0.5)
        assert loss.item() == pytest.approx(want, rel=1e-6)
    # DPO, on summed log-probs, does see the length (a control: the check above can fail).
    assert run("dpo", short)[0].item() != pytest.approx(run("dpo", long)[0].item(), rel=1e-3)
    # CPO-SimPO adds α · NLL of the chosen completions (prompt excluded).
    loss, metrics = run("simpo", long, beta=2.0, gamma=0.5, cpo_alpha=0.5)
    assert metrics["nll"] == pytest.approx(-pol.lp(3), rel=1e-6)
    assert loss.item() == pytest.approx(want - 0.5 * pol.lp(3), rel=1e-6)


# --------------------------------------------------------------------------- shared pieces


def test_sequence_logps_sum_and_mean_over_the_mask():
    lp = torch.tensor([[-1.0, -2.0, -4.0], [-1.0, -3.0, -5.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0], [0.0, 1.0, 0.0]])
    torch.testing.assert_close(sequence_logps(lp, mask), torch.tensor([-6.0, -3.0]))
    torch.testing.assert_close(sequence_logps(lp, mask, average=True), torch.tensor([-3.0, -3.0]))


def test_stack_tokens_pads_the_narrower_side():
    a = build_batch([[1]], [[2, 3, 4]], pad_id=0)
    b = build_batch([[1], [1]], [[5], [6, 7]], pad_id=0)
    s = stack_tokens(a, b)
    assert s.input_ids.tolist() == [[1, 2, 3, 4], [1, 5, 0, 0], [1, 6, 7, 0]]
    assert s.attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]]
    assert s.completion_mask.tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]


# --------------------------------------------------------------------------- configs


@pytest.mark.parametrize("name", ["dpo", "kto", "orpo", "simpo"])
def test_preference_config_without_pairs_fails_naming_the_field(name):
    with pytest.raises(ValueError, match=rf"algorithm_config\.{name}\.pairs"):
        TrialSpec(algorithm=name)
    spec = TrialSpec(algorithm=name, algorithm_config={name: {"pairs": "best_vs_worst"}})
    assert spec.algo_config.pairs == "best_vs_worst"
    assert get_algorithm(name).source == "pairs"


def test_unknown_dpo_loss_type_and_pair_source_are_rejected_by_name():
    with pytest.raises(ValueError, match=r"algorithm_config\.dpo\.loss_type"):
        TrialSpec(algorithm="dpo", algorithm_config={"dpo": {"pairs": "offline", "loss_type": "hinge"}})
    with pytest.raises(ValueError, match=r"algorithm_config\.dpo\.pairs"):
        TrialSpec(algorithm="dpo", algorithm_config={"dpo": {"pairs": "online"}})
    spec = TrialSpec(algorithm="dpo", algorithm_config={"dpo": {"pairs": "offline", "loss_type": "ipo", "beta": 0.5}})
    assert (spec.algo_config.loss_type, spec.algo_config.beta) == ("ipo", 0.5)


def test_reference_is_needed_by_dpo_and_kto_only():
    assert {n: get_algorithm(n).uses_reference for n in ("dpo", "kto", "orpo", "simpo")} == {
        "dpo": True, "kto": True, "orpo": False, "simpo": False,
    }
