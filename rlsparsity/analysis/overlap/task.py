"""One task of the overlap job: rows [r0, r1) of N masks, read once (memory maps, or ranged
requests to an object store: ``rows``), their intersections per tensor, and the
verification of those rows (``contracts.mask``)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from rlsparsity.analysis.overlap.kernels import (
    _numba_kernels,
    _pair_counts_numba,
    _pair_counts_numpy,
)
from rlsparsity.analysis.overlap.layout import _row_where
from rlsparsity.analysis.overlap.rows import TaskRows
from rlsparsity.contracts.mask import check_changed, row_digest

# A pack of rows processed together: 16384 words = one full chunk (128 KiB) per mask.
PACK_WORDS = 16384


def overlap_task(spec: dict[str, Any]) -> dict[str, Any]:
    """Read rows [r0, r1) of N masks once; intersections for pairs (i < n_new, j >= i).

    ``spec``: paths (local paths or object-store URIs, no credentials) and labels (N, stack
    order), pos (N, R) file offsets of the rows' bits, changed (N, R), nbytes, row_tensor
    and chunk (R,), tensor_names (id -> name), n_new, verify (N bools). Checks 'changed' against the bits of the first n_new masks and of
    the verified ones (``check_changed``), and digests the verified ones' rows (``row_digest``,
    as each row is copied). Returns
    per-tensor (k, n_new, N) counts, per-row digests (R, n_verify, 16) and the remote
    reads' requests and bytes (``io``).
    """
    paths: list[str] = spec["paths"]
    labels: list[str] = spec["labels"]
    pos: np.ndarray = spec["pos"]
    changed: np.ndarray = spec["changed"]
    nbytes: np.ndarray = spec["nbytes"]
    row_tensor: np.ndarray = spec["row_tensor"]
    n_new: int = spec["n_new"]
    verify: list[bool] = spec["verify"]
    t_wall, t_cpu = time.perf_counter(), time.process_time()
    n, rows = pos.shape
    vpos = {k: v for v, k in enumerate(k for k in range(n) if verify[k])}
    # The first n_new masks' popcounts come with their intersections; the others' are
    # counted only to be verified (a mask verified earlier is not checked again).
    checked = [k for k in range(n) if k < n_new or verify[k]]
    row_names = [spec["tensor_names"][t] for t in row_tensor.tolist()]

    def where(k: int, first: int) -> Callable[[int], str]:
        return _row_where(labels[k], paths[k], row_names, spec["chunk"], first)

    words = (nbytes + 7) // 8
    # Greedy packs of consecutive rows up to PACK_WORDS words: small tensors (norms,
    # biases) share one block so per-call numpy overhead stays per 128 KiB, not per row.
    packs: list[list[int]] = []
    cur: list[int] = []
    cur_w = 0
    for r in range(rows):
        if cur and cur_w + words[r] > PACK_WORDS:
            packs.append(cur)
            cur, cur_w = [], 0
        cur.append(r)
        cur_w += int(words[r])
    if cur:
        packs.append(cur)
    # Each file opened once; the rows' bits come from their byte ranges.
    source = TaskRows(paths, pos, nbytes, starts=[p[0] for p in packs])
    try:
        tensors, local = np.unique(row_tensor, return_inverse=True)
        acc = np.zeros((len(tensors), n_new, n), dtype=np.int64)
        popc = np.zeros((rows, n), dtype=np.int64)
        digests = np.zeros((rows, len(vpos), 16), dtype=np.uint8)

        width = max([PACK_WORDS, *(int(words[p].sum()) for p in packs)]) if packs else 0
        kern = _numba_kernels()
        # numba: rows padded to a multiple of 4 (zero rows, for the 4x4 tiles), no temporaries.
        block = np.zeros((-(-n // 4) * 4 if kern else n, width), dtype=np.uint64)
        block8 = block.view(np.uint8)
        if kern is None:
            tmp = np.empty((n, width), dtype=np.uint64)
            cnt = np.empty((n, width), dtype=np.uint8)

        for pack in packs:
            p0, p1 = pack[0], pack[-1] + 1
            starts = np.concatenate([[0], np.cumsum(words[pack])]).astype(np.int64)
            wp = int(starts[-1])
            for k in range(n):
                for s, r in enumerate(pack):
                    view = memoryview(source.view(k, r))
                    if verify[k]:
                        # Digest while the row is hot in cache, right before copying it:
                        # the bits are read from memory once (a pack of N rows is too big
                        # to stay in cache until after the kernel).
                        digests[r, vpos[k]] = np.frombuffer(row_digest(view), dtype=np.uint8)
                    w0 = int(starts[s]) * 8
                    block8[k, w0 : w0 + len(view)] = np.frombuffer(view, dtype=np.uint8)
                    block8[k, w0 + len(view) : int(starts[s + 1]) * 8] = 0
            nz = [s for s, r in enumerate(pack) if words[r] > 0]
            if nz:
                seg = starts[nz]
                rows_nz = [pack[s] for s in nz]
                if kern is not None:
                    res = _pair_counts_numba(kern, block, n, n_new, seg, wp)
                    if n_new < n and any(verify[n_new:]):
                        pc = np.zeros((len(seg), block.shape[0] - n_new), dtype=np.uint64)
                        kern[1](block, n_new, seg, wp, pc)
                        popc[np.ix_(rows_nz, np.arange(n_new, n))] = pc[:, : n - n_new]
                else:
                    single = len(nz) == 1
                    X = block[:, :wp]
                    res = _pair_counts_numpy(X, n_new, None if single else seg, tmp, cnt)
                    if n_new < n and any(verify[n_new:]):
                        np.bitwise_count(X[n_new:], out=cnt[: n - n_new, :wp])
                        if single:
                            popc[rows_nz[0], n_new:] = cnt[: n - n_new, :wp].sum(
                                axis=1, dtype=np.uint32
                            )
                        else:
                            popc[np.ix_(rows_nz, np.arange(n_new, n))] = np.add.reduceat(
                                cnt[: n - n_new, :wp], seg, axis=1, dtype=np.uint32
                            ).T
                for i in range(n_new):
                    popc[rows_nz, i] = res[:, i, i]
                np.add.at(acc, local[rows_nz], res)
            # 'changed' against the popcounts the kernels counted.
            for k in checked:
                check_changed(popc[p0:p1, k], changed[k, p0:p1], where=where(k, p0))
        io = source.io()
    finally:
        source.close()
    return {
        "r0": spec["r0"],
        "r1": spec["r1"],
        "tensors": tensors,
        "inter": acc,
        "digests": digests,
        "bytes": int(nbytes.sum()) * n,
        "task_s": time.perf_counter() - t_wall,
        "cpu_s": time.process_time() - t_cpu,
        "io": io,
    }
