"""The update rank of two checkpoints (`rlsparsity diff --rank`), matrices in parallel on
threads or Ray tasks, by the rule of `rlsparsity.analysis.rank`."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from rlsparsity.analysis.checkpoints import Reader, TensorInfo
from rlsparsity.analysis.parallel import bounded_map
from rlsparsity.analysis.rank import (
    DEFAULT_MAX_DIM,
    MatrixRank,
    RankResult,
    delta_rank,
    skip_reason,
)


def _rank_one(name: str, a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """One matrix; JSON-able in and out so it can also run as a Ray task."""
    ia, ib = TensorInfo.from_dict(a), TensorInfo.from_dict(b)
    with Reader() as r:
        ta = r.read(ia, 0, ia.numel).reshape(ia.shape)
        tb = r.read(ib, 0, ib.numel).reshape(ib.shape)
        try:
            return {"name": name, "rank": delta_rank(ta, tb)}
        except (ValueError, RuntimeError) as e:
            return {"name": name, "error": str(e)}


def update_rank(
    pairs: Sequence[tuple[str, TensorInfo, TensorInfo]],
    *,
    max_dim: int | None = DEFAULT_MAX_DIM,
    workers: int | None = None,
    use_ray: bool = False,
) -> RankResult:
    """Update rank of every eligible matrix in ``pairs`` (name, base info, target info),
    parallel across matrices (threads, or Ray tasks with ``use_ray``)."""
    result = RankResult(max_dim=max_dim)
    todo = []
    for name, a, b in pairs:
        reason = skip_reason(name, a.shape, max_dim)
        if reason:
            result.skipped.append({"name": name, "shape": list(a.shape), "reason": reason})
        else:
            todo.append((name, a, b))
    shapes = {name: a.shape for name, a, _ in todo}
    args = [(name, a.to_dict(), b.to_dict()) for name, a, b in todo]
    if use_ray:
        import ray

        remote = ray.remote(num_cpus=1)(_rank_one)
        outs = ray.get([remote.remote(*x) for x in args])
    else:
        import torch

        workers = workers or len(os.sched_getaffinity(0))
        threads = torch.get_num_threads()
        # One LAPACK thread per matrix, matrices in parallel: no oversubscription.
        torch.set_num_threads(1 if workers > 1 else threads)
        try:
            # Every matrix in flight at once, as before: results are small, and SVD times
            # differ widely (k_proj vs up_proj), so a short window would idle threads.
            outs = list(bounded_map(lambda x: _rank_one(*x), args, workers, len(args), name="rlsparsity-rank"))
        finally:
            torch.set_num_threads(threads)
    for out in outs:
        shape = shapes[out["name"]]
        if "error" in out:
            result.skipped.append({"name": out["name"], "shape": list(shape), "reason": out["error"]})
        else:
            result.matrices.append(MatrixRank(out["name"], (shape[0], shape[1]), out["rank"], min(shape)))
    return result
