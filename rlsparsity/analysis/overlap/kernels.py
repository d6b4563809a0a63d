"""The kernels: ``popcount(X[i] & X[j])`` for all pairs of rows of an (N, W) uint64 block,
per column segment, and row popcounts. A register-blocked numba kernel (AND and popcount
fused); the numpy kernel is the fallback and the reference."""

from __future__ import annotations

from typing import Any

import numpy as np


def pair_counts(
    X: np.ndarray,
    n_new: int,
    seg: np.ndarray | None = None,
    tmp: np.ndarray | None = None,
    cnt: np.ndarray | None = None,
    *,
    backend: str = "auto",
) -> np.ndarray:
    """The kernel: popcount(X[i] & X[j]) for i < n_new, j >= i, per column segment.

    ``X`` is (N, W) uint64 (a cache-sized block: one 128 KiB chunk per mask); ``seg`` the
    start word of each segment (None: one segment). Returns (S, n_new, N) int64 with
    zeros below the diagonal. ``backend``: "numba" (the register-blocked kernel, see
    :func:`_tile_counts`), "numpy" (the reference), or "auto" (numba when it is
    installed and compiles, else numpy; ``RLSPARSITY_NUMBA=0`` forces numpy).
    """
    kern = _numba_kernels() if backend in ("auto", "numba") else None
    if backend == "numba" and kern is None:
        raise RuntimeError("the numba overlap kernel is not available")
    if kern is None:
        return _pair_counts_numpy(X, n_new, seg, tmp, cnt)
    n, w = X.shape
    npad = -(-n // 4) * 4
    if X.dtype != np.uint64 or not X.flags.c_contiguous or npad != n:
        B = np.zeros((npad, w), dtype=np.uint64)
        B[:n] = X
    else:
        B = X
    return _pair_counts_numba(kern, B, n, n_new, seg, w)


def _pair_counts_numba(
    kern: tuple[Any, Any], B: np.ndarray, n: int, n_new: int, seg: np.ndarray | None, wend: int
) -> np.ndarray:
    """``pair_counts`` on a C-contiguous (N rounded up to 4, width) block; words [seg[0], wend)."""
    seg = np.zeros(1, dtype=np.int64) if seg is None else np.asarray(seg, dtype=np.int64)
    full = np.zeros((len(seg), B.shape[0], B.shape[0]), dtype=np.uint64)
    if n_new > 0 and len(seg):
        kern[0](B, int(n_new), seg, int(wend), full)
    return full[:, :n_new, :n].astype(np.int64) * _upper(n_new, n)


def _upper(n_new: int, n: int) -> np.ndarray:
    return (np.arange(n)[None, :] >= np.arange(n_new)[:, None]).astype(np.int64)


def _pair_counts_numpy(
    X: np.ndarray,
    n_new: int,
    seg: np.ndarray | None = None,
    tmp: np.ndarray | None = None,
    cnt: np.ndarray | None = None,
) -> np.ndarray:
    """numpy reference of :func:`pair_counts`: one AND, one popcount and one row sum per i,
    N numpy calls of (N - i) * W words each, so call overhead is negligible against the
    N^2 W / 2 words (about 0.5 ns per word-pair here)."""
    n, w = X.shape
    tmp = np.empty((n, w), dtype=np.uint64) if tmp is None else tmp
    cnt = np.empty((n, w), dtype=np.uint8) if cnt is None else cnt
    res = np.zeros((1 if seg is None else len(seg), n_new, n), dtype=np.int64)
    for i in range(n_new):
        m = n - i
        np.bitwise_and(X[i], X[i:], out=tmp[:m, :w])
        np.bitwise_count(tmp[:m, :w], out=cnt[:m, :w])
        # uint32 sums are ~5x faster than int64 here and cannot overflow (<= 64 * W).
        if seg is None and w % 512 == 0:
            # uint16 partial sums over 512 words (<= 32768) are faster still.
            part = cnt[:m, :w].reshape(m, w // 512, 512).sum(axis=2, dtype=np.uint16)
            res[0, i, i:] = part.sum(axis=1, dtype=np.int64)
        elif seg is None:
            res[0, i, i:] = cnt[:m, :w].sum(axis=1, dtype=np.uint32)
        else:
            res[:, i, i:] = np.add.reduceat(cnt[:m, :w], seg, axis=1, dtype=np.uint32).T
    return res


def row_popcounts(
    X: np.ndarray, seg: np.ndarray | None = None, *, backend: str = "auto"
) -> np.ndarray:
    """popcount of every row of ``X`` (N, W) uint64 per column segment: (S, N) int64."""
    kern = _numba_kernels() if backend in ("auto", "numba") else None
    if backend == "numba" and kern is None:
        raise RuntimeError("the numba overlap kernel is not available")
    n, w = X.shape
    if kern is not None:
        segs = np.zeros(1, dtype=np.int64) if seg is None else np.asarray(seg, dtype=np.int64)
        out = np.zeros((len(segs), n), dtype=np.uint64)
        if n and len(segs):
            kern[1](np.ascontiguousarray(X, dtype=np.uint64), 0, segs, int(w), out)
        return out.astype(np.int64)
    cnt = np.bitwise_count(X)
    if seg is None:
        return cnt.sum(axis=1, dtype=np.int64)[None, :]
    return np.add.reduceat(cnt, seg, axis=1, dtype=np.int64).T


# The numba kernels. Plain Python source here; compiled by ``_numba_kernels`` on first use
# (numba is imported only then), with the on-disk cache when a cache directory is writable.
# Ray supplies the parallelism, so each kernel is single-threaded (parallel=False).
_STRETCH = 512  # words per stretch: 8 rows x 4 KiB stay in L1 while a 4x4 tile runs over them
_popc64: Any = None  # llvm.ctpop.i64, set by _build_numba_kernels before compiling


def _tile_counts(B, n_new, seg, wend, full):  # pragma: no cover - compiled by numba
    """full[s, i, j] (uint64) += popcount(B[i] & B[j]) over segment s, for 4x4 tiles i0 < n_new, j0 >= i0.

    B: (Np, W) uint64, Np a multiple of 4. Segment s covers words [seg[s], seg[s+1]) (the
    last one up to ``wend``). Each tile reads 8 rows once per stretch and keeps its 16
    sums in registers: AND and popcount fused, no temporaries; LLVM vectorises the word
    loop (vpandq/vpopcntq where the CPU has AVX-512 VPOPCNTDQ). Tiles on the diagonal
    also fill i > j; the caller keeps j >= i.
    """
    npad = B.shape[0]
    nseg = seg.shape[0]
    for s in range(nseg):
        s0 = seg[s]
        s1 = seg[s + 1] if s + 1 < nseg else wend
        o = full[s]
        for kb in range(s0, s1, _STRETCH):
            ke = min(kb + _STRETCH, s1)
            for i0 in range(0, n_new, 4):
                for j0 in range(i0, npad, 4):
                    # Slices starting at kb, indexed from 0: LLVM sees contiguous loads
                    # (an index that may be negative makes it gather instead).
                    a0 = B[i0, kb:ke]
                    a1 = B[i0 + 1, kb:ke]
                    a2 = B[i0 + 2, kb:ke]
                    a3 = B[i0 + 3, kb:ke]
                    b0 = B[j0, kb:ke]
                    b1 = B[j0 + 1, kb:ke]
                    b2 = B[j0 + 2, kb:ke]
                    b3 = B[j0 + 3, kb:ke]
                    c00 = c01 = c02 = c03 = c10 = c11 = c12 = c13 = np.uint64(0)
                    c20 = c21 = c22 = c23 = c30 = c31 = c32 = c33 = np.uint64(0)
                    for k in range(ke - kb):
                        x0, x1, x2, x3 = a0[k], a1[k], a2[k], a3[k]
                        y0, y1, y2, y3 = b0[k], b1[k], b2[k], b3[k]
                        c00 += _popc64(x0 & y0)
                        c01 += _popc64(x0 & y1)
                        c02 += _popc64(x0 & y2)
                        c03 += _popc64(x0 & y3)
                        c10 += _popc64(x1 & y0)
                        c11 += _popc64(x1 & y1)
                        c12 += _popc64(x1 & y2)
                        c13 += _popc64(x1 & y3)
                        c20 += _popc64(x2 & y0)
                        c21 += _popc64(x2 & y1)
                        c22 += _popc64(x2 & y2)
                        c23 += _popc64(x2 & y3)
                        c30 += _popc64(x3 & y0)
                        c31 += _popc64(x3 & y1)
                        c32 += _popc64(x3 & y2)
                        c33 += _popc64(x3 & y3)
                    o[i0, j0] += c00
                    o[i0, j0 + 1] += c01
                    o[i0, j0 + 2] += c02
                    o[i0, j0 + 3] += c03
                    o[i0 + 1, j0] += c10
                    o[i0 + 1, j0 + 1] += c11
                    o[i0 + 1, j0 + 2] += c12
                    o[i0 + 1, j0 + 3] += c13
                    o[i0 + 2, j0] += c20
                    o[i0 + 2, j0 + 1] += c21
                    o[i0 + 2, j0 + 2] += c22
                    o[i0 + 2, j0 + 3] += c23
                    o[i0 + 3, j0] += c30
                    o[i0 + 3, j0 + 1] += c31
                    o[i0 + 3, j0 + 2] += c32
                    o[i0 + 3, j0 + 3] += c33


def _row_counts(B, r0, seg, wend, out):  # pragma: no cover - compiled by numba
    """out[s, r - r0] (uint64) = popcount of row r >= r0 of B over segment s (as in _tile_counts)."""
    nseg = seg.shape[0]
    for s in range(nseg):
        s0 = seg[s]
        s1 = seg[s + 1] if s + 1 < nseg else wend
        for r in range(r0, B.shape[0]):
            row = B[r, s0:s1]
            c = np.uint64(0)
            for k in range(s1 - s0):
                c += _popc64(row[k])
            out[s, r - r0] = c


def _build_numba_kernels() -> tuple[Any, Any]:
    global _popc64
    from numba import types
    from numba.extending import intrinsic

    from rlsparsity.numba_jit import njit

    @intrinsic
    def popc64(typingctx, x):  # noqa: ARG001
        def codegen(context, builder, signature, args):  # noqa: ARG001
            return builder.ctpop(args[0])

        return types.uint64(types.uint64), codegen

    _popc64 = popc64
    kerns = tuple(njit(f) for f in (_tile_counts, _row_counts))
    X = np.zeros((4, 8), dtype=np.uint64)
    seg = np.zeros(1, dtype=np.int64)
    kerns[0](X, 1, seg, 8, np.zeros((1, 4, 4), dtype=np.uint64))
    kerns[1](X, 1, seg, 8, np.zeros((1, 3), dtype=np.uint64))
    return kerns


def _numba_kernels() -> tuple[Any, Any] | None:
    """The compiled (tile_counts, row_counts), or None (numba missing, disabled, or failing to compile)."""
    from rlsparsity.numba_jit import compiled

    return compiled("overlap", _build_numba_kernels)
