"""rlsparsity: which parameters does RL fine-tuning change? Sweeps, masks and overlap at scale."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rlsparsity.sweeps.run import SweepResult

__version__ = "0.1.0"

from rlsparsity.contracts.mlflow_layout import DEFAULT_TRACKING_URI

__all__ = ["DEFAULT_TRACKING_URI", "sweep"]


def sweep(spec: Any, overrides: tuple[str, ...] = ()) -> SweepResult:
    """Run a sweep from a `SweepSpec`, a dict or a YAML path; see `rlsparsity.sweeps.run.sweep`."""
    from rlsparsity.sweeps.run import sweep as _sweep

    return _sweep(spec, overrides)
