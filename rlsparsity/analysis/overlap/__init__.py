"""Pairwise overlap of update masks: the distributed analysis job's engine (issue 4).

For N masks over the same base model, the size of the intersection of every pair's update
sets, per tensor, per layer, per matrix type and in total, with the random baselines of
docs/DESIGN.md ("Metrics"). The modules, in the order the work runs:

- ``engine``: ``compute_overlap``. Reads every mask's metadata first (footer only) and
  fails on incompatible inputs before touching any bits; looks the pairs up in the cache
  and, for the missing ones, runs the tasks and verifies what they read.
- ``layout``: the small columns of every file, joined on (tensor, chunk), chunk shapes
  checked; no bits.
- ``planner``: the rows cut into contiguous ranges, one task each, sized from the work
  (N*P/8 bytes read and hashed, N(N+1)/2 * P/64 word popcounts) and measured rates.
- ``task``: one range; memory-maps the N files, copies each chunk's bits into one (N, W)
  uint64 block and computes all pairs at once with ``kernels``. It checks the rows it
  reads ('changed' against the popcounts the kernels count anyway) and digests those of
  the masks being verified, so the driver verifies every checksum while the bits are read
  once. The rules are ``rlsparsity.contracts.mask``'s, the ones ``read_mask`` applies.
- ``cache``: results per pair of mask checksums (Arrow files), so adding a run computes
  only its pairs, and re-running with nothing new reads no bits at all.
- ``result``: ``OverlapResult``, its groupings, metrics and serialisations.
- ``progress``: the progress bar.
"""

from rlsparsity.analysis.overlap.cache import OverlapCache, default_cache_dir
from rlsparsity.analysis.overlap.engine import OverlapError, compute_overlap
from rlsparsity.analysis.overlap.kernels import pair_counts, row_popcounts
from rlsparsity.analysis.overlap.planner import plan_ranges
from rlsparsity.analysis.overlap.progress import ProgressFn
from rlsparsity.analysis.overlap.result import (
    DEFAULT_FACTORS,
    RESULT_FORMAT,
    OverlapResult,
    differing_factors,
    pair_metrics,
    rows_to_table,
)
from rlsparsity.analysis.overlap.task import overlap_task

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
