"""GRPO and RLOO against TRL 1.16's GRPOTrainer / RLOOTrainer on the same model and batch.

Both sides load one seeded tiny `LlamaForCausalLM` (saved to disk, so TRL builds its own
reference model from it as it does in training) and score the same prompts + completions
(token ids from the project's tokenizer). TRL's side runs its real code path: its
`_generate_and_score_completions` (with generation replaced by the fixed completions and the
reward function returning fixed rewards) computes advantages, reference log-probs and masks;
then its `compute_loss`. Ours runs `prepare` + loss. Losses, advantages and per-parameter
gradients must agree to a relative error below 1e-5.

Prompts all have the same token length: TRL left-pads prompts and our batches are right-padded,
and Llama's position ids do not follow the attention mask, so unequal prompts would give the
two sides different (both legitimate) log-probs rather than test the losses.
"""

from __future__ import annotations

import copy

import pytest
import torch

pytestmark = pytest.mark.trl_parity

trl = pytest.importorskip("trl")

from datasets import Dataset  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from rlsparsity.platform.algorithms import Models, StepBatch, common  # noqa: E402
from rlsparsity.platform.algorithms import policy_gradient as pg  # noqa: E402
from rlsparsity.platform.batches import build_batch  # noqa: E402
from rlsparsity.platform.config import TrainingSpec  # noqa: E402
from rlsparsity.platform.models import build_tokenizer  # noqa: E402

torch.set_num_threads(1)

G = 3  # samples per prompt
PROMPTS = ["12+34=", "56+78="]
COMPLETIONS = ["46<eos>", "4<eos>", "461", "134<eos>", "13<eos>", "9"]
REWARDS = [1.0, 0.0, 0.5, 1.0, 0.0, 0.0]
MAX_COMPLETION = 6
TOL = 1e-5


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tok):
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        tie_word_embeddings=True,
    )
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def _ids(tok):
    prompts = [tok(p)["input_ids"] for p in PROMPTS for _ in range(G)]
    completions = []
    for c in COMPLETIONS:
        text, eos = (c[: -len("<eos>")], True) if c.endswith("<eos>") else (c, False)
        completions.append(tok(text, add_special_tokens=False)["input_ids"] + ([tok.eos_token_id] if eos else []))
    assert len({len(p) for p in prompts}) == 1, "prompts must have equal token length (see module doc)"
    return prompts, completions


def _perturb_(model: torch.nn.Module, seed: int) -> None:
    """Move θ away from θ0 (the reference) so the KL terms are not trivially zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def _trl_inputs(trainer, tok):
    """TRL's training inputs for our fixed batch, through its own scoring code path."""
    prompts, completions = _ids(tok)

    def fixed_generate(prompt_texts):
        texts = [tok.decode(c) for c in completions]
        if isinstance(trainer, trl.GRPOTrainer):
            return prompts, completions, None, texts, None, {}, None, None
        return prompts, completions, texts

    trainer._generate = fixed_generate
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    return trainer._generate_and_score_completions([{"prompt": p} for p in PROMPTS for _ in range(G)])


def _trl_args(config_cls, tmp_path, **kw):
    # TRL's configs default to bf16=True, which autocasts its forward even on CPU: both sides
    # must run in float32 to compare at 1e-5.
    return config_cls(
        output_dir=str(tmp_path), report_to=[], use_cpu=True, bf16=False, save_strategy="no",
        per_device_train_batch_size=len(REWARDS), num_generations=G, max_completion_length=MAX_COMPLETION,
        temperature=1.0, model_init_kwargs={"dtype": torch.float32}, **kw,
    )


def _reward_func(completions, **kwargs):
    return list(REWARDS)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp(min=1e-12)).item()


def _assert_grads_match(ours: torch.nn.Module, theirs: torch.nn.Module) -> float:
    worst = 0.0
    theirs_grads = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        q = theirs_grads[name]
        assert p.grad is not None and q.grad is not None, name
        if q.grad.norm() == 0:
            assert p.grad.norm() == 0, name
            continue
        err = _rel(p.grad, q.grad)
        assert err < TOL, f"{name}: relative gradient error {err:.2e}"
        worst = max(worst, err)
    return worst


def _ours(model_dir, tok, perturb: int | None):
    policy = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    if perturb is not None:
        _perturb_(policy, perturb)
    prompts, completions = _ids(tok)
    tokens = build_batch(prompts, completions, tok.pad_token_id)
    return Models(policy, reference), tokens


def _to_ours(per_completion: torch.Tensor, tokens) -> torch.Tensor:
    """(B, C) completion-aligned values → (B, T-1) aligned with our completion_mask."""
    out = torch.zeros_like(tokens.completion_mask)
    p = tokens.input_ids.shape[1] - per_completion.shape[1]
    out[:, p - 1 :] = per_completion
    return out


