"""Update rank of a checkpoint pair, the paper's Table 2 method.

For every 2-D matrix (1-D tensors and keys containing "norm" skipped), the rank of
Δ = θ1 − θ0 computed in float32 from the stored values, with ``torch.linalg.matrix_rank``'s
default tolerance (σ_max · max(m, n) · eps(float32)), as a fraction of min(shape). The
result lists every matrix and the unweighted mean of the fractions.

Differences from the paper's script, both deliberate: it subtracts in bf16 and then casts
Δ to float32 (rounding Δ first), and it skips only keys containing "layernorm" (RMSNorm
weights named ``norm.weight`` are 1-D anyway). Matrices whose larger side exceeds
``max_dim`` are skipped and listed, because an SVD of a vocabulary matrix takes minutes
and gigabytes. Memory: one float32 Δ (plus the SVD workspace) per worker.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from rlsparsity.analysis.checkpoints import Reader, TensorInfo
from rlsparsity.analysis.parallel import bounded_map

DEFAULT_MAX_DIM = 32768


@dataclass
class MatrixRank:
    name: str
    shape: tuple[int, int]
    rank: int
    max_rank: int

    @property
    def fraction(self) -> float:
        return self.rank / self.max_rank if self.max_rank else 0.0


@dataclass
class RankResult:
    matrices: list[MatrixRank] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)  # name, shape, reason
    max_dim: int | None = DEFAULT_MAX_DIM

    @property
    def mean(self) -> float | None:
        """Mean of rank / min(shape) over the ranked matrices (None if there are none)."""
        if not self.matrices:
            return None
        return sum(m.fraction for m in self.matrices) / len(self.matrices)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": "matrix_rank(float32 delta, default tol) / min(shape); 1-D and *norm* skipped",
            "max_dim": self.max_dim,
            "mean": self.mean,
            "matrices": [{**asdict(m), "shape": list(m.shape), "fraction": m.fraction} for m in self.matrices],
            "skipped": self.skipped,
        }


def skip_reason(name: str, shape: Sequence[int], max_dim: int | None) -> str | None:
    """Why a tensor gets no rank (None: it is ranked)."""
    if len(shape) != 2:
        return f"{len(shape)}-D, not a matrix"
    if "norm" in name.lower():
        return "normalisation weight"
    if max_dim and max(shape) > max_dim:
        return f"larger side {max(shape)} > --rank-max-dim {max_dim}"
    return None


def delta_rank(a: Any, b: Any) -> int:
    """Rank of b − a (torch tensors) computed in float32 (default matrix_rank tolerance)."""
    import torch

    d = b.to(torch.float32) - a.to(torch.float32)
    if not torch.isfinite(d).all():
        raise ValueError("Δ has non-finite values")
    if not d.any():
        return 0
    return int(torch.linalg.matrix_rank(d))


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


def final_update_rank(
    base_bf16: dict[str, Any], named_params: Sequence[tuple[str, Any]], *, max_dim: int | None = DEFAULT_MAX_DIM
) -> RankResult:
    """The update rank of a training run's bf16 view against θ0's (torch tensors in memory),
    by the same rule as `update_rank` on two checkpoints."""
    import torch

    result = RankResult(max_dim=max_dim)
    for name, p in named_params:
        reason = skip_reason(name, tuple(p.shape), max_dim)
        if reason:
            result.skipped.append({"name": name, "shape": list(p.shape), "reason": reason})
            continue
        try:
            rank = delta_rank(base_bf16[name], p.detach().to(torch.bfloat16))
        except (ValueError, RuntimeError) as e:
            result.skipped.append({"name": name, "shape": list(p.shape), "reason": str(e)})
            continue
        result.matrices.append(MatrixRank(name, (p.shape[0], p.shape[1]), rank, min(p.shape)))
    return result
