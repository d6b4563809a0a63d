"""Pairwise overlap of update masks: the distributed analysis job's engine (issue 4)."""

from rlsparsity.analysis.overlap.engine import (
    DEFAULT_FACTORS,
    RESULT_FORMAT,
    OverlapCache,
    OverlapError,
    OverlapResult,
    ProgressFn,
    compute_overlap,
    default_cache_dir,
    differing_factors,
    overlap_task,
    pair_counts,
    pair_metrics,
    plan_ranges,
    row_popcounts,
    rows_to_table,
)

__all__ = [
    "DEFAULT_FACTORS",
    "RESULT_FORMAT",
    "OverlapCache",
    "OverlapError",
    "OverlapResult",
    "ProgressFn",
    "compute_overlap",
    "default_cache_dir",
    "differing_factors",
    "overlap_task",
    "pair_counts",
    "pair_metrics",
    "plan_ranges",
    "row_popcounts",
    "rows_to_table",
]
