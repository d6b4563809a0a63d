"""The counting kernels behind :func:`rlsparsity.analysis.criteria.compare`, and the dtype
rules they share.

The criteria's definitions (what ``bitwise``, ``abs:TOL`` and ``rel:TOL`` count, and the
NaN/±0/subnormal rules) are stated in :mod:`rlsparsity.analysis.criteria`; here are three
implementations of them that give the same counts:

- :func:`compare_numpy`: a blocked numpy kernel on CPU data (bf16 is widened to float32 by
  a 16-bit shift, exact), so ``rlsparsity diff`` on bf16/float32 checkpoints never imports
  torch. float16 and float8 are converted with torch (imported on first use; numpy's
  float16 cast is about 10x slower here).
- :func:`compare_numba`: the fused numba kernel for bf16 pairs; counts only, no masks.
- :func:`compare_torch`: whole-tensor torch ops, for tensors on other devices.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from rlsparsity.analysis.criteria import Criterion

# Elements per inner block: the float32 temporaries of one block (2 MiB each) stay in the
# caches, and the per-op Python overhead (a few µs) stays small next to the work. Measured
# here: 64K 5.7, 256K 6.2, 512K 6.4, 1M 6.4 GB/s of bf16 input per core (bitwise+abs).
BLOCK_ELEMS = 1 << 19

# Storage of each dtype (torch's names) as numpy sees it. bf16 and fp8 have no numpy type
# and travel as their raw bits.
STORAGE: dict[str, np.dtype] = {
    "bool": np.dtype(np.uint8), "uint8": np.dtype(np.uint8), "int8": np.dtype(np.int8),
    "int16": np.dtype(np.int16), "uint16": np.dtype(np.uint16), "int32": np.dtype(np.int32),
    "uint32": np.dtype(np.uint32), "int64": np.dtype(np.int64), "uint64": np.dtype(np.uint64),
    "float16": np.dtype(np.float16), "bfloat16": np.dtype(np.uint16), "float32": np.dtype(np.float32),
    "float64": np.dtype(np.float64), "float8_e4m3fn": np.dtype(np.uint8), "float8_e5m2": np.dtype(np.uint8),
    "float8_e8m0fnu": np.dtype(np.uint8),
}
_UINT = {1: np.dtype(np.uint8), 2: np.dtype(np.uint16), 4: np.dtype(np.uint32), 8: np.dtype(np.uint64)}
_WIDE = {"float64", "int32", "int64", "uint32", "uint64"}
# Conversions numpy does slowly (float16, ~10x slower than torch here) or not at all (fp8).
TORCH_CONVERTED = {"float16", "float8_e4m3fn", "float8_e5m2", "float8_e8m0fnu"}


# ----------------------------------------------------------------------------- dtypes, result


@dataclass
class Comparison:
    """Result of a comparison: per-criterion counts, in the order of the criteria given."""

    counts: list[int]
    numel: int
    bitwise_dtype: str  # dtype whose bits were compared
    compute_dtype: str  # dtype of Δ for abs/rel
    masks: dict[int, np.ndarray] = field(default_factory=dict)  # criterion index -> mask


def dtype_name(dtype: Any) -> str:
    """``torch.bfloat16`` / ``np.float32`` / ``"bfloat16"`` -> ``"bfloat16"`` / ``"float32"``."""
    name = str(dtype).removeprefix("torch.")
    return {"bool_": "bool", "float": "float32", "double": "float64", "half": "float16"}.get(name, name)


def common_dtypes(a: Any, b: Any) -> tuple[str, str]:
    """(dtype whose bits ``bitwise`` compares, dtype Δ is computed in) for a pair of dtypes.

    Δ is float32, or float64 when either side is float64 or a 32/64-bit integer. Equal
    dtypes compare their own bits; different dtypes are both cast to the compute dtype
    (exact for every float pair) and compared there.
    """
    a, b = dtype_name(a), dtype_name(b)
    for x in (a, b):
        if x not in STORAGE:
            raise TypeError(f"dtype {x} is not supported (complex or unknown)")
    compute = "float64" if (a in _WIDE or b in _WIDE) else "float32"
    return (a if a == b else compute), compute


_torch_mod = None


def _torch() -> Any:
    """torch, imported on first use: the CPU kernel itself needs only numpy."""
    global _torch_mod
    if _torch_mod is None:
        import torch

        _torch_mod = torch
    return _torch_mod


class _Workspace(threading.local):
    """Per-thread scratch buffers, reused across calls: a fresh multi-MiB allocation per
    call costs page faults comparable to the arithmetic itself."""

    def __init__(self) -> None:
        self.bufs: dict[tuple[str, str], np.ndarray] = {}

    def get(self, slot: str, dtype: np.dtype | str, n: int) -> np.ndarray:
        dt = np.dtype(dtype)
        buf = self.bufs.get((slot, dt.str))
        if buf is None or buf.size < n:
            buf = np.empty(max(n, BLOCK_ELEMS), dtype=dt)
            self.bufs[(slot, dt.str)] = buf
        return buf[:n]


_ws = _Workspace()


def is_torch(x: Any) -> bool:
    """Whether ``x`` is a torch tensor (without importing torch)."""
    mod = sys.modules.get("torch")
    return mod is not None and isinstance(x, mod.Tensor)


def as_raw(x: Any, dtype: str | None) -> tuple[np.ndarray, str]:
    """A flat numpy array of ``x``'s storage (raw bits for bf16/fp8) and its dtype name."""
    if is_torch(x):
        name = dtype_name(x.dtype)
        if name not in STORAGE:
            raise TypeError(f"dtype {name} is not supported (complex or unknown)")
        t = x.detach().reshape(-1).contiguous()
        ints = {1: "uint8", 2: "int16", 4: "int32", 8: "int64"}[t.element_size()]
        raw = t.view(getattr(_torch(), ints)).numpy()
        return raw.view(STORAGE[name]), name
    arr = np.ascontiguousarray(x).reshape(-1)
    name = dtype_name(dtype or arr.dtype)
    if name not in STORAGE:
        raise TypeError(f"dtype {name} is not supported (complex or unknown)")
    if arr.dtype.itemsize != STORAGE[name].itemsize:
        raise TypeError(f"a {arr.dtype} array cannot hold {name} values")
    return arr.view(STORAGE[name]), name


