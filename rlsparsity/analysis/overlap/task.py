"""One task of the overlap job: rows [r0, r1) of N masks, read once through memory maps, their
intersections per tensor, and the digests of the rows of the masks being verified."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pyarrow as pa

from rlsparsity.analysis.overlap.kernels import (
    _numba_kernels,
    _pair_counts_numba,
    _pair_counts_numpy,
)
from rlsparsity.analysis.overlap.layout import _BITS_COL
from rlsparsity.contracts.mask import row_digest

# A pack of rows processed together: 16384 words = one full chunk (128 KiB) per mask.
PACK_WORDS = 16384


def overlap_task(spec: dict[str, Any]) -> dict[str, Any]:
    """Read rows [r0, r1) of N masks once; intersections for pairs (i < n_new, j >= i).

    ``spec``: paths (N, stack order), batch/in_batch (N, R) row coordinates, nbytes (R,),
    row_tensor (R,), n_new, verify (N bools). Returns per-tensor (k, n_new, N) counts,
    per-row popcounts (R, N), per-row digests of the verified masks (R, n_verify, 16).
    """
    paths: list[str] = spec["paths"]
    batch: np.ndarray = spec["batch"]
    in_batch: np.ndarray = spec["in_batch"]
    nbytes: np.ndarray = spec["nbytes"]
    row_tensor: np.ndarray = spec["row_tensor"]
    n_new: int = spec["n_new"]
    verify: list[bool] = spec["verify"]
    t_wall, t_cpu = time.perf_counter(), time.process_time()
    n, rows = batch.shape
    vidx = [k for k in range(n) if verify[k]]

    # Memory-map every file once; fetch each record batch's bits buffers lazily.
    maps = [pa.memory_map(p) for p in paths]
    readers = [pa.ipc.open_file(m) for m in maps]
    bufcache: list[dict[int, tuple[np.ndarray, pa.Buffer]]] = [{} for _ in range(n)]

    def row_bytes(k: int, r: int) -> tuple[pa.Buffer, int, int]:
        b = int(batch[k, r])
        hit = bufcache[k].get(b)
        if hit is None:
            col = readers[k].get_batch(b).column(_BITS_COL)
            offs = np.frombuffer(
                col.buffers()[1], dtype=np.int32, count=len(col) + 1, offset=4 * col.offset
            )
            hit = bufcache[k][b] = (offs, col.buffers()[2])
        offs, data = hit
        i = int(in_batch[k, r])
        return data, int(offs[i]), int(offs[i + 1])

    words = (nbytes + 7) // 8
    tensors, local = np.unique(row_tensor, return_inverse=True)
    acc = np.zeros((len(tensors), n_new, n), dtype=np.int64)
    popc = np.zeros((rows, n), dtype=np.int64)
    digests = np.zeros((rows, len(vidx), 16), dtype=np.uint8)
    problems: list[tuple[int, int, int]] = []

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
    width = max([PACK_WORDS, *(int(words[p].sum()) for p in packs)]) if packs else 0
    kern = _numba_kernels()
    # numba: rows padded to a multiple of 4 (zero rows, for the 4x4 tiles), no temporaries.
    block = np.zeros((-(-n // 4) * 4 if kern else n, width), dtype=np.uint64)
    block8 = block.view(np.uint8)
    if kern is None:
        tmp = np.empty((n, width), dtype=np.uint64)
        cnt = np.empty((n, width), dtype=np.uint8)

    for pack in packs:
        starts = np.concatenate([[0], np.cumsum(words[pack])]).astype(np.int64)
        wp = int(starts[-1])
        for k in range(n):
            vk = vidx.index(k) if verify[k] else -1
            for s, r in enumerate(pack):
                data, lo, hi = row_bytes(k, r)
                if hi - lo != nbytes[r]:
                    problems.append((k, r, hi - lo))
                    continue
                view = memoryview(data)[lo:hi]
                if vk >= 0:
                    # Digest while the chunk is hot in cache; the bits are read once.
                    digests[r, vk] = np.frombuffer(row_digest(view), dtype=np.uint8)
                w0 = int(starts[s]) * 8
                block8[k, w0 : w0 + (hi - lo)] = np.frombuffer(view, dtype=np.uint8)
                block8[k, w0 + (hi - lo) : int(starts[s + 1]) * 8] = 0
        if problems:
            break
        nz = [s for s, r in enumerate(pack) if words[r] > 0]
        if not nz:
            continue
        seg = starts[nz]
        single = len(nz) == 1
        rows_nz = [pack[s] for s in nz]
        if kern is not None:
            res = _pair_counts_numba(kern, block, n, n_new, seg, wp)
            for i in range(n_new):
                popc[rows_nz, i] = res[:, i, i]
            if n_new < n and any(verify[n_new:]):
                pc = np.zeros((len(seg), block.shape[0] - n_new), dtype=np.uint64)
                kern[1](block, n_new, seg, wp, pc)
                popc[np.ix_(rows_nz, np.arange(n_new, n))] = pc[:, : n - n_new]
            np.add.at(acc, local[rows_nz], res)
            continue
        X = block[:, :wp]
        res = _pair_counts_numpy(X, n_new, None if single else seg, tmp, cnt)
        for i in range(n_new):
            popc[rows_nz, i] = res[:, i, i]
        if n_new < n and any(verify[n_new:]):
            # Popcounts of the other masks only serve to check their 'changed' column,
            # which a mask verified earlier does not need again.
            np.bitwise_count(X[n_new:], out=cnt[: n - n_new, :wp])
            if single:
                popc[rows_nz[0], n_new:] = cnt[: n - n_new, :wp].sum(axis=1, dtype=np.uint32)
            else:
                popc[np.ix_(rows_nz, np.arange(n_new, n))] = np.add.reduceat(
                    cnt[: n - n_new, :wp], seg, axis=1, dtype=np.uint32
                ).T
        np.add.at(acc, local[rows_nz], res)
    for c in bufcache:
        c.clear()  # drop the buffer views before unmapping
    readers.clear()
    for m in maps:
        m.close()
    return {
        "r0": spec["r0"],
        "r1": spec["r1"],
        "tensors": tensors,
        "inter": acc,
        "popc": popc,
        "digests": digests,
        "bytes": int(nbytes.sum()) * n,
        "problems": problems,
        "task_s": time.perf_counter() - t_wall,
        "cpu_s": time.process_time() - t_cpu,
    }
