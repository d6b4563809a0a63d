"""Pairwise overlap of update masks: the distributed analysis job's engine (issue 4).

For N masks over the same base model, compute for every pair of runs the size of the
intersection of their update sets, per tensor, per layer, per matrix type and in total,
with the random baselines of docs/DESIGN.md ("Metrics").

How the work is laid out:
- ``read_meta`` of every mask first (footer only) and ``check_compatible``: an
  incompatible input fails before any bits are touched.
- The small columns (tensor, chunk, length, changed) of every file are read through a
  memory map and joined on (tensor, chunk); the bits are not touched.
- The rows (chunks) are cut into contiguous ranges, one Ray task each. A task gets
  file paths and row coordinates, never data: it memory-maps the N files, copies each
  chunk's bits into one (N, W) uint64 block (cache-sized, zero-padded) and computes
  ``popcount(X[i] & X[j])`` for all pairs at once, summed per tensor (a register-blocked
  numba kernel, AND and popcount fused; the numpy kernel is the fallback and the
  reference, see ``pair_counts``). It also digests
  each row it reads (``mask.row_digest``), so the driver verifies every checksum
  (``combine_digests`` in file row order) while the bits are read exactly once.
- Work is N*P/8 bytes read (and hashed) plus N(N+1)/2 * P/64 word popcounts; the task
  count comes from those two numbers and the measured per-core rates below.
- Results are cached per pair of mask checksums (Arrow files, no pickle), so adding a
  run computes only its pairs, and re-running with nothing new reads no bits at all.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from rlsparsity.contracts.layers import group_sort_key, layer_of, matrix_type
from rlsparsity.contracts.mask import (
    MaskError,
    check_compatible,
    combine_digests,
    read_meta,
    row_digest,
)

RESULT_FORMAT = "rlsparsity.overlap/1"
DEFAULT_FACTORS = ("seed", "dataset", "algorithm")

# Per-core rates measured on the reference 2-core machine (see benchmarks/BENCHMARKS.md);
# only used to size tasks, so being off by 2x costs a little balance, not correctness.
PAIR_WORDS_PER_S = 1.6e9  # AND + popcount + sum, uint64 words of one pair (numpy kernel)
PAIR_WORDS_PER_S_NUMBA = 1.5e10  # the same, numba kernel (AVX-512 VPOPCNTDQ: ~3e10)
HASH_BYTES_PER_S = 1.4e9  # BLAKE2b
COPY_BYTES_PER_S = 8e9  # mmap -> stacked block
TASK_TARGET_S = 1.0  # long enough to hide ~ms of Ray overhead, short enough to balance
# A pack of rows processed together: 16384 words = one full chunk (128 KiB) per mask.
PACK_WORDS = 16384

_BITS_COL = "bits"


class OverlapError(RuntimeError):
    """The analysis cannot run: bad inputs, missing artifacts."""


# --------------------------------------------------------------------------- naming


# --------------------------------------------------------------------------- metrics


def pair_metrics(size_a: int, size_b: int, inter: int, n: int) -> dict[str, float | None]:
    """o_A, o_B, Jaccard and their random baselines (None where undefined)."""
    union = size_a + size_b - inter
    exp_inter = size_a * size_b / n if n else 0.0
    exp_union = size_a + size_b - exp_inter
    return {
        "o_a": inter / size_a if size_a else None,
        "o_b": inter / size_b if size_b else None,
        "o_a_random": size_b / n if n else None,
        "o_b_random": size_a / n if n else None,
        "jaccard": inter / union if union else None,
        # Ratio of expectations for uniformly random sets of these sizes; the exact
        # hypergeometric mean differs by O(1/n), nothing at model sizes.
        "jaccard_random": exp_inter / exp_union if exp_union else None,
    }


def _mean(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return sum(vals) / len(vals) if vals else None


# --------------------------------------------------------------------------- result


@dataclass
class OverlapResult:
    """Intersection counts of N masks, per tensor and in total.

    ``inter[i, j]`` = |I_i ∩ I_j| over the whole model (diagonal: |I_i|);
    ``tensor_inter[t, i, j]`` the same per tensor.
    """

    labels: list[str]
    n: int
    inter: np.ndarray
    tensor_names: list[str]
    tensor_numel: np.ndarray
    tensor_inter: np.ndarray
    checksums: list[str] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    factors: list[dict[str, Any]] | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def counts(self) -> np.ndarray:
        return np.diagonal(self.inter).copy()

    @property
    def sparsity(self) -> list[float]:
        return [1.0 - c / self.n if self.n else 1.0 for c in self.counts.tolist()]

    # -- groupings
    def groups(self, level: str) -> tuple[list[str], np.ndarray, np.ndarray]:
        """(group names, numel per group, (G, N, N) intersections) for level tensor/layer/matrix."""
        if level == "tensor":
            return list(self.tensor_names), self.tensor_numel, self.tensor_inter
        key = {"layer": layer_of, "matrix": matrix_type}.get(level)
        if key is None:
            raise ValueError(f"level must be tensor, layer or matrix, not {level!r}")
        names = sorted({key(t) for t in self.tensor_names}, key=group_sort_key)
        index = {g: k for k, g in enumerate(names)}
        gid = np.array([index[key(t)] for t in self.tensor_names], dtype=np.int64)
        numel = np.zeros(len(names), dtype=np.int64)
        np.add.at(numel, gid, self.tensor_numel)
        inter = np.zeros((len(names), *self.inter.shape), dtype=np.int64)
        np.add.at(inter, gid, self.tensor_inter)
        return names, numel, inter

    # -- rows
    def pairs(self) -> list[dict[str, Any]]:
        """One row per unordered pair (i < j, input order)."""
        rows = []
        counts = self.counts.tolist()
        for i, j in _pair_indices(len(self.labels)):
            rows.append(
                {
                    "a": self.labels[i],
                    "b": self.labels[j],
                    "size_a": counts[i],
                    "size_b": counts[j],
                    "intersection": int(self.inter[i, j]),
                    **pair_metrics(counts[i], counts[j], int(self.inter[i, j]), self.n),
                }
            )
        return rows

    def group_rows(self, level: str) -> list[dict[str, Any]]:
        """Per-pair rows for every layer / matrix type / tensor."""
        names, numel, inter = self.groups(level)
        rows = []
        for g, name in enumerate(names):
            n = int(numel[g])
            for i, j in _pair_indices(len(self.labels)):
                a, b, x = int(inter[g, i, i]), int(inter[g, j, j]), int(inter[g, i, j])
                rows.append(
                    {
                        level: name,
                        "numel": n,
                        "a": self.labels[i],
                        "b": self.labels[j],
                        "size_a": a,
                        "size_b": b,
                        "intersection": x,
                        **pair_metrics(a, b, x, n),
                    }
                )
        return rows

    def group_means(self, level: str) -> list[dict[str, Any]]:
        """Per layer / matrix type: sparsity and overlap averaged over runs and pairs."""
        names, numel, inter = self.groups(level)
        out = []
        n_runs = len(self.labels)
        for g, name in enumerate(names):
            n = int(numel[g])
            sizes = np.diagonal(inter[g]).tolist()
            ms = [
                pair_metrics(sizes[i], sizes[j], int(inter[g, i, j]), n)
                for i, j in _pair_indices(n_runs)
            ]
            out.append(
                {
                    level: name,
                    "numel": n,
                    "sparsity": _mean([1 - s / n if n else None for s in sizes]),
                    **{f"mean_{k}": _mean([m[k] for m in ms]) for k in _METRIC_KEYS},
                }
            )
        return out

    def summary(self, factor_keys: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """Pairs grouped by which factors differ (the platform's Table 4)."""
        if not self.factors:
            return []
        keys = list(factor_keys or self.meta.get("factor_keys") or DEFAULT_FACTORS)
        spars = self.sparsity
        buckets: dict[str, list[tuple[int, int, dict[str, Any]]]] = {}
        for (i, j), row in zip(_pair_indices(len(self.labels)), self.pairs(), strict=True):
            diff = differing_factors(self.factors[i], self.factors[j], keys)
            cat = diff[0] if len(diff) == 1 else ("several" if diff else "none")
            buckets.setdefault(cat, []).append((i, j, row))
        order = [*keys, "several", "none"]
        out = []
        for cat in sorted(buckets, key=lambda c: (order.index(c) if c in order else len(order), c)):
            items = buckets[cat]
            rows = [r for _, _, r in items]
            out.append(
                {
                    "differs": cat,
                    "pairs": len(rows),
                    **{f"mean_{k}": _mean([r[k] for r in rows]) for k in _METRIC_KEYS},
                    "mean_sparsity_a": _mean([spars[i] for i, _, _ in items]),
                    "mean_sparsity_b": _mean([spars[j] for _, j, _ in items]),
                }
            )
        return out

    # -- serialisation
    def to_json(self, *, detail: bool = False) -> dict[str, Any]:
        """JSON-ready dict: ``runs`` (labels), ``pairs`` rows, per-layer/matrix means, summary."""
        counts = self.counts.tolist()
        doc: dict[str, Any] = {
            "format": RESULT_FORMAT,
            "runs": list(self.labels),
            "n": self.n,
            "run_info": [
                {
                    "label": lab,
                    "changed": counts[i],
                    "sparsity": self.sparsity[i],
                    "checksum": self.checksums[i] if self.checksums else None,
                    "path": self.paths[i] if self.paths else None,
                    "factors": self.factors[i] if self.factors else None,
                }
                for i, lab in enumerate(self.labels)
            ],
            "pairs": self.pairs(),
            "layers": self.group_means("layer"),
            "matrices": self.group_means("matrix"),
            "summary": self.summary(),
            "meta": self.meta,
            "stats": self.stats,
        }
        if detail:
            doc["layer_pairs"] = self.group_rows("layer")
            doc["matrix_pairs"] = self.group_rows("matrix")
        return doc

    def to_arrow(self, level: str = "pair") -> pa.Table:
        """Arrow table of ``pairs()`` (level "pair") or of ``group_rows(level)``."""
        rows = self.pairs() if level == "pair" else self.group_rows(level)
        return rows_to_table(rows)

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> OverlapResult:
        """Rebuild the totals (not the per-tensor tables) from ``to_json`` output."""
        labels = doc["runs"]
        index = {lab: k for k, lab in enumerate(labels)}
        inter = np.zeros((len(labels), len(labels)), dtype=np.int64)
        for k, info in enumerate(doc["run_info"]):
            inter[k, k] = info["changed"]
        for p in doc["pairs"]:
            i, j = index[p["a"]], index[p["b"]]
            inter[i, j] = inter[j, i] = p["intersection"]
        return cls(
            labels=labels,
            n=doc["n"],
            inter=inter,
            tensor_names=[],
            tensor_numel=np.zeros(0, dtype=np.int64),
            tensor_inter=np.zeros((0, len(labels), len(labels)), dtype=np.int64),
            factors=[i["factors"] for i in doc["run_info"]]
            if doc["run_info"] and doc["run_info"][0]["factors"] is not None
            else None,
            meta=doc.get("meta", {}),
            stats=doc.get("stats", {}),
        )


_METRIC_KEYS = ("o_a", "o_b", "o_a_random", "o_b_random", "jaccard", "jaccard_random")


def differing_factors(fa: dict[str, Any], fb: dict[str, Any], keys: Sequence[str]) -> list[str]:
    """Factor keys whose values differ between two runs (missing on both counts as equal)."""
    return [k for k in keys if str(fa.get(k)) != str(fb.get(k))]


def _pair_indices(n: int) -> list[tuple[int, int]]:
    return [(i, j) for i in range(n) for j in range(i + 1, n)]


def rows_to_table(rows: list[dict[str, Any]]) -> pa.Table:
    if not rows:
        return pa.table({})
    cols = {k: [r[k] for r in rows] for k in rows[0]}
    arrays = {}
    for k, v in cols.items():
        if k in _METRIC_KEYS or k.startswith("mean_") or k == "sparsity":
            arrays[k] = pa.array([math.nan if x is None else x for x in v], type=pa.float64())
        else:
            arrays[k] = pa.array(v)
    return pa.table(arrays)


# --------------------------------------------------------------------------- layout


@dataclass
class _Layout:
    """The small columns of one mask file, in file row order."""

    tensor: list[str]
    shape: dict[str, list[int]]
    chunk: np.ndarray
    length: np.ndarray
    nbytes: np.ndarray
    changed: np.ndarray
    batch: np.ndarray
    in_batch: np.ndarray


def _read_layout(path: str, label: str) -> _Layout:
    try:
        with pa.memory_map(path) as src:
            reader = pa.ipc.open_file(src)
            tensors: list[str] = []
            shapes: dict[str, list[int]] = {}
            chunk, length, nbytes, changed, batch, in_batch = [], [], [], [], [], []
            for b in range(reader.num_record_batches):
                rb = reader.get_batch(b)
                if rb.num_rows == 0:
                    continue
                names = rb.column("tensor").to_pylist()
                tensors.extend(names)
                for name, shp in zip(names, rb.column("shape").to_pylist(), strict=True):
                    shapes.setdefault(name, shp)
                chunk.append(rb.column("chunk").to_numpy())
                length.append(rb.column("length").to_numpy())
                changed.append(rb.column("changed").to_numpy())
                bits = rb.column(_BITS_COL)
                offs = np.frombuffer(
                    bits.buffers()[1], dtype=np.int32, count=len(bits) + 1, offset=4 * bits.offset
                )
                nbytes.append(np.diff(offs).astype(np.int64))
                batch.append(np.full(rb.num_rows, b, dtype=np.int32))
                in_batch.append(np.arange(rb.num_rows, dtype=np.int32))
    except (pa.ArrowInvalid, OSError, KeyError) as e:
        raise MaskError(f"{label} ({path}): not a readable mask file ({e})") from e

    def cat(xs: list[np.ndarray], dtype: Any) -> np.ndarray:
        return np.concatenate(xs).astype(dtype) if xs else np.zeros(0, dtype=dtype)

    return _Layout(
        tensor=tensors,
        shape=shapes,
        chunk=cat(chunk, np.int64),
        length=cat(length, np.int64),
        nbytes=cat(nbytes, np.int64),
        changed=cat(changed, np.int64),
        batch=cat(batch, np.int32),
        in_batch=cat(in_batch, np.int32),
    )


@dataclass
class _Plan:
    """Rows joined on (tensor, chunk) across masks, in the first mask's row order."""

    tensor_names: list[str]
    tensor_numel: np.ndarray
    row_tensor: np.ndarray  # (R,) tensor index
    row_nbytes: np.ndarray  # (R,)
    file_row: np.ndarray  # (N, R): row index in each mask's file
    layouts: list[_Layout]
    layout_hash: str


def _join(layouts: list[_Layout], labels: list[str], paths: list[str], chunk_elems: int) -> _Plan:
    ref = layouts[0]
    for lay, label, path in zip(layouts, labels, paths, strict=True):
        bad = (lay.length > chunk_elems) | (lay.nbytes != (lay.length + 7) // 8) | (lay.length < 0)
        if bad.any():
            r = int(np.flatnonzero(bad)[0])
            raise MaskError(
                f"{label} ({path}): tensor {lay.tensor[r]!r} chunk {int(lay.chunk[r])}: malformed chunk "
                f"(length {int(lay.length[r])}, {int(lay.nbytes[r])} bytes of bits)"
            )
    names = list(dict.fromkeys(ref.tensor))
    tindex = {t: k for k, t in enumerate(names)}
    numel = np.zeros(len(names), dtype=np.int64)
    row_tensor = np.array([tindex[t] for t in ref.tensor], dtype=np.int32)
    np.add.at(numel, row_tensor, ref.length)
    for t, k in tindex.items():
        if int(numel[k]) != math.prod(ref.shape[t]):
            raise MaskError(
                f"{labels[0]} ({paths[0]}): tensor {t!r} rows cover {int(numel[k])} elements, shape {ref.shape[t]}"
            )
    file_row = np.empty((len(layouts), len(ref.tensor)), dtype=np.int64)
    file_row[0] = np.arange(len(ref.tensor))
    ref_keys: dict[tuple[str, int], int] | None = None
    for m, (lay, label) in enumerate(zip(layouts[1:], labels[1:], strict=True), start=1):
        if lay.tensor == ref.tensor and np.array_equal(lay.chunk, ref.chunk):
            file_row[m] = np.arange(len(ref.tensor))  # the common case: same writer, same order
        else:
            if ref_keys is None:
                ref_keys = {
                    (t, int(c)): r
                    for r, (t, c) in enumerate(zip(ref.tensor, ref.chunk.tolist(), strict=True))
                }
            own = {
                (t, int(c)): r
                for r, (t, c) in enumerate(zip(lay.tensor, lay.chunk.tolist(), strict=True))
            }
            missing = [k for k in ref_keys if k not in own]
            extra = [k for k in own if k not in ref_keys]
            if missing or extra:
                what = (
                    f"lacks tensor {missing[0][0]!r} chunk {missing[0][1]}"
                    if missing
                    else f"has extra tensor {extra[0][0]!r} chunk {extra[0][1]}"
                )
                raise MaskError(
                    f"{label} ({paths[m]}) {what} compared with {labels[0]}; masks must cover the same tensors"
                )
            file_row[m] = [own[k] for k in ref_keys]
        for t in names:
            if lay.shape.get(t) != ref.shape[t]:
                raise MaskError(
                    f"{label} ({paths[m]}): tensor {t!r} has shape {lay.shape.get(t)} but {ref.shape[t]} in {labels[0]}"
                )
        if not np.array_equal(lay.length[file_row[m]], ref.length):
            raise MaskError(f"{label} ({paths[m]}): chunk lengths differ from {labels[0]}")
    return _Plan(
        tensor_names=names,
        tensor_numel=numel,
        row_tensor=row_tensor,
        row_nbytes=ref.nbytes,
        file_row=file_row,
        layouts=layouts,
        layout_hash=_layout_hash(names, [ref.shape[t] for t in names]),
    )


def _layout_hash(names: list[str], shapes: list[list[int]]) -> str:
    return hashlib.blake2b(json.dumps([names, shapes]).encode(), digest_size=12).hexdigest()


# --------------------------------------------------------------------------- the task


def pair_counts(
    X: np.ndarray,
    n_new: int,
    seg: np.ndarray | None = None,
    tmp: np.ndarray | None = None,
    cnt: np.ndarray | None = None,
    *,
    backend: str = "auto",
) -> np.ndarray:
    """The kernel: popcount(X[i] & X[j]) for i < n_new, j >= i, per column segment.

    ``X`` is (N, W) uint64 (a cache-sized block: one 128 KiB chunk per mask); ``seg`` the
    start word of each segment (None: one segment). Returns (S, n_new, N) int64 with
    zeros below the diagonal. ``backend``: "numba" (the register-blocked kernel, see
    :func:`_tile_counts`), "numpy" (the reference), or "auto" (numba when it is
    installed and compiles, else numpy; ``RLSPARSITY_NUMBA=0`` forces numpy).
    """
    kern = _numba_kernels() if backend in ("auto", "numba") else None
    if backend == "numba" and kern is None:
        raise RuntimeError("the numba overlap kernel is not available")
    if kern is None:
        return _pair_counts_numpy(X, n_new, seg, tmp, cnt)
    n, w = X.shape
    npad = -(-n // 4) * 4
    if X.dtype != np.uint64 or not X.flags.c_contiguous or npad != n:
        B = np.zeros((npad, w), dtype=np.uint64)
        B[:n] = X
    else:
        B = X
    return _pair_counts_numba(kern, B, n, n_new, seg, w)


def _pair_counts_numba(
    kern: tuple[Any, Any], B: np.ndarray, n: int, n_new: int, seg: np.ndarray | None, wend: int
) -> np.ndarray:
    """``pair_counts`` on a C-contiguous (N rounded up to 4, width) block; words [seg[0], wend)."""
    seg = np.zeros(1, dtype=np.int64) if seg is None else np.asarray(seg, dtype=np.int64)
    full = np.zeros((len(seg), B.shape[0], B.shape[0]), dtype=np.uint64)
    if n_new > 0 and len(seg):
        kern[0](B, int(n_new), seg, int(wend), full)
    return full[:, :n_new, :n].astype(np.int64) * _upper(n_new, n)


def _upper(n_new: int, n: int) -> np.ndarray:
    return (np.arange(n)[None, :] >= np.arange(n_new)[:, None]).astype(np.int64)


def _pair_counts_numpy(
    X: np.ndarray,
    n_new: int,
    seg: np.ndarray | None = None,
    tmp: np.ndarray | None = None,
    cnt: np.ndarray | None = None,
) -> np.ndarray:
    """numpy reference of :func:`pair_counts`: one AND, one popcount and one row sum per i,
    N numpy calls of (N - i) * W words each, so call overhead is negligible against the
    N^2 W / 2 words (about 0.5 ns per word-pair here)."""
    n, w = X.shape
    tmp = np.empty((n, w), dtype=np.uint64) if tmp is None else tmp
    cnt = np.empty((n, w), dtype=np.uint8) if cnt is None else cnt
    res = np.zeros((1 if seg is None else len(seg), n_new, n), dtype=np.int64)
    for i in range(n_new):
        m = n - i
        np.bitwise_and(X[i], X[i:], out=tmp[:m, :w])
        np.bitwise_count(tmp[:m, :w], out=cnt[:m, :w])
        # uint32 sums are ~5x faster than int64 here and cannot overflow (<= 64 * W).
        if seg is None and w % 512 == 0:
            # uint16 partial sums over 512 words (<= 32768) are faster still.
            part = cnt[:m, :w].reshape(m, w // 512, 512).sum(axis=2, dtype=np.uint16)
            res[0, i, i:] = part.sum(axis=1, dtype=np.int64)
        elif seg is None:
            res[0, i, i:] = cnt[:m, :w].sum(axis=1, dtype=np.uint32)
        else:
            res[:, i, i:] = np.add.reduceat(cnt[:m, :w], seg, axis=1, dtype=np.uint32).T
    return res


def row_popcounts(
    X: np.ndarray, seg: np.ndarray | None = None, *, backend: str = "auto"
) -> np.ndarray:
    """popcount of every row of ``X`` (N, W) uint64 per column segment: (S, N) int64."""
    kern = _numba_kernels() if backend in ("auto", "numba") else None
    if backend == "numba" and kern is None:
        raise RuntimeError("the numba overlap kernel is not available")
    n, w = X.shape
    if kern is not None:
        segs = np.zeros(1, dtype=np.int64) if seg is None else np.asarray(seg, dtype=np.int64)
        out = np.zeros((len(segs), n), dtype=np.uint64)
        if n and len(segs):
            kern[1](np.ascontiguousarray(X, dtype=np.uint64), 0, segs, int(w), out)
        return out.astype(np.int64)
    cnt = np.bitwise_count(X)
    if seg is None:
        return cnt.sum(axis=1, dtype=np.int64)[None, :]
    return np.add.reduceat(cnt, seg, axis=1, dtype=np.int64).T


# The numba kernels. Plain Python source here; compiled by ``_numba_kernels`` on first use
# (numba is imported only then), with the on-disk cache when a cache directory is writable.
# Ray supplies the parallelism, so each kernel is single-threaded (parallel=False).
_STRETCH = 512  # words per stretch: 8 rows x 4 KiB stay in L1 while a 4x4 tile runs over them
_popc64: Any = None  # llvm.ctpop.i64, set by _build_numba_kernels before compiling


def _tile_counts(B, n_new, seg, wend, full):  # pragma: no cover - compiled by numba
    """full[s, i, j] (uint64) += popcount(B[i] & B[j]) over segment s, for 4x4 tiles i0 < n_new, j0 >= i0.

    B: (Np, W) uint64, Np a multiple of 4. Segment s covers words [seg[s], seg[s+1]) (the
    last one up to ``wend``). Each tile reads 8 rows once per stretch and keeps its 16
    sums in registers: AND and popcount fused, no temporaries; LLVM vectorises the word
    loop (vpandq/vpopcntq where the CPU has AVX-512 VPOPCNTDQ). Tiles on the diagonal
    also fill i > j; the caller keeps j >= i.
    """
    npad = B.shape[0]
    nseg = seg.shape[0]
    for s in range(nseg):
        s0 = seg[s]
        s1 = seg[s + 1] if s + 1 < nseg else wend
        o = full[s]
        for kb in range(s0, s1, _STRETCH):
            ke = min(kb + _STRETCH, s1)
            for i0 in range(0, n_new, 4):
                for j0 in range(i0, npad, 4):
                    # Slices starting at kb, indexed from 0: LLVM sees contiguous loads
                    # (an index that may be negative makes it gather instead).
                    a0 = B[i0, kb:ke]
                    a1 = B[i0 + 1, kb:ke]
                    a2 = B[i0 + 2, kb:ke]
                    a3 = B[i0 + 3, kb:ke]
                    b0 = B[j0, kb:ke]
                    b1 = B[j0 + 1, kb:ke]
                    b2 = B[j0 + 2, kb:ke]
                    b3 = B[j0 + 3, kb:ke]
                    c00 = c01 = c02 = c03 = c10 = c11 = c12 = c13 = np.uint64(0)
                    c20 = c21 = c22 = c23 = c30 = c31 = c32 = c33 = np.uint64(0)
                    for k in range(ke - kb):
                        x0, x1, x2, x3 = a0[k], a1[k], a2[k], a3[k]
                        y0, y1, y2, y3 = b0[k], b1[k], b2[k], b3[k]
                        c00 += _popc64(x0 & y0)
                        c01 += _popc64(x0 & y1)
                        c02 += _popc64(x0 & y2)
                        c03 += _popc64(x0 & y3)
                        c10 += _popc64(x1 & y0)
                        c11 += _popc64(x1 & y1)
                        c12 += _popc64(x1 & y2)
                        c13 += _popc64(x1 & y3)
                        c20 += _popc64(x2 & y0)
                        c21 += _popc64(x2 & y1)
                        c22 += _popc64(x2 & y2)
                        c23 += _popc64(x2 & y3)
                        c30 += _popc64(x3 & y0)
                        c31 += _popc64(x3 & y1)
                        c32 += _popc64(x3 & y2)
                        c33 += _popc64(x3 & y3)
                    o[i0, j0] += c00
                    o[i0, j0 + 1] += c01
                    o[i0, j0 + 2] += c02
                    o[i0, j0 + 3] += c03
                    o[i0 + 1, j0] += c10
                    o[i0 + 1, j0 + 1] += c11
                    o[i0 + 1, j0 + 2] += c12
                    o[i0 + 1, j0 + 3] += c13
                    o[i0 + 2, j0] += c20
                    o[i0 + 2, j0 + 1] += c21
                    o[i0 + 2, j0 + 2] += c22
                    o[i0 + 2, j0 + 3] += c23
                    o[i0 + 3, j0] += c30
                    o[i0 + 3, j0 + 1] += c31
                    o[i0 + 3, j0 + 2] += c32
                    o[i0 + 3, j0 + 3] += c33


def _row_counts(B, r0, seg, wend, out):  # pragma: no cover - compiled by numba
    """out[s, r - r0] (uint64) = popcount of row r >= r0 of B over segment s (as in _tile_counts)."""
    nseg = seg.shape[0]
    for s in range(nseg):
        s0 = seg[s]
        s1 = seg[s + 1] if s + 1 < nseg else wend
        for r in range(r0, B.shape[0]):
            row = B[r, s0:s1]
            c = np.uint64(0)
            for k in range(s1 - s0):
                c += _popc64(row[k])
            out[s, r - r0] = c


def _build_numba_kernels() -> tuple[Any, Any]:
    global _popc64
    from numba import types
    from numba.extending import intrinsic

    from rlsparsity.numba_jit import njit

    @intrinsic
    def popc64(typingctx, x):  # noqa: ARG001
        def codegen(context, builder, signature, args):  # noqa: ARG001
            return builder.ctpop(args[0])

        return types.uint64(types.uint64), codegen

    _popc64 = popc64
    kerns = tuple(njit(f) for f in (_tile_counts, _row_counts))
    X = np.zeros((4, 8), dtype=np.uint64)
    seg = np.zeros(1, dtype=np.int64)
    kerns[0](X, 1, seg, 8, np.zeros((1, 4, 4), dtype=np.uint64))
    kerns[1](X, 1, seg, 8, np.zeros((1, 3), dtype=np.uint64))
    return kerns


def _numba_kernels() -> tuple[Any, Any] | None:
    """The compiled (tile_counts, row_counts), or None (numba missing, disabled, or failing to compile)."""
    from rlsparsity.numba_jit import compiled

    return compiled("overlap", _build_numba_kernels)


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


# --------------------------------------------------------------------------- planning


def plan_ranges(
    row_words: np.ndarray, n: int, n_new: int, n_verify: int, workers: int
) -> list[tuple[int, int]]:
    """Contiguous row ranges of about TASK_TARGET_S each, at least 4 per worker when there is enough work.

    Cost of a row = its words * (pairs / pair rate + 8 * (hashed masks / hash rate + N / copy rate)).
    """
    rows = len(row_words)
    if rows == 0:
        return []
    pairs = n_new * (n_new + 1) / 2 + n_new * (n - n_new)
    per_word = pairs / _pair_rate() + 8 * n_verify / HASH_BYTES_PER_S + 8 * n / COPY_BYTES_PER_S
    cost = row_words.astype(np.float64) * per_word + 2e-6 * n  # + per-row numpy overhead
    total = float(cost.sum())
    n_tasks = max(
        math.ceil(total / TASK_TARGET_S), 4 * workers if total > 0.05 * workers else workers
    )
    n_tasks = max(1, min(n_tasks, rows))
    cum = np.cumsum(cost)
    cuts = np.searchsorted(cum, total * np.arange(1, n_tasks) / n_tasks, side="left") + 1
    bounds = [0, *sorted({int(c) for c in cuts if 0 < c < rows}), rows]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def _pair_rate() -> float:
    """Planning rate of the kernel the tasks will run, without importing numba here."""
    import importlib.util

    from rlsparsity.numba_jit import known_unavailable

    if known_unavailable("overlap"):
        return PAIR_WORDS_PER_S
    return PAIR_WORDS_PER_S_NUMBA if importlib.util.find_spec("numba") else PAIR_WORDS_PER_S


def _pair_cover(n: int, missing: set[tuple[int, int]]) -> list[int]:
    """A small set of masks touching every missing pair (greedy vertex cover)."""
    missing = set(missing)
    cover: list[int] = []
    while missing:
        deg = np.zeros(n, dtype=np.int64)
        for i, j in missing:
            deg[i] += 1
            deg[j] += 1
        k = int(deg.argmax())
        cover.append(k)
        missing = {p for p in missing if k not in p}
    return cover


# --------------------------------------------------------------------------- cache


def default_cache_dir() -> Path:
    env = os.environ.get("RLSPARSITY_OVERLAP_CACHE")
    if env:
        return Path(env)
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "rlsparsity" / "overlap"


class OverlapCache:
    """Pair results keyed by mask checksums, as append-only Arrow files (no pickle).

    ``<dir>/<base key>/`` holds ``layout-<hash>.json`` (tensor names and sizes),
    ``runs-*.arrow`` (checksum -> per-tensor changed counts) and ``pairs-*.arrow``
    (checksum pair -> per-tensor intersections). Writers add new files atomically, so
    concurrent analyses never corrupt each other. ``verified.json`` remembers which
    files (by path, size, mtime, inode) have had their checksum verified.
    """

    COMPACT_AT = 32

    def __init__(self, root: str | os.PathLike, base_key: str) -> None:
        self.root = Path(root)
        self.dir = self.root / base_key
        self.dir.mkdir(parents=True, exist_ok=True)
        self.runs: dict[str, tuple[str, np.ndarray]] = {}
        self.pairs: dict[tuple[str, str], np.ndarray] = {}
        for f in sorted(self.dir.glob("runs-*.arrow")):
            for c, lay, ch in _read_arrow_rows(f, ("checksum", "layout", "changed")):
                self.runs[c] = (lay, np.asarray(ch, dtype=np.int64))
        for f in sorted(self.dir.glob("pairs-*.arrow")):
            for a, b, lay, x in _read_arrow_rows(f, ("a", "b", "layout", "inter")):
                self.pairs[(a, b, lay)] = np.asarray(x, dtype=np.int64)  # type: ignore[index]

    @staticmethod
    def key(a: str, b: str) -> tuple[str, str]:
        return (a, b) if a <= b else (b, a)

    def get_pair(self, a: str, b: str, layout: str) -> np.ndarray | None:
        return self.pairs.get((*self.key(a, b), layout))  # type: ignore[arg-type]

    def layout(self, layout_hash: str) -> dict[str, Any] | None:
        p = self.dir / f"layout-{layout_hash}.json"
        return json.loads(p.read_text()) if p.exists() else None

    def save(
        self,
        layout_hash: str,
        names: list[str],
        numel: np.ndarray,
        runs: dict[str, np.ndarray],
        pairs: dict[tuple[str, str], np.ndarray],
    ) -> None:
        lp = self.dir / f"layout-{layout_hash}.json"
        if not lp.exists():
            _atomic_write(lp, json.dumps({"tensors": names, "numel": numel.tolist()}).encode())
        new_runs = {c: v for c, v in runs.items() if c not in self.runs}
        new_pairs = {
            self.key(*k): v
            for k, v in pairs.items()
            if (*self.key(*k), layout_hash) not in self.pairs
        }
        if new_runs:
            _write_arrow(
                self.dir / f"runs-{_stamp()}.arrow",
                {
                    "checksum": list(new_runs),
                    "layout": [layout_hash] * len(new_runs),
                    "changed": [v.tolist() for v in new_runs.values()],
                },
            )
            self.runs.update({c: (layout_hash, v) for c, v in new_runs.items()})
        if new_pairs:
            _write_arrow(
                self.dir / f"pairs-{_stamp()}.arrow",
                {
                    "a": [k[0] for k in new_pairs],
                    "b": [k[1] for k in new_pairs],
                    "layout": [layout_hash] * len(new_pairs),
                    "inter": [v.tolist() for v in new_pairs.values()],
                },
            )
            self.pairs.update({(*k, layout_hash): v for k, v in new_pairs.items()})  # type: ignore[misc]
        self._compact()

    def _compact(self) -> None:
        # Many small files make loading slow; merge them once there are enough.
        for kind, cols in (
            ("runs", ("checksum", "layout", "changed")),
            ("pairs", ("a", "b", "layout", "inter")),
        ):
            files = sorted(self.dir.glob(f"{kind}-*.arrow"))
            if len(files) < self.COMPACT_AT:
                continue
            tables = []
            for f in files:
                try:
                    with pa.memory_map(str(f)) as src:
                        tables.append(pa.ipc.open_file(src).read_all().select(list(cols)))
                except (OSError, pa.ArrowInvalid):
                    continue
            _write_arrow(
                self.dir / f"{kind}-{_stamp()}.arrow", pa.concat_tables(tables).to_pydict()
            )
            for f in files:
                f.unlink(missing_ok=True)

    # -- verification memo
    def _verified_path(self) -> Path:
        return self.root / "verified.json"

    def verified(self) -> dict[str, Any]:
        try:
            return json.loads(self._verified_path().read_text())
        except (OSError, json.JSONDecodeError):
            return {}

    def mark_verified(self, entries: dict[str, dict[str, Any]]) -> None:
        if not entries:
            return
        data = self.verified()
        data.update(entries)
        _atomic_write(self._verified_path(), json.dumps(data).encode())


def _stamp() -> str:
    return f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _write_arrow(path: Path, cols: dict[str, list]) -> None:
    table = pa.table(cols)
    tmp = path.with_name(f".{path.name}.tmp")
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
        w.write_table(table)
    os.replace(tmp, path)


def _read_arrow_rows(path: Path, cols: tuple[str, ...]) -> list[tuple]:
    try:
        with pa.memory_map(str(path)) as src:
            t = pa.ipc.open_file(src).read_all()
        return list(zip(*(t.column(c).to_pylist() for c in cols), strict=True))
    except (OSError, pa.ArrowInvalid, KeyError):
        return []  # a file removed by a concurrent compaction, or foreign: ignore


def _file_id(path: str) -> dict[str, Any]:
    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino}


# --------------------------------------------------------------------------- driver


ProgressFn = Callable[[int, int], None]  # (bytes done, bytes total)


def compute_overlap(
    paths: Sequence[str | os.PathLike],
    labels: Sequence[str] | None = None,
    *,
    use_ray: bool = True,
    workers: int | None = None,
    factors: Sequence[dict[str, Any]] | None = None,
    factor_keys: Sequence[str] | None = None,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    verify: bool = True,
    progress: bool | ProgressFn = False,
) -> OverlapResult:
    """Pairwise overlap of N mask files (``rlsparsity.mask/1``).

    - ``use_ray``: run the chunk-range tasks on Ray (``ray.init()`` only if no cluster is
      connected yet); otherwise run them in this process.
    - ``workers``: tasks in flight at once (default: the cluster's CPUs).
    - ``factors``: per run, e.g. {"seed": 0, "dataset": "add", "algorithm": "grpo"}, for
      the grouped summary; ``factor_keys`` the keys compared (default seed, dataset, algorithm).
    - ``cache_dir`` / ``use_cache``: the incremental cache (default
      ``~/.cache/rlsparsity/overlap``, env ``RLSPARSITY_OVERLAP_CACHE``).
    - ``verify``: check every mask's checksum from the digests of the rows read. A file
      verified earlier and unchanged since (same path, size, mtime, inode, checksum) is
      not hashed again.
    - ``progress``: True for a rich progress bar with throughput, or a callback.

    Raises ``MaskError`` for incompatible, malformed or corrupt masks.
    """
    t_start = time.perf_counter()
    paths = [str(p) for p in paths]
    if len(paths) < 1:
        raise OverlapError("no masks given")
    labels = list(labels) if labels is not None else [Path(p).stem for p in paths]
    if len(labels) != len(paths):
        raise OverlapError(f"{len(labels)} labels for {len(paths)} masks")
    if len(set(labels)) != len(labels):
        dup = next(lab for lab in labels if labels.count(lab) > 1)
        raise OverlapError(f"label {dup!r} is used twice; labels must be unique")
    if factors is not None and len(factors) != len(paths):
        raise OverlapError(f"{len(factors)} factor sets for {len(paths)} masks")
    n = len(paths)

    # 1. Metadata only: fail on incompatible inputs before touching any bits.
    metas = []
    for p, lab in zip(paths, labels, strict=True):
        try:
            metas.append(read_meta(p))
        except MaskError as e:
            raise MaskError(f"{lab}: {e}") from e
        except FileNotFoundError as e:
            raise MaskError(f"{lab}: mask file {p} does not exist") from e
    check_compatible(metas, labels)
    checksums = [str(m["checksum"]) for m in metas]
    total_elems = {int(m["total_elems"]) for m in metas}
    if len(total_elems) > 1:
        raise MaskError(
            f"masks cover different numbers of elements {sorted(total_elems)}; they cannot be compared"
        )
    chunk_elems = int(metas[0]["chunk_elems"])
    base_key = hashlib.blake2b(
        json.dumps([metas[0]["base"].get("hash"), chunk_elems]).encode(), digest_size=10
    ).hexdigest()
    cache = OverlapCache(cache_dir or default_cache_dir(), base_key) if use_cache else None

    # 2. Which pairs are missing from the cache? With all present, no mask is read.
    plan: _Plan | None = None
    layout_hash: str | None = None
    names: list[str] | None = None
    numel: np.ndarray | None = None
    run_counts: list[np.ndarray | None] = [None] * n
    if cache is not None and all(c in cache.runs for c in checksums):
        lays = {cache.runs[c][0] for c in checksums}
        lay = cache.layout(next(iter(lays))) if len(lays) == 1 else None
        if lay is not None:
            layout_hash = next(iter(lays))
            names, numel = lay["tensors"], np.asarray(lay["numel"], dtype=np.int64)
            run_counts = [cache.runs[c][1] for c in checksums]
    if names is None:
        layouts = [_read_layout(p, lab) for p, lab in zip(paths, labels, strict=True)]
        plan = _join(layouts, labels, paths, chunk_elems)
        names, numel, layout_hash = plan.tensor_names, plan.tensor_numel, plan.layout_hash
        for m, lay in enumerate(layouts):
            c = np.zeros(len(names), dtype=np.int64)
            np.add.at(c, plan.row_tensor, lay.changed[plan.file_row[m]])
            run_counts[m] = c
            if int(c.sum()) != int(metas[m]["total_changed"]) or int(lay.length.sum()) != int(
                metas[m]["total_elems"]
            ):
                raise MaskError(
                    f"{labels[m]} ({paths[m]}): totals in metadata ({metas[m]['total_changed']}/{metas[m]['total_elems']}) "
                    f"do not match the rows ({int(c.sum())}/{int(lay.length.sum())})"
                )
    assert names is not None and numel is not None and layout_hash is not None
    T = len(names)
    tinter = np.zeros((T, n, n), dtype=np.int64)
    for m in range(n):
        tinter[:, m, m] = run_counts[m]  # type: ignore[index]
    missing: set[tuple[int, int]] = set()
    cached_pairs = 0
    for i, j in _pair_indices(n):
        if checksums[i] == checksums[j]:
            tinter[:, i, j] = tinter[:, j, i] = run_counts[i]  # identical masks
            continue
        hit = cache.get_pair(checksums[i], checksums[j], layout_hash) if cache is not None else None
        if hit is not None and len(hit) == T:
            tinter[:, i, j] = tinter[:, j, i] = hit
            cached_pairs += 1
        else:
            missing.add((i, j))

    stats: dict[str, Any] = {
        "masks": n,
        "pairs": n * (n - 1) // 2,
        "pairs_cached": cached_pairs,
        "pairs_computed": 0,
        "bytes_read": 0,
        "tasks": 0,
        "task_s": 0.0,
        "task_cpu_s": 0.0,
        "workers": 0,
        "verified": [],
    }
    # 3. Compute the missing pairs: masks in the cover go first in the stack.
    if missing:
        if plan is None:
            layouts = [_read_layout(p, lab) for p, lab in zip(paths, labels, strict=True)]
            plan = _join(layouts, labels, paths, chunk_elems)
            if plan.layout_hash != layout_hash:
                raise MaskError("mask layout changed since it was cached; clear the overlap cache")
        cover = _pair_cover(n, missing)
        order = cover + [k for k in range(n) if k not in cover]
        memo = cache.verified() if (cache is not None and verify) else {}
        need_verify = [False] * n
        if verify:
            for k in range(n):
                real = os.path.realpath(paths[k])
                ent = memo.get(real)
                need_verify[k] = not (
                    ent
                    and ent.get("checksum") == checksums[k]
                    and ent.get("id") == _file_id(paths[k])
                )
        done_inter = _run_tasks(
            plan, order, len(cover), [need_verify[k] for k in order],
            paths=[paths[k] for k in order], labels=[labels[k] for k in order],
            metas=[metas[k] for k in order], use_ray=use_ray, workers=workers,
            progress=progress, stats=stats,
        )  # fmt: skip
        # done_inter: (T, n_new, N) in stack order -> input order.
        computed: dict[tuple[str, str], np.ndarray] = {}
        for a, i in enumerate(cover):
            for b, j in enumerate(order):
                if b < a or i == j:
                    continue
                tinter[:, i, j] = tinter[:, j, i] = done_inter[:, a, b]
                if checksums[i] != checksums[j]:
                    computed[(checksums[i], checksums[j])] = done_inter[:, a, b]
        stats["pairs_computed"] = len({OverlapCache.key(*k) for k in computed})
        if cache is not None:
            cache.save(
                layout_hash, names, numel, {checksums[m]: run_counts[m] for m in range(n)}, computed
            )  # type: ignore[misc]
            if verify:
                cache.mark_verified(
                    {
                        os.path.realpath(paths[k]): {
                            "checksum": checksums[k],
                            "id": _file_id(paths[k]),
                        }
                        for k in range(n)
                        if need_verify[k]
                    }
                )
        stats["verified"] = [labels[k] for k in range(n) if need_verify[k]]
    elif cache is not None and plan is not None:
        cache.save(layout_hash, names, numel, {checksums[m]: run_counts[m] for m in range(n)}, {})

    inter = tinter.sum(axis=0)
    stats["seconds"] = time.perf_counter() - t_start
    stats["bytes_per_s"] = stats["bytes_read"] / stats["seconds"] if stats["seconds"] > 0 else 0.0
    return OverlapResult(
        labels=labels,
        n=next(iter(total_elems)),
        inter=inter,
        tensor_names=list(names),
        tensor_numel=np.asarray(numel, dtype=np.int64),
        tensor_inter=tinter,
        checksums=checksums,
        paths=paths,
        factors=[dict(f) for f in factors] if factors is not None else None,
        meta={
            "chunk_elems": chunk_elems,
            "base": metas[0]["base"],
            "criteria": [m["criterion"] for m in metas],
            "dtype": metas[0]["dtype"],
            "factor_keys": list(factor_keys) if factor_keys else list(DEFAULT_FACTORS),
        },
        stats=stats,
    )


def _run_tasks(
    plan: _Plan,
    order: list[int],
    n_new: int,
    verify: list[bool],
    *,
    paths: list[str],
    labels: list[str],
    metas: list[dict[str, Any]],
    use_ray: bool,
    workers: int | None,
    progress: bool | ProgressFn,
    stats: dict[str, Any],
) -> np.ndarray:
    """Run the chunk-range tasks; verify popcounts and checksums; return (T, n_new, N) counts.

    ``order[k]`` is the input index of stack position k; every other list is in stack order.
    """
    n = len(order)
    file_row = plan.file_row[order]
    layouts = [plan.layouts[k] for k in order]
    batch = np.stack([lay.batch[file_row[k]] for k, lay in enumerate(layouts)])
    in_batch = np.stack([lay.in_batch[file_row[k]] for k, lay in enumerate(layouts)])
    words = (plan.row_nbytes + 7) // 8

    if use_ray:
        import ray

        if not ray.is_initialized():
            ray.init()
        cpus = int(ray.available_resources().get("CPU", 0) or ray.cluster_resources().get("CPU", 1))
        workers = workers or max(1, cpus)
    else:
        workers = 1
    ranges = plan_ranges(words, n, n_new, sum(verify), workers)
    specs = [
        {
            "r0": r0,
            "r1": r1,
            "paths": paths,
            "batch": batch[:, r0:r1],
            "in_batch": in_batch[:, r0:r1],
            "nbytes": plan.row_nbytes[r0:r1],
            "row_tensor": plan.row_tensor[r0:r1],
            "n_new": n_new,
            "verify": verify,
        }
        for r0, r1 in ranges
    ]
    total_bytes = int(plan.row_nbytes.sum()) * n
    stats.update(tasks=len(specs), workers=workers, task_s=0.0, task_cpu_s=0.0)

    T = len(plan.tensor_names)
    R = len(plan.row_tensor)
    inter = np.zeros((T, n_new, n), dtype=np.int64)
    popc = np.zeros((R, n), dtype=np.int64)
    vidx = [k for k in range(n) if verify[k]]
    digests = np.zeros((R, len(vidx), 16), dtype=np.uint8)

    def absorb(out: dict[str, Any]) -> None:
        r0, r1 = out["r0"], out["r1"]
        if out["problems"]:
            k, r, got = out["problems"][0]
            t = plan.tensor_names[int(plan.row_tensor[r0 + r])]
            raise MaskError(
                f"{labels[k]} ({paths[k]}): tensor {t!r}: chunk has {got} bytes of bits, expected {int(plan.row_nbytes[r0 + r])}"
            )
        inter[out["tensors"]] += out["inter"]
        popc[r0:r1] = out["popc"]
        digests[r0:r1] = out["digests"]
        stats["bytes_read"] += out["bytes"]
        stats["task_s"] += out["task_s"]
        stats["task_cpu_s"] += out["cpu_s"]

    with _progress(progress, total_bytes, f"overlap of {n} masks") as advance:
        if use_ray:
            import ray

            remote = ray.remote(num_cpus=1, max_retries=1)(overlap_task)
            pending = list(reversed(specs))
            running: list[Any] = []
            try:
                while pending or running:
                    while pending and len(running) < workers:
                        running.append(remote.remote(pending.pop()))
                    ready, running = ray.wait(running, num_returns=1)
                    try:
                        out = ray.get(ready[0])
                    except ray.exceptions.RayTaskError as e:
                        # Surface the task's own error (MaskError, OSError...) to the caller.
                        cause = getattr(e, "cause", None)
                        if isinstance(cause, MaskError | OverlapError):
                            raise cause from None
                        raise OverlapError(f"an overlap task failed: {cause or e}") from e
                    absorb(out)
                    advance(out["bytes"])
            finally:
                for ref in running:
                    ray.cancel(ref)
        else:
            for spec in specs:
                out = overlap_task(spec)
                absorb(out)
                advance(out["bytes"])

    # Verification: popcounts against the 'changed' column, checksums in file row order.
    for k in range(n):
        if k >= n_new and not verify[k]:
            continue  # not popcounted: verified in an earlier analysis
        lay = layouts[k]
        bad = np.flatnonzero(popc[:, k] != lay.changed[file_row[k]])
        if len(bad):
            r = int(bad[0])
            raise MaskError(
                f"{labels[k]} ({paths[k]}): tensor {plan.tensor_names[int(plan.row_tensor[r])]!r} chunk "
                f"{int(lay.chunk[file_row[k][r]])}: 'changed' does not match its bits"
            )
    for v, k in enumerate(vidx):
        ordered = np.empty((R, 16), dtype=np.uint8)
        ordered[file_row[k]] = digests[:, v]
        if combine_digests([bytes(d) for d in ordered]) != metas[k]["checksum"]:
            raise MaskError(
                f"{labels[k]} ({paths[k]}): checksum mismatch: the bits were modified or the file is corrupt"
            )
    return inter


class _progress:
    """Context manager yielding ``advance(nbytes)``: a rich bar with throughput, a callback, or nothing."""

    def __init__(self, progress: bool | ProgressFn, total: int, title: str) -> None:
        self.progress, self.total, self.title = progress, total, title
        self.done = 0
        self._bar: Any = None

    def __enter__(self) -> Callable[[int], None]:
        if self.progress is True:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            self._bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                DownloadColumn(binary_units=True),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                console=Console(stderr=True),
                transient=False,
            )
            self._bar.start()
            task = self._bar.add_task(self.title, total=self.total)

            def advance(nbytes: int) -> None:
                self._bar.advance(task, nbytes)

            return advance
        if callable(self.progress):
            cb = self.progress

            def advance(nbytes: int) -> None:
                self.done += nbytes
                cb(self.done, self.total)

            return advance
        return lambda nbytes: None

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()
