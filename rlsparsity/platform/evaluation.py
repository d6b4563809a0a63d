"""A trial's held-out measurements, before and after training."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from rlsparsity.platform.batches import build_batch, token_logprobs
from rlsparsity.platform.engines import Rollout
from rlsparsity.platform.pairs import rollout_pairs
from rlsparsity.platform.tasks import Problem, answer_correct

Score = Callable[[str, str], float]


def served_accuracy(rollout: Rollout, tok: Any, problems: list[Problem], max_new_tokens: int, score: Score) -> dict[str, float]:
    """Test accuracy of what the rollout engines hold (the bf16 view), greedy decoding:
    `test_accuracy` by the reward (answer, then stop), `test_answer_accuracy` by the answer alone."""
    outs = rollout.generate([p.prompt for p in problems], n=1, temperature=0.0, max_new_tokens=max_new_tokens, seed=0)
    texts = [tok.decode(o[0], skip_special_tokens=True) for o in outs]
    return {
        "test_accuracy": float(np.mean([score(x, p.answer) for x, p in zip(texts, problems, strict=True)])),
        "test_answer_accuracy": float(np.mean([answer_correct(x, p.answer) for x, p in zip(texts, problems, strict=True)])),
    }


def held_out_pairs(rollout: Rollout, tok: Any, problems: list[Problem], max_new_tokens: int, score: Score, n: int = 8) -> list:
    """θ0's own (correct, wrong) sample pairs on test prompts where its k samples disagree:
    the pairs θ0 is unsure about, fixed for the trial."""
    outs = rollout.generate([p.prompt for p in problems], n=n, temperature=1.0, max_new_tokens=max_new_tokens, seed=123)
    rewards = [[score(tok.decode(c, skip_special_tokens=True), p.answer) for c in cs] for cs, p in zip(outs, problems, strict=True)]
    return rollout_pairs([tok(p.prompt)["input_ids"] for p in problems], outs, rewards, "random_negative", seed=0)


def preference_accuracy(policy: torch.nn.Module, tok: Any, pairs: list) -> float:
    """Share of `pairs` where the policy gives the correct sample the higher log-probability:
    the objective preference algorithms train, measured the same way for every algorithm."""
    if not pairs:
        return float("nan")
    prompts = [p for p, _, _ in pairs]
    scores = []
    device = next(policy.parameters()).device
    for side in (1, 2):
        b = build_batch(prompts, [pair[side] for pair in pairs], tok.pad_token_id).to(device)
        with torch.no_grad():
            scores.append((token_logprobs(policy, b) * b.completion_mask).sum(1))
    return (scores[0] > scores[1]).float().mean().item()


def first_last(curve: list[float], window: int = 10) -> tuple[float, float]:
    """The mean over the first and over the last (up to) `window` points of a per-step curve."""
    w = max(1, min(window, len(curve) // 4))
    return float(np.mean(curve[:w])), float(np.mean(curve[-w:]))
