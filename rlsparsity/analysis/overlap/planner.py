"""Sizing the work: contiguous row ranges for the tasks from measured per-core rates, and the
masks that go first in the stack (a cover of the pairs still to compute)."""

from __future__ import annotations

import math

import numpy as np

# Per-core rates measured on the reference 2-core machine (see benchmarks/BENCHMARKS.md);
# only used to size tasks, so being off by 2x costs a little balance, not correctness.
PAIR_WORDS_PER_S = 1.6e9  # AND + popcount + sum, uint64 words of one pair (numpy kernel)
PAIR_WORDS_PER_S_NUMBA = 1.5e10  # the same, numba kernel (AVX-512 VPOPCNTDQ: ~3e10)
HASH_BYTES_PER_S = 1.4e9  # BLAKE2b
COPY_BYTES_PER_S = 8e9  # mmap -> stacked block
TASK_TARGET_S = 1.0  # long enough to hide ~ms of Ray overhead, short enough to balance


def plan_ranges(
    row_words: np.ndarray, n: int, n_new: int, n_verify: int, workers: int
) -> list[tuple[int, int]]:
    """Contiguous row ranges of about TASK_TARGET_S each, at least 4 per worker when there is enough work.

    Cost of a row = its words * (pairs / pair rate + 8 * (hashed masks / hash rate + N / copy rate)).
    """
    rows = len(row_words)
    if rows == 0:
        return []
    pairs = n_new * (n_new + 1) / 2 + n_new * (n - n_new)
    per_word = pairs / _pair_rate() + 8 * n_verify / HASH_BYTES_PER_S + 8 * n / COPY_BYTES_PER_S
    cost = row_words.astype(np.float64) * per_word + 2e-6 * n  # + per-row numpy overhead
    total = float(cost.sum())
    n_tasks = max(
        math.ceil(total / TASK_TARGET_S), 4 * workers if total > 0.05 * workers else workers
    )
    n_tasks = max(1, min(n_tasks, rows))
    cum = np.cumsum(cost)
    cuts = np.searchsorted(cum, total * np.arange(1, n_tasks) / n_tasks, side="left") + 1
    bounds = [0, *sorted({int(c) for c in cuts if 0 < c < rows}), rows]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def _pair_rate() -> float:
    """Planning rate of the kernel the tasks will run, without importing numba here."""
    import importlib.util

    from rlsparsity.numba_jit import known_unavailable

    if known_unavailable("overlap"):
        return PAIR_WORDS_PER_S
    return PAIR_WORDS_PER_S_NUMBA if importlib.util.find_spec("numba") else PAIR_WORDS_PER_S


def _pair_cover(n: int, missing: set[tuple[int, int]]) -> list[int]:
    """A small set of masks touching every missing pair (greedy vertex cover)."""
    missing = set(missing)
    cover: list[int] = []
    while missing:
        deg = np.zeros(n, dtype=np.int64)
        for i, j in missing:
            deg[i] += 1
            deg[j] += 1
        k = int(deg.argmax())
        cover.append(k)
        missing = {p for p in missing if k not in p}
    return cover