def _to_float(raw: np.ndarray, name: str, comp: str, slot: str) -> np.ndarray:
    """``raw`` (storage of dtype ``name``) as values of the compute dtype. Exact for floats."""
    if name == comp:
        return raw
    out = _ws.get(slot, comp, raw.size)
    torch = sys.modules.get("torch")
    if name in TORCH_CONVERTED or (name == "bfloat16" and torch is not None):
        # torch converts bf16/f16 about 2-10x faster than numpy; fp8 only torch knows.
        torch = _torch()
        tdt = getattr(torch, name)
        src = torch.from_numpy(raw.view(_UINT[raw.itemsize]).view({1: np.uint8, 2: np.int16}[raw.itemsize])).view(tdt)
        torch.from_numpy(out).copy_(src)
    elif name == "bfloat16":
        # bf16 is the upper half of a float32: shifting the bits is the exact conversion
        # (widen, then shift in place: faster than one mixed-type ufunc call).
        f32 = out if comp == "float32" else _ws.get(slot + "32", "float32", raw.size)
        u32 = f32.view(np.uint32)
        np.copyto(u32, raw)
        np.left_shift(u32, 16, out=u32)
        if comp != "float32":
            np.copyto(out, f32)
    else:
        np.copyto(out, raw, casting="unsafe")
    return out


# ----------------------------------------------------------------------------- numpy kernel


