"""The diff's execution: units of work (read both ranges, count, pack mask bits, hash), run
on threads or as batched Ray tasks, and the driver that folds their results in order into
a DiffResult and the mask file (see the package docstring, "How it runs")."""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from rlsparsity.analysis.checkpoint_hash import (
    HASH_CHUNK_ELEMS,
    chunk_digest,
    combine_tensor_digests,
    tensor_digest,
)
from rlsparsity.analysis.checkpoints import (
    CHUNK_ELEMS,
    DTYPES,
    Checkpoint,
    Reader,
    TensorInfo,
    open_checkpoint,
)
from rlsparsity.analysis.criteria import (
    DEFAULT_CRITERIA,
    TORCH_CONVERTED,
    Criterion,
    common_dtypes,
    compare,
    numba_available,
    parse_criteria,
)
from rlsparsity.analysis.diff.plan import DiffError, Plan, plan_diff
from rlsparsity.analysis.diff.result import DiffResult, TensorResult
from rlsparsity.analysis.parallel import bounded_map, windowed

UNIT_ELEMS = CHUNK_ELEMS
RAY_BATCH_BYTES = 256 << 20


@dataclass
class _Task:
    pair: int  # index into plan.pairs, or -1 for a hash-only task
    a: TensorInfo | None
    b: TensorInfo | None
    start: int
    count: int
    mask: bool = False
    hash_a: bool = False
    hash_b: bool = False


@dataclass
class _Out:
    pair: int
    name_a: str | None
    name_b: str | None
    counts: list[int] | None
    bits: bytes | None
    digests_a: list[bytes] | None
    digests_b: list[bytes] | None
    nbytes: int
    dtypes: tuple[str, str] | None
    kernel: str | None = None  # the counting kernel that ran (Comparison.kernel)


_tls = threading.local()
_TORCH_CODES = {code for code, name in DTYPES.items() if name in TORCH_CONVERTED}


@contextmanager
def _single_threaded_torch(needed: bool) -> Iterator[None]:
    """float16/fp8 conversions go through torch; with several worker threads, torch's own
    intra-op threads would only oversubscribe the cores. bf16/f32 runs never import torch."""
    torch = sys.modules.get("torch")
    if needed and torch is None:
        import torch
    if torch is None:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _buffer(slot: str, nbytes: int) -> np.ndarray:
    buf = getattr(_tls, slot, None)
    if buf is None or buf.size < nbytes:
        buf = np.empty(nbytes, dtype=np.uint8)
        setattr(_tls, slot, buf)
    return buf


def _digests(raw: np.ndarray, count: int, itemsize: int) -> list[bytes]:
    step = HASH_CHUNK_ELEMS * itemsize
    return [chunk_digest(raw[s : s + step]) for s in range(0, count * itemsize, step)]


# The fused numba kernel counts a bf16 pair about 5x faster per core than numpy (about 35
# vs 6 GB/s of input here), but importing numba costs about 0.3 s of one core: on the
# 2-core reference machine the two break even near 3 GB of bf16 input per worker (see
# benchmarks/BENCHMARKS.md). Smaller runs keep the numpy kernel. RLSPARSITY_NUMBA=0 turns
# numba off; RLSPARSITY_NUMBA_MIN_BYTES overrides this threshold (0: always numba).
NUMBA_MIN_BYTES_PER_WORKER = float(os.environ.get("RLSPARSITY_NUMBA_MIN_BYTES", 4e9))


def _kernel_backend(plan: Plan, workers: int, masks: bool) -> str:
    """"numpy", or "auto" (the numba kernel, loaded now) when the bf16 work pays for numba.
    With "auto" only bf16 pairs run numba; the others still run numpy."""
    if masks:
        return "numpy"  # masks use the numpy kernel anyway
    bf16 = sum(
        p.base.numel * 4 for p in plan.pairs if p.base.dtype_name == p.target.dtype_name == "bfloat16"
    )
    if bf16 == 0 or bf16 < NUMBA_MIN_BYTES_PER_WORKER * workers:
        return "numpy"  # nothing numba could count (float32 pairs...), or too little to pay
    return "auto" if numba_available() else "numpy"