@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_grpo_loss_and_gradients_match_trl(tmp_path, model_dir, tok, loss_type, beta):
    args = _trl_args(trl.GRPOConfig, tmp_path, beta=beta, loss_type=loss_type, epsilon=0.2, epsilon_high=0.28)
    trainer = trl.GRPOTrainer(model=str(model_dir), reward_funcs=_reward_func, args=args,
                              train_dataset=Dataset.from_dict({"prompt": PROMPTS}), processing_class=tok)
    _perturb_(trainer.model, seed=1)
    inputs = _trl_inputs(trainer, tok)

    models, tokens = _ours(model_dir, tok, perturb=1)
    cfg = pg.GRPOConfig(loss_type=loss_type, epsilon=0.2, epsilon_high=0.28)
    train = TrainingSpec(kl_coef=beta, kl_estimator="k3", max_new_tokens=MAX_COMPLETION, samples_per_prompt=G)
    batch = StepBatch(tokens, rewards=torch.tensor(REWARDS), group_size=G)
    with torch.no_grad():
        batch = pg.grpo_prepare(models, batch, cfg, train)
    torch.testing.assert_close(batch.extras["advantages"], inputs["advantages"], rtol=TOL, atol=1e-7)
    if beta:
        ref = inputs["ref_per_token_logps"]
        torch.testing.assert_close(batch.extras["ref_logps"] * tokens.completion_mask,
                                   _to_ours(ref * inputs["completion_mask"], tokens), rtol=TOL, atol=1e-6)

    # Off-policy: the behaviour log-probs are the current ones shifted by noise, so the ratio
    # leaves [1−ε, 1+ε_high] on both sides for some tokens (and both clip branches are used).
    with torch.no_grad():
        current = common.logprobs_no_grad(models.policy, tokens)
    noise = 0.4 * torch.randn(current.shape, generator=torch.Generator().manual_seed(2))
    old = current + noise
    p_len = tokens.input_ids.shape[1] - inputs["completion_ids"].shape[1]
    inputs["old_per_token_logps"] = old[:, p_len - 1 :].clone()
    batch.old_logps = old

    ours, metrics = pg.grpo_loss(models, batch, cfg, train)
    theirs = trainer.compute_loss(trainer.model, inputs)
    err = abs(ours.item() - theirs.item()) / abs(theirs.item())
    assert err < TOL, (ours.item(), theirs.item())
    assert 0 < metrics["clip_frac"] < 1
    ours.backward()
    theirs.backward()
    grad_err = _assert_grads_match(models.policy, trainer.model)
    print(f"grpo/{loss_type}/beta={beta}: loss rel err {err:.1e}, worst grad rel err {grad_err:.1e}")


@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none", True, False])
def test_grpo_advantages_match_trl_for_each_reward_scaling(tmp_path, model_dir, tok, scale_rewards):
    args = _trl_args(trl.GRPOConfig, tmp_path, scale_rewards=scale_rewards)
    trainer = trl.GRPOTrainer(model=str(model_dir), reward_funcs=_reward_func, args=args,
                              train_dataset=Dataset.from_dict({"prompt": PROMPTS}), processing_class=tok)
    inputs = _trl_inputs(trainer, tok)
    cfg = pg.GRPOConfig(scale_rewards=scale_rewards)
    ours = pg.group_advantages(torch.tensor(REWARDS), G, cfg.scale_rewards)
    torch.testing.assert_close(ours, inputs["advantages"], rtol=TOL, atol=1e-7)


@pytest.mark.parametrize("beta", [0.0, 0.05])
def test_rloo_loss_and_gradients_match_trl(tmp_path, model_dir, tok, beta):
    args = _trl_args(trl.RLOOConfig, tmp_path, beta=beta, epsilon=0.2, epsilon_high=0.28)
    trainer = trl.RLOOTrainer(model=str(model_dir), reward_funcs=_reward_func, args=args,
                              train_dataset=Dataset.from_dict({"prompt": PROMPTS}), processing_class=tok)
    _perturb_(trainer.model, seed=3)
    inputs = _trl_inputs(trainer, tok)

    models, tokens = _ours(model_dir, tok, perturb=3)
    cfg = pg.RLOOConfig(epsilon=0.2, epsilon_high=0.28)
    # TRL's RLOO measures the KL in the reward with k1 (log π_old − log π_ref).
    train = TrainingSpec(kl_coef=beta, kl_estimator="k1", max_new_tokens=MAX_COMPLETION, samples_per_prompt=G)
    batch = StepBatch(tokens, rewards=torch.tensor(REWARDS), group_size=G)
    with torch.no_grad():
        batch = pg.rloo_prepare(models, batch, cfg, train)
    torch.testing.assert_close(batch.extras["advantages"], inputs["advantages"], rtol=TOL, atol=1e-6)
    mask = tokens.completion_mask
    torch.testing.assert_close((batch.old_logps * mask).sum(1), inputs["old_logps"], rtol=TOL, atol=1e-6)

    # Off-policy pass with the same advantages: shift the behaviour log-probs on both sides.
    noise = 0.15 * torch.randn(batch.old_logps.shape, generator=torch.Generator().manual_seed(4))
    batch.old_logps = batch.old_logps + noise
    inputs["old_logps"] = (batch.old_logps * mask).sum(1)

    ours, metrics = pg.rloo_loss(models, batch, cfg, train)
    theirs = trainer.compute_loss(trainer.model, inputs)
    err = abs(ours.item() - theirs.item()) / abs(theirs.item())
    assert err < TOL, (ours.item(), theirs.item())
    ours.backward()
    theirs.backward()
    grad_err = _assert_grads_match(models.policy, trainer.model)
    print(f"rloo/beta={beta}: loss rel err {err:.1e}, worst grad rel err {grad_err:.1e}")
