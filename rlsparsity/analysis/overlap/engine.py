"""The driver: ``compute_overlap`` reads metadata and layouts, looks pairs up in the cache,
runs the chunk-range tasks (on Ray or in this process) and verifies what they read.

Masks are local paths or object-store locations (``s3://``, an MLflow server's
``http(s)://…/mlflow-artifacts/artifacts/…``): the driver reads only footers and small
columns, and each task reads its own rows' bits where the mask lives."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from rlsparsity.analysis.object_store import StoreError, identity_of, is_remote, local_path
from rlsparsity.analysis.overlap.cache import OverlapCache, default_cache_dir
from rlsparsity.analysis.overlap.layout import _join, _Plan, _read_layout, open_meta
from rlsparsity.analysis.overlap.planner import _pair_cover, plan_ranges
from rlsparsity.analysis.overlap.progress import ProgressFn, _progress
from rlsparsity.analysis.overlap.result import DEFAULT_FACTORS, OverlapResult, _pair_indices
from rlsparsity.analysis.overlap.task import overlap_task
from rlsparsity.contracts.mask import (
    MaskError,
    check_checksum,
    check_compatible,
    check_totals,
)

T = TypeVar("T")


class OverlapError(RuntimeError):
    """The analysis cannot run: bad inputs, missing artifacts."""


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
    """Pairwise overlap of N mask files (``rlsparsity.mask/1``): local paths, or
    ``s3://`` / MLflow server URLs read in place by the tasks (``analysis.object_store``).

    - ``use_ray``: run the chunk-range tasks on Ray (``ray.init()`` only if no cluster is
      connected yet); otherwise run them in this process.
    - ``workers``: tasks in flight at once (default: the cluster's CPUs).
    - ``factors``: per run, e.g. {"seed": 0, "dataset": "add", "algorithm": "grpo"}, for
      the grouped summary; ``factor_keys`` the keys compared (default seed, dataset, algorithm).
    - ``cache_dir`` / ``use_cache``: the incremental cache (default
      ``~/.cache/rlsparsity/overlap``, env ``RLSPARSITY_OVERLAP_CACHE``).
    - ``verify``: check every mask's bits against its checksum (from the digests of the rows
      read) before any result keyed by that checksum is used, so a tampered file that claims
      another's checksum is refused, cache or no cache. A file verified earlier and unchanged
      since (same path, size, mtime, ctime, inode, device, checksum; for an S3 object the
      same URI, ETag, size and Last-Modified) is not read again. ``verify=False`` trusts
      the claimed checksums.
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

    # 1. Metadata only: fail on incompatible inputs before touching any bits. Each mask's
    # identity is taken as it is opened, before any read, so a mask changed afterwards is
    # caught (below) rather than trusted.
    t_meta = time.perf_counter()
    metas, ids, stable, meta_io = _open_all(paths, labels)
    meta_io["meta_s"] = time.perf_counter() - t_meta
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

    # Nothing keyed by a checksum (the identical-mask shortcut, the cache's counts) is trusted
    # before the file's bits were verified against that checksum: in this call, or in an
    # earlier one on this very file or object, unchanged since (its identity).
    keys = [_memo_key(p) for p in paths]
    memo = cache.verified() if cache is not None else {}
    need_verify = [
        verify and not (st and _verified_before(memo, k, c, i))
        for k, c, i, st in zip(keys, checksums, ids, stable, strict=True)
    ]

    # 2. Which pairs are missing from the cache? With all present and verified, no mask is read.
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
    if names is None or any(need_verify):
        plan, read_counts = _load_plan(paths, labels, metas, chunk_elems, layout_hash)
        names, numel, layout_hash = plan.tensor_names, plan.tensor_numel, plan.layout_hash
        run_counts = list(read_counts)
    assert names is not None and numel is not None and layout_hash is not None
    T = len(names)
    tinter = np.zeros((T, n, n), dtype=np.int64)
    for m in range(n):
        tinter[:, m, m] = run_counts[m]  # type: ignore[index]
    missing: set[tuple[int, int]] = set()
    cached_pairs = 0
    for i, j in _pair_indices(n):
        if checksums[i] == checksums[j]:
            # Identical masks, once both files are verified below.
            tinter[:, i, j] = tinter[:, j, i] = run_counts[i]
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
        "verified": [labels[k] for k in range(n) if need_verify[k]],
    }
    if meta_io["requests"]:
        stats["remote"] = {**meta_io, "layout_requests": 0, "layout_bytes": 0, "layout_s": 0.0,
                           "task_requests": 0, "task_bytes": 0, "task_bits": 0, "task_wait_s": 0.0}  # fmt: skip
    # 3. Compute the missing pairs (masks in the cover go first in the stack, the others are
    # read for their columns), or only read the masks still to verify.
    computed: dict[tuple[str, str], np.ndarray] = {}
    if missing or any(need_verify):
        if plan is None:
            plan, _ = _load_plan(paths, labels, metas, chunk_elems, layout_hash)
        _count_layout_io(plan, stats)
        cover = _pair_cover(n, missing)
        if missing:
            order = cover + [k for k in range(n) if k not in cover]
        else:
            order = [k for k in range(n) if need_verify[k]]
        done_inter = _run_tasks(
            plan, order, len(cover), [need_verify[k] for k in order],
            paths=[paths[k] for k in order], labels=[labels[k] for k in order],
            metas=[metas[k] for k in order], use_ray=use_ray, workers=workers,
            progress=progress, stats=stats,
        )  # fmt: skip
        # done_inter: (T, n_new, N) in stack order -> input order.
        for a, i in enumerate(cover):
            for b, j in enumerate(order):
                if b < a or i == j:
                    continue
                tinter[:, i, j] = tinter[:, j, i] = done_inter[:, a, b]
                if checksums[i] != checksums[j]:
                    computed[(checksums[i], checksums[j])] = done_inter[:, a, b]
        stats["pairs_computed"] = len({OverlapCache.key(*k) for k in computed})
        # A mask replaced while its bits were read would have been verified (or counted)
        # from a mix of versions: refuse it, and leave nothing of it in the cache.
        for k in range(n):
            if identity_of(paths[k]) != ids[k]:
                raise MaskError(f"{labels[k]} ({paths[k]}) changed while it was being read; run the analysis again")
    if cache is not None:
        if plan is not None or computed:
            cache.save(
                layout_hash, names, numel, {checksums[m]: run_counts[m] for m in range(n)}, computed
            )  # type: ignore[misc]
        cache.mark_verified(
            {
                keys[k]: {"checksum": checksums[k], "id": ids[k]}
                for k in range(n)
                if need_verify[k] and stable[k]
            }
        )

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


