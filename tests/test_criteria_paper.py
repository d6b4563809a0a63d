"""``paper:TOL`` against the paper script's own torch arithmetic (tests/paper_reference.py) on
pairs built for its edge cases, in every kernel: numpy (masks, packed or not), torch, numba."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from paper_reference import script_bound, script_changed

from rlsparsity.analysis import criteria as C
from rlsparsity.analysis import criteria_kernels as K
from rlsparsity.analysis.criteria import Criterion, compare, parse_criteria

# A tolerance whose float32 rounding lands on a bf16 tie (1 + 2^-8) that the real number
# (just above it) is not: the script's bound is bf16(float32(TOL)) = 2^-17, not the
# correctly rounded (1 + 2^-7) * 2^-17.
TRICKY = (1 + 2**-8 + 2**-30) * 2**-17
TOLS = [1e-8, 1e-7, 1e-6, 1e-5, 1e-3, TRICKY, 0.0, 1e-40]
CRITS = [Criterion("paper", t) for t in TOLS] + parse_criteria(["paper:1e39", "abs:1e-5", "bitwise"])


def _bf16(*vals: float) -> torch.Tensor:
    return torch.tensor(vals, dtype=torch.float64).to(torch.bfloat16)


def _bf16_bits(*bits: int) -> torch.Tensor:
    return torch.tensor(bits, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)


def _next(x: float, up: bool) -> float:
    """The bf16 neighbour of the bf16 value x >= 0 (towards +inf, or towards 0)."""
    b = int(_bf16(x).view(torch.int16)) + (1 if up else -1)
    return float(_bf16_bits(b).float())


def _all_backends(a: torch.Tensor, b: torch.Tensor, crits: list[Criterion]) -> None:
    """Every kernel's mask (numpy, packed numpy, torch) and count (numba, for bf16 pairs)
    equals the script's, element by element."""
    want = {i: script_changed(a, b, c.tol) for i, c in enumerate(crits) if c.mode == "paper"}
    n = a.numel()
    plain = compare(a, b, crits, masks=list(want), backend="numpy")
    packed = compare(a, b, crits, masks=list(want), packed=True, backend="numpy")
    tor = compare(a, b, crits, masks=list(want), backend="torch")
    for i, ref in want.items():
        c = str(crits[i])
        np.testing.assert_array_equal(plain.masks[i], ref, err_msg=c)
        np.testing.assert_array_equal(np.unpackbits(packed.masks[i], count=n, bitorder="little").astype(bool), ref, err_msg=c)
        np.testing.assert_array_equal(tor.masks[i], ref, err_msg=c)
        assert plain.counts[i] == packed.counts[i] == tor.counts[i] == int(ref.sum()), c
    if a.dtype == b.dtype == torch.bfloat16 and C.numba_available():
        got = compare(a, b, crits, backend="numba")
        assert got.kernel == "numba" and [got.counts[i] for i in want] == [int(r.sum()) for r in want.values()]
        for j in range(n):  # one element per call: each count is that element's flag
            one = compare(a[j : j + 1], b[j : j + 1], crits, backend="numba")
            assert [one.counts[i] for i in want] == [int(r[j]) for r in want.values()], (float(a[j]), float(b[j]))


# ----------------------------------------------------------------------------- the bound


def test_bound_is_what_isclose_uses() -> None:
    """bf16(float32(TOL)), checked against torch.isclose on every finite bf16 |Δ|."""
    expected = {1e-8: 1.0011717677116394e-08, 1e-7: 1.0011717677116394e-07, 1e-6: 9.98377799987793e-07, 1e-5: 1.0013580322265625e-05}
    for tol, bound in expected.items():
        assert float(Criterion("paper", tol).threshold(np.dtype(np.float32))) == bound == script_bound(tol)
    rng = np.random.default_rng(0)
    tols = [0.0, 5e-45, 1e-40, 1e-3, 0.1, 1.0, 3e38, 1e39, TRICKY, *10.0 ** rng.uniform(-42, 38, 60)]
    for tol in tols:
        got = Criterion("paper", float(tol)).threshold(np.dtype(np.float64))
        assert float(got) == script_bound(float(tol)), tol
    assert script_bound(TRICKY) == 2.0**-17  # double rounding: not (1 + 2^-7) * 2^-17


# ----------------------------------------------------------------------------- stated semantics

T5 = 1.0013580322265625e-05  # bf16(1e-5) = 168 * 2^-24


