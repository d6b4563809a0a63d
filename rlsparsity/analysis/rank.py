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

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

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


def final_update_rank(
    base_bf16: Callable[[str], Any], named_params: Sequence[tuple[str, Any]], *, max_dim: int | None = DEFAULT_MAX_DIM
) -> RankResult:
    """The update rank of a training run's bf16 view against θ0's (`base_bf16(name)` gives θ0's tensor),
    by the same rule as `update_rank` on two checkpoints."""
    import torch

    result = RankResult(max_dim=max_dim)
    for name, p in named_params:
        reason = skip_reason(name, tuple(p.shape), max_dim)
        if reason:
            result.skipped.append({"name": name, "shape": list(p.shape), "reason": reason})
            continue
        try:
            rank = delta_rank(base_bf16(name), p.detach().to(torch.bfloat16))
        except (ValueError, RuntimeError) as e:
            result.skipped.append({"name": name, "shape": list(p.shape), "reason": str(e)})
            continue
        result.matrices.append(MatrixRank(name, (p.shape[0], p.shape[1]), rank, min(p.shape)))
    return result