def _run_task(t: _Task, criteria: Sequence[Criterion], reader: Reader, backend: str = "auto") -> _Out:
    ra = rb = None
    nbytes = 0
    if t.a is not None:
        ra = reader.read_bytes(t.a, t.start, t.count, _buffer("a", t.count * t.a.itemsize))
        nbytes += ra.size
    if t.b is not None:
        rb = reader.read_bytes(t.b, t.start, t.count, _buffer("b", t.count * t.b.itemsize))
        nbytes += rb.size
    da = _digests(ra, t.count, t.a.itemsize) if t.hash_a else None
    db = _digests(rb, t.count, t.b.itemsize) if t.hash_b else None
    head = (t.pair, t.a.name if t.a else None, t.b.name if t.b else None)
    if t.pair < 0 or t.count == 0:
        return _Out(*head, None if t.pair < 0 else [0] * len(criteria), b"" if t.mask else None, da, db, nbytes, None)
    cmp = compare(
        ra.view(t.a.storage), rb.view(t.b.storage), criteria,
        masks=[0] if t.mask else (), packed=True, dtypes=(t.a.dtype_name, t.b.dtype_name), backend=backend,
    )
    bits = cmp.masks[0].tobytes() if t.mask else None
    return _Out(*head, cmp.counts, bits, da, db, nbytes, (cmp.bitwise_dtype, cmp.compute_dtype), cmp.kernel)


# Ray: tasks are JSON-like dicts so workers need nothing but this package and the files.


def _task_to_dict(t: _Task) -> dict[str, Any]:
    return {
        "pair": t.pair, "start": t.start, "count": t.count, "mask": t.mask, "hash_a": t.hash_a, "hash_b": t.hash_b,
        "a": t.a.to_dict() if t.a else None, "b": t.b.to_dict() if t.b else None,
    }


# Units of a batch in flight at once when a side is in an object store: each unit's ranged
# requests wait on the network, so the next units' reads overlap this one's counting.
REMOTE_UNITS_IN_FLIGHT = 4


def _ray_batch(tasks: list[dict[str, Any]], criteria: list[str]) -> list[dict[str, Any]]:
    crit = parse_criteria(criteria)
    needs_torch = any(d[s]["dtype"] in _TORCH_CODES for d in tasks for s in ("a", "b") if d[s])
    remote = any(d[s]["file"].startswith("s3://") for d in tasks for s in ("a", "b") if d[s])
    units = [
        _Task(
            d["pair"], TensorInfo.from_dict(d["a"]) if d["a"] else None, TensorInfo.from_dict(d["b"]) if d["b"] else None,
            d["start"], d["count"], d["mask"], d["hash_a"], d["hash_b"],
        )
        for d in tasks
    ]  # fmt: skip
    threads = REMOTE_UNITS_IN_FLIGHT if remote else 1
    with _single_threaded_torch(needs_torch), Reader() as reader:
        outs = bounded_map(lambda t: _run_task(t, crit, reader), units, threads, 2 * threads, name="rlsparsity-diff-ray")
        return [o.__dict__ for o in outs]


def _ray_ordered(tasks: Iterable[_Task], criteria: Sequence[Criterion]) -> Iterator[_Out]:
    import ray

    remote = ray.remote(num_cpus=1)(_ray_batch)
    window = max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
    crit = [str(c) for c in criteria]

    def batches() -> Iterator[list[dict[str, Any]]]:
        batch, size = [], 0
        for t in tasks:
            batch.append(_task_to_dict(t))
            size += t.count * ((t.a.itemsize if t.a else 0) + (t.b.itemsize if t.b else 0))
            if size >= RAY_BATCH_BYTES:
                yield batch
                batch, size = [], 0
        if batch:
            yield batch

    for res in windowed(lambda b: remote.remote(b, crit), batches(), window, ray.get):
        for d in res:
            d["dtypes"] = tuple(d["dtypes"]) if d["dtypes"] else None
            yield _Out(**d)


# ----------------------------------------------------------------------------- engine


