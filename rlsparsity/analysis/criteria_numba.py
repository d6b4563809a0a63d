"""The fused numba kernel behind :func:`rlsparsity.analysis.criteria.compare` for bf16 pairs:
counts only, no masks, the same counts as the numpy kernel of
:mod:`rlsparsity.analysis.criteria_kernels` bit for bit (the criteria's definitions are
stated in :mod:`rlsparsity.analysis.criteria`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from rlsparsity.analysis.criteria_kernels import Comparison, paper_key_bound

if TYPE_CHECKING:
    from rlsparsity.analysis.criteria import Criterion

# Elements per pass: each criterion runs over one stretch while it is in L1/L2.
_NB_STRETCH = 1 << 14
_u16_to_f32: Any = None  # bf16 bits -> float32 (16-bit shift + bitcast), set before compiling
_f32_to_u32: Any = None  # float32 -> its bits (bitcast), set before compiling


def _bf16_counts(a, b, thr_abs, thr_rel, thr_paper, counts):  # pragma: no cover - compiled by numba
    """counts[0] += bits differ; counts[1 + k] += abs:thr_abs[k]; counts[1 + K + k] +=
    rel:thr_rel[k]; counts[1 + K + R + k] += paper with key bound thr_paper[k].

    ``a``, ``b``: bf16 bits (uint16). The definitions of the numpy kernel, branch-free so
    that LLVM vectorises them, with no floating-point reassociation (fastmath off):
    Δ = |fb - fa| in float32; abs: changed iff bits differ and not Δ <= thr (so NaN/inf Δ
    gives "bits differ"); rel: changed iff bits differ and (Δ not finite or
    Δ > thr * max(|fa|, |fb|)). paper: with u the bits of Δ, changed iff
    u + bit16(u) > bound, i.e. Δ rounded to nearest-even bf16 exceeds the bf16 tolerance
    (see criteria_kernels.paper_key_bound); NaN/inf Δ always exceed it. abs/rel count only
    where bits differ; paper also counts bit-identical NaN/±inf (their Δ is NaN).
    """
    n = a.shape[0]
    n_abs = thr_abs.shape[0]
    n_rel = thr_rel.shape[0]
    n_paper = thr_paper.shape[0]
    inf = np.float32(np.inf)
    for s in range(0, n, _NB_STRETCH):
        m = min(n - s, _NB_STRETCH)
        x = a[s : s + m]
        y = b[s : s + m]
        c = 0
        for i in range(m):
            c += x[i] != y[i]
        counts[0] += c
        if c == 0:
            # Identical bits: abs/rel count nothing; paper counts NaN/±inf (exponent all ones).
            if n_paper:
                c = 0
                for i in range(m):
                    c += (x[i] & 0x7F80) == 0x7F80
                for k in range(n_paper):
                    counts[1 + n_abs + n_rel + k] += c
            continue
        for k in range(n_abs):
            t = thr_abs[k]
            c = 0
            for i in range(m):
                d = abs(_u16_to_f32(y[i]) - _u16_to_f32(x[i]))
                c += (x[i] != y[i]) & (not (d <= t))
            counts[1 + k] += c
        for k in range(n_rel):
            t = thr_rel[k]
            c = 0
            for i in range(m):
                fa = _u16_to_f32(x[i])
                fb = _u16_to_f32(y[i])
                d = abs(fb - fa)
                r = max(abs(fa), abs(fb)) * t
                c += (x[i] != y[i]) & ((not (d < inf)) | (d > r))
            counts[1 + n_abs + k] += c
        for k in range(n_paper):
            t = thr_paper[k]
            c = 0
            for i in range(m):
                u = np.int64(_f32_to_u32(abs(_u16_to_f32(y[i]) - _u16_to_f32(x[i]))))
                c += (u + ((u >> 16) & 1)) > t
            counts[1 + n_abs + n_rel + k] += c


def _build_numba_kernel() -> Any:
    global _u16_to_f32, _f32_to_u32
    from rlsparsity.numba_jit import bitcasts, njit

    _u16_to_f32, _f32_to_u32 = bitcasts()
    kern = njit(_bf16_counts)
    z16 = np.zeros(2, dtype=np.uint16)
    kern(z16, z16, np.zeros(1, np.float32), np.zeros(1, np.float32), np.zeros(1, np.int64), np.zeros(4, np.int64))
    return kern


def numba_kernel() -> Any:
    """The compiled :func:`_bf16_counts`, or None (numba missing, disabled, or failing)."""
    from rlsparsity.numba_jit import compiled

    return compiled("bf16 diff", _build_numba_kernel)


def compare_numba(kern: Any, ra: np.ndarray, rb: np.ndarray, criteria: list[Criterion]) -> Comparison:
    """Counts of a bf16 pair (raw uint16 bits ``ra``, ``rb``) with the compiled kernel ``kern``
    (from :func:`numba_kernel`); no masks."""
    f32 = np.dtype(np.float32)
    idx = {mode: [i for i, c in enumerate(criteria) if c.mode == mode] for mode in ("abs", "rel", "paper")}
    thr = {mode: np.array([criteria[i].threshold(f32) for i in idx[mode]], dtype=np.float32) for mode in ("abs", "rel")}
    thr_paper = np.array([paper_key_bound(criteria[i].threshold(f32)) for i in idx["paper"]], dtype=np.int64)
    out = np.zeros(1 + sum(len(v) for v in idx.values()), dtype=np.int64)
    kern(ra.view(np.uint16), rb.view(np.uint16), thr["abs"], thr["rel"], thr_paper, out)
    counts = [int(out[0]) if c.mode == "bitwise" else 0 for c in criteria]
    slot = 1
    for mode in ("abs", "rel", "paper"):  # the kernel's count layout
        for i in idx[mode]:
            counts[i] = int(out[slot])
            slot += 1
    return Comparison(counts=counts, numel=ra.size, bitwise_dtype="bfloat16", compute_dtype="float32", kernel="numba")
