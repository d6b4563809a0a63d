"""Preference losses against TRL 1.16's own trainers on one tiny Llama and one batch.

Each test builds TRL's trainer offline (CPU, no reporting), lets it tokenize and collate the
prompt/chosen/rejected strings itself, takes `compute_loss` on that collated batch, and runs
our registered loss on a `PairBatch` made of exactly the token ids TRL used. The token
layouts differ by trainer (TRL's DPO/KTO add EOS; ORPO/CPO add BOS and EOS themselves), which
is why every PairBatch is read back from TRL's batch rather than re-tokenized.

Where TRL's definition is a choice, we match it (parity is the acceptance criterion):

- IPO (DPOTrainer): log-ratios are divided by the completion length before the square.
- KTO: the KL reference point is estimated on TRL's rotated (prompt_i, completion_{i-1})
  batch, under no_grad, averaged over the batch and clamped at 0.
- ORPO: the NLL term is taken over prompt *and* completion tokens of the chosen rows (TRL
  labels every attended token), one token-mean over the batch; the odds ratio uses
  per-token mean log-probs of the completion.
- SimPO (CPOTrainer, loss_type="simpo"): length-normalised log-probs; with cpo_alpha > 0 an
  NLL term over the chosen completions (prompt excluded there, unlike ORPO).
"""

from __future__ import annotations

import warnings

import pytest
import torch

from rlsparsity.platform.algorithms import Models, PairBatch, StepBatch, get_algorithm
from rlsparsity.platform.algorithms.preference import mismatched_completions, stack_tokens
from rlsparsity.platform.batches import TokenBatch
from rlsparsity.platform.config import TrainingSpec
from rlsparsity.platform.models import build_tokenizer

pytestmark = pytest.mark.trl_parity
torch.set_num_threads(1)

datasets = pytest.importorskip("datasets")
pytest.importorskip("trl")

# Chosen longer in some rows, rejected longer in others, prompts of different lengths.
TRIPLES = [
    ("1+1=", "2", "13"),
    ("12*3=", "36", "5"),
    ("7-10=", "-3", "3"),
]
N = len(TRIPLES)
RTOL = 1e-5


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def llama(tok, seed: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=64, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )
    model = LlamaForCausalLM(cfg)
    # Default init gives near-uniform next-token distributions; a larger scale makes the
    # log-probs (and so every reward, margin and KL) clearly non-trivial.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.3)
    return model


def preference_dataset():
    p, c, r = zip(*TRIPLES, strict=True)
    return datasets.Dataset.from_dict({"prompt": list(p), "chosen": list(c), "rejected": list(r)})