@pytest.mark.parametrize(
    "a,b,dtype,abs_changed,paper_changed",
    [
        (0.0, -0.0, torch.bfloat16, 0, 0),  # ±0: Δ = 0 under both
        (0.0, T5, torch.bfloat16, 1, 0),  # exactly at the rounded tolerance
        (0.0, 169 * 2.0**-24, torch.bfloat16, 1, 1),  # one bf16 ulp above it
        (0.0, 167 * 2.0**-24, torch.bfloat16, 0, 0),  # one ulp below (9.95e-6)
        (-133 * 2.0**-28, 160 * 2.0**-24, torch.bfloat16, 1, 0),  # Δ = 2693 * 2^-28 = 1.0032e-5 rounds to T5
        (float("nan"), float("nan"), torch.bfloat16, 0, 1),  # identical NaN: NaN Δ is never close
        (float("inf"), float("inf"), torch.bfloat16, 0, 1),  # inf - inf = NaN
        (1.0, float("inf"), torch.bfloat16, 1, 1),
        (1.0, 1.0 + 2.0**-12, torch.float32, 1, 0),  # the same bf16 once rounded
        (0.0, 1.002e-5, torch.float32, 1, 0),  # rounds to T5
        (0.0, 9.99e-6, torch.float32, 0, 0),
        (3.4e38, 3.4e38, torch.float32, 0, 1),  # identical, but beyond bf16's range: inf - inf
        (1.0, 1 + 2.0**-8 + 2.0**-30, torch.float64, 1, 0),  # via float32: a tie, to even 1.0
    ],
)
def test_paper_vs_abs_by_hand(a: float, b: float, dtype: torch.dtype, abs_changed: int, paper_changed: int) -> None:
    ta, tb = torch.tensor([a], dtype=dtype), torch.tensor([b], dtype=dtype)
    crits = parse_criteria(["abs:1e-5", "paper:1e-5"])
    assert int(script_changed(ta, tb, 1e-5)[0]) == paper_changed  # the hand count is the script's
    for backend in ("numpy", "torch"):
        assert compare(ta, tb, crits, backend=backend).counts == [abs_changed, paper_changed], backend


# ----------------------------------------------------------------------------- edge pairs


_FINITE_BF16 = torch.arange(0, 0x7F80, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).double()
_FACTORS = torch.tensor([2.0**-e * (1 + m / 128) for e in range(1, 13) for m in range(128)], dtype=torch.float64)


