"""A task's rows of bits, where each mask lives: slices of a memory map for a local file;
for a remote one (object store, MLflow server), ranged requests covering just the task's
rows, a window at a time, the next window fetched while the current one is computed."""

from __future__ import annotations

import bisect
import time
from concurrent.futures import Future
from typing import Any

import numpy as np
import pyarrow as pa

from rlsparsity.analysis.object_store import Source, coalesce, fetch_pool, open_source

# Bytes of bits per window, all remote masks together; two windows are in memory (the one
# being computed, the next being fetched). Several windows per task let fetching overlap
# computing; each mask's part of a window is one request of at least MIN_REQUEST_BYTES,
# about what an object store needs per request to approach its bandwidth.
WINDOW_BYTES = 16 << 20
MIN_REQUEST_BYTES = 1 << 20
# Rows of two record batches are separated by a batch's header and small columns (about a
# KiB): read through such gaps rather than pay a request for each side.
HOLE_BYTES = 64 << 10


class TaskRows:
    """``view(k, r)``: row ``r``'s bits in mask ``k`` (rows are asked for in order)."""

    def __init__(
        self, locations: list[str], pos: np.ndarray, nbytes: np.ndarray, starts: list[int] | None = None
    ) -> None:
        """``starts``: the rows where a window may begin (the task's packs: a pack of rows
        is read for every mask in turn, so it must lie in one window)."""
        self.pos, self.nbytes = pos, nbytes
        self.sources: list[Source] = []
        self._fetched: dict[int, dict[int, list[tuple[int, Future]]]] = {}
        self._ready: dict[int, tuple[list[int], list[pa.Buffer]]] = {}
        self._cur = -1
        try:
            for loc in locations:
                self.sources.append(open_source(loc))
        except BaseException:
            self.close()
            raise
        self.remote = [k for k, s in enumerate(self.sources) if s.remote]
        self.bits_remote = 0  # bytes of bits the task needed from remote masks
        self.wait_s = 0.0  # time spent waiting for fetches (not hidden behind compute)
        self._windows: list[tuple[int, int]] = []
        if self.remote:
            self._per_mask = max(MIN_REQUEST_BYTES, WINDOW_BYTES // len(self.remote))
            bounds = sorted({0, *(starts or range(len(nbytes))), len(nbytes)})
            cuts, acc, start = [], 0, 0
            for a, b in zip(bounds[:-1], bounds[1:], strict=True):
                size = int(nbytes[a:b].sum())
                if acc and acc + size > self._per_mask:
                    cuts.append((start, a))
                    start, acc = a, 0
                acc += size
            cuts.append((start, len(nbytes)))
            self._windows = cuts
            self.bits_remote = int(nbytes.sum()) * len(self.remote)

    def _submit(self, w: int) -> None:
        if w >= len(self._windows) or w in self._fetched:
            return
        r0, r1 = self._windows[w]
        limit = self._per_mask + HOLE_BYTES * 4
        per_mask: dict[int, list[tuple[int, Future]]] = {}
        for k in self.remote:
            ranges = coalesce(
                list(zip(self.pos[k, r0:r1].tolist(), self.nbytes[r0:r1].tolist(), strict=True)),
                HOLE_BYTES, limit,
            )  # fmt: skip
            per_mask[k] = [(s, fetch_pool().submit(self.sources[k].read, s, n)) for s, n in ranges]
        self._fetched[w] = per_mask

    def _enter(self, w: int) -> None:
        self._submit(w)
        self._submit(w + 1)  # fetched while window w is computed
        per_mask = self._fetched.pop(w)
        t = time.perf_counter()
        self._ready = {k: ([s for s, _ in fs], [f.result() for _, f in fs]) for k, fs in per_mask.items()}
        self.wait_s += time.perf_counter() - t
        self._cur = w

    def view(self, k: int, r: int) -> Any:
        pos, n = int(self.pos[k, r]), int(self.nbytes[r])
        src = self.sources[k]
        if not src.remote:
            return src.read(pos, n)
        if self._cur < 0 or not (self._windows[self._cur][0] <= r < self._windows[self._cur][1]):
            w = bisect.bisect_right([a for a, _ in self._windows], r) - 1
            if w < self._cur:  # a window is fetched once: rows must come in window order
                raise RuntimeError(f"row {r} asked for after window {self._cur} was entered")
            self._enter(w)
        starts, bufs = self._ready[k]
        i = bisect.bisect_right(starts, pos) - 1
        return bufs[i].slice(pos - starts[i], n)

    def io(self) -> dict[str, float]:
        """Requests and bytes read from remote masks' bits, and the bits they were for."""
        return {
            "requests": sum(self.sources[k].requests for k in self.remote),
            "bytes": sum(self.sources[k].bytes for k in self.remote),
            "bits": self.bits_remote,
            "wait_s": self.wait_s,
        }

    def close(self) -> None:
        pending = [f for fs in self._fetched.values() for fl in fs.values() for _, f in fl]
        for f in pending:
            f.cancel()
        for f in pending:  # those already running: let them end before their files close
            if not f.cancelled():
                f.exception()
        for s in self.sources:
            s.close()
        self._ready.clear()
        self._fetched.clear()
