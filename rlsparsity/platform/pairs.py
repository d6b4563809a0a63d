"""Preference pairs for the `pairs` algorithms (DPO, KTO, ORPO, SimPO …).

Three sources, named by the algorithm config's ``pairs`` field:

- ``offline``: a preference dataset built from the task: the correct answer is chosen, a
  near-miss (one digit changed) is rejected. Fixed by the seed, independent of the policy.
- ``best_vs_worst``: on-policy. Of the k samples for a prompt, the best-rewarded one is
  chosen and the worst rejected; prompts whose samples all score alike give no pair.
- ``random_negative``: on-policy. A correct sample is chosen against a random incorrect one
  (the paper's positive-vs-random-negative construction).

Completions are token ids; `offline` completions end with EOS, like the policy's own.
"""

from __future__ import annotations

import random

from rlsparsity.platform.algorithms.registry import PairSource
from rlsparsity.platform.tasks import Problem

Pair = tuple[list[int], list[int], list[int]]  # prompt ids, chosen ids, rejected ids


def near_miss(answer: str, rng: random.Random) -> str:
    """`answer` with one digit changed: a wrong answer that looks like a right one."""
    i = rng.randrange(len(answer))
    digit = rng.choice([d for d in "0123456789" if d != answer[i]])
    wrong = answer[:i] + digit + answer[i + 1 :]
    return wrong if len(wrong) == 1 or wrong[0] != "0" else near_miss(answer, rng)


def offline_pairs(problems: list[Problem], encode, eos_id: int, seed: int) -> list[Pair]:
    """One (correct, near-miss) pair per problem; `encode(text)` gives token ids."""
    rng = random.Random(seed)
    return [
        (encode(p.prompt, True), encode(p.answer, False) + [eos_id], encode(near_miss(p.answer, rng), False) + [eos_id])
        for p in problems
    ]


def rollout_pairs(
    prompt_ids: list[list[int]], samples: list[list[list[int]]], rewards: list[list[float]], source: PairSource, seed: int
) -> list[Pair]:
    """Pairs from k scored samples per prompt; prompts without a reward gap give none."""
    if source not in ("best_vs_worst", "random_negative"):
        raise ValueError(f"pairs={source!r} is not an on-policy source (best_vs_worst, random_negative)")
    rng = random.Random(seed)
    out = []
    for prompt, comps, rs in zip(prompt_ids, samples, rewards, strict=True):
        best, worst = max(rs), min(rs)
        if best == worst:
            continue
        if source == "best_vs_worst":
            chosen, rejected = comps[rs.index(best)], comps[rs.index(worst)]
        else:
            chosen = comps[rs.index(best)]
            rejected = rng.choice([c for c, r in zip(comps, rs, strict=True) if r < best])
        out.append((prompt, chosen, rejected))
    return out
