"""rlsparsity: which parameters does RL fine-tuning change? Sweeps, masks and overlap at scale."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rlsparsity.sweeps.run import SweepResult
    from rlsparsity.sweeps.study import StudyResult

__version__ = "0.1.0"

from rlsparsity.contracts.mlflow_layout import DEFAULT_TRACKING_URI

__all__ = ["DEFAULT_TRACKING_URI", "sweep"]


def sweep(spec: Any, overrides: tuple[str, ...] = (), *, resume: bool = False) -> SweepResult | StudyResult:
    """Run a sweep from a `SweepSpec`, a dict or a YAML path; see `rlsparsity.sweeps.run.sweep`
    (``resume`` continues an interrupted one). A spec with `subnetwork_stages` runs a staged
    study (`rlsparsity.sweeps.study.run_study`), which reuses its finished stages when run again."""
    from rlsparsity.sweeps.run import load_spec
    from rlsparsity.sweeps.run import sweep as _sweep

    spec = load_spec(spec, overrides)
    if spec.stages is not None:
        from rlsparsity.sweeps.study import run_study

        return run_study(spec)
    return _sweep(spec, resume=resume)