def compare_numpy(
    ra: np.ndarray,
    na: str,
    rb: np.ndarray,
    nb: str,
    criteria: list[Criterion],
    want: Sequence[int],
    packed: bool,
) -> Comparison:
    """Counts (and the masks of the criterion indices in ``want``) of two flat storage arrays
    ``ra``/``rb`` of dtypes ``na``/``nb`` (from :func:`as_raw`), block by block."""
    n = ra.size
    bits_dt, comp_dt = common_dtypes(na, nb)
    np_comp = np.dtype(comp_dt)
    thresholds = [c.threshold(np_comp) if c.mode != "bitwise" else None for c in criteria]
    need_float = any(c.mode != "bitwise" for c in criteria)
    need_rel = any(c.mode == "rel" for c in criteria)
    same = na == nb
    out_masks = {i: np.zeros((n + 7) // 8 if packed else n, dtype=np.uint8 if packed else bool) for i in want}
    counts = [0] * len(criteria)
    # NaN/inf/overflow in Δ are expected and handled by the `bad` fix-up: no warnings.
    with np.errstate(invalid="ignore", over="ignore"):
        _blocks(ra, na, rb, nb, criteria, thresholds, need_float, need_rel, same, comp_dt, counts, out_masks, packed)
    return Comparison(counts=counts, numel=n, bitwise_dtype=bits_dt, compute_dtype=comp_dt, masks=out_masks)


def _blocks(
    ra: np.ndarray, na: str, rb: np.ndarray, nb: str, criteria: list[Criterion], thresholds: list[Any],
    need_float: bool, need_rel: bool, same: bool, comp_dt: str, counts: list[int],
    out_masks: dict[int, np.ndarray], packed: bool,
) -> None:
    n = ra.size
    if same:
        ia, ib = ra.view(_UINT[ra.itemsize]), rb.view(_UINT[rb.itemsize])
    for s in range(0, n, BLOCK_ELEMS):  # BLOCK_ELEMS is a multiple of 8: packed blocks align
        e = min(n, s + BLOCK_ELEMS)
        k = e - s
        ne = _ws.get("ne", bool, k)
        tmp = _ws.get("tmp", bool, k)
        fa = fb = None
        if same:
            np.not_equal(ia[s:e], ib[s:e], out=ne)
        else:
            # Different dtypes: cast both to the compute dtype (exact) and compare bits there.
            fa = _to_float(ra[s:e], na, comp_dt, "fa")
            fb = _to_float(rb[s:e], nb, comp_dt, "fb")
            np.not_equal(fa.view(_UINT[fa.itemsize]), fb.view(_UINT[fb.itemsize]), out=ne)
        n_bits = int(np.count_nonzero(ne))
        if n_bits == 0:
            continue  # abs/rel changes are a subset of bitwise changes: nothing to do
        if need_float:
            if fa is None:
                fa = _to_float(ra[s:e], na, comp_dt, "fa")
                fb = _to_float(rb[s:e], nb, comp_dt, "fb")
            if need_rel:
                rn = _ws.get("r", comp_dt, k)
                rhs = _ws.get("rhs", comp_dt, k)
                np.abs(fa, out=rn)
                np.maximum(rn, np.abs(fb, out=rhs), out=rn)
            # Δ overwrites fb when fb is our scratch copy: one buffer less in cache.
            dn = fb if nb != comp_dt else _ws.get("d", comp_dt, k)
            np.subtract(fb, fa, out=dn)
            np.abs(dn, out=dn)
            bad = None
            if not np.isfinite(np.max(dn)):  # max propagates NaN: one cheap pass
                bad = ~np.isfinite(dn)
        for i, (c, thr) in enumerate(zip(criteria, thresholds, strict=True)):
            if c.mode == "bitwise":
                m, cnt = ne, n_bits
            else:
                if c.mode == "abs":
                    np.greater(dn, thr, out=tmp)
                else:
                    np.multiply(rn, thr, out=rhs)
                    np.greater(dn, rhs, out=tmp)
                if bad is not None:
                    np.copyto(tmp, ne, where=bad)
                m, cnt = tmp, int(np.count_nonzero(tmp))
            counts[i] += cnt
            if i in out_masks and cnt:
                if packed:
                    out_masks[i][s // 8 : (e + 7) // 8] = np.packbits(m, bitorder="little")
                else:
                    out_masks[i][s:e] = m


# ----------------------------------------------------------------------------- numba kernel

# Elements per pass: each criterion runs over one stretch while it is in L1/L2.
_NB_STRETCH = 1 << 14
_u16_to_f32: Any = None  # bf16 bits -> float32 (16-bit shift + bitcast), set before compiling


def _bf16_counts(a, b, thr_abs, thr_rel, counts):  # pragma: no cover - compiled by numba
    """counts[0] += bits differ; counts[1 + k] += abs:thr_abs[k]; counts[1 + K + k] += rel:thr_rel[k].

    ``a``, ``b``: bf16 bits (uint16). The definitions of the numpy kernel, branch-free so
    that LLVM vectorises them, with no floating-point reassociation (fastmath off):
    Δ = |fb - fa| in float32; abs: changed iff bits differ and not Δ <= thr (so NaN/inf Δ
    gives "bits differ"); rel: changed iff bits differ and (Δ not finite or
    Δ > thr * max(|fa|, |fb|)). Bit-identical elements are unchanged under every criterion.
    """
    n = a.shape[0]
    n_abs = thr_abs.shape[0]
    n_rel = thr_rel.shape[0]
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
            continue  # abs/rel changes are a subset of bitwise changes
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


def _build_numba_kernel() -> Any:
    global _u16_to_f32
    from numba import types
    from numba.extending import intrinsic

    from rlsparsity.numba_jit import njit

    @intrinsic
    def u16_to_f32(typingctx, x):  # noqa: ARG001
        def codegen(context, builder, signature, args):  # noqa: ARG001
            wide = builder.shl(builder.zext(args[0], context.get_value_type(types.uint32)), context.get_constant(types.uint32, 16))
            return builder.bitcast(wide, context.get_value_type(types.float32))

        return types.float32(types.uint16), codegen

    _u16_to_f32 = u16_to_f32
    kern = njit(_bf16_counts)
    z16 = np.zeros(2, dtype=np.uint16)
    kern(z16, z16, np.zeros(1, np.float32), np.zeros(1, np.float32), np.zeros(3, np.int64))
    return kern


def numba_kernel() -> Any:
    """The compiled :func:`_bf16_counts`, or None (numba missing, disabled, or failing)."""
    from rlsparsity.numba_jit import compiled

    return compiled("bf16 diff", _build_numba_kernel)


def compare_numba(kern: Any, ra: np.ndarray, rb: np.ndarray, criteria: list[Criterion]) -> Comparison:
    """Counts of a bf16 pair (raw uint16 bits ``ra``, ``rb``) with the compiled kernel ``kern``
    (from :func:`numba_kernel`); no masks."""
    f32 = np.dtype(np.float32)
    idx_abs = [i for i, c in enumerate(criteria) if c.mode == "abs"]
    idx_rel = [i for i, c in enumerate(criteria) if c.mode == "rel"]
    thr_abs = np.array([criteria[i].threshold(f32) for i in idx_abs], dtype=np.float32)
    thr_rel = np.array([criteria[i].threshold(f32) for i in idx_rel], dtype=np.float32)
    out = np.zeros(1 + len(idx_abs) + len(idx_rel), dtype=np.int64)
    kern(ra.view(np.uint16), rb.view(np.uint16), thr_abs, thr_rel, out)
    counts = [0] * len(criteria)
    for i, c in enumerate(criteria):
        if c.mode == "bitwise":
            counts[i] = int(out[0])
    for k, i in enumerate(idx_abs):
        counts[i] = int(out[1 + k])
    for k, i in enumerate(idx_rel):
        counts[i] = int(out[1 + len(idx_abs) + k])
    return Comparison(counts=counts, numel=ra.size, bitwise_dtype="bfloat16", compute_dtype="float32")


# ----------------------------------------------------------------------------- torch


def compare_torch(a: Any, b: Any, criteria: list[Criterion], want: Sequence[int], packed: bool) -> Comparison:
    """Whole-tensor torch version (any device); the same semantics as the numpy kernel."""
    torch = _torch()
    ta = (a if is_torch(a) else torch.from_numpy(np.asarray(a))).detach().reshape(-1)
    tb = (b if is_torch(b) else torch.from_numpy(np.asarray(b))).detach().reshape(-1).to(ta.device)
    if ta.numel() != tb.numel():
        raise ValueError(f"compare: {ta.numel()} vs {tb.numel()} elements")
    bits_dt, comp_dt = common_dtypes(ta.dtype, tb.dtype)
    tcomp = getattr(torch, comp_dt)
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    ca, cb = (ta, tb) if ta.dtype == tb.dtype else (ta.to(tcomp), tb.to(tcomp))
    iv = lambda t: t.view(ints[t.element_size()])  # noqa: E731
    ne = iv(ca) != iv(cb)
    np_comp = np.dtype(comp_dt)
    counts: list[int] = []
    out_masks: dict[int, np.ndarray] = {}
    fa = fb = d = bad = r = None
    for i, c in enumerate(criteria):
        if c.mode == "bitwise":
            m = ne
        else:
            if d is None:
                fa, fb = ta.to(tcomp), tb.to(tcomp)
                d = (fb - fa).abs()
                bad = ~torch.isfinite(d)
            thr = torch.tensor(float(c.threshold(np_comp)), dtype=tcomp, device=d.device)
            if c.mode == "abs":
                m = d > thr
            else:
                if r is None:
                    r = torch.maximum(fa.abs(), fb.abs())
                m = d > r * thr
            m = torch.where(bad, ne, m)
        counts.append(int(torch.count_nonzero(m)))
        if i in want:
            mn = m.cpu().numpy()
            out_masks[i] = np.packbits(mn, bitorder="little") if packed else mn
    return Comparison(counts=counts, numel=ta.numel(), bitwise_dtype=bits_dt, compute_dtype=comp_dt, masks=out_masks)