def trainer_args(cls, tmp_path, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls(output_dir=str(tmp_path), report_to=[], use_cpu=True, bf16=False, per_device_train_batch_size=N, **kw)


def token_batch(ids: torch.Tensor, attn: torch.Tensor, completion: torch.Tensor) -> TokenBatch:
    """Our TokenBatch from TRL rows; `completion` is TRL's per-input-token mask.

    Trailing all-padding columns are cut, so chosen and rejected come in at different widths
    and our own padding (`stack_tokens`) is exercised too.
    """
    width = int(attn.sum(1).max())
    return TokenBatch(ids[:, :width], attn[:, :width], completion[:, 1:width].float())


def relerr(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return abs(ours.item() - theirs.item()) / abs(theirs.item())


def decoded(tok, batch: TokenBatch) -> list[str]:
    return [tok.decode(ids[attn.bool()]) for ids, attn in zip(batch.input_ids, batch.attention_mask, strict=True)]


def completions(tok, batch: TokenBatch) -> list[str]:
    return [tok.decode(ids[1:][m.bool()]) for ids, m in zip(batch.input_ids, batch.completion_mask, strict=True)]


def our_loss(name: str, policy, ref, pairs: PairBatch, **cfg):
    algo = get_algorithm(name)
    return algo.loss(Models(policy, ref if algo.uses_reference else None), StepBatch(pairs=pairs),
                     algo.config(pairs="offline", **cfg), TrainingSpec())


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_loss_and_gradients_match_trl(tok, tmp_path, loss_type):
    from trl import DPOConfig, DPOTrainer

    policy, ref = llama(tok, 0), llama(tok, 1)
    beta = 0.2
    args = trainer_args(DPOConfig, tmp_path, beta=beta, loss_type=[loss_type])
    tr = DPOTrainer(model=policy, ref_model=ref, args=args, train_dataset=preference_dataset(), processing_class=tok)
    inputs = tr.data_collator([tr.train_dataset[i] for i in range(N)])
    trl_loss = tr.compute_loss(tr.model, inputs)
    trl_loss.backward()
    trl_grads = {n: p.grad.clone() for n, p in policy.named_parameters()}
    policy.zero_grad(set_to_none=True)

    ids, attn, comp = inputs["input_ids"], inputs["attention_mask"], inputs["completion_mask"]
    pairs = PairBatch(token_batch(ids[:N], attn[:N], comp[:N]), token_batch(ids[N:], attn[N:], comp[N:]))
    assert decoded(tok, pairs.chosen) == [f"<bos>{p}{c}<eos>" for p, c, _ in TRIPLES]
    assert completions(tok, pairs.rejected) == [f"{r}<eos>" for _, _, r in TRIPLES]
    assert pairs.chosen.input_ids.shape != pairs.rejected.input_ids.shape  # our padding path runs

    loss, metrics = our_loss("dpo", policy, ref, pairs, beta=beta, loss_type=loss_type)
    print(f"dpo/{loss_type}: ours {loss.item():.8f} trl {trl_loss.item():.8f} rel {relerr(loss, trl_loss):.2e}")
    assert relerr(loss, trl_loss) < RTOL
    loss.backward()
    # Float32 noise (TRL's fused, chunked LM head vs our log_softmax) is ~1e-6 of each
    # parameter's gradient scale; entries that nearly cancel have no meaningful relative
    # error, so the absolute tolerance is a tiny fraction of that parameter's largest entry.
    worst = 0.0
    for n, p in policy.named_parameters():
        scale = trl_grads[n].abs().max().item()
        torch.testing.assert_close(p.grad, trl_grads[n], rtol=RTOL, atol=RTOL * scale,
                                   msg=lambda m, n=n: f"{n}: {m}")
        worst = max(worst, (p.grad - trl_grads[n]).abs().max().item() / scale)
    print(f"dpo/{loss_type}: gradients, worst max|diff| / max|grad| over parameters {worst:.2e}")
    assert any(g.abs().sum() > 0 for g in trl_grads.values())

    trl_metrics = {k: v[-1] for k, v in tr._metrics["train"].items()}
    assert metrics["chosen_reward"] == pytest.approx(trl_metrics["rewards/chosen"], rel=RTOL, abs=1e-7)
    assert metrics["rejected_reward"] == pytest.approx(trl_metrics["rewards/rejected"], rel=RTOL, abs=1e-7)
    assert metrics["reward_margin"] == pytest.approx(trl_metrics["rewards/margins"], rel=RTOL, abs=1e-7)
    assert metrics["preference_accuracy"] == trl_metrics["rewards/accuracies"]


def test_kto_loss_matches_trl(tok, tmp_path):
    from trl import KTOConfig, KTOTrainer

    policy, ref = llama(tok, 0), llama(tok, 2)
    cfg = dict(beta=0.3, desirable_weight=1.3, undesirable_weight=0.7)
    # One TRL batch holds all 2N unpaired rows, so its KL rotation runs over the same rows as ours.
    args = trainer_args(KTOConfig, tmp_path, **cfg)
    args.per_device_train_batch_size = 2 * N
    tr = KTOTrainer(model=policy, ref_model=ref, args=args, train_dataset=preference_dataset(), processing_class=tok)
    inputs = tr.data_collator([tr.train_dataset[i] for i in range(2 * N)])
    assert inputs["label"].tolist() == [True] * N + [False] * N  # TRL's unpairing: chosen rows, then rejected
    trl_loss = tr.compute_loss(tr.model, inputs)

    ids, attn, comp = inputs["input_ids"], inputs["attention_mask"], inputs["completion_mask"]
    pairs = PairBatch(token_batch(ids[:N], attn[:N], comp[:N]), token_batch(ids[N:], attn[N:], comp[N:]))
    assert completions(tok, pairs.chosen) == [f"{c}<eos>" for _, c, _ in TRIPLES]

    # Our mismatched (KL) batch is TRL's, token for token.
    kl = mismatched_completions(stack_tokens(pairs.chosen, pairs.rejected))
    assert torch.equal(kl.input_ids, inputs["KL_input_ids"])
    assert torch.equal(kl.attention_mask, inputs["KL_attention_mask"])
    assert torch.equal(kl.completion_mask, inputs["KL_completion_mask"][:, 1:].float())

    loss, metrics = our_loss("kto", policy, ref, pairs, **cfg)
    trl_kl = tr._metrics["train"]["kl"][-1]
    print(f"kto: ours {loss.item():.8f} trl {trl_loss.item():.8f} rel {relerr(loss, trl_loss):.2e}; kl {trl_kl:.5f}")
    assert trl_kl > 0.05  # the KL term is live (not clamped to 0), so the test covers it
    assert metrics["kl"] == pytest.approx(trl_kl, rel=RTOL)
    assert relerr(loss, trl_loss) < RTOL
    assert metrics["chosen_reward"] == pytest.approx(tr._metrics["train"]["rewards/chosen"][-1], rel=RTOL)
    assert metrics["rejected_reward"] == pytest.approx(tr._metrics["train"]["rewards/rejected"][-1], rel=RTOL)


def pair_batch_from_dpo_collator(inputs: dict) -> PairBatch:
    """ORPO/CPO batches carry `labels` (-100 off the completion) instead of a completion mask."""
    def side(prefix: str) -> TokenBatch:
        labels = inputs[f"{prefix}_labels"]
        return token_batch(inputs[f"{prefix}_input_ids"], inputs[f"{prefix}_attention_mask"], labels != -100)

    return PairBatch(side("chosen"), side("rejected"))


def test_orpo_loss_matches_trl(tok, tmp_path):
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    policy = llama(tok, 0)
    beta = 0.25
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = trainer_args(ORPOConfig, tmp_path, beta=beta, max_length=64)
        tr = ORPOTrainer(model=policy, args=args, train_dataset=preference_dataset(), processing_class=tok)
    inputs = tr.data_collator([tr.train_dataset[i] for i in range(N)])
    trl_loss = tr.compute_loss(tr.model, inputs)

    pairs = pair_batch_from_dpo_collator(inputs)
    assert decoded(tok, pairs.chosen) == [f"<bos>{p}{c}<eos>" for p, c, _ in TRIPLES]
    assert completions(tok, pairs.rejected) == [f"{r}<eos>" for _, _, r in TRIPLES]

    loss, metrics = our_loss("orpo", policy, None, pairs, beta=beta)
    trl_metrics = {k: v[-1] for k, v in tr._stored_metrics["train"].items()}
    print(f"orpo: ours {loss.item():.8f} trl {trl_loss.item():.8f} rel {relerr(loss, trl_loss):.2e}")
    assert relerr(loss, trl_loss) < RTOL
    assert metrics["nll"] == pytest.approx(trl_metrics["nll_loss"], rel=RTOL)
    assert metrics["log_odds_ratio"] == pytest.approx(trl_metrics["log_odds_chosen"], rel=RTOL)
    assert metrics["chosen_reward"] == pytest.approx(trl_metrics["rewards/chosen"], rel=RTOL)
    # Completion-only NLL is our documented departure option; it must change the loss.
    other, _ = our_loss("orpo", policy, None, pairs, beta=beta, nll_on_prompt=False)
    assert relerr(other, trl_loss) > 1e-3


@pytest.mark.parametrize(("cpo_alpha", "label_smoothing"), [(0.0, 0.0), (0.5, 0.1)])
def test_simpo_loss_matches_trl_cpo_simpo(tok, tmp_path, cpo_alpha, label_smoothing):
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    policy = llama(tok, 0)
    beta, gamma = 2.0, 0.6
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = trainer_args(CPOConfig, tmp_path, loss_type="simpo", beta=beta, simpo_gamma=gamma,
                            cpo_alpha=cpo_alpha, label_smoothing=label_smoothing, max_length=64)
        tr = CPOTrainer(model=policy, args=args, train_dataset=preference_dataset(), processing_class=tok)
    inputs = tr.data_collator([tr.train_dataset[i] for i in range(N)])
    trl_loss = tr.compute_loss(tr.model, inputs)

    pairs = pair_batch_from_dpo_collator(inputs)
    assert completions(tok, pairs.chosen) == [f"{c}<eos>" for _, c, _ in TRIPLES]

    loss, metrics = our_loss("simpo", policy, None, pairs, beta=beta, gamma=gamma, cpo_alpha=cpo_alpha,
                             label_smoothing=label_smoothing)
    trl_metrics = {k: v[-1] for k, v in tr._stored_metrics["train"].items()}
    print(f"simpo(a={cpo_alpha}): ours {loss.item():.8f} trl {trl_loss.item():.8f} rel {relerr(loss, trl_loss):.2e}")
    assert relerr(loss, trl_loss) < RTOL
    assert metrics["chosen_reward"] == pytest.approx(trl_metrics["rewards/chosen"], rel=RTOL)
    assert metrics["reward_margin"] == pytest.approx(trl_metrics["rewards/margins"], rel=RTOL)
    if cpo_alpha > 0:
        assert metrics["nll"] == pytest.approx(trl_metrics["nll_loss"], rel=RTOL)
