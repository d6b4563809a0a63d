"""A task's rows of bits, where each mask lives: slices of a memory map for a local file;
for a remote one (object store, MLflow server), ranged requests covering just the task's
rows, a window at a time, the next window fetched while the current one is computed."""

from __future__ import annotations

import bisect
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa

from rlsparsity.analysis.object_store import Source, coalesce, open_source

# Bytes of bits held per window, all remote masks together (two windows are in memory:
# the one being computed and the one being fetched). Large enough that each request is
# several MiB, which is what an object store needs to reach its bandwidth.
WINDOW_BYTES = 64 << 20
# Rows of two record batches are separated by a batch's header and small columns (about a
# KiB): read through such gaps rather than pay a request for each side.
HOLE_BYTES = 64 << 10
FETCH_THREADS = 8


class TaskRows:
    """``view(k, r)``: row ``r``'s bits in mask ``k`` (rows are asked for in order)."""

    def __init__(self, locations: list[str], pos: np.ndarray, nbytes: np.ndarray) -> None:
        self.pos, self.nbytes = pos, nbytes
        self.sources: list[Source] = []
        try:
            for loc in locations:
                self.sources.append(open_source(loc))
        except BaseException:
            self.close()
            raise
        self.remote = [k for k, s in enumerate(self.sources) if s.remote]
        self.bits_remote = 0  # bytes of bits the task needed from remote masks
        self._pool: ThreadPoolExecutor | None = None
        self._windows: list[tuple[int, int]] = []
        if self.remote:
            per_row = nbytes * len(self.remote)
            cuts, acc, start = [], 0, 0
            for r, b in enumerate(per_row.tolist()):
                if acc and acc + b > WINDOW_BYTES:
                    cuts.append((start, r))
                    start, acc = r, 0
                acc += b
            cuts.append((start, len(nbytes)))
            self._windows = cuts
            self._pool = ThreadPoolExecutor(FETCH_THREADS, thread_name_prefix="rls-rows")
            self.bits_remote = int(nbytes.sum()) * len(self.remote)
        self._fetched: dict[int, dict[int, list[tuple[int, Future]]]] = {}
        self._ready: dict[int, tuple[list[int], list[pa.Buffer]]] = {}
        self._cur = -1

    def _submit(self, w: int) -> None:
        if w >= len(self._windows) or w in self._fetched:
            return
        r0, r1 = self._windows[w]
        limit = max(1, WINDOW_BYTES // len(self.remote))
        per_mask: dict[int, list[tuple[int, Future]]] = {}
        for k in self.remote:
            ranges = coalesce(
                list(zip(self.pos[k, r0:r1].tolist(), self.nbytes[r0:r1].tolist(), strict=True)),
                HOLE_BYTES, limit,
            )  # fmt: skip
            assert self._pool is not None
            per_mask[k] = [(s, self._pool.submit(self.sources[k].read, s, n)) for s, n in ranges]
        self._fetched[w] = per_mask

    def _enter(self, w: int) -> None:
        self._submit(w)
        self._submit(w + 1)  # fetched while window w is computed
        per_mask = self._fetched.pop(w)
        self._ready = {k: ([s for s, _ in fs], [f.result() for _, f in fs]) for k, fs in per_mask.items()}
        self._cur = w

    def view(self, k: int, r: int) -> Any:
        pos, n = int(self.pos[k, r]), int(self.nbytes[r])
        src = self.sources[k]
        if not src.remote:
            return src.read(pos, n)
        if self._cur < 0 or not (self._windows[self._cur][0] <= r < self._windows[self._cur][1]):
            w = bisect.bisect_right([a for a, _ in self._windows], r) - 1
            self._enter(w)
        starts, bufs = self._ready[k]
        i = bisect.bisect_right(starts, pos) - 1
        return bufs[i].slice(pos - starts[i], n)

    def io(self) -> dict[str, int]:
        """Requests and bytes read from remote masks' bits, and the bits they were for."""
        return {
            "requests": sum(self.sources[k].requests for k in self.remote),
            "bytes": sum(self.sources[k].bytes for k in self.remote),
            "bits": self.bits_remote,
        }

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        for s in self.sources:
            s.close()
        self._ready.clear()
        self._fetched.clear()
