"""The paper's check_sparsity.py arithmetic, written with torch the way the script does it: the
independent reference that ``paper:TOL`` is tested against (it uses no rlsparsity code)."""

from __future__ import annotations

import numpy as np
import torch

# Every finite non-negative bf16 value, +0 up to the largest finite one (bits 0x0000..0x7F7F).
_NONNEG_BF16 = torch.arange(0, 0x7F80, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)


def script_changed(a: torch.Tensor, b: torch.Tensor, tol: float) -> np.ndarray:
    """Flat mask of the script's "changed": both models loaded with torch_dtype=bfloat16 (a
    float32/float16/float64 side is cast with .to(bfloat16)), Δ = θ1 − θ0 in bf16, unchanged
    iff torch.isclose(Δ, 0, atol=tol), rtol and equal_nan at their defaults."""
    a16, b16 = a.reshape(-1).to(torch.bfloat16), b.reshape(-1).to(torch.bfloat16)
    delta = b16 - a16
    return (~torch.isclose(delta, torch.zeros_like(delta), atol=tol)).numpy()


def script_bound(tol: float) -> float:
    """The largest bf16 |Δ| that torch.isclose(Δ, 0, atol=tol) still calls close, found by
    trying every finite non-negative bf16 value."""
    close = torch.isclose(_NONNEG_BF16, torch.zeros_like(_NONNEG_BF16), atol=tol)
    k = int(close.sum())
    assert bool(close[:k].all()), "closeness is monotone in |Δ|"
    return float(_NONNEG_BF16[k - 1])
