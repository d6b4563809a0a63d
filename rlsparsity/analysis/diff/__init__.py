"""Update sparsity of a checkpoint pair, streamed and exact (``rlsparsity diff``).

Modules: `result` (what a diff returns, its JSON), `plan` (matching the two sides),
`engine` (units on threads or Ray tasks, and the driver), `cli` (the subcommand). The
names below are imported from them on first use, so building the ``rlsparsity`` parser
(which imports `cli`) does not load the engine.

What is counted
    n (``total``) is the number of elements of every tensor compared: embeddings, lm_head,
    norms, buffers -- every named tensor stored in the checkpoint, each once. Excluded
    tensors (``--allow-mismatch``) are not in n and are listed with their reason.
    ``changed`` per criterion follows :mod:`rlsparsity.analysis.criteria` (``bitwise``,
    ``abs:TOL``, ``rel:TOL``, and ``paper:TOL``, the paper script's bf16 arithmetic;
    NaN/±0/subnormal rules are stated there), and sparsity = 1 − changed / n.

Mismatches
    A tensor whose shapes differ, or that exists on one side only, stops the diff with an
    error naming every such tensor and both shapes. With ``allow_mismatch`` they are
    excluded instead and reported in ``excluded``. Tensors whose dtypes differ are compared
    in a common dtype (see ``criteria.common_dtypes``) and listed in ``notes``.

Tied weights
    When a side's config.json sets ``tie_word_embeddings``, its ``lm_head.weight`` is the
    input embedding. A missing ``lm_head.weight`` is then not an error, and a stored copy is
    verified to be byte-identical to the embedding (if it differs it is treated as an
    ordinary tensor, with a note). If both sides tie, lm_head is counted once, through the
    embedding, and the pair is listed in ``tied``. If only one side ties, that side's
    embedding is compared against the other side's lm_head, which is a parameter of its own
    there. (safetensors files cannot alias storage, so there are no other in-file ties.)

How it runs
    Each tensor is split into units of ``unit_elems`` elements (default 2**20, one mask
    chunk); a unit reads its element range of both files with ``preadv`` into per-thread
    buffers and runs the one-pass kernel for all criteria. Units run on a thread pool (the
    kernel and the reads release the GIL) or as batched Ray tasks, and results are consumed
    in order through a bounded window, so memory is a few units per worker (plus, with a
    mask, one tensor's boolean mask while it is written). Tensors are processed in the base
    checkpoint's storage order so reads are sequential.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rlsparsity.analysis.checkpoints import CheckpointError
    from rlsparsity.analysis.diff.engine import diff, diff_checkpoints
    from rlsparsity.analysis.diff.plan import DiffError, Plan, plan_diff
    from rlsparsity.analysis.diff.result import DiffResult, Excluded, TensorResult, layer_group
    from rlsparsity.contracts.layers import natural_key

_FROM = {
    "CheckpointError": "rlsparsity.analysis.checkpoints",
    "diff": "rlsparsity.analysis.diff.engine",
    "diff_checkpoints": "rlsparsity.analysis.diff.engine",
    "DiffError": "rlsparsity.analysis.diff.plan",
    "Plan": "rlsparsity.analysis.diff.plan",
    "plan_diff": "rlsparsity.analysis.diff.plan",
    "DiffResult": "rlsparsity.analysis.diff.result",
    "Excluded": "rlsparsity.analysis.diff.result",
    "TensorResult": "rlsparsity.analysis.diff.result",
    "layer_group": "rlsparsity.analysis.diff.result",
    "natural_key": "rlsparsity.contracts.layers",
}


def __getattr__(name: str) -> Any:
    """Import a public name from its module on first use (PEP 562)."""
    module = _FROM.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value

__all__ = [
    "CheckpointError",
    "DiffError",
    "DiffResult",
    "Excluded",
    "Plan",
    "TensorResult",
    "diff",
    "diff_checkpoints",
    "layer_group",
    "natural_key",
    "plan_diff",
]