def _task_specs(
    plan: _Plan, ranges: list[tuple[int, int]], pos: np.ndarray, changed: np.ndarray,
    paths: list[str], labels: list[str], n_new: int, verify: list[bool],
) -> list[dict[str, Any]]:  # fmt: skip
    """Each task's arguments: locations and row coordinates only. A task opens the masks
    itself, with the endpoint and credentials of its own environment; none are passed."""
    return [
        {
            "r0": r0,
            "r1": r1,
            "paths": paths,
            "labels": labels,
            "pos": pos[:, r0:r1],
            "changed": changed[:, r0:r1],
            "nbytes": plan.row_nbytes[r0:r1],
            "row_tensor": plan.row_tensor[r0:r1],
            "chunk": plan.row_chunk[r0:r1],
            "tensor_names": {
                int(t): plan.tensor_names[t] for t in np.unique(plan.row_tensor[r0:r1])
            },
            "n_new": n_new,
            "verify": verify,
        }
        for r0, r1 in ranges
    ]


def _ray_task(spec: dict[str, Any]) -> dict[str, Any]:
    """``overlap_task`` as a Ray task, noting the node it ran on."""
    import ray

    out = overlap_task(spec)
    out["node"] = ray.get_runtime_context().get_node_id()
    return out


def _memo_key(location: str) -> str:
    return location if is_remote(location) else os.path.realpath(local_path(location))


def _verified_before(memo: dict[str, Any], key: str, checksum: str, ident: dict) -> bool:
    ent = memo.get(key)
    return bool(ent) and ent.get("checksum") == checksum and ent.get("id") == ident


def _open_all(
    paths: list[str], labels: list[str]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[bool], dict[str, int]]:
    """Every mask's metadata, identity and whether that identity is stable; remote ones
    concurrently (a few requests each)."""

    def one(path: str, label: str) -> tuple[dict[str, Any], dict[str, Any], bool, int, int]:
        meta, src = open_meta(path, label)
        with src:
            return meta, src.identity, src.stable, src.requests, src.bytes

    got = _per_mask(one, paths, labels, threads=8)
    io = {"meta_requests": sum(g[3] for g in got), "meta_bytes": sum(g[4] for g in got)}
    io["requests"] = io["meta_requests"]
    return [g[0] for g in got], [g[1] for g in got], [g[2] for g in got], io


def _per_mask(fn: Callable[[str, str], T], paths: list[str], labels: list[str], threads: int) -> list[T]:
    """``fn(path, label)`` for every mask; concurrently when several are remote (their
    reads wait on the network). A store's error names the mask."""

    def one(k: int) -> T:
        try:
            return fn(paths[k], labels[k])
        except StoreError as e:
            raise OverlapError(f"{labels[k]}: {e}") from e

    remote = sum(is_remote(p) for p in paths)
    if remote > 1:
        with ThreadPoolExecutor(min(threads, remote), thread_name_prefix="rls-masks") as ex:
            return list(ex.map(one, range(len(paths))))
    return [one(k) for k in range(len(paths))]


