"""rlsparsity: which parameters does RL fine-tuning change? Sweeps, masks and overlap at scale."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rlsparsity.sweeps.run import SweepResult

__version__ = "0.1.0"

# Local SQLite store in the working directory: the embedded default, no server needed.
# Here rather than in platform.config so that the CLIs can name it without importing pydantic.
DEFAULT_TRACKING_URI = "sqlite:///mlruns.db"


def sweep(spec: Any, overrides: tuple[str, ...] = ()) -> SweepResult:
    """Run a sweep from a `SweepSpec`, a dict or a YAML path; see `rlsparsity.sweeps.run.sweep`."""
    from rlsparsity.sweeps.run import sweep as _sweep

    return _sweep(spec, overrides)
