"""GRPO, RLOO, PPO, PRIME and RAFT against hand-derived values on tiny batches."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rlsparsity.platform.algorithms import Models, StepBatch, common, get_algorithm
from rlsparsity.platform.algorithms import policy_gradient as pg
from rlsparsity.platform.algorithms import ppo_prime as pp
from rlsparsity.platform.algorithms.supervised import RAFTConfig, RAFTPlusPlusConfig
from rlsparsity.platform.batches import build_batch, token_logprobs
from rlsparsity.platform.config import TrainingSpec
from rlsparsity.platform.trial_spec import TrialSpec

torch.set_num_threads(1)
V = 5


class Unigram(torch.nn.Module):
    """Logits depend only on a learned vector: log-probs are easy to derive by hand."""

    def __init__(self, w: torch.Tensor | None = None) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.linspace(-1, 1, V) if w is None else w.clone())

    def forward(self, input_ids, attention_mask=None):
        return type("Out", (), {"logits": self.w.expand(*input_ids.shape, -1)})()

    def logp(self) -> torch.Tensor:
        return torch.log_softmax(self.w.detach(), 0)


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=12, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32, pad_token_id=0)
    return LlamaForCausalLM(cfg)


# --------------------------------------------------------------------------- GAE


def gae_loop(rewards: list[float], values: list[float], gamma: float, lam: float) -> tuple[list[float], list[float]]:
    """Textbook GAE over one episode (V = 0 after its end), written as a plain Python loop."""
    n = len(rewards)
    adv = [0.0] * n
    for t in range(n):
        a = 0.0
        for k in range(t, n):
            next_v = values[k + 1] if k + 1 < n else 0.0
            delta = rewards[k] + gamma * next_v - values[k]
            a += (gamma * lam) ** (k - t) * delta
        adv[t] = a
    return adv, [a + v for a, v in zip(adv, values, strict=True)]


@pytest.mark.parametrize(("gamma", "lam"), [(1.0, 1.0), (1.0, 0.95), (0.9, 0.8), (0.5, 0.0)])
def test_gae_matches_a_direct_loop_on_variable_lengths(gamma, lam):
    batch = build_batch([[1, 2], [1], [1, 2, 3]], [[4, 4, 4], [4], [4, 4]], pad_id=0)
    mask = batch.completion_mask
    g = torch.Generator().manual_seed(0)
    rewards = torch.randn(mask.shape, generator=g) * mask
    values = torch.randn(mask.shape, generator=g)  # garbage off-mask must not leak in
    adv, ret = pp.gae(rewards, values, mask, gamma, lam)
    for b in range(3):
        idx = mask[b].nonzero().squeeze(1).tolist()
        want_adv, want_ret = gae_loop(rewards[b, idx].tolist(), values[b, idx].tolist(), gamma, lam)
        torch.testing.assert_close(adv[b, idx], torch.tensor(want_adv))
        torch.testing.assert_close(ret[b, idx], torch.tensor(want_ret))
        off = mask[b] == 0
        assert (adv[b, off] == 0).all() and (ret[b, off] == 0).all()


def test_ppo_token_rewards_put_the_outcome_on_the_last_token_minus_kl():
    batch = build_batch([[1], [1, 2]], [[3, 3, 3], [3]], pad_id=0)
    mask = batch.completion_mask  # row 0: positions 0..2, row 1: position 1
    kl = torch.full(mask.shape, 0.5)
    r = pp.token_rewards(torch.tensor([1.0, 2.0]), mask, kl, kl_coef=0.1)
    torch.testing.assert_close(r, torch.tensor([[-0.05, -0.05, 0.95], [0.0, 1.95, 0.0]]))


# --------------------------------------------------------------------------- PPO objectives


@pytest.mark.parametrize("adv", [2.0, -2.0])
def test_clipped_surrogate_inside_at_and_beyond_the_range(adv):
    eps = 0.2
    # inside, just inside and just beyond each bound, far beyond each bound
    ratios = torch.tensor([1.0, 1.19, 1.21, 1.5, 0.81, 0.79, 0.5])
    logp = torch.log(ratios).requires_grad_(True)
    loss, ratio, clipped = common.clipped_surrogate(logp, torch.zeros(7), torch.tensor(adv), eps, eps)
    # −min(ρA, clip(ρ)A): with A > 0 the clip binds above 1+ε, with A < 0 below 1−ε.
    want = [-min(r * adv, min(max(r, 1 - eps), 1 + eps) * adv) for r in ratios.tolist()]
    torch.testing.assert_close(loss, torch.tensor(want))
    loss.sum().backward()
    # d(−ρA)/d log ρ = −ρA where the unclipped branch is active, 0 where the clip binds.
    active = [not ((r > 1 + eps and adv > 0) or (r < 1 - eps and adv < 0)) for r in ratios.tolist()]
    want_grad = [-r * adv if a else 0.0 for r, a in zip(ratios.tolist(), active, strict=True)]
    torch.testing.assert_close(logp.grad, torch.tensor(want_grad))
    assert clipped.tolist() == [not a for a in active]
    # at the bound itself both branches give the same value: the objective is continuous
    at, _, _ = common.clipped_surrogate(torch.log(torch.tensor([1.2, 0.8])), torch.zeros(2), torch.tensor(adv), eps, eps)
    torch.testing.assert_close(at, torch.tensor([-1.2 * adv, -0.8 * adv]))


def test_clipped_surrogate_clip_higher_uses_separate_bounds():
    loss, _, clipped = common.clipped_surrogate(torch.log(torch.tensor([1.25, 0.75])), torch.zeros(2),
                                            torch.tensor([1.0, -1.0]), 0.2, 0.28)
    torch.testing.assert_close(loss, torch.tensor([-1.25, 0.8]))  # 1.25 < 1.28 unclipped; 0.75 → 0.8
    assert clipped.tolist() == [False, True]


def test_value_loss_clips_around_the_rollout_values():
    mask = torch.ones(1, 3)
    old = torch.tensor([[0.0, 0.0, 0.0]])
    ret = torch.tensor([[1.0, 1.0, -1.0]])
    new = torch.tensor([[0.5, 0.1, 0.5]], requires_grad=True)
    loss = pp.value_loss(new, old, ret, mask, clip=0.2)
    # per token max((v−R)², (clip(v)−R)²): (0.25, 0.64)→0.64; (0.81, 0.81)→0.81; (2.25, 1.44)→2.25
    assert loss.item() == pytest.approx(0.5 * (0.64 + 0.81 + 2.25) / 3)
    loss.backward()
    # token 0: the clipped term wins → no gradient; tokens 1, 2: (v − R)/3
    torch.testing.assert_close(new.grad, torch.tensor([[0.0, (0.1 - 1.0) / 3, (0.5 + 1.0) / 3]]))


def test_ppo_step_trains_policy_and_a_separate_zero_initialised_critic():
    policy = tiny_llama()
    cfg = pp.PPOConfig(critic=pp.CriticConfig(lr=1e-5), epochs=2)
    aux = get_algorithm("ppo").aux(policy, cfg, TrainingSpec())
    critic = aux["critic"].module
    assert aux["critic"].lr == 1e-5
    assert all(p.data_ptr() != q.data_ptr() for p in critic.parameters() for q in policy.parameters())
    batch = StepBatch(build_batch([[1, 2], [1, 3]], [[4, 5, 2], [6]], pad_id=0), rewards=torch.tensor([1.0, 0.0]))
    models = Models(policy, aux={"critic": critic})
    with torch.no_grad():
        prepared = pp.ppo_prepare(models, batch, cfg, TrainingSpec())
    assert (prepared.extras["values"] == 0).all()  # fresh head: V ≡ 0
    mask = batch.tokens.completion_mask
    want_adv, _ = pp.gae(pp.token_rewards(batch.rewards, mask), torch.zeros_like(mask), mask, 1.0, 0.95)
    torch.testing.assert_close(prepared.extras["advantages"], common.masked_whiten(want_adv, mask))
    loss, m = get_algorithm("ppo").loss(models, prepared, cfg, TrainingSpec())
    loss.backward()
    assert critic.head.weight.grad.abs().sum() > 0
    assert policy.model.embed_tokens.weight.grad.abs().sum() > 0
    assert m["vf_loss"] > 0


def test_ppo_without_a_critic_section_fails_validation():
    with pytest.raises(ValueError, match=r"algorithm_config\.ppo\.critic"):
        TrialSpec(algorithm="ppo")
    with pytest.raises(ValueError, match=r"algorithm_config\.ppo\.critic\.lr"):
        TrialSpec(algorithm="ppo", algorithm_config={"ppo": {"critic": {}}})
    spec = TrialSpec(algorithm="ppo", algorithm_config={"ppo": {"critic": {"lr": 1e-5}}})
    assert spec.algo_config.critic.lr == 1e-5


def test_unknown_grpo_loss_type_fails_naming_the_field():
    with pytest.raises(ValueError, match=r"algorithm_config\.grpo\.loss_type"):
        TrialSpec(algorithm="grpo", algorithm_config={"grpo": {"loss_type": "sapo"}})
    spec = TrialSpec(algorithm="grpo", algorithm_config={"grpo": {"loss_type": "dr_grpo", "scale_rewards": False}})
    assert spec.algo_config.scale_rewards == "none"


# --------------------------------------------------------------------------- GRPO aggregation


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_grpo_loss_type_aggregation_by_hand(loss_type):
    # Off-policy with ratios inside the clip range: per-token loss is −ρ_t A_i.
    model = Unigram()
    tokens = build_batch([[0, 1], [0, 1]], [[2, 3], [4]], pad_id=0)
    lp = model.logp()
    shift = torch.tensor([[0.0, 0.1, -0.05], [0.0, 0.12, 0.0]])  # aligned with completion_mask (T-1 = 3)
    logp_tokens = torch.tensor([[0.0, lp[2], lp[3]], [0.0, lp[4], 0.0]])
    old = logp_tokens - shift
    sb = StepBatch(tokens, rewards=torch.tensor([1.0, 0.0]), group_size=2, old_logps=old)
    L = 7
    loss, _ = get_algorithm("grpo").loss(Models(model), sb, pg.GRPOConfig(loss_type=loss_type), TrainingSpec(max_new_tokens=L))
    a = 0.5 / (math.sqrt(0.5) + 1e-4)  # A = ±0.5 / (std + 1e-4), the std of {1, 0} being √½
    row0 = [-math.exp(0.1) * a, -math.exp(-0.05) * a]
    row1 = [math.exp(0.12) * a]
    want = {
        "grpo": (sum(row0) / 2 + sum(row1) / 1) / 2,
        "bnpo": (sum(row0) + sum(row1)) / 3,
        "dr_grpo": (sum(row0) + sum(row1)) / (2 * L),
        "dapo": (sum(row0) + sum(row1)) / 3,
    }[loss_type]
    assert loss.item() == pytest.approx(want, rel=1e-5)


def test_grpo_scale_rewards_options():
    r = torch.tensor([1.0, 0.0, 0.0, 3.0, 1.0, 2.0])
    centred = torch.tensor([2 / 3, -1 / 3, -1 / 3, 1.0, -1.0, 0.0])
    torch.testing.assert_close(pg.group_advantages(r, 3, "none"), centred)
    torch.testing.assert_close(pg.group_advantages(r, 3, "batch"), centred / (r.std() + 1e-4))
    group_std = torch.tensor([math.sqrt(1 / 3)] * 3 + [1.0] * 3)
    torch.testing.assert_close(pg.group_advantages(r, 3, "group"), centred / (group_std + 1e-4))


def test_grpo_kl_term_uses_the_reference():
    model, ref = Unigram(), Unigram(torch.zeros(V))
    tokens = build_batch([[0]], [[2, 3]], pad_id=0)
    sb = StepBatch(tokens, rewards=torch.tensor([1.0]), group_size=1)
    loss, m = get_algorithm("grpo").loss(Models(model, ref), sb, pg.GRPOConfig(), TrainingSpec(kl_coef=0.5))
    lp, lr = model.logp(), torch.log(torch.full((V,), 1 / V))
    k3 = [math.exp(d) - d - 1 for d in ((lr[t] - lp[t]).item() for t in (2, 3))]
    # one sample per group: A = 0, so the loss is the (ratio-1) weighted KL mean
    assert loss.item() == pytest.approx(0.5 * sum(k3) / 2, rel=1e-5)
    assert m["kl"] == pytest.approx(sum(k3) / 2, rel=1e-5)


# --------------------------------------------------------------------------- RLOO


def test_rloo_leave_one_out_baseline_by_hand():
    adv = pg.rloo_advantages(torch.tensor([1.0, 0.0, 0.5, 2.0, 2.0, 2.0]), group_size=3)
    # baselines: (0 + .5)/2 = .25, (1 + .5)/2 = .75, (1 + 0)/2 = .5; second group: constant
    torch.testing.assert_close(adv, torch.tensor([0.75, -0.75, 0.0, 0.0, 0.0, 0.0]))


def test_rloo_loss_is_sequence_level_clipped_and_kl_enters_the_reward():
    model, ref = Unigram(), Unigram(torch.zeros(V))
    tokens = build_batch([[0], [0]], [[2, 3], [4]], pad_id=0)
    sb = StepBatch(tokens, rewards=torch.tensor([1.0, 0.0]), group_size=2)
    train = TrainingSpec(kl_coef=0.1, kl_estimator="k1")
    loss, _ = get_algorithm("rloo").loss(Models(model, ref), sb, pg.RLOOConfig(), train)
    lp, lr = model.logp(), math.log(1 / V)
    kl0, kl1 = (lp[2] - lr) + (lp[3] - lr), lp[4] - lr
    r0, r1 = 1.0 - 0.1 * kl0, 0.0 - 0.1 * kl1
    # on-policy: ratio 1, loss = −mean(A) = −((r0 − r1) + (r1 − r0))/2 = 0, but the value of A matters
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        prepared = pg.rloo_prepare(Models(model, ref), sb, pg.RLOOConfig(), train)
    torch.testing.assert_close(prepared.extras["advantages"], torch.stack([r0 - r1, r1 - r0]).float())


# --------------------------------------------------------------------------- PRIME


def test_prime_token_rewards_are_beta_log_ratio_of_prm_to_reference():
    policy, ref = Unigram(), Unigram(torch.zeros(V))
    prm = Unigram(torch.tensor([0.3, -0.2, 0.5, 0.1, -0.4]))
    tokens = build_batch([[0, 1], [0, 1], [0, 1], [0, 1]], [[2, 3], [4], [3, 3, 2], [1]], pad_id=0)
    sb = StepBatch(tokens, rewards=torch.tensor([1.0, 0.0, 0.0, 1.0]), group_size=2)
    cfg = pp.PRIMEConfig(prm=pp.PRMConfig(beta=0.05))
    with torch.no_grad():
        out = pp.prime_prepare(Models(policy, ref, {"prm": prm}), sb, cfg, TrainingSpec())
    log_ratio = prm.logp() - torch.log(torch.full((V,), 1 / V))
    want = torch.zeros_like(tokens.completion_mask)
    targets = tokens.input_ids[:, 1:]
    for b, t in tokens.completion_mask.nonzero().tolist():
        want[b, t] = 0.05 * log_ratio[targets[b, t]]
    torch.testing.assert_close(out.extras["token_rewards"], want)


def test_prime_leave_one_out_on_dense_and_outcome_rewards_by_hand():
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    r = torch.tensor([[0.2, 0.4, 0.0], [0.3, 0.0, 0.6]]) * mask
    adv = pp.leave_one_out_token_advantages(r, mask, group_size=2)
    # baselines: row 0 ← mean of row 1 = 0.3; row 1 ← mean of row 0 = 0.3
    torch.testing.assert_close(adv, torch.tensor([[-0.1, 0.1, 0.0], [0.0, -0.3, 0.3]]))


def test_prime_step_trains_the_prm_with_outcome_cross_entropy():
    policy = tiny_llama(0)
    cfg = pp.PRIMEConfig(whiten_advantages=False)
    prm = get_algorithm("prime").aux(policy, cfg, TrainingSpec())["prm"].module
    ref = tiny_llama(1).requires_grad_(False)  # a θ0 other than the PRM, so the scores are not 0
    tokens = build_batch([[1, 2], [1, 2]], [[4, 5, 2], [6, 2]], pad_id=0)
    sb = StepBatch(tokens, rewards=torch.tensor([1.0, 0.0]), group_size=2)
    models = Models(policy, ref, {"prm": prm})
    loss, m = get_algorithm("prime").loss(models, sb, cfg, TrainingSpec())
    mask = tokens.completion_mask
    with torch.no_grad():
        score = 0.05 * ((token_logprobs(prm, tokens) - token_logprobs(ref, tokens)) * mask).sum(1)
    want_bce = -(math.log(torch.sigmoid(score[0]).item()) + math.log(1 - torch.sigmoid(score[1]).item())) / 2
    assert m["prm_loss"] == pytest.approx(want_bce, rel=1e-5)
    assert loss.item() == pytest.approx(m["pg_loss"] + want_bce, rel=1e-5)
    loss.backward()
    assert prm.model.embed_tokens.weight.grad.abs().sum() > 0
    assert policy.model.embed_tokens.weight.grad.abs().sum() > 0


# --------------------------------------------------------------------------- RAFT


def test_raft_trains_only_on_correct_samples():
    model = Unigram()
    tokens = build_batch([[0], [0], [0]], [[2, 3], [4], [1, 1]], pad_id=0)
    sb = StepBatch(tokens, rewards=torch.tensor([1.0, 0.0, 1.0]), group_size=3)
    loss, m = get_algorithm("raft").loss(Models(model), sb, RAFTConfig(reward_threshold=1.0), TrainingSpec())
    lp = model.logp()
    assert loss.item() == pytest.approx(-(lp[2] + lp[3] + lp[1] + lp[1]).item() / 4, rel=1e-6)
    assert m["kept_frac"] == pytest.approx(2 / 3)


@pytest.mark.parametrize("name", ["raft", "raftpp"])
def test_raft_with_nothing_correct_is_a_connected_zero(name):
    model = Unigram()
    sb = StepBatch(build_batch([[0], [0]], [[2], [3]], pad_id=0), rewards=torch.tensor([0.0, 0.0]), group_size=2)
    cfg = RAFTPlusPlusConfig() if name == "raftpp" else RAFTConfig()
    loss, m = get_algorithm(name).loss(Models(model), sb, cfg, TrainingSpec())
    assert loss.item() == 0.0 and m["kept_frac"] == 0
    loss.backward()
    assert model.w.grad is not None and (model.w.grad == 0).all()


def test_raft_plus_plus_is_raft_on_policy_and_clips_off_policy():
    tokens = build_batch([[0], [0]], [[2, 3], [4]], pad_id=0)
    rewards = torch.tensor([1.0, 0.0])
    raft, rpp = Unigram(), Unigram()
    get_algorithm("raft").loss(Models(raft), StepBatch(tokens, rewards=rewards), RAFTConfig(), TrainingSpec())[0].backward()
    get_algorithm("raftpp").loss(Models(rpp), StepBatch(tokens, rewards=rewards), RAFTPlusPlusConfig(), TrainingSpec())[0].backward()
    torch.testing.assert_close(rpp.w.grad, raft.w.grad)  # ρ ≡ 1: same gradient as SFT on kept samples
    # Behaviour policy far less likely on token 2 (ρ = e > 1.2): that token is clipped, token 3 is not.
    model = Unigram()
    logp = token_logprobs(model, tokens).detach()
    old = logp.clone()
    old[0, 0] -= 1.0
    loss, m = get_algorithm("raftpp").loss(Models(model), StepBatch(tokens, rewards=rewards, old_logps=old),
                                           RAFTPlusPlusConfig(epsilon=0.2), TrainingSpec())
    assert loss.item() == pytest.approx(-(1.2 + 1.0) / 2, rel=1e-5)
    assert m["clip_frac"] == 0.5
    loss.backward()
    p = torch.softmax(model.w.detach(), 0)
    want = -(torch.nn.functional.one_hot(torch.tensor(3), V).float() - p) / 2  # only token 3's ∇ρ = ∇log π
    torch.testing.assert_close(model.w.grad, want)


# --------------------------------------------------------------------------- a learner-like step


@pytest.mark.parametrize(
    ("name", "raw"),
    [
        ("grpo", {"loss_type": "dr_grpo", "scale_rewards": "batch"}),
        ("rloo", {"normalize_advantages": True}),
        ("ppo", {"critic": {"lr": 1e-4}}),
        ("prime", {}),
        ("raft", {}),
        ("raftpp", {}),
    ],
)
def test_each_algorithm_runs_a_multi_pass_minibatched_step(name, raw):
    """The learner's sequence: aux models, `prepare` under no_grad on the whole batch, then
    epochs × minibatches of (select, loss, backward, step) over every optimizer."""
    algo = get_algorithm(name)
    cfg = algo.config.model_validate({**raw, "epochs": 2, "minibatches": 2})
    train = TrainingSpec(kl_coef=0.05, samples_per_prompt=2, max_new_tokens=4)
    policy = tiny_llama()
    reference = copy.deepcopy(policy).requires_grad_(False)
    aux = algo.aux(policy, cfg, train) if algo.aux else {}
    models = Models(policy, reference, {k: a.module for k, a in aux.items()})
    opts = [torch.optim.AdamW(policy.parameters(), lr=1e-3)] + [
        torch.optim.AdamW(a.module.parameters(), lr=a.lr) for a in aux.values()
    ]
    tokens = build_batch([[1, 2]] * 2 + [[1, 3]] * 2, [[4, 5, 2], [6], [7, 2], [8, 9, 10, 2]], pad_id=0)
    batch = StepBatch(tokens, rewards=torch.tensor([1.0, 0.0, 0.0, 1.0]), group_size=2)
    with torch.no_grad():
        batch.old_logps = token_logprobs(policy, tokens)
        if algo.prepare:
            batch = algo.prepare(models, batch, cfg, train)
    before = [p.detach().clone() for p in policy.parameters()]
    for _ in range(cfg.epochs):
        for rows in (torch.tensor([0, 1]), torch.tensor([2, 3])):
            loss, metrics = algo.loss(models, batch.select(rows), cfg, train)
            assert torch.isfinite(loss) and all(math.isfinite(v) for v in metrics.values())
            for opt in opts:
                opt.zero_grad()
            loss.backward()
            for opt in opts:
                opt.step()
    assert any(not torch.equal(b, p) for b, p in zip(before, policy.parameters(), strict=True))
