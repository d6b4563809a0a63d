"""The counting kernels behind :func:`rlsparsity.analysis.criteria.compare`, and the dtype
rules they share.

The criteria's definitions (what ``bitwise``, ``abs:TOL``, ``rel:TOL`` and ``paper:TOL``
count, and the NaN/±0/subnormal rules) are stated in :mod:`rlsparsity.analysis.criteria`;
here are two of the three implementations of them that give the same counts:

- :func:`compare_numpy`: a blocked numpy kernel on CPU data (bf16 is widened to float32 by
  a 16-bit shift, exact), so ``rlsparsity diff`` on bf16/float32 checkpoints never imports
  torch. float16 and float8 are converted with torch (imported on first use; numpy's
  float16 cast is about 10x slower here).
- :func:`compare_torch`: whole-tensor torch ops, for tensors on other devices.

The third, the fused numba kernel for bf16 counts, is in
:mod:`rlsparsity.analysis.criteria_numba`. All three round to bf16 for ``paper`` with the
same integer arithmetic on float32 bits (:func:`bf16_round`, :func:`paper_key_bound`),
which is torch's own float32 -> bf16 rounding (round to nearest even).
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
    compute_dtype: str  # dtype of Δ for abs/rel (paper's Δ is always bf16)
    masks: dict[int, np.ndarray] = field(default_factory=dict)  # criterion index -> mask
    kernel: str = "numpy"  # the kernel that ran: "numpy", "numba" or "torch"


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


# ----------------------------------------------------------------------------- bf16 rounding (paper)

# Largest finite bf16 (bits 0x7F7F) and the float32 bits of +inf.
BF16_MAX = float.fromhex("0x1.fep127")
_F32_INF_BITS = 0x7F800000


def bf16_round(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """float32 ``x`` rounded to the nearest bf16 (ties to even), as float32 values in ``out``:
    torch's float32 -> bf16 conversion. Overflow gives ±inf; NaN stays NaN.

    Round to nearest even on the bits: add 0x7FFF plus the lowest kept bit, then drop the
    low 16 bits. A carry out of the mantissa correctly bumps the exponent (up to inf); only
    NaN payloads can carry into the sign bit, so NaNs are copied back afterwards.
    """
    x = np.asarray(x, dtype=np.float32)
    out = np.empty_like(x) if out is None else out
    u, r = x.view(np.uint32), out.view(np.uint32)
    np.right_shift(u, 16, out=r)
    np.bitwise_and(r, 1, out=r)
    np.add(r, u, out=r)
    np.add(r, 0x7FFF, out=r)
    np.bitwise_and(r, 0xFFFF0000, out=r)
    if x.size and np.isnan(np.min(x)):  # min propagates NaN: one cheap pass
        np.copyto(out, x, where=np.isnan(x))
    return out


def paper_bound(tol: float) -> np.float32:
    """paper:TOL's bound on |Δ|: the bf16 that ``torch.isclose(Δ, 0, atol=TOL)`` compares a bf16
    Δ against. Its allowed error ``atol + |rtol · 0|`` is computed in bf16 with the scalar
    taken as float32 (CPU kernels' opmath), so it is bf16(float32(TOL)), double rounding
    included; capped at the largest finite bf16, since an infinite bound still leaves ±inf
    Δ "not close" (isclose's finiteness test)."""
    with np.errstate(over="ignore"):
        t = np.array([tol], dtype=np.float32)  # round to nearest; overflow -> inf
    return np.float32(min(float(bf16_round(t)[0]), BF16_MAX))


def paper_key_bound(bound: np.floating) -> int:
    """K such that, for the float32 bits u of any |Δ| (NaN included; sign bit clear),
    bf16(|Δ|) > ``bound``  <=>  u + bit16(u) > K.

    bf16(|Δ|) has bits (u + 0x7FFF + bit16(u)) >> 16 (round to nearest even; NaN and inf
    give 0x7F80 or more, above every finite bound, so no NaN check is needed). With T the
    bits of ``bound``: that is > T iff u + 0x7FFF + bit16(u) >= (T + 1) << 16, i.e.
    u + bit16(u) > ((T + 1) << 16) - 0x8000. One add and one compare per element and
    tolerance; u + bit16(u) <= 0x80000000, so uint32 does not wrap.
    """
    t = int(np.float32(bound).view(np.uint32)) >> 16
    assert t <= 0x7F7F, "the paper bound is a finite bf16"
    return ((t + 1) << 16) - 0x8000


def _paper_keys(
    ra: np.ndarray, na: str, rb: np.ndarray, nb: str, fa: np.ndarray | None, fb: np.ndarray | None, comp_dt: str, k: int
) -> np.ndarray:
    """u + bit16(u) (uint32) for u the float32 bits of |bf16(b) − bf16(a)| of one block, to
    compare against :func:`paper_key_bound`. ``fa``/``fb``: the block in the compute dtype
    (reused when that is float32; they are not modified)."""
    sides = []
    for raw, name, f, slot in ((ra, na, fa, "pa"), (rb, nb, fb, "pb")):
        # to float32 (round to nearest for float64/int), then to bf16: torch's .to(bfloat16).
        f32 = f if (f is not None and comp_dt == "float32") else _to_float(raw, name, "float32", slot)
        sides.append(f32 if name == "bfloat16" else bf16_round(f32, _ws.get(slot + "16", np.float32, k)))
    d = _ws.get("pd", np.float32, k)
    np.subtract(sides[1], sides[0], out=d)  # float32, rounded to nearest: torch's bf16 sub
    np.abs(d, out=d)  # clears the sign bit, NaN's too
    key = d.view(np.uint32)
    low = _ws.get("pl", np.uint32, k)
    np.right_shift(key, 16, out=low)
    np.bitwise_and(low, 1, out=low)
    np.add(key, low, out=key)
    return key


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
    thresholds: list[Any] = [
        None if c.mode == "bitwise" else paper_key_bound(c.threshold(np_comp)) if c.mode == "paper" else c.threshold(np_comp)
        for c in criteria
    ]
    out_masks = {i: np.zeros((n + 7) // 8 if packed else n, dtype=np.uint8 if packed else bool) for i in want}
    counts = [0] * len(criteria)
    # NaN/inf/overflow in Δ (and float64 -> float32 overflow for paper) are expected and
    # handled by the `bad` fix-up or the paper bound: no warnings.
    with np.errstate(invalid="ignore", over="ignore"):
        _blocks(ra, na, rb, nb, criteria, thresholds, comp_dt, counts, out_masks, packed)
    return Comparison(counts=counts, numel=n, bitwise_dtype=bits_dt, compute_dtype=comp_dt, masks=out_masks)


def _blocks(
    ra: np.ndarray, na: str, rb: np.ndarray, nb: str, criteria: list[Criterion], thresholds: list[Any],
    comp_dt: str, counts: list[int], out_masks: dict[int, np.ndarray], packed: bool,
) -> None:
    n = ra.size
    need_absrel = any(c.mode in ("abs", "rel") for c in criteria)
    need_rel = any(c.mode == "rel" for c in criteria)
    need_paper = any(c.mode == "paper" for c in criteria)
    same = na == nb
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
        # abs/rel changes are a subset of bitwise changes: an identical block has none. paper
        # can still count identical NaN/inf (its Δ is NaN) or float32 values past bf16's range.
        only_paper = n_bits == 0
        if only_paper and not need_paper:
            continue
        if fa is None and (need_paper or need_absrel):
            fa = _to_float(ra[s:e], na, comp_dt, "fa")
            fb = _to_float(rb[s:e], nb, comp_dt, "fb")
        if need_paper:  # before Δ overwrites fb below
            keys = _paper_keys(ra[s:e], na, rb[s:e], nb, fa, fb, comp_dt, k)
        if need_absrel and not only_paper:
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
            if only_paper and c.mode != "paper":
                continue  # counts 0, mask already all False
            if c.mode == "bitwise":
                m, cnt = ne, n_bits
            elif c.mode == "paper":
                np.greater(keys, thr, out=tmp)
                m, cnt = tmp, int(np.count_nonzero(tmp))
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


# ----------------------------------------------------------------------------- torch


def pack_torch(mask: Any) -> np.ndarray:
    """A flat bool tensor's bits packed LSB first where it lives (a GPU's), so only n/8
    bytes come to the host: `np.packbits(..., bitorder="little")` of it, bit for bit."""
    torch = _torch()
    n = mask.numel()
    padded = torch.zeros(-(-n // 8) * 8, dtype=torch.uint8, device=mask.device)
    padded[:n] = mask.reshape(-1)
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=mask.device)
    return (padded.view(-1, 8) * weights).sum(1, dtype=torch.uint8).cpu().numpy()


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
    fa = fb = d = bad = r = d16 = None
    for i, c in enumerate(criteria):
        if c.mode == "bitwise":
            m = ne
        elif c.mode == "paper":
            if d16 is None:
                # The script's arithmetic, spelled out so it is the same on every device: each
                # side to float32 (round to nearest) then bf16, Δ in float32 rounded to bf16.
                ga, gb = (t.to(torch.float32).to(torch.bfloat16).float() for t in (ta, tb))
                d16 = (gb - ga).to(torch.bfloat16).float().abs()
            # NaN and ±inf Δ are not <= a finite bound: changed, as with torch.isclose.
            m = ~(d16 <= float(c.threshold(np_comp)))
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
            out_masks[i] = pack_torch(m) if packed else m.cpu().numpy()
    return Comparison(
        counts=counts, numel=ta.numel(), bitwise_dtype=bits_dt, compute_dtype=comp_dt, masks=out_masks, kernel="torch"
    )

