"""Micro-batching: a minibatch run in row blocks accumulates the gradient of the whole
minibatch's loss, for every registered algorithm, on one process and across two DDP ranks.

The reference is the loss itself on the unsplit batch (each loss is checked against TRL or
by hand elsewhere); the models are float64, so that "the same gradient" can be asserted to
1e-10 rather than to float32's summation noise.
"""

from __future__ import annotations

import copy
import os
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp
from transformers import LlamaConfig, LlamaForCausalLM

from rlsparsity.platform.algorithms import Models, PairBatch, StepBatch, get_algorithm
from rlsparsity.platform.batches import build_batch, token_logprobs
from rlsparsity.platform.config import TrainingSpec
from rlsparsity.platform.micro_batches import accumulate_gradients, split

torch.set_num_threads(1)


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=12, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32, pad_token_id=0)
    return LlamaForCausalLM(cfg).double()


def rollout_batch(seed: int, rows: int = 8, group: int = 2) -> StepBatch:
    """Completions of 1 to 6 tokens (very different lengths, so token and row means differ)."""
    g = torch.Generator().manual_seed(seed)
    prompts = [[1, 2 + i % 3] for i in range(rows)]
    completions = [torch.randint(3, 12, (int(torch.randint(1, 7, (1,), generator=g)),), generator=g).tolist()
                   for _ in range(rows)]
    rewards = torch.randint(0, 2, (rows,), generator=g).double()
    return StepBatch(build_batch(prompts, completions, pad_id=0), rewards=rewards, group_size=group)


def pair_batch(seed: int, pairs: int = 7) -> StepBatch:
    g = torch.Generator().manual_seed(seed)

    def completions() -> list[list[int]]:
        return [torch.randint(3, 12, (int(torch.randint(1, 7, (1,), generator=g)),), generator=g).tolist()
                for _ in range(pairs)]

    prompts = [[1, 2 + i % 4, 3][: 2 + i % 2] for i in range(pairs)]
    return StepBatch(pairs=PairBatch(build_batch(prompts, completions(), 0), build_batch(prompts, completions(), 0)))


CASES = [
    ("grpo", {"loss_type": "grpo"}, 0.0),
    ("grpo", {"loss_type": "bnpo"}, 0.0),
    ("grpo", {"loss_type": "dr_grpo"}, 0.0),
    ("grpo", {"loss_type": "dapo", "scale_rewards": "batch"}, 0.05),
    ("rloo", {"normalize_advantages": True}, 0.05),
    ("ppo", {"critic": {"lr": 1e-4}}, 0.05),
    ("prime", {}, 0.0),
    ("raft", {"reward_threshold": 1.0}, 0.0),
    ("raftpp", {"minibatches": 1}, 0.0),
    ("sft", {}, 0.0),
    ("dpo", {"pairs": "offline"}, 0.0),
    ("dpo", {"pairs": "offline", "loss_type": "ipo"}, 0.0),
    ("kto", {"pairs": "offline"}, 0.0),
    ("orpo", {"pairs": "offline"}, 0.0),
    ("orpo", {"pairs": "offline", "nll_on_prompt": False}, 0.0),
    ("simpo", {"pairs": "offline"}, 0.0),
    ("simpo", {"pairs": "offline", "cpo_alpha": 0.5}, 0.0),
]


def setup_models(name: str, raw: dict, kl_coef: float, micro: int | None, seed: int = 0):
    algo = get_algorithm(name)
    cfg = algo.config.model_validate(raw)
    train = TrainingSpec(kl_coef=kl_coef, samples_per_prompt=2, max_new_tokens=6, micro_batch_size=micro)
    policy = tiny_llama(seed)
    reference = copy.deepcopy(policy).requires_grad_(False)
    aux = {k: a.module.double() for k, a in (algo.aux(policy, cfg, train) if algo.aux else {}).items()}
    return algo, cfg, train, Models(policy, reference, aux)


def prepared_batch(algo, cfg, train, models, batch: StepBatch) -> StepBatch:
    """What the learner hands a minibatch: behaviour log-probs a little off-policy (so the
    ratio and its clip matter) and `prepare` run on the whole batch."""
    with torch.no_grad():
        if batch.tokens is not None:
            logp = token_logprobs(models.policy, batch.tokens)
            batch.old_logps = logp + 0.3 * torch.randn(logp.shape, generator=torch.Generator().manual_seed(5)).double()
        if algo.prepare:
            batch = algo.prepare(models, batch, cfg, train)
    return batch


def grads(models: Models) -> list[torch.Tensor]:
    params = [*models.policy.parameters(), *(p for m in models.aux.values() for p in m.parameters())]
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]


def whole_and_micro(name: str, raw: dict, kl_coef: float, micro: int):
    """(loss, grads) of the unsplit minibatch and of it in micro-batches of `micro` rows."""
    out = []
    for size in (None, micro):
        algo, cfg, train, models = setup_models(name, raw, kl_coef, size)
        source = pair_batch(1) if algo.source == "pairs" else rollout_batch(1)
        batch = prepared_batch(algo, cfg, train, models, source)
        loss, metrics = accumulate_gradients(algo, models, batch, cfg, train)
        out.append((loss, metrics, grads(models), split(batch, algo, cfg, size)))
    return out