def diff_checkpoints(
    base: Checkpoint,
    target: Checkpoint,
    criteria: Sequence[Criterion | str] = DEFAULT_CRITERIA,
    *,
    allow_mismatch: bool = False,
    workers: int | None = None,
    mask_path: str | os.PathLike | None = None,
    content_hash: bool | None = None,
    rank: bool = False,
    rank_max_dim: int | None = None,
    use_ray: bool = False,
    ray_address: str | None = None,
    unit_elems: int = UNIT_ELEMS,
    progress: Callable[[int], None] | None = None,
) -> DiffResult:
    """Diff two resolved checkpoints. See the package docstring for what is counted.

    ``mask_path`` writes the mask of the first criterion (``rlsparsity.mask/1``).
    ``content_hash`` (default: on when a mask is written) digests both sides while reading.
    ``progress`` is called with the number of bytes read after every unit.
    """
    crits: list[Criterion] = []
    for c in criteria:
        crits.extend(x for x in ([c] if isinstance(c, Criterion) else parse_criteria(c)) if x not in crits)
    if not crits:
        raise DiffError("no criterion given")
    if unit_elems <= 0 or unit_elems % 8:
        raise DiffError("unit_elems must be a positive multiple of 8")
    want_hash = bool(mask_path) if content_hash is None else content_hash
    if want_hash and unit_elems % HASH_CHUNK_ELEMS:
        unit_elems = HASH_CHUNK_ELEMS * max(1, round(unit_elems / HASH_CHUNK_ELEMS))
    workers = max(1, workers or len(os.sched_getaffinity(0)))
    t0 = time.perf_counter()
    reader = Reader()
    started_ray = False
    writer: Any = None  # mask.MaskWriter; pyarrow is imported only when a mask is written
    try:
        plan = plan_diff(base, target, allow_mismatch=allow_mismatch, reader=reader)
        base_meta, target_meta = base.describe(), target.describe()
        backend = _kernel_backend(plan, workers, bool(mask_path))

        # Hash each stored tensor once: in the task that reads it, else in a hash-only task.
        hashed_a: set[str] = set()
        hashed_b: set[str] = set()

        def tasks() -> Iterator[_Task]:
            for i, p in enumerate(plan.pairs):
                ha = want_hash and p.base.name not in hashed_a
                hb = want_hash and p.target.name not in hashed_b
                if ha:
                    hashed_a.add(p.base.name)
                if hb:
                    hashed_b.add(p.target.name)
                n = p.base.numel
                for s in range(0, max(n, 1), unit_elems):
                    yield _Task(i, p.base, p.target, s, min(unit_elems, n - s), bool(mask_path), ha, hb)
            if want_hash:
                for ck, done, side in ((base, hashed_a, "a"), (target, hashed_b, "b")):
                    for name, info in ck.tensors.items():
                        if name in done:
                            continue
                        for s in range(0, info.numel, unit_elems):
                            c = min(unit_elems, info.numel - s)
                            if side == "a":
                                yield _Task(-1, info, None, s, c, hash_a=True)
                            else:
                                yield _Task(-1, None, info, s, c, hash_b=True)

        if mask_path:
            from rlsparsity.contracts.mask import MaskWriter

            bits_dts = sorted({common_dtypes(p.base.dtype_name, p.target.dtype_name)[0] for p in plan.pairs})
            writer = MaskWriter(
                mask_path,
                criterion=crits[0].to_meta(),
                dtype=bits_dts[0] if len(bits_dts) == 1 else "mixed:" + ",".join(bits_dts),
                base=base_meta,  # hashes are filled into these dicts before close()
                target=target_meta,
                tied=plan.tied,
                extra={
                    "tool": "rlsparsity diff",
                    "compute_dtype": (
                        "bfloat16 (both sides rounded to bf16, as check_sparsity.py loads them)"
                        if crits[0].mode == "paper"
                        else "float32 (float64 for 64-bit/int32 sources)"
                    ),
                    "excluded": [e.to_dict() for e in plan.excluded],
                },
            )

        if use_ray:
            import ray

            if not ray.is_initialized():
                ray.init(address=ray_address, log_to_driver=False)
                started_ray = True
            outs = _ray_ordered(tasks(), crits)
        else:
            outs = bounded_map(
                lambda t: _run_task(t, crits, reader, backend), tasks(), workers, 2 * workers + 2, name="rlsparsity-diff"
            )

        needs_torch = any(x.dtype in _TORCH_CODES for p in plan.pairs for x in (p.base, p.target))
        with _single_threaded_torch(needs_torch):
            results, digests = _consume(plan, crits, outs, writer, progress)
        nbytes = digests.pop("__bytes__")
        kernels_ran = digests.pop("__kernels__")

        if want_hash:
            for meta, ck, side in ((base_meta, base, "a"), (target_meta, target, "b")):
                meta["hash"] = combine_tensor_digests(
                    {n: (i.dtype, i.shape, tensor_digest(digests[side].get(n, []))) for n, i in ck.tensors.items()}
                )
        if writer is not None:
            from rlsparsity.contracts.mask import read_meta

            writer.close()
            meta = read_meta(mask_path)
            if want_hash and meta["base"].get("hash") != base_meta["hash"]:
                raise AssertionError("MaskWriter no longer keeps the base/target dicts by reference")
            writer = None

        rank_result = None
        if rank:
            from rlsparsity.analysis.rank import DEFAULT_MAX_DIM
            from rlsparsity.analysis.rank_checkpoints import update_rank

            rank_result = update_rank(
                [(p.name, p.base, p.target) for p in plan.pairs],
                max_dim=DEFAULT_MAX_DIM if rank_max_dim is None else rank_max_dim,
                workers=workers,
                use_ray=use_ray,
            )
        wall = time.perf_counter() - t0
        return DiffResult(
            base=base_meta,
            target=target_meta,
            criteria=crits,
            tensors=results,
            excluded=plan.excluded,
            tied=plan.tied,
            notes=plan.notes,
            rank=rank_result,
            mask=str(mask_path) if mask_path else None,
            timing={
                "wall_s": wall,
                "bytes_read": nbytes,
                "bytes_per_s": nbytes / wall if wall > 0 else None,
                "workers": workers,
                "backend": "ray" if use_ray else "threads",
                # The counting kernel(s) that actually ran: "numpy", "numba" (the fused bf16
                # kernel, see _kernel_backend), both as "numba+numpy", or "none".
                "kernel": "+".join(sorted(kernels_ran)) or "none",
                "unit_elems": unit_elems,
            },
        )
    finally:
        if writer is not None:
            writer.abort()
        reader.close()
        if started_ray:
            import ray

            ray.shutdown()


