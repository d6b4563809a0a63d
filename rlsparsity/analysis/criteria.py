"""Update criteria: which elements of a tensor count as changed between θ0 and θ1.

Three criteria, all computed by one pass of :func:`compare` over the data:

``bitwise``
    The stored values differ in any bit. Same dtype: the raw bit patterns are compared
    (an integer view of the storage). Different dtypes (e.g. bf16 vs float32): both sides
    are cast to the compute dtype below (float32, or float64) and the bits are compared
    there. Those casts are exact for every float dtype, so this is "the values differ",
    except that ±0 and NaN payloads keep their bit identity.

``abs:TOL``
    The paper's criterion: changed iff |θ1 − θ0| > TOL, i.e. unchanged iff |Δ| ≤ TOL.
    Δ is computed in float32 from the stored dtype (float64 when either side is float64
    or a 32/64-bit integer, so no stored value is rounded before the subtraction). TOL is
    compared *exactly* as a real number: internally it is replaced by the largest float32
    not above it, which gives the same answer for every float32 |Δ|. (The paper's script
    subtracts in bf16 and compares with ``torch.isclose(Δ, 0, atol=TOL)``; float32 avoids
    rounding Δ before the test.)

``rel:TOL``
    changed iff |Δ| > TOL · max(|θ0|, |θ1|), the precision-relative criterion of the
    follow-up work, computed in the same dtype as ``abs`` with the product rounded there
    (TOL itself rounded to nearest in that dtype).

Special values (tested):

* An element whose two stored values are bit-identical is unchanged under every criterion
  (NaN -> same NaN, inf -> inf, a subnormal -> itself).
* ``abs`` and ``rel`` changes are always a subset of ``bitwise`` changes. Wherever Δ is not
  finite (either side NaN or ±inf, or the subtraction overflows), an element is changed
  under ``abs``/``rel`` iff its bits differ. So x -> NaN, NaN -> other NaN payload, 1 -> inf
  are changed; NaN -> identical NaN is not.
* -0 -> +0 is changed under ``bitwise`` (the bits differ) and unchanged under ``abs``/``rel``
  (Δ = 0).
* Subnormals are ordinary values: bf16/f16 subnormals convert exactly to float32, and the
  arithmetic runs with gradual underflow (the process must not have enabled
  ``torch.set_flush_denormal(True)``).

Implementation: :func:`compare` dispatches to the kernels of
:mod:`rlsparsity.analysis.criteria_kernels` (numpy on CPU, so bf16/float32 never import
torch; a fused numba kernel for bf16 counts; torch for tensors on other devices), which
give the same counts bit for bit.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from rlsparsity.analysis import criteria_kernels as kernels
from rlsparsity.analysis.criteria_kernels import (
    STORAGE,
    TORCH_CONVERTED,
    Comparison,
    common_dtypes,
    dtype_name,
)

Mode = Literal["bitwise", "abs", "rel"]


class CriterionError(ValueError):
    """A criterion string could not be parsed."""


def _fmt_tol(tol: float) -> str:
    """Shortest round-tripping text for a tolerance, with a plain exponent (1e-05 -> 1e-5)."""
    text = repr(float(tol))
    if "e" in text:
        mant, exp = text.split("e")
        text = f"{mant.removesuffix('.0')}e{int(exp)}"
    return text


@dataclass(frozen=True)
class Criterion:
    """One update criterion. ``str(c)`` is its canonical spelling (``abs:1e-5``)."""

    mode: Mode
    tol: float | None = None

    def __post_init__(self) -> None:
        if self.mode == "bitwise":
            if self.tol is not None:
                raise CriterionError("bitwise takes no tolerance")
        elif self.mode in ("abs", "rel"):
            if self.tol is None or not math.isfinite(self.tol) or self.tol < 0:
                raise CriterionError(f"{self.mode}: tolerance must be a finite number >= 0, got {self.tol!r}")
        else:
            raise CriterionError(f"unknown criterion mode {self.mode!r}")

    def __str__(self) -> str:
        return "bitwise" if self.mode == "bitwise" else f"{self.mode}:{_fmt_tol(self.tol)}"

    def to_meta(self) -> dict[str, Any]:
        """The ``criterion`` entry of a mask file's metadata."""
        return {"mode": self.mode, "tol": self.tol, "spec": str(self)}

    def threshold(self, dtype: np.dtype) -> np.generic:
        """The scalar |Δ| (abs) or the factor (rel) is compared against, in ``dtype``."""
        assert self.tol is not None
        t = dtype.type(self.tol)
        if self.mode == "abs" and float(t) > self.tol:
            # Largest representable value <= TOL: for any representable |Δ|,
            # |Δ| > t  <=>  |Δ| > TOL as real numbers.
            t = np.nextafter(t, dtype.type(-np.inf))
        return t


BITWISE = Criterion("bitwise")
DEFAULT_CRITERIA: tuple[Criterion, ...] = (BITWISE, Criterion("abs", 1e-5))

_SPEC = re.compile(r"^\s*(bitwise|abs|rel)\s*(?::\s*(.*))?$", re.IGNORECASE)


def parse_criteria(specs: str | Iterable[str]) -> list[Criterion]:
    """Parse criterion strings. ``"abs:1e-8,1e-7"`` gives two criteria; duplicates are dropped.

    >>> [str(c) for c in parse_criteria(["bitwise", "abs:1e-8,1e-5", "rel:1e-3"])]
    ['bitwise', 'abs:1e-8', 'abs:1e-5', 'rel:0.001']
    """
    if isinstance(specs, str):
        specs = [specs]
    out: list[Criterion] = []
    for spec in specs:
        m = _SPEC.match(spec)
        if not m:
            raise CriterionError(
                f"bad criterion {spec!r}: expected 'bitwise', 'abs:TOL[,TOL...]' or 'rel:TOL[,TOL...]'"
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
    """Parse exactly one criterion (``"bitwise"``, ``"abs:1e-5"``, ``"rel:1e-3"``)."""
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
        kern = kernels.numba_kernel() if (fast or backend == "numba") else None
        if backend == "numba" and kern is None:
            raise ValueError("the numba kernel is not available (numba missing or RLSPARSITY_NUMBA=0)")
        if backend == "numba" and not fast:
            raise ValueError("the numba kernel counts bf16 pairs without masks only")
        if kern is not None:
            return kernels.compare_numba(kern, ra, rb, criteria)
    return kernels.compare_numpy(ra, na, rb, nb, criteria, masks, packed)


def numba_available() -> bool:
    """Whether the fused numba kernel is in use for bf16 counts (imports numba: ~0.3 s once)."""
    return kernels.numba_kernel() is not None


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
