"""Criterion parsing and the one-pass kernels, checked against an independent numpy brute force
and, for ``paper:TOL``, against the paper script's own torch arithmetic."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from paper_reference import script_changed

from rlsparsity.analysis import criteria as C
from rlsparsity.analysis import criteria_kernels as K
from rlsparsity.analysis import criteria_numba as N
from rlsparsity.analysis.criteria import (
    BITWISE,
    Criterion,
    CriterionError,
    compare,
    parse_criteria,
    parse_criterion,
)

TABLE6 = "abs:1e-8,1e-7,1e-6,1e-5"
PAPER6 = "paper:1e-8,1e-7,1e-6,1e-5"


# ----------------------------------------------------------------------------- parsing


def test_parse_single_and_lists() -> None:
    assert parse_criterion("bitwise") == BITWISE
    assert parse_criterion("abs:1e-5") == Criterion("abs", 1e-5)
    assert parse_criterion(" REL : 1e-3 ") == Criterion("rel", 1e-3)
    crits = parse_criteria(["bitwise", TABLE6, "rel:1e-3", "abs:1e-5"])
    assert [str(c) for c in crits] == ["bitwise", "abs:1e-8", "abs:1e-7", "abs:1e-6", "abs:1e-5", "rel:0.001"]
    assert str(Criterion("abs", 2.5e-6)) == "abs:2.5e-6"
    assert Criterion("abs", 1e-5).to_meta() == {"mode": "abs", "tol": 1e-5, "spec": "abs:1e-5"}
    assert [str(c) for c in parse_criteria([PAPER6, "Paper: 0"])] == ["paper:1e-8", "paper:1e-7", "paper:1e-6", "paper:1e-5", "paper:0"]
    assert parse_criterion("paper:1e-5") != parse_criterion("abs:1e-5")
    assert Criterion("paper", 1e-5).to_meta() == {"mode": "paper", "tol": 1e-5, "spec": "paper:1e-5", "atol_bf16": 1.0013580322265625e-05}


def test_spelling_is_the_typed_number() -> None:
    """The spelling is the JSON key: abs:0, not abs:0.0; -0.0 and the int 0 are the same key."""
    assert [str(c) for c in parse_criteria(["abs:0", "rel:0.0", "abs:2", "abs:1e20", "paper:0.5"])] == [
        "abs:0", "rel:0", "abs:2", "abs:1e20", "paper:0.5"
    ]  # fmt: skip
    assert str(Criterion("abs", -0.0)) == str(Criterion("abs", 0)) == "abs:0"
    assert Criterion("abs", -0.0).to_meta()["tol"] == 0.0 and parse_criteria("abs:0,-0,0.0") == [Criterion("abs", 0.0)]
    for c in parse_criteria(["abs:0", "abs:1.5e-7", "rel:0.001", "paper:3e-6"]):
        assert parse_criterion(str(c)) == c  # round-trips


@pytest.mark.parametrize(
    "bad", ["", "abs", "abs:", "abs:x", "abs:-1", "abs:nan", "rel:inf", "bitwise:1", "close:1e-5", "abs:1e-5,", "paper", "paper:-1e-5", "paper:inf"]
)
def test_parse_errors(bad: str) -> None:
    with pytest.raises(CriterionError):
        parse_criteria(bad)


def test_parse_criterion_rejects_lists() -> None:
    with pytest.raises(CriterionError, match="parse_criteria"):
        parse_criterion(TABLE6)


# ----------------------------------------------------------------------------- brute force


def _bits(t: torch.Tensor) -> np.ndarray:
    """Raw stored bits as unsigned integers (independent of the kernel's views)."""
    raw = t.contiguous().view(torch.uint8).numpy()
    return raw.view({1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[t.element_size()])


def _as_f32(t: torch.Tensor) -> np.ndarray:
    if t.dtype == torch.bfloat16:  # bf16 -> f32 is a 16-bit shift of the bits
        return (_bits(t).astype(np.uint32) << 16).view(np.float32)
    if t.dtype == torch.float16:
        return _bits(t).view(np.float16).astype(np.float32)
    return t.numpy().astype(np.float32)


def brute(a: torch.Tensor, b: torch.Tensor, crit: Criterion) -> np.ndarray:
    """Definition-level reference: float32 arithmetic, TOL compared in float64; ``paper`` is the
    script's torch arithmetic."""
    if crit.mode == "paper":
        return script_changed(a, b, crit.tol)
    fa, fb = _as_f32(a).reshape(-1), _as_f32(b).reshape(-1)
    if a.dtype == b.dtype:
        bits = _bits(a).reshape(-1) != _bits(b).reshape(-1)
    else:
        bits = fa.view(np.uint32) != fb.view(np.uint32)
    if crit.mode == "bitwise":
        return bits
    with np.errstate(all="ignore"):
        d = np.abs(fb - fa)
        finite = np.isfinite(d)
        if crit.mode == "abs":
            test = d.astype(np.float64) > crit.tol
        else:
            test = d > np.float32(crit.tol) * np.maximum(np.abs(fa), np.abs(fb))
    return np.where(finite, test, bits)


def _random_pair(n: int, dtype: torch.dtype, seed: int, *, specials: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    a32 = torch.randn(n, generator=g) * torch.logspace(-9, 0, n)[torch.randperm(n, generator=g)]
    a = a32.to(dtype)
    scale = torch.logspace(-9, -3, 7)[torch.randint(0, 7, (n,), generator=g)]
    upd = torch.rand(n, generator=g) < 0.4
    b = (a.float() + upd * torch.randn(n, generator=g) * scale).to(dtype)
    if specials:
        idx = torch.randperm(n, generator=g)[:60]
        vals = [float("nan"), float("inf"), float("-inf"), 0.0, -0.0, 1e-40, -1e-41, 3e38]
        for k, i in enumerate(idx.tolist()):
            a[i] = vals[k % len(vals)]
            b[i] = vals[(k * 3 + k // len(vals)) % len(vals)]
        a[idx[:5]] = b[idx[:5]] = float("nan")  # identical NaN bits: unchanged
    return a, b


ALL = parse_criteria(["bitwise", TABLE6, "abs:0", "abs:1e-3", "rel:1e-3,1e-2,0", PAPER6, "paper:0,1e-3"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_kernel_matches_brute_force(dtype: torch.dtype, backend: str) -> None:
    n = K.BLOCK_ELEMS + 12345  # crosses a block boundary with a short last block
    a, b = _random_pair(n, dtype, seed=len(str(dtype)) + 7 * len(backend))
    res = compare(a, b, ALL, masks=range(len(ALL)), backend=backend)
    for i, c in enumerate(ALL):
        ref = brute(a, b, c)
        assert res.counts[i] == int(ref.sum()), str(c)
        np.testing.assert_array_equal(res.masks[i], ref, err_msg=str(c))


@pytest.mark.parametrize("pair", [(torch.bfloat16, torch.float32), (torch.float16, torch.bfloat16), (torch.float32, torch.float16)])
def test_kernel_mixed_dtypes(pair: tuple[torch.dtype, torch.dtype]) -> None:
    a, b0 = _random_pair(50_000, torch.float32, seed=3, specials=False)
    a, b = a.to(pair[0]), b0.to(pair[1])
    res = compare(a, b, ALL)
    assert res.bitwise_dtype == "float32" and res.compute_dtype == "float32"
    for i, c in enumerate(ALL):
        assert res.counts[i] == int(brute(a, b, c).sum()), str(c)
    # The same values in two dtypes are unchanged under every criterion.
    x = torch.randn(1000).bfloat16()
    assert compare(x, x.float(), ALL).counts == [0] * len(ALL)


def test_packed_masks_equal_unpacked() -> None:
    a, b = _random_pair(100_003, torch.bfloat16, seed=5)
    crits = parse_criteria(["abs:1e-6", "bitwise"])
    packed = compare(a, b, crits, masks=[0, 1], packed=True)
    plain = compare(a, b, crits, masks=[0, 1])
    for i in (0, 1):
        np.testing.assert_array_equal(np.unpackbits(packed.masks[i], count=a.numel(), bitorder="little").astype(bool), plain.masks[i])
    # A 2-D input gives the flat (row-major) mask of the same elements.
    m = compare(a.reshape(1, -1), b.reshape(1, -1), crits[:1], masks=[0]).masks[0]
    assert m.shape == (a.numel(),) and int(m.sum()) == plain.counts[0]
    np.testing.assert_array_equal(m, plain.masks[0])


# ----------------------------------------------------------------------------- stated semantics


def _bf16_from_bits(*bits: int) -> torch.Tensor:
    return torch.tensor(bits, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)


def test_special_values_bf16() -> None:
    # pairs (θ0 bits, θ1 bits) -> expected (bitwise, abs:1e-8, abs:0, rel:1e-3)
    cases = {
        (0x7FC0, 0x7FC0): (0, 0, 0, 0),  # identical NaN
        (0x7FC0, 0x7FC1): (1, 1, 1, 1),  # NaN -> NaN with another payload
        (0x3F80, 0x7FC0): (1, 1, 1, 1),  # 1.0 -> NaN
        (0x7F80, 0x7F80): (0, 0, 0, 0),  # inf -> inf (inf - inf is NaN, but bits equal)
        (0x3F80, 0x7F80): (1, 1, 1, 1),  # 1.0 -> inf
        (0x7F80, 0xFF80): (1, 1, 1, 1),  # inf -> -inf
        (0x0000, 0x8000): (1, 0, 0, 0),  # +0 -> -0
        (0x0000, 0x0001): (1, 0, 1, 1),  # 0 -> smallest subnormal (9.2e-41)
        (0x0001, 0x0001): (0, 0, 0, 0),  # subnormal unchanged
        (0x0001, 0x0002): (1, 0, 1, 1),  # subnormal -> next subnormal
        (0x7F7F, 0xFF7F): (1, 1, 1, 1),  # max -> -max: Δ overflows float32
    }
    a = _bf16_from_bits(*(k[0] for k in cases))
    b = _bf16_from_bits(*(k[1] for k in cases))
    crits = parse_criteria(["bitwise", "abs:1e-8", "abs:0", "rel:1e-3"])
    for backend in ("numpy", "torch"):
        res = compare(a, b, crits, masks=range(4), backend=backend)
        for j, (_, want) in enumerate(cases.items()):
            got = tuple(int(res.masks[i][j]) for i in range(4))
            assert got == want, (backend, hex(int(a.view(torch.int16)[j])), hex(int(b.view(torch.int16)[j])))


@pytest.mark.parametrize("tol", [1e-8, 1e-7, 1e-6, 1e-5, 3e-6, 0.1])
def test_abs_threshold_is_exact_in_float32(tol: float) -> None:
    """|Δ| > TOL as real numbers, even where float32(TOL) rounds up (1e-7, 1e-6, 0.1)."""
    t32 = np.float32(tol)
    below = t32 if float(t32) <= tol else np.nextafter(t32, np.float32(0))
    above = np.nextafter(below, np.float32(1))
    vals = np.array([below, above, -below, -above, np.nextafter(below, np.float32(0))], dtype=np.float32)
    a = torch.zeros(len(vals))
    b = torch.from_numpy(vals)
    res = compare(a, b, [Criterion("abs", tol)], masks=[0])
    assert res.masks[0].tolist() == [False, True, False, True, False]
    assert compare(a, b, [Criterion("abs", tol)], backend="torch").counts == [2]


def test_rel_definition() -> None:
    a = torch.tensor([1.0, 1.0, 100.0, -2.0, 0.0])
    b = torch.tensor([1.0011, 1.0009, 100.2, -2.0, 1e-30])
    assert compare(a, b, [Criterion("rel", 1e-3)], masks=[0]).masks[0].tolist() == [True, False, True, False, True]


def test_bitwise_fast_path_counts_only() -> None:
    a = torch.randn(10_000).bfloat16()
    b = a.clone()
    b[::7] = (b[::7].float() * 1.5).bfloat16()
    assert compare(a, b, [BITWISE]).counts == [int((a.view(torch.int16) != b.view(torch.int16)).sum())]
    assert compare(a, a.clone(), ALL).counts == [0] * len(ALL)


def test_shape_and_dtype_errors() -> None:
    with pytest.raises(ValueError, match="elements"):
        compare(torch.zeros(3), torch.zeros(4), [BITWISE])
    with pytest.raises(TypeError, match="complex"):
        compare(torch.zeros(3, dtype=torch.complex64), torch.zeros(3, dtype=torch.complex64), [BITWISE])


def test_numpy_only_path_for_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without torch loaded (the CLI's case) bf16 is widened by a bit shift: same results."""
    from types import SimpleNamespace

    a, b = _random_pair(K.BLOCK_ELEMS + 999, torch.bfloat16, seed=11)
    ra, rb = _bits(a), _bits(b)
    monkeypatch.setattr(K, "sys", SimpleNamespace(modules={}))
    res = compare(ra, rb, ALL, masks=range(len(ALL)), dtypes=("bfloat16", "bfloat16"))
    mixed = compare(ra, b.float().numpy(), ALL, dtypes=("bfloat16", None))
    for i, c in enumerate(ALL):
        np.testing.assert_array_equal(res.masks[i], brute(a, b, c), err_msg=str(c))
        assert mixed.counts[i] == int(brute(a, b.float(), c).sum()), str(c)


# ----------------------------------------------------------------------------- numba kernel


def _numba_or_skip() -> None:
    pytest.importorskip("numba")
    if not C.numba_available():
        pytest.skip("numba kernel disabled or not compilable here")


def _bf16_edge_pairs() -> tuple[np.ndarray, np.ndarray]:
    """Every bf16 bit pattern against neighbours, sign flips, ±0, NaN payloads, ±inf,
    subnormals, ±max and itself: (θ0 bits, θ1 bits) as uint16."""
    every = np.arange(1 << 16, dtype=np.uint32)
    others = [every ^ 1, every ^ 2, every ^ 0x8000, every ^ 0x7F, every + 1, every - 1, every]
    special = np.array(
        [0x0000, 0x8000, 0x0001, 0x8001, 0x007F, 0x0080, 0x7F7F, 0xFF7F, 0x7F80, 0xFF80,
         0x7FC0, 0x7FC1, 0xFFC0, 0x7F81, 0x3F80, 0x3727, 0xB727],
        dtype=np.uint32,
    )  # fmt: skip
    sa, sb = np.meshgrid(special, special)
    a = np.concatenate([*(every for _ in others), sa.ravel()])
    b = np.concatenate([*others, sb.ravel()])
    return (a & 0xFFFF).astype(np.uint16), (b & 0xFFFF).astype(np.uint16)


EDGE = parse_criteria(
    ["bitwise", TABLE6, "abs:0", "abs:1e-3", "abs:1e30", "rel:1e-3,1e-2,0,0.5,2,1e30", PAPER6, "paper:0,1e-3,1e30,1e39"]
)


def test_numba_matches_numpy_on_every_bf16_edge_case() -> None:
    """The fused numba kernel and the numpy kernel agree bit for bit (and with the brute
    force) on every bf16 bit pattern, ±0, NaN payloads, ±inf, subnormals and overflow."""
    _numba_or_skip()
    a, b = _bf16_edge_pairs()
    got = compare(a, b, EDGE, dtypes=("bfloat16", "bfloat16"), backend="numba")
    ref = compare(a, b, EDGE, dtypes=("bfloat16", "bfloat16"), backend="numpy")
    assert got.counts == ref.counts
    assert (got.bitwise_dtype, got.compute_dtype) == (ref.bitwise_dtype, ref.compute_dtype)
    ta, tb = torch.from_numpy(a.view(np.int16)).view(torch.bfloat16), torch.from_numpy(b.view(np.int16)).view(torch.bfloat16)
    assert got.counts == [int(brute(ta, tb, c).sum()) for c in EDGE]
    # Element by element: one element per call, so every count is that element's flag.
    cases = {(0x0000, 0x8000): [1, 0], (0x7FC0, 0x7FC0): [0, 0], (0x7FC0, 0x7FC1): [1, 1],
             (0x3F80, 0x7F80): [1, 1], (0x7F7F, 0xFF7F): [1, 1], (0x0001, 0x0002): [1, 1]}  # fmt: skip
    for (x, y), want in cases.items():
        one = compare(np.array([x], np.uint16), np.array([y], np.uint16), parse_criteria(["bitwise", "abs:0"]),
                      dtypes=("bfloat16", "bfloat16"), backend="numba")  # fmt: skip
        assert one.counts == want, (hex(x), hex(y))


@pytest.mark.parametrize("n", [0, 1, 7, 16384, 16385, K.BLOCK_ELEMS + 12345])
def test_numba_matches_numpy_on_random_pairs(n: int) -> None:
    _numba_or_skip()
    a, b = _random_pair(max(n, 1), torch.bfloat16, seed=n % 1000, specials=n > 100)
    ra, rb = _bits(a)[:n], _bits(b)[:n]
    for crits in (ALL, EDGE, [BITWISE], parse_criteria(["rel:1e-3"]), parse_criteria(["abs:1e-5", "bitwise"])):
        got = compare(ra, rb, crits, dtypes=("bfloat16", "bfloat16"), backend="numba")
        ref = compare(ra, rb, crits, dtypes=("bfloat16", "bfloat16"), backend="numpy")
        assert got.counts == ref.counts, [str(c) for c in crits]
        assert got.numel == ref.numel == n


def test_numba_backend_scope(monkeypatch: pytest.MonkeyPatch) -> None:
    """``auto`` takes numba only for bf16 counts; masks and other dtypes stay on numpy."""
    _numba_or_skip()
    a, b = _random_pair(1000, torch.bfloat16, seed=3)
    ra, rb = _bits(a), _bits(b)
    with pytest.raises(ValueError, match="numba"):
        compare(ra, rb, ALL, masks=[0], dtypes=("bfloat16", "bfloat16"), backend="numba")
    calls = []
    real = N.compare_numba
    monkeypatch.setattr(N, "compare_numba", lambda *x: calls.append(1) or real(*x))
    auto = compare(ra, rb, ALL, dtypes=("bfloat16", "bfloat16"))
    assert calls and auto.counts == compare(ra, rb, ALL, dtypes=("bfloat16", "bfloat16"), backend="numpy").counts
    calls.clear()
    compare(ra, rb, ALL, masks=[1], dtypes=("bfloat16", "bfloat16"))
    compare(a.float(), b.float(), ALL)
    assert not calls


def test_numba_kernels_are_compiled_once_or_fall_back(monkeypatch):
    """`numba_jit.compiled`: the kernels once per process; None when RLSPARSITY_NUMBA=0, when
    numba is missing (silently), or when compiling fails (with one warning)."""
    from rlsparsity import numba_jit

    monkeypatch.setattr(numba_jit, "_COMPILED", {})
    calls = []

    def build():
        calls.append(1)
        return "kernels"

    assert numba_jit.compiled("t", build) == numba_jit.compiled("t", build) == "kernels" and len(calls) == 1

    def missing():
        raise ImportError("no numba")

    def broken():
        raise RuntimeError("LLVM says no")

    assert numba_jit.compiled("missing", missing) is None and numba_jit.known_unavailable("missing")
    with pytest.warns(UserWarning, match="numba broken kernel unavailable .LLVM says no"):
        assert numba_jit.compiled("broken", broken) is None
    assert numba_jit.compiled("broken", broken) is None  # not retried, not warned again
    monkeypatch.setenv("RLSPARSITY_NUMBA", "0")
    assert numba_jit.compiled("off", build) is None and len(calls) == 1 and numba_jit.known_unavailable("t")
