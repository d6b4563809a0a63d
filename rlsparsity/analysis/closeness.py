"""How close a subnetwork run ends to its full run (the paper's RQ3), from their saved weights
and final masks: the share of parameters identical under each criterion, and the overlap of
the two update sets."""

from __future__ import annotations

import os
from collections.abc import Sequence

from rlsparsity.analysis.criteria import parse_criterion
from rlsparsity.analysis.diff.engine import diff
from rlsparsity.analysis.overlap.engine import compute_overlap

# The paper's tolerances (1e-5, 1e-4), bitwise, and Path Not Taken's relative criterion.
CLOSENESS_CRITERIA = ("bitwise", "abs:1e-5", "abs:1e-4", "rel:1e-3")


def identical_shares(
    sub_weights: str | os.PathLike, full_weights: str | os.PathLike, criteria: Sequence[str] = CLOSENESS_CRITERIA
) -> dict[str, float]:
    """Per criterion, the share of parameters of θ_sub equal to θ_full's (1 − the diff's
    changed share, tied tensors counted once), compared in the checkpoints' dtype."""
    parsed = [parse_criterion(c) for c in criteria]
    result = diff(full_weights, sub_weights, parsed, workers=1)
    return {spec: result.sparsity(c) for spec, c in zip(criteria, parsed, strict=True)}  # keyed as given


def update_overlap(sub_mask: str | os.PathLike, full_mask: str | os.PathLike) -> dict[str, float]:
    """|I_sub ∩ I_full| over |I_sub| and over |I_full|, where I is the set of entries each
    run changed against θ0 (their final bitwise bf16 masks)."""
    result = compute_overlap([sub_mask, full_mask], ["sub", "full"], use_ray=False, use_cache=False)
    inter = result.inter  # (2, 2), diagonal |I_i|
    size_sub, size_full, both = int(inter[0, 0]), int(inter[1, 1]), int(inter[0, 1])
    return {
        "of_sub": both / size_sub if size_sub else float("nan"),
        "of_full": both / size_full if size_full else float("nan"),
        "changed_sub": float(size_sub),
        "changed_full": float(size_full),
    }