@pytest.mark.parametrize(("name", "raw", "kl_coef"), CASES, ids=[f"{n}-{'-'.join(map(str, r.values()))}" for n, r, _ in CASES])
def test_micro_batches_accumulate_the_whole_minibatch_gradient(name, raw, kl_coef):
    (loss, metrics, whole_grads, unsplit), (mloss, mmetrics, micro_grads, parts) = whole_and_micro(name, raw, kl_coef, 3)
    assert unsplit is None and len(parts) >= 3 and len({len(p.batch) for p in parts}) == 2  # uneven blocks
    assert max(g.abs().max().item() for g in whole_grads) > 1e-3  # a real gradient to compare
    torch.testing.assert_close(mloss.double(), loss.double().cpu(), rtol=1e-10, atol=1e-12)
    for w, m in zip(whole_grads, micro_grads, strict=True):
        torch.testing.assert_close(m, w, rtol=1e-9, atol=1e-12)
    assert set(mmetrics) == set(metrics)


@pytest.mark.parametrize(("name", "raw"), [("grpo", {"loss_type": "dapo"}), ("grpo", {"loss_type": "bnpo"}),
                                           ("sft", {}), ("orpo", {"pairs": "offline"})])
def test_equal_weights_per_micro_batch_would_not_give_the_minibatch_gradient(name, raw):
    """The control: averaging micro-batch losses with equal weights (gradient accumulation
    without the losses' units) moves these token-mean losses' gradients well beyond 1e-9."""
    algo, cfg, train, models = setup_models(name, raw, 0.0, None)
    batch = prepared_batch(algo, cfg, train, models, pair_batch(1) if algo.source == "pairs" else rollout_batch(1))
    algo.loss(models, batch, cfg, train)[0].backward()
    reference = grads(models)
    models.policy.zero_grad()
    parts = split(batch, algo, cfg, 3)
    for part in parts:
        unscaled = copy.copy(part.batch)
        unscaled.whole = None  # the loss's own mean over the micro-batch
        (algo.loss(models, unscaled, cfg, train)[0] / len(parts)).backward()
    worst = max(((g - r).abs().max() / r.abs().max()).item() for g, r in zip(grads(models), reference, strict=True))
    assert worst > 1e-3


# ----------------------------------------------------------------------- two DDP ranks (gloo)

WORLD = 2


def _rank_main(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    from rlsparsity.platform.sharding import shard_model

    results = {}
    # dapo: a denominator over both ranks' tokens; dpo: 7 pairs on rank 0, 2 on rank 1, so
    # rank 1 runs padded zero-weight micro-batches to match rank 0's count; FSDP
    # reduce-scatters every micro-batch's gradient into its shards.
    for case, name, raw, batch_of in [
        ("grpo", "grpo", {"loss_type": "dapo"}, lambda: rollout_batch(10 + rank)),
        ("dpo", "dpo", {"pairs": "offline"}, lambda: pair_batch(20 + rank, pairs=7 if rank == 0 else 2)),
        ("fsdp", "grpo", {"loss_type": "dapo"}, lambda: rollout_batch(10 + rank)),
    ]:
        per_size = []
        for micro in (None, 2):
            algo, cfg, train, models = setup_models(name, raw, 0.0, micro)
            policy = models.policy
            models.policy = shard_model(policy, torch.device("cpu")) if case == "fsdp" else DDP(policy)
            batch = prepared_batch(algo, cfg, train, models, batch_of())
            accumulate_gradients(algo, models, batch, cfg, train)
            whole = [g.full_tensor() if hasattr(g, "full_tensor") else g for g in grads(Models(policy))]
            per_size.append(whole)
            parts = split(batch, algo, cfg, micro)
            results[f"{case}_parts"] = torch.tensor([len(parts or []), sum(p.weight == 0 for p in parts or [])])
        results[f"{case}_whole"] = torch.cat([g.flatten() for g in per_size[0]])
        results[f"{case}_micro"] = torch.cat([g.flatten() for g in per_size[1]])
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_ddp_and_fsdp_ranks_accumulate_the_minibatch_gradient(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ranks = mp.spawn(_rank_main, args=(port, str(tmp_path)), nprocs=WORLD, join=False)
    deadline = time.monotonic() + 300  # a collective that never matches fails the test, not CI
    while not ranks.join(timeout=5):
        if time.monotonic() > deadline:
            for process in ranks.processes:
                process.kill()
            pytest.fail("the two ranks did not finish within 300 s (a collective out of step?)")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for name in ("grpo", "dpo", "fsdp"):
        # All-reduced (or gathered from the shards): both ranks hold the same averaged gradient.
        torch.testing.assert_close(ranks[0][f"{name}_whole"], ranks[1][f"{name}_whole"], rtol=0, atol=0)
        torch.testing.assert_close(ranks[0][f"{name}_micro"], ranks[0][f"{name}_whole"], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(ranks[1][f"{name}_micro"], ranks[0][f"{name}_micro"], rtol=0, atol=0)
    assert ranks[0]["grpo_parts"].tolist() == [4, 0] == ranks[1]["grpo_parts"].tolist() == ranks[0]["fsdp_parts"].tolist()
    torch.testing.assert_close(ranks[0]["fsdp_whole"], ranks[0]["grpo_whole"], rtol=1e-9, atol=1e-12)  # FSDP = DDP
    assert ranks[0]["dpo_parts"].tolist() == [4, 0] and ranks[1]["dpo_parts"].tolist() == [4, 2]