def _consume(
    plan: Plan,
    crits: list[Criterion],
    outs: Iterator[_Out],
    writer: Any,
    progress: Callable[[int], None] | None,
) -> tuple[list[TensorResult], dict[str, Any]]:
    """Fold unit results (in task order) into per-tensor results, mask rows and digests
    (with "__bytes__" read and the "__kernels__" that counted)."""
    keys = [str(c) for c in crits]
    results: list[TensorResult] = []
    digests: dict[str, Any] = {"a": {}, "b": {}, "__bytes__": 0, "__kernels__": set()}
    cur = -1
    counts = np.zeros(len(crits), dtype=np.int64)
    bits: list[bytes] = []
    dtypes: tuple[str, str] | None = None

    def finish(i: int) -> None:
        p = plan.pairs[i]
        bd, cd = dtypes or common_dtypes(p.base.dtype_name, p.target.dtype_name)
        results.append(
            TensorResult(p.name, p.base.shape, p.base.numel, p.base.dtype_name, p.target.dtype_name,
                         bd, cd, {k: int(v) for k, v in zip(keys, counts, strict=True)})
        )
        if writer is not None:
            packed = np.frombuffer(b"".join(bits), dtype=np.uint8)
            # MaskWriter.add takes one boolean array per tensor (1 byte/element, transient).
            mask = np.unpackbits(packed, count=p.base.numel, bitorder="little").view(bool)
            writer.add(p.name, p.base.shape, mask)

    for o in outs:
        digests["__bytes__"] += o.nbytes
        if progress:
            progress(o.nbytes)
        if o.digests_a is not None:
            digests["a"].setdefault(o.name_a, []).extend(o.digests_a)
        if o.digests_b is not None:
            digests["b"].setdefault(o.name_b, []).extend(o.digests_b)
        if o.counts is None:  # hash-only unit
            continue
        if o.kernel:
            digests["__kernels__"].add(o.kernel)
        if o.pair != cur:
            if cur >= 0:
                finish(cur)
            cur, bits, dtypes = o.pair, [], None
            counts[:] = 0
        counts += np.asarray(o.counts, dtype=np.int64)
        if o.dtypes is not None:
            dtypes = o.dtypes
        if o.bits is not None:
            bits.append(o.bits)
    if cur >= 0:
        finish(cur)
    done = {r.name for r in results}
    for i, p in enumerate(plan.pairs):  # tensors that produced no counted unit (cannot happen; be safe)
        if p.name not in done:
            raise AssertionError(f"internal: no result for {p.name} (pair {i})")
    return results, digests


def diff(
    base: str | os.PathLike,
    target: str | os.PathLike,
    criteria: Sequence[Criterion | str] = DEFAULT_CRITERIA,
    *,
    base_revision: str | None = None,
    target_revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    **kwargs: Any,
) -> DiffResult:
    """Resolve both sides (local path or hub id) and diff them; kwargs as :func:`diff_checkpoints`."""
    b = open_checkpoint(base, revision=base_revision, cache_dir=cache_dir, label="base")
    t = open_checkpoint(target, revision=target_revision, cache_dir=cache_dir, label="target")
    return diff_checkpoints(b, t, criteria, **kwargs)
