"""Why a weight did not change: distances in units of θ0's bf16 half-ulp.

A float32 master weight that starts at a bf16 value x = θ0 keeps its bf16 view while it
stays within half a bf16 unit in the last place of x (2^(floor(log2|x|) − 8): bf16 has 8
significant bits). So the ratio r = |θ_t − θ0| / half-ulp(θ0) says how far each weight is
from changing its bf16 view: r < 1 and it still reads as θ0 (below a power of two the
next value down is closer, so a downward move there needs only r ≥ 1/2). The same units
for the last optimizer step's update show how many per-step updates are too small to
cross a rounding step on their own (PULSE's "vanish after the bf16 cast").

The histogram bins r by powers of two, exactly, from the float32 exponents of Δ and θ0
(`torch.frexp`), so no ratio is formed and nothing overflows (θ0 = 0 has a half-ulp of
2^-134, half the smallest bf16 subnormal).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

# Bins of floor(log2 r): everything below LOW_EXP and from HIGH_EXP up is lumped.
LOW_EXP, HIGH_EXP = -10, 6
_MIN_HALF_ULP_EXP = -134  # the bf16 subnormal step is 2^-133


def half_ulp_exponent(theta0: Any) -> Any:
    """e (int32 tensor) with half-ulp(θ0) = 2**e for the bf16 values ``theta0``."""
    import torch

    _, e = torch.frexp(theta0.float())  # |x| = m · 2^e, m in [0.5, 1): floor(log2|x|) = e − 1
    e = (e.to(torch.int32) - 9).clamp(min=_MIN_HALF_ULP_EXP)
    return torch.where(theta0 == 0, torch.full_like(e, _MIN_HALF_ULP_EXP), e)


@dataclass
class DriftHistogram:
    """Counts of r = |Δ| / half-ulp(θ0): `zero` where Δ = 0, then one bin per power of two."""

    zero: int = 0
    bins: list[int] = field(default_factory=lambda: [0] * (HIGH_EXP - LOW_EXP + 1))

    @property
    def total(self) -> int:
        return self.zero + sum(self.bins)

    @property
    def below_one(self) -> int:
        """Entries with r < 1 (Δ = 0 included): too close to θ0 to move its bf16 view."""
        return self.zero + sum(self.bins[: -LOW_EXP])

    def add(self, delta: Any, half_exp: Any) -> None:
        import torch

        d = delta.float().abs()
        _, ed = torch.frexp(d)
        k = (ed.to(torch.int32) - 1 - half_exp).clamp_(LOW_EXP, HIGH_EXP) - LOW_EXP
        # A NaN or infinite Δ is as far as it gets: the top bin (frexp's exponent is 0 there).
        k = torch.where(torch.isfinite(d), k, HIGH_EXP - LOW_EXP)
        # Δ = 0 goes to one more bin, after the others: one bincount and no boolean indexing
        # (compacting the nonzero entries took most of a mask step's drift time).
        zero_bin = len(self.bins)
        k = torch.where(d == 0, zero_bin, k)
        counts = torch.bincount(k.reshape(-1), minlength=zero_bin + 1).tolist()
        self.zero += counts[zero_bin]
        self.bins = [a + b for a, b in zip(self.bins, counts[:zero_bin], strict=True)]

    @staticmethod
    def labels() -> list[str]:
        def p(k: int) -> str:
            return "1" if k == 0 else f"2^{k}"

        out = [f"< {p(LOW_EXP + 1)}"]
        out += [f"[{p(k)}, {p(k + 1)})" for k in range(LOW_EXP + 1, HIGH_EXP)]
        return ["0", *out, f">= {p(HIGH_EXP)}"]

    def to_json(self) -> dict[str, Any]:
        return {"zero": self.zero, "bins": self.bins, "low_exp": LOW_EXP, "high_exp": HIGH_EXP}


@dataclass
class Drift:
    """At one mask step: the drift since θ0 and the last step's update, both in units of
    θ0's half-ulp, and how many of that step's master updates left the bf16 view alone."""

    step: int
    since_theta0: DriftHistogram = field(default_factory=DriftHistogram)
    last_step: DriftHistogram = field(default_factory=DriftHistogram)
    step_updated: int = 0  # master entries the last step changed
    step_vanished: int = 0  # of those, entries whose bf16 view did not change

    def add(self, theta0_bf16: Any, previous: Any, current: Any, *, fused: bool = True) -> None:
        """One tensor: θ0's bf16 view, the masters before and after the last step. CPU
        float32 masters go through one fused numba pass (`_drift_counts`); others (CUDA,
        bf16 masters) through torch ops. Both give the same counts (tests/test_training_masks.py)."""
        import torch

        kern = _kernel() if fused else None
        if (kern is not None and current.device.type == "cpu" and current.dtype == torch.float32
                and previous.dtype == torch.float32 and theta0_bf16.dtype == torch.bfloat16):
            since = np.zeros(len(self.since_theta0.bins) + 1, np.int64)
            last = np.zeros_like(since)
            moved = np.zeros(2, np.int64)
            kern(theta0_bf16.contiguous().view(torch.int16).numpy().reshape(-1).view(np.uint16),
                 previous.detach().contiguous().numpy().reshape(-1), current.detach().contiguous().numpy().reshape(-1),
                 LOW_EXP, HIGH_EXP, since, last, moved)
            for hist, counts in ((self.since_theta0, since), (self.last_step, last)):
                hist.zero += int(counts[-1])
                hist.bins = [a + int(b) for a, b in zip(hist.bins, counts[:-1].tolist(), strict=True)]
            self.step_updated += int(moved[0])
            self.step_vanished += int(moved[1])
            return
        half = half_ulp_exponent(theta0_bf16)
        self.since_theta0.add(current.float() - theta0_bf16.float(), half)
        step = current.float() - previous.float()
        self.last_step.add(step, half)
        moved = (step != 0) | (current != previous)  # NaN-safe: a changed bit pattern counts
        same_bf16 = previous.to(torch.bfloat16).view(torch.int16) == current.to(torch.bfloat16).view(torch.int16)
        self.step_updated += int(moved.sum())
        self.step_vanished += int((moved & same_bf16).sum())

    def metrics(self) -> dict[str, float]:
        n = self.since_theta0.total
        out = {"drift/below_half_ulp_frac": self.since_theta0.below_one / n if n else 0.0,
               "drift/step_below_half_ulp_frac": self.last_step.below_one / n if n else 0.0,
               "drift/step_updated_frac": self.step_updated / n if n else 0.0}
        if self.step_updated:
            out["drift/step_update_vanished_frac"] = self.step_vanished / self.step_updated
        return out

    def counts(self) -> list[int]:
        """Every count as one flat list (to sum over the ranks that each hold some rows)."""
        a, b = self.since_theta0, self.last_step
        return [a.zero, *a.bins, b.zero, *b.bins, self.step_updated, self.step_vanished]

    def set_counts(self, counts: list[int]) -> None:
        """The inverse of `counts`."""
        k = len(self.since_theta0.bins) + 1
        for hist, part in ((self.since_theta0, counts[:k]), (self.last_step, counts[k: 2 * k])):
            hist.zero, hist.bins = int(part[0]), [int(c) for c in part[1:]]
        self.step_updated, self.step_vanished = (int(c) for c in counts[2 * k:])

    def table_rows(self) -> list[dict[str, Any]]:
        a, b = self.since_theta0, self.last_step
        rows = []
        for label, x, y in zip(DriftHistogram.labels(), [a.zero, *a.bins], [b.zero, *b.bins], strict=True):
            rows.append({
                "|Δ| / half-ulp(θ0)": label,
                "since θ0: weights": x, "since θ0: %": round(100 * x / a.total, 4) if a.total else 0.0,
                "last step: weights": y, "last step: %": round(100 * y / b.total, 4) if b.total else 0.0,
            })
        return rows

    def to_json(self) -> dict[str, Any]:
        return {"step": self.step, "since_theta0": self.since_theta0.to_json(), "last_step": self.last_step.to_json(),
                "step_updated": self.step_updated, "step_vanished": self.step_vanished, **self.metrics()}


_f32_to_u32: Any = None  # float32 -> its bits, set before compiling (numba_jit.bitcasts)
_u16_to_f32: Any = None  # bf16 bits -> float32, likewise


def _floor_log2(u: Any) -> Any:  # pragma: no cover - compiled by numba
    """floor(log2 |x|) of a finite nonzero float32 from its bits ``u`` (subnormals too)."""
    e = (u >> 23) & 0xFF
    if e != 0:
        return e - 127
    m = u & 0x7FFFFF  # a subnormal: m · 2^-149
    k = -150
    while m:
        m >>= 1
        k += 1
    return k


def _half_exp(u: Any) -> Any:  # pragma: no cover - compiled by numba
    """half_ulp_exponent of one bf16 value θ0 from its float32 bits ``u``."""
    if (u & 0x7FFFFFFF) == 0:
        return _MIN_HALF_ULP_EXP
    return max(_floor_log2(u) - 8, _MIN_HALF_ULP_EXP)


def _bin(d: Any, half: Any, low: Any, high: Any) -> Any:  # pragma: no cover - compiled by numba
    """The histogram slot of |Δ| = d: its power-of-two bin, or the zero slot (the last)."""
    if d == 0:
        return high - low + 1
    u = _f32_to_u32(d) & 0x7FFFFFFF
    if u >= 0x7F800000:  # NaN or infinite: the top bin, as the torch path puts it
        return high - low
    return min(max(_floor_log2(u) - half, low), high) - low


def _bf16_bits(u: Any) -> Any:  # pragma: no cover - compiled by numba
    """torch's float32 -> bfloat16 cast on bits: nearest even, every NaN to 0xFFFF."""
    if (u & 0x7FFFFFFF) > 0x7F800000:
        return 0xFFFF
    return (u + 0x7FFF + ((u >> 16) & 1)) >> 16