def _count_layout_io(plan: _Plan, stats: dict[str, Any]) -> None:
    if "remote" in stats and not stats["remote"]["layout_requests"]:
        stats["remote"]["layout_requests"] = sum(lay.io.get("requests", 0) for lay in plan.layouts)
        stats["remote"]["layout_bytes"] = sum(lay.io.get("bytes", 0) for lay in plan.layouts)
        stats["remote"]["layout_s"] = plan.read_s


def _load_plan(
    paths: list[str],
    labels: list[str],
    metas: list[dict[str, Any]],
    chunk_elems: int,
    cached_layout: str | None,
) -> tuple[_Plan, list[np.ndarray]]:
    """The joined layout of the masks' small columns (which must be the cached layout, when
    there is one), and each mask's changed counts per tensor, checked against its metadata's
    totals."""
    t0 = time.perf_counter()
    layouts = _per_mask(_read_layout, paths, labels, threads=4)
    plan = _join(layouts, labels, paths, chunk_elems)
    plan.read_s = time.perf_counter() - t0
    if cached_layout is not None and plan.layout_hash != cached_layout:
        raise MaskError("mask layout changed since it was cached; clear the overlap cache")
    counts = []
    for m, lay in enumerate(layouts):
        c = np.zeros(len(plan.tensor_names), dtype=np.int64)
        np.add.at(c, plan.row_tensor, lay.changed[plan.file_row[m]])
        where = f"{labels[m]} ({paths[m]})"
        check_totals(int(c.sum()), int(lay.length.sum()), metas[m], where=where)
        counts.append(c)
    return plan, counts


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
    """Run the chunk-range tasks (they check rows), verify checksums; return (T, n_new, N) counts.

    ``order[k]`` is the input index of stack position k; every other list is in stack order.
    """
    n = len(order)
    file_row = plan.file_row[order]
    layouts = [plan.layouts[k] for k in order]
    pos = np.stack([lay.pos[file_row[k]] for k, lay in enumerate(layouts)])
    changed = np.stack([lay.changed[file_row[k]] for k, lay in enumerate(layouts)])
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
    specs = _task_specs(plan, ranges, pos, changed, paths, labels, n_new, verify)
    total_bytes = int(plan.row_nbytes.sum()) * n
    stats.update(tasks=len(specs), workers=workers, task_s=0.0, task_cpu_s=0.0, task_log=[])

    T = len(plan.tensor_names)
    R = len(plan.row_tensor)
    inter = np.zeros((T, n_new, n), dtype=np.int64)
    vidx = [k for k in range(n) if verify[k]]
    digests = np.zeros((R, len(vidx), 16), dtype=np.uint8)

    def absorb(out: dict[str, Any]) -> None:
        inter[out["tensors"]] += out["inter"]
        digests[out["r0"] : out["r1"]] = out["digests"]
        stats["bytes_read"] += out["bytes"]
        stats["task_s"] += out["task_s"]
        stats["task_cpu_s"] += out["cpu_s"]
        io = out["io"]
        if "remote" in stats:
            for k in ("requests", "bytes", "bits", "wait_s"):
                stats["remote"][f"task_{k}"] += io[k]
        stats["task_log"].append({"r0": out["r0"], "r1": out["r1"], "node": out.get("node"),
                                  "task_s": round(out["task_s"], 4), **io})  # fmt: skip

    with _progress(progress, total_bytes, f"overlap of {n} masks") as advance:
        if use_ray:
            import ray

            # Tasks reading an object store go to as many nodes as possible: each node's
            # network adds bandwidth.
            spread = "SPREAD" if any(is_remote(p) for p in paths) else "DEFAULT"
            remote = ray.remote(num_cpus=1, max_retries=1, scheduling_strategy=spread)(_ray_task)
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
                # After a failed task, let the others (about TASK_TARGET_S each) finish rather
                # than cancel them: ray.cancel racing a task's completion aborts the driver
                # ("Check failed: ... Tried to complete task that was not pending", Ray 2.60,
                # seen in CI in test_ray_matches_local). Cancel only what is still running later.
                if running:
                    _, late = ray.wait(running, num_returns=len(running), timeout=30)
                    for ref in late:
                        ray.cancel(ref)
        else:
            for spec in specs:
                out = overlap_task(spec)
                absorb(out)
                advance(out["bytes"])

    # The tasks checked every row; the checksums need the digests in file row order.
    for v, k in enumerate(vidx):
        ordered = np.empty((R, 16), dtype=np.uint8)
        ordered[file_row[k]] = digests[:, v]
        check_checksum([bytes(d) for d in ordered], metas[k], where=f"{labels[k]} ({paths[k]})")
    return inter
