"""Update criteria: which elements of a tensor count as changed between θ0 and θ1.

Four criteria, all computed by one pass of :func:`compare` over the data:

``bitwise``
    The stored values differ in any bit. Same dtype: the raw bit patterns are compared
    (an integer view of the storage). Different dtypes (e.g. bf16 vs float32): both sides
    are cast to the compute dtype below (float32, or float64) and the bits are compared
    there. Those casts are exact for every float dtype, so this is "the values differ",
    except that ±0 and NaN payloads keep their bit identity.

``abs:TOL``
    The paper's criterion as a real-number statement: changed iff |θ1 − θ0| > TOL, i.e.
    unchanged iff |Δ| ≤ TOL. Δ is computed in float32 from the stored dtype (float64 when
    either side is float64 or a 32/64-bit integer, so no stored value is rounded before the
    subtraction). TOL is compared *exactly* as a real number: internally it is replaced by
    the largest float32 not above it, which gives the same answer for every float32 |Δ|.

``paper:TOL``
    The arithmetic of the paper's own ``check_sparsity.py``, to the element, so that its
    Tables 1 and 6 can be reproduced exactly. The script loads both models with
    ``torch_dtype=bfloat16``, takes ``Δ = θ1 − θ0`` in bf16 and counts
    ``torch.isclose(Δ, 0, atol=TOL)`` as unchanged. So, per element:

    1. each side is cast to bf16 as ``tensor.to(torch.bfloat16)`` does: to float32 (round
       to nearest), then to bf16 (round to nearest even; NaN stays NaN, overflow gives
       ±inf). bf16 data is unchanged; float32/float16/fp8 data is rounded as the script's
       loader would. (Integer tensors go the same way; the script never sees them, as it
       compares parameters only.)
    2. Δ = bf16(float32(b) − float32(a)): torch's bf16 subtraction, computed in float32 and
       rounded to nearest even. Differences of two bf16 values are never rounded to 0, so
       Δ = 0 iff the two bf16 values are equal, -0 vs +0 included.
    3. unchanged iff |Δ| ≤ T, where T = bf16(float32(TOL)) is the tolerance as isclose
       evaluates it on a bf16 tensor (``atol + |rtol · 0|`` computed in bf16): 1e-8 ->
       1.0011718e-8, 1e-7 -> 1.0011718e-7, 1e-6 -> 9.983778e-7, 1e-5 -> 1.0013580e-5. A
       NaN or ±inf Δ is never close (isclose's ``equal_nan=False`` and its finiteness
       test), so NaN or ±inf weights count as *changed* even when their bits are equal
       (inf − inf is NaN), as in the script; so do equal float32 values beyond bf16's range.

    How it differs from ``abs:TOL`` (up to about 0.01 points of sparsity on real pairs):
    the subtraction is rounded to bf16; the tolerance is rounded to bf16 (1e-5 becomes
    1.001358e-5, so a Δ of exactly 1.001358e-5 is unchanged); non-bf16 sides are rounded to
    bf16 before the subtraction; and NaN/inf weights count as changed. -0 vs +0 is
    unchanged under both.

``rel:TOL``
    changed iff |Δ| > TOL · max(|θ0|, |θ1|), the precision-relative criterion of the
    follow-up work, computed in the same dtype as ``abs`` with the product rounded there
    (TOL itself rounded to nearest in that dtype).

Special values (tested):

* An element whose two stored values are bit-identical is unchanged under ``bitwise``,
  ``abs`` and ``rel`` (NaN -> same NaN, inf -> inf, a subnormal -> itself); under ``paper``
  too, except for NaN and ±inf (see above).
* ``abs`` and ``rel`` changes are always a subset of ``bitwise`` changes. Wherever Δ is not
  finite (either side NaN or ±inf, or the subtraction overflows), an element is changed
  under ``abs``/``rel`` iff its bits differ. So x -> NaN, NaN -> other NaN payload, 1 -> inf
  are changed; NaN -> identical NaN is not.
* -0 -> +0 is changed under ``bitwise`` (the bits differ) and unchanged under
  ``abs``/``rel``/``paper`` (Δ = 0).
* Subnormals are ordinary values: bf16/f16 subnormals convert exactly to float32, and the
  arithmetic runs with gradual underflow (the process must not have enabled
  ``torch.set_flush_denormal(True)``).

Implementation: :func:`compare` dispatches to the kernels of
:mod:`rlsparsity.analysis.criteria_kernels` (numpy on CPU, so bf16/float32 never import
torch; torch for tensors on other devices) and :mod:`rlsparsity.analysis.criteria_numba`
(a fused numba kernel for bf16 counts), which give the same counts bit for bit.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from rlsparsity.analysis import criteria_kernels as kernels
from rlsparsity.analysis import criteria_numba
from rlsparsity.analysis.criteria_kernels import (
    STORAGE,
    TORCH_CONVERTED,
    Comparison,
    common_dtypes,
    dtype_name,
)

Mode = Literal["bitwise", "abs", "rel", "paper"]
_TOL_MODES = ("abs", "rel", "paper")


class CriterionError(ValueError):
    """A criterion string could not be parsed."""


def _fmt_tol(tol: float) -> str:
    """Shortest round-tripping text for a tolerance, with a plain exponent and no ``.0``
    (1e-05 -> 1e-5, 0.0 -> 0, 2.0 -> 2): the spelling users type, used as the JSON key."""
    text = repr(float(tol))
    if "e" in text:
        mant, exp = text.split("e")
        return f"{mant.removesuffix('.0')}e{int(exp)}"
    return text.removesuffix(".0")


@dataclass(frozen=True)
class Criterion:
    """One update criterion. ``str(c)`` is its canonical spelling (``abs:1e-5``)."""

    mode: Mode
    tol: float | None = None

    def __post_init__(self) -> None:
        if self.mode == "bitwise":
            if self.tol is not None:
                raise CriterionError("bitwise takes no tolerance")
        elif self.mode in _TOL_MODES:
            if self.tol is None or not math.isfinite(self.tol) or self.tol < 0:
                raise CriterionError(f"{self.mode}: tolerance must be a finite number >= 0, got {self.tol!r}")
            # One spelling and one JSON key per value: 0 / -0.0 / 0.0 are all "0".
            object.__setattr__(self, "tol", float(self.tol) + 0.0)
        else:
            raise CriterionError(f"unknown criterion mode {self.mode!r}")

    def __str__(self) -> str:
        return "bitwise" if self.mode == "bitwise" else f"{self.mode}:{_fmt_tol(self.tol)}"

    def to_meta(self) -> dict[str, Any]:
        """The ``criterion`` entry of a mask file's metadata (``paper`` adds the bf16
        tolerance its comparison really uses)."""
        meta: dict[str, Any] = {"mode": self.mode, "tol": self.tol, "spec": str(self)}
        if self.mode == "paper":
            meta["atol_bf16"] = float(self.threshold(np.dtype(np.float32)))
        return meta

    def threshold(self, dtype: np.dtype) -> np.generic:
        """The scalar |Δ| (abs) or the factor (rel) is compared against, in ``dtype``.

        ``paper``: the bf16 bound of its |Δ| (as a float32 whatever ``dtype``):
        bf16(float32(TOL)), as ``torch.isclose`` computes its allowed error on a bf16
        tensor, capped at the largest finite bf16 (an infinite bound still leaves ±inf
        Δ "not close", by isclose's finiteness test)."""
        assert self.tol is not None
        if self.mode == "paper":
            return kernels.paper_bound(self.tol)
        t = dtype.type(self.tol)
        if self.mode == "abs" and float(t) > self.tol:
            # Largest representable value <= TOL: for any representable |Δ|,
            # |Δ| > t  <=>  |Δ| > TOL as real numbers.
            t = np.nextafter(t, dtype.type(-np.inf))
        return t


BITWISE = Criterion("bitwise")
DEFAULT_CRITERIA: tuple[Criterion, ...] = (BITWISE, Criterion("abs", 1e-5))

_SPEC = re.compile(r"^\s*(bitwise|abs|rel|paper)\s*(?::\s*(.*))?$", re.IGNORECASE)


def parse_criteria(specs: str | Iterable[str]) -> list[Criterion]:
    """Parse criterion strings. ``"abs:1e-8,1e-7"`` gives two criteria; duplicates are dropped.

    >>> [str(c) for c in parse_criteria(["bitwise", "abs:1e-8,1e-5", "rel:1e-3", "paper:0"])]
    ['bitwise', 'abs:1e-8', 'abs:1e-5', 'rel:0.001', 'paper:0']
    """
    if isinstance(specs, str):
        specs = [specs]
    out: list[Criterion] = []
    for spec in specs:
        m = _SPEC.match(spec)
        if not m:
            raise CriterionError(
                f"bad criterion {spec!r}: expected 'bitwise', 'abs:TOL[,TOL...]', 'rel:TOL[,TOL...]' "
                "or 'paper:TOL[,TOL...]'"
            )
        mode, rest = m.group(1).lower(), m.group(2)
        if mode == "bitwise":
            if rest:
                raise CriterionError(f"bad criterion {spec!r}: bitwise takes no tolerance")
            found = [BITWISE]
        else:
            if not rest:
                raise CriterionError(f"bad criterion {spec!r}: {mode} needs a tolerance, e.g. {mode}:1e-5")
            found = []
            for part in rest.split(","):
                try:
                    tol = float(part)
                except ValueError:
                    raise CriterionError(f"bad criterion {spec!r}: {part.strip()!r} is not a number") from None
                found.append(Criterion(mode, tol))  # type: ignore[arg-type]
        out.extend(c for c in found if c not in out)
    if not out:
        raise CriterionError("no criterion given")
    return out


def parse_criterion(spec: str) -> Criterion:
    """Parse exactly one criterion (``"bitwise"``, ``"abs:1e-5"``, ``"rel:1e-3"``, ``"paper:1e-5"``)."""
    found = parse_criteria(spec)
    if len(found) != 1:
        raise CriterionError(f"{spec!r} names {len(found)} criteria; use parse_criteria for lists")
    return found[0]


# ----------------------------------------------------------------------------- compare


def compare(
    a: Any,
    b: Any,
    criteria: Sequence[Criterion],
    *,
    masks: Sequence[int] = (),
    packed: bool = False,
    dtypes: tuple[str | None, str | None] = (None, None),
    backend: Literal["auto", "numpy", "numba", "torch"] = "auto",
) -> Comparison:
    """Count changed elements of θ0=``a`` -> θ1=``b`` under every criterion in one pass.

    ``a`` and ``b`` are torch tensors or numpy arrays with the same number of elements
    (compared in row-major order); their dtypes may differ (see the module docstring).
    numpy has no bfloat16/float8: pass such data as its raw bits (uint16/uint8 arrays) and
    name the dtype in ``dtypes``. ``masks`` lists criterion indices whose flat boolean masks
    are returned (``packed``: LSB-first packed bits, the mask format's layout, 1/8 of the
    memory). CPU data runs a blocked numpy kernel (cache-sized blocks, no allocation per
    call); tensors on other devices (or ``backend="torch"``) use plain torch ops with the
    same semantics. A bf16 pair counted without masks runs the fused numba kernel when
    numba is installed (``backend="auto"``; ``"numba"`` requires it, ``"numpy"`` never
    uses it; ``RLSPARSITY_NUMBA=0`` turns it off): the same counts, bit for bit.
    """
    criteria = list(criteria)
    if backend == "torch" or (backend == "auto" and any(kernels.is_torch(x) and x.device.type != "cpu" for x in (a, b))):
        return kernels.compare_torch(a, b, criteria, masks, packed)
    if kernels.is_torch(a) and a.device.type != "cpu":
        a = a.cpu()
    if kernels.is_torch(b) and b.device.type != "cpu":
        b = b.cpu()
    ra, na = kernels.as_raw(a, dtypes[0])
    rb, nb = kernels.as_raw(b, dtypes[1])
    if ra.size != rb.size:
        raise ValueError(f"compare: {ra.size} vs {rb.size} elements")
    if backend in ("auto", "numba"):
        fast = na == nb == "bfloat16" and not masks
        kern = criteria_numba.numba_kernel() if (fast or backend == "numba") else None
        if backend == "numba" and kern is None:
            raise ValueError("the numba kernel is not available (numba missing or RLSPARSITY_NUMBA=0)")
        if backend == "numba" and not fast:
            raise ValueError("the numba kernel counts bf16 pairs without masks only")
        if kern is not None:
            return criteria_numba.compare_numba(kern, ra, rb, criteria)
    return kernels.compare_numpy(ra, na, rb, nb, criteria, masks, packed)


def numba_available() -> bool:
    """Whether the fused numba kernel is in use for bf16 counts (imports numba: ~0.3 s once)."""
    return criteria_numba.numba_kernel() is not None


__all__ = [
    "BITWISE",
    "DEFAULT_CRITERIA",
    "STORAGE",
    "TORCH_CONVERTED",
    "Comparison",
    "Criterion",
    "CriterionError",
    "Mode",
    "common_dtypes",
    "compare",
    "dtype_name",
    "numba_available",
    "parse_criteria",
    "parse_criterion",
]