def _drift_counts(theta0, prev, cur, low, high, since, last, moved):  # pragma: no cover - compiled by numba
    """One pass over a tensor: ``theta0`` bf16 bits (uint16), ``prev``/``cur`` float32
    masters before/after the last step. Adds into the histograms ``since`` (Δ = cur − θ0)
    and ``last`` (Δ = cur − prev), zero slot last, and into moved[0] (entries the step
    changed) and moved[1] (of those, entries whose bf16 view did not change)."""
    for i in range(cur.shape[0]):
        t = _u16_to_f32(theta0[i])
        half = _half_exp(_f32_to_u32(t))
        c = cur[i]
        p = prev[i]
        since[_bin(abs(c - t), half, low, high)] += 1
        step = c - p
        last[_bin(abs(step), half, low, high)] += 1
        if step != 0 or c != p:
            moved[0] += 1
            if _bf16_bits(_f32_to_u32(c)) == _bf16_bits(_f32_to_u32(p)):
                moved[1] += 1


def _build_kernel() -> Any:
    global _f32_to_u32, _u16_to_f32, _floor_log2, _half_exp, _bin, _bf16_bits
    from rlsparsity.numba_jit import bitcasts, njit

    _u16_to_f32, _f32_to_u32 = bitcasts()
    _floor_log2, _half_exp, _bin, _bf16_bits = (njit(f) for f in (_floor_log2, _half_exp, _bin, _bf16_bits))
    kern = njit(_drift_counts)
    f = np.zeros(2, np.float32)
    kern(np.zeros(2, np.uint16), f, f, LOW_EXP, HIGH_EXP, np.zeros(HIGH_EXP - LOW_EXP + 2, np.int64),
         np.zeros(HIGH_EXP - LOW_EXP + 2, np.int64), np.zeros(2, np.int64))
    return kern


def _kernel() -> Any:
    from rlsparsity.numba_jit import compiled

    return compiled("drift histogram", _build_kernel)