def _rounded_pairs(bound: float, limit: int) -> tuple[list[float], list[float]]:
    """(θ0, θ1) = (−y, x) bf16 pairs whose exact Δ = x + y is no bf16 value but rounds (in
    bf16) to the bound or a neighbour: the subtraction's rounding decides. x in
    [bound/2, 2·bound], y 2^-1 to 2^-12 of it (close enough that float32 holds x + y exactly)."""
    if bound < 2.0**-110:
        return [], []
    near = torch.tensor([_next(bound, False), bound, _next(bound, True)], dtype=torch.float64)
    v = _FINITE_BF16
    xs = v[(v >= bound / 2) & (v <= 2 * bound)][:, None]
    ys = (xs * _FACTORS).to(torch.bfloat16).double()
    exact = xs + ys  # float64: exact
    r = exact.float().to(torch.bfloat16).double()
    keep = (r != exact) & torch.isin(r, near)
    step = max(1, int(keep.sum()) // limit)
    return (-ys[keep][::step]).tolist(), xs.expand_as(ys)[keep][::step].tolist()


def test_edge_pairs_bf16() -> None:
    """±0, Δ at the rounded bound and one ulp either side, Δ that reach them only through
    the subtraction's rounding, huge exponents, NaN/inf and subnormals: the script's masks."""
    a: list[float] = [0.0, -0.0, 0.0, -0.0]
    b: list[float] = [-0.0, 0.0, 0.0, -0.0]
    n_rounded = 0
    for tol in TOLS:
        t = script_bound(tol)
        for d in {t, _next(t, True), *((_next(t, False),) if t > 0 else ())}:
            a += [0.0, 0.0, d, -d, 1.0]
            b += [d, -d, 0.0, 0.0, 1.0 + d]  # 1 + d: bf16-rounded too
        r0, r1 = _rounded_pairs(t, 60)
        a, b, n_rounded = a + r0, b + r1, n_rounded + len(r0)
    big = float.fromhex("0x1.fep127")  # largest finite bf16
    specials = [
        (big, -big), (-big, big), (big, _next(big, False)), (3e38, 3e38), (1e30, -1e30), (2.0**100, 2.0**100 + 2.0**93),
        (2.0**-133, 0.0), (0.0, 2.0**-133), (2.0**-133, 2 * 2.0**-133), (-(2.0**-133), 2.0**-133), (2.0**-126, 2.0**-126 - 2.0**-133),
        (float("inf"), float("inf")), (float("-inf"), float("-inf")), (float("inf"), float("-inf")), (1.0, float("inf")),
        (float("nan"), 1.0), (0.0, float("nan")),
    ]  # fmt: skip
    a += [x for x, _ in specials]
    b += [y for _, y in specials]
    ta, tb = _bf16(*a), _bf16(*b)
    # NaN payloads: identical NaN, and NaN -> another payload.
    ta = torch.cat([ta, _bf16_bits(0x7FC0, 0x7FC0, 0xFFC1)])
    tb = torch.cat([tb, _bf16_bits(0x7FC0, 0x7FC1, 0xFFC1)])
    assert n_rounded > 200
    _all_backends(ta, tb, CRITS)
    # The rounding matters: on these pairs paper:1e-5 and abs:1e-5 disagree both ways.
    ref, exact = script_changed(ta, tb, 1e-5), compare(ta, tb, parse_criteria("abs:1e-5"), masks=[0]).masks[0]
    assert (ref & ~exact).any() and (exact & ~ref).any()


def test_float_pairs_are_rounded_to_bf16_first() -> None:
    """float32/float64/float16 sides are cast to bf16 as torch_dtype=bfloat16 loading does."""
    x = [1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 3.4e38, 3.4e38, -3.4e38, 1e-45, 1.0, float("nan"), float("inf"), 0.0]
    y = [1 + 2**-9, 1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-8 + 2**-20, 1.002e-5, 9.99e-6, -1.0013e-5, 3.4e38, 3.3e38, 3.4e38, 0.0, -1.0, float("nan"), float("inf"), 1e-40]  # fmt: skip
    a32, b32 = torch.tensor(x), torch.tensor(y)
    _all_backends(a32, b32, CRITS)
    # 1 -> 1 + 2^-9 is the same bf16 (unchanged); 1 -> 1 + 3 * 2^-8 ties up to 1 + 2^-6 (changed).
    assert script_changed(a32, b32, 1e-5)[:3].tolist() == [False, False, True]
    # float32 NaN payloads whose rounding would carry into the sign bit (0x7FFFFFFF -> -0 if
    # rounded like a number): NaN must stay NaN, so changed against 0 and against themselves.
    nans = torch.tensor([0x7FFFFFFF, -1, 0x7F800001, 0x7FFF8000, -0x8000], dtype=torch.int32).view(torch.float32)
    _all_backends(torch.cat([nans, nans]), torch.cat([torch.zeros(5), nans]), CRITS)
    a64 = torch.tensor([1.0, 1.0, 1.0, 1e300, -7.0], dtype=torch.float64)
    b64 = torch.tensor([1 + 2**-8 + 2**-30, 1 + 2**-7, 1 + 2**-8 + 2**-21, 1e300, -7.0], dtype=torch.float64)
    _all_backends(a64, b64, CRITS)
    _all_backends(a32[:12], b64.float().repeat(3)[:12].double(), CRITS)  # float32 vs float64
    _all_backends(a32[:12].half(), b32[:12].bfloat16(), CRITS)  # float16 vs bf16
    _all_backends(a32[:12].bfloat16(), b32[:12], CRITS)  # bf16 vs float32


# ----------------------------------------------------------------------------- random pairs


def _perturbed(n: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights of all magnitudes, 40 % of them moved by 1e-9 .. 1e-3, and some NaN/inf/±0."""
    g = torch.Generator().manual_seed(seed)
    a32 = torch.randn(n, generator=g) * 10 ** torch.empty(n).uniform_(-8, 1, generator=g)
    scale = 10 ** torch.randint(-9, -2, (n,), generator=g).float()
    b32 = a32 + (torch.rand(n, generator=g) < 0.4) * torch.randn(n, generator=g) * scale
    idx = torch.randperm(n, generator=g)[:64]
    vals = torch.tensor([float("nan"), float("inf"), float("-inf"), 0.0, -0.0, 1e-40])
    a32[idx] = vals[torch.arange(64) % 6]
    b32[idx] = vals[(torch.arange(64) * 5 + 1) % 6]
    return a32.to(dtype), b32.to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_random_large_pair(dtype: torch.dtype) -> None:
    n = 2 * K.BLOCK_ELEMS + 4321  # several blocks and a short last one
    a, b = _perturbed(n, dtype, seed=13)
    crits = parse_criteria(["paper:1e-8,1e-7,1e-6,1e-5,0", "abs:1e-5"])
    want = [script_changed(a, b, c.tol) for c in crits[:5]]
    res = compare(a, b, crits, masks=range(5), packed=True)
    tor = compare(a, b, crits, backend="torch")
    for i, ref in enumerate(want):
        assert res.counts[i] == tor.counts[i] == int(ref.sum()), str(crits[i])
        np.testing.assert_array_equal(np.unpackbits(res.masks[i], count=n, bitorder="little").astype(bool), ref)
    if dtype == torch.bfloat16 and C.numba_available():
        assert compare(a, b, crits, backend="numba").counts == res.counts
    # Identical weights: unchanged unless NaN/inf (the script's NaN rule), as the numba kernel's
    # skip of identical stretches must also count.
    same = compare(a, a.clone(), crits, backend="numpy").counts
    nonfinite = int((~torch.isfinite(a.to(torch.bfloat16))).sum())
    assert same == [nonfinite] * 5 + [0]
    if dtype == torch.bfloat16 and C.numba_available():
        assert compare(a, a.clone(), crits, backend="numba").counts == same
