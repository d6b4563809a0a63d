"""Benchmark ``rlsparsity diff`` against the reference approach and a plain read.

    python benchmarks/bench_diff.py [--params 1e9] [--out DIR]

1. Generates (once, into ``benchmarks/data/``) a bf16 Llama-layout pair with at least
   ``--params`` parameters in several shards. The tuned side has RL-like deltas: a random
   30 % of the elements of each matrix (10 % of embedding rows) get a small float32 update
   (σ = 1e-4) before the bf16 cast, so many of them round back to the stored value. Norms
   are unchanged.
2. Runs, each in its own process (peak RSS from ``os.wait4``'s rusage of that child):
   * ``raw read``: read every byte of both checkpoints sequentially (16 MiB ``readinto``);
   * ``rlsparsity diff`` (the CLI: bitwise + abs:1e-5, default workers);
   * ``baseline``: the reference method (check_sparsity.py): load both models whole with
     transformers in bf16, subtract every parameter in bf16, concatenate the deltas and
     count ``delta != 0`` and ``isclose(delta, 0, atol=1e-5)``.
   Warm runs follow a read that puts the files in the page cache. Cold runs first evict the
   benchmark's own files with ``posix_fadvise(DONTNEED)`` (nothing else is dropped).
3. Writes the figures to ``DIR/bench_diff.json`` (default ``benchmarks/data/``) and updates the section
   "## diff (issue 3)" of ``benchmarks/BENCHMARKS.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SECTION = "## diff (issue 3)"

# TinyLlama-1.1B shapes; the layer count is chosen to reach --params.
HIDDEN, INTER, HEADS, KV_HEADS, VOCAB = 2048, 5632, 32, 4, 32000


def layout(params: float) -> tuple[int, list[tuple[str, tuple[int, ...]]]]:
    kv = HIDDEN // HEADS * KV_HEADS
    layer = [
        ("self_attn.q_proj.weight", (HIDDEN, HIDDEN)),
        ("self_attn.k_proj.weight", (kv, HIDDEN)),
        ("self_attn.v_proj.weight", (kv, HIDDEN)),
        ("self_attn.o_proj.weight", (HIDDEN, HIDDEN)),
        ("mlp.gate_proj.weight", (INTER, HIDDEN)),
        ("mlp.up_proj.weight", (INTER, HIDDEN)),
        ("mlp.down_proj.weight", (HIDDEN, INTER)),
        ("input_layernorm.weight", (HIDDEN,)),
        ("post_attention_layernorm.weight", (HIDDEN,)),
    ]
    per_layer = sum(math.prod(s) for _, s in layer)
    fixed = 2 * VOCAB * HIDDEN + HIDDEN
    n_layers = max(1, math.ceil((params - fixed) / per_layer))
    names = [("model.embed_tokens.weight", (VOCAB, HIDDEN))]
    for i in range(n_layers):
        names += [(f"model.layers.{i}.{n}", s) for n, s in layer]
    names += [("model.norm.weight", (HIDDEN,)), ("lm_head.weight", (VOCAB, HIDDEN))]
    return n_layers, names


def generate(data: Path, params: float, shards: int) -> dict[str, Any]:
    """Write base/ and tuned/ (sharded safetensors + index + config). Idempotent."""
    import torch
    from safetensors.torch import save_file

    info_path = data / "pair.json"
    if info_path.exists():
        return json.loads(info_path.read_text())
    n_layers, names = layout(params)
    total = sum(math.prod(s) for _, s in names)
    per_shard = total / shards
    g = torch.Generator().manual_seed(0)
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
        "intermediate_size": INTER, "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
        "num_hidden_layers": n_layers, "vocab_size": VOCAB, "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "hidden_act": "silu", "rope_theta": 10000.0,
    }
    for side in ("base", "tuned"):
        (data / side).mkdir(parents=True, exist_ok=True)
        (data / side / "config.json").write_text(json.dumps(config, indent=1))
    # Partition tensors into shards of about equal size first, so file names are final.
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    acc = 0
    for name, shape in names:
        if acc >= per_shard * len(groups) and len(groups) < shards:
            groups.append([])
        groups[-1].append((name, shape))
        acc += math.prod(shape)
    weight_map: dict[str, str] = {}
    t0 = time.time()
    for k, group in enumerate(groups):
        fname = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        base, tuned = {}, {}
        for name, shape in group:
            if len(shape) == 1:
                base[name] = tuned[name] = torch.ones(shape, dtype=torch.bfloat16)
                continue
            w = torch.randn(shape, generator=g) * 0.02
            sel = torch.rand(shape, generator=g) < 0.3
            if "embed" in name or "lm_head" in name:  # only the rows of tokens seen in training
                sel &= torch.rand(shape[0], 1, generator=g) < 0.1
            base[name] = w.bfloat16()
            tuned[name] = w.add_(torch.randn(shape, generator=g).mul_(1e-4).mul_(sel)).bfloat16()
            del w, sel
        save_file(base, str(data / "base" / fname), metadata={"format": "pt"})
        save_file(tuned, str(data / "tuned" / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(base, fname))
        print(f"  shard {k + 1}/{len(groups)} written", flush=True)
    for side in ("base", "tuned"):
        (data / side / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": 2 * total}, "weight_map": weight_map}, indent=1)
        )
    total_shards = len(groups)
    info = {
        "params": total, "layers": n_layers, "shards": total_shards, "tensors": len(names),
        "bytes_per_side": sum(f.stat().st_size for f in (data / "base").glob("*.safetensors")),
        "generate_s": round(time.time() - t0, 1),
    }
    info_path.write_text(json.dumps(info, indent=1))
    return info


def files_of(data: Path) -> list[Path]:
    return sorted((data / "base").glob("*.safetensors")) + sorted((data / "tuned").glob("*.safetensors"))


def evict(files: list[Path]) -> None:
    """Drop only these files' pages from the page cache (cold-ish reads)."""
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def measured(cmd: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``cmd``: wall time, stdout, and that child's own peak RSS (``os.wait4`` rusage)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=None if env is None else os.environ | env)
        _, status, ru = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
        p.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if p.returncode != 0:
        raise RuntimeError(f"{cmd} failed ({p.returncode}):\n{stderr[-3000:]}")
    return {"wall_s": wall, "cpu_s": ru.ru_utime + ru.ru_stime, "peak_rss_bytes": ru.ru_maxrss * 1024, "stdout": stdout}


def read_all(paths: list[str]) -> tuple[int, float]:
    buf = bytearray(16 << 20)
    view = memoryview(buf)
    total = 0
    t0 = time.perf_counter()
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while n := f.readinto(view):
                total += n
    return total, time.perf_counter() - t0


def child_read(paths: list[str]) -> int:
    total, inner = read_all(paths)
    print(json.dumps({"bytes": total, "inner_s": inner}))
    return 0


def child_kernels(seconds: float = 1.0) -> int:
    """Per-core rates of the two bf16 counting kernels (bitwise + abs:1e-5) on the same
    cache-resident pair of 2**20 elements (one diff unit) with the benchmark's RL-like deltas."""
    import numpy as np

    from rlsparsity.analysis.criteria import compare, numba_available, parse_criteria

    rng = np.random.default_rng(0)
    n = 1 << 20
    w = (rng.standard_normal(n) * 0.02).astype(np.float32)
    upd = rng.random(n) < 0.3
    w2 = w + upd * (rng.standard_normal(n) * 1e-4).astype(np.float32)
    bf = lambda x: ((x.view(np.uint32) + 0x7FFF + ((x.view(np.uint32) >> 16) & 1)) >> 16).astype(np.uint16)  # noqa: E731
    a, b = bf(w), bf(w2)
    crits = parse_criteria(["bitwise", "abs:1e-5"])
    t0 = time.perf_counter()
    have = numba_available()
    load_s = time.perf_counter() - t0
    out: dict[str, Any] = {"numba_import_and_load_s": load_s if have else None}
    counts = {}
    for backend in ("numpy", "numba") if have else ("numpy",):
        best = math.inf
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            t = time.perf_counter()
            counts[backend] = compare(a, b, crits, dtypes=("bfloat16", "bfloat16"), backend=backend).counts
            best = min(best, time.perf_counter() - t)
        out[f"{backend}_bytes_per_s"] = 4 * n / best
    assert len({tuple(c) for c in counts.values()}) == 1, counts  # the kernels agree
    print(json.dumps(out))
    return 0


def child_baseline(base: str, tuned: str) -> int:
    """The reference method: both models whole, bf16 deltas, concatenated, then counted."""
    # If memory runs out, let the kernel kill this process rather than another job's.
    with contextlib.suppress(OSError), open("/proc/self/oom_score_adj", "w") as f:
        f.write("1000")
    import torch
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    m0 = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    m1 = AutoModelForCausalLM.from_pretrained(tuned, dtype=torch.bfloat16)
    t_load = time.perf_counter() - t0
    sd0, sd1 = m0.state_dict(), m1.state_dict()
    deltas, skipped = [], []
    with torch.no_grad():
        for name, _ in m0.named_parameters():
            if name not in sd1 or sd1[name].shape != sd0[name].shape:
                skipped.append(name)  # the reference prints and skips
                continue
            deltas.append((sd1[name] - sd0[name]).view(-1))
        flat = torch.cat(deltas)
        nonzero = int((flat != 0).sum())
        close = int(torch.isclose(flat, torch.zeros_like(flat), atol=1e-5).sum())
    print(json.dumps({
        "total": flat.numel(), "changed_nonzero_bf16_delta": nonzero, "changed_abs_1e-5_bf16_delta": flat.numel() - close,
        "load_s": t_load, "diff_s": time.perf_counter() - t0 - t_load, "skipped": skipped,
    }))
    return 0


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import psutil

    return (
        f"{cpu}, {len(os.sched_getaffinity(0))} cores available, {psutil.virtual_memory().total / 2**30:.0f} GiB RAM, "
        f"Python {platform.python_version()}, torch {version('torch')}, safetensors {version('safetensors')}, "
        f"{platform.system()} {platform.release()}"
    )


def update_markdown(path: Path, body: str) -> None:
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    block = f"{SECTION}\n\n{body.strip()}\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(lambda _: block + "\n", text) if pattern.search(text) else text.rstrip() + "\n\n" + block
    path.write_text(text)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", type=float, default=1e9, help="minimum parameters of the pair (default 1e9)")
    ap.add_argument("--shards", type=int, default=5)
    ap.add_argument("--out", type=Path, default=HERE / "data", help="where bench_diff.json goes (default: benchmarks/data, gitignored)")
    ap.add_argument("--data", type=Path, help="data directory (default benchmarks/data/diff-<params>)")
    ap.add_argument("--repeat", type=int, default=2, help="runs of raw read and diff per cache state (best kept)")
    ap.add_argument("--skip-baseline", action="store_true")
    ap.add_argument(
        "--baseline-from", type=Path,
        help="reuse the baseline run of an earlier bench_diff.json instead of running it (it needs ~20 GiB of RAM)",
    )
    ap.add_argument("--no-markdown", action="store_true", help="do not update BENCHMARKS.md")
    args = ap.parse_args()

    data = args.data or HERE / "data" / f"diff-{args.params:.0e}"
    print(f"pair in {data} ...", flush=True)
    # Generate in a child: this process must stay small, because a forked child's peak RSS
    # (ru_maxrss) starts from its parent's RSS at fork time.
    if not (data / "pair.json").exists():
        subprocess.run([sys.executable, __file__, "--child-generate", str(data), str(args.params), str(args.shards)], check=True)
    pair = json.loads((data / "pair.json").read_text())
    files = files_of(data)
    nbytes = sum(f.stat().st_size for f in files)
    print(json.dumps(pair), flush=True)
    py = sys.executable
    jout = args.out / "diff_result.json"
    args.out.mkdir(parents=True, exist_ok=True)
    ours_cmd = [py, "-m", "rlsparsity.analysis.diff.cli", str(data / "base"), str(data / "tuned"), "-q", "--json", str(jout)]
    read_cmd = [py, __file__, "--child-read", *map(str, files)]
    runs: dict[str, dict[str, Any]] = {}
    load0 = os.getloadavg()[0]

    def best(key: str, cmd: list[str], cold: bool, env: dict[str, str] | None = None) -> None:
        tries = []
        for _ in range(args.repeat):
            if cold:
                evict(files)
            else:
                read_all(list(map(str, files)))  # warm the page cache
            r = measured(cmd, env)
            tries.append(r)
            print(f"{key}: {r['wall_s']:.2f} s, peak RSS {r['peak_rss_bytes'] / 2**20:.0f} MiB", flush=True)
        runs[key] = min(tries, key=lambda r: r["wall_s"]) | {"all_wall_s": [round(r["wall_s"], 3) for r in tries]}

    best("raw_read_cold", read_cmd, cold=True)
    best("diff_cold", ours_cmd, cold=True)
    best("raw_read_warm", read_cmd, cold=False)
    best("diff_warm", ours_cmd, cold=False)
    ours = json.loads(jout.read_text())
    # The same command with the fused numba kernel forced (by default `diff` takes it only
    # from 4 GB of bf16 input per worker, where it pays for importing numba).
    best("diff_warm_numba", ours_cmd, cold=False, env={"RLSPARSITY_NUMBA_MIN_BYTES": "0"})
    ours_numba = json.loads(jout.read_text())
    assert ours_numba["criteria"] == ours["criteria"], "numba and numpy kernels disagree"
    kernels = json.loads(measured([py, __file__, "--child-kernels"])["stdout"].strip().splitlines()[-1])
    print(json.dumps(kernels), flush=True)
    baseline = None
    if args.baseline_from:
        baseline = json.loads(args.baseline_from.read_text())["runs"]["baseline_warm"]
        baseline["reused_from"] = str(args.baseline_from)
        runs["baseline_warm"] = baseline
    elif not args.skip_baseline:
        import psutil

        # Measured peak: about 9.8x one side's bytes, about 2x of it file-backed (reclaimable).
        need = 8 * pair["bytes_per_side"]
        avail = psutil.virtual_memory().available
        if avail < need:
            print(f"skipping baseline: needs about {need / 2**30:.1f} GiB, {avail / 2**30:.1f} GiB available", flush=True)
        else:
            read_all(list(map(str, files)))
            try:
                r = measured([py, __file__, "--child-baseline", str(data / "base"), str(data / "tuned")])
            except RuntimeError as e:  # e.g. killed by the OOM killer on a busy machine
                print(f"baseline failed: {e}", flush=True)
            else:
                baseline = r | {"result": json.loads(r["stdout"].strip().splitlines()[-1])}
                runs["baseline_warm"] = baseline
                print(f"baseline: {r['wall_s']:.2f} s, peak RSS {r['peak_rss_bytes'] / 2**20:.0f} MiB", flush=True)

    for r in runs.values():
        r.pop("stdout", None)
        r["bytes_per_s"] = nbytes / r["wall_s"]
    summary = {
        "machine": machine(), "load_avg_start_end": [load0, os.getloadavg()[0]], "pair": pair, "bytes_both": nbytes, "runs": runs,
        "diff": {k: ours["criteria"][k] for k in ours["criteria"]} | {"total": ours["total"], "engine": ours["timing"]},
        "engine_numba": ours_numba["timing"], "kernels": kernels,
        "command": f"python benchmarks/bench_diff.py --params {args.params:g}"
        + (f" --repeat {args.repeat}" if args.repeat != 2 else "")
        + (" --baseline-from PREVIOUS/bench_diff.json" if args.baseline_from else ""),
    }
    if baseline:
        summary["ratios"] = {
            "wall_baseline_over_diff": baseline["wall_s"] / runs["diff_warm"]["wall_s"],
            "rss_diff_over_baseline": runs["diff_warm"]["peak_rss_bytes"] / baseline["peak_rss_bytes"],
        }
    summary.setdefault("ratios", {}).update({
        "diff_over_raw_read_warm": runs["diff_warm"]["wall_s"] / runs["raw_read_warm"]["wall_s"],
        "diff_numba_over_raw_read_warm": runs["diff_warm_numba"]["wall_s"] / runs["raw_read_warm"]["wall_s"],
        "diff_over_raw_read_cold": runs["diff_cold"]["wall_s"] / runs["raw_read_cold"]["wall_s"],
    })
    (args.out / "bench_diff.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary["ratios"], indent=1))
    if not args.no_markdown:
        update_markdown(HERE / "BENCHMARKS.md", render(summary))
    return 0


def render(s: dict[str, Any]) -> str:
    gb = lambda b: f"{b / 1e9:.2f}"  # noqa: E731
    mib = lambda b: f"{b / 2**20:,.0f}"  # noqa: E731
    p = s["pair"]
    lines = [
        f"Machine: {s['machine']}. Shared with other jobs (1-min load average {s['load_avg_start_end'][0]:.1f} at the "
        f"start, {s['load_avg_start_end'][1]:.1f} at the end, on 2 cores), so timings are noisy; best of the runs shown.",
        "",
        f"Command: `{s['command']}`",
        "",
        f"Pair: bf16 Llama layout, {p['params']:,} parameters per side, {p['layers']} layers, {p['shards']} shards, "
        f"{gb(p['bytes_per_side'])} GB per side ({gb(s['bytes_both'])} GB read per comparison). RL-like deltas: "
        "30 % of matrix elements (3 % of embedding/lm_head elements) get a float32 update of σ = 1e-4 before the bf16 "
        "cast; norms unchanged.",
        "",
        "| run | page cache | wall s | CPU s (user+sys) | read GB/s (both files / wall) | peak RSS MiB |",
        "|---|---|---:|---:|---:|---:|",
    ]
    names = {
        "raw_read_cold": ("read both checkpoints (16 MiB readinto)", "cold"),
        "diff_cold": ("`rlsparsity diff` (bitwise + abs:1e-5)", "cold"),
        "raw_read_warm": ("read both checkpoints (16 MiB readinto)", "warm"),
        "diff_warm": ("`rlsparsity diff` (bitwise + abs:1e-5)", "warm"),
        "diff_warm_numba": ("`rlsparsity diff`, numba kernel forced (`RLSPARSITY_NUMBA_MIN_BYTES=0`)", "warm"),
        "baseline_warm": ("baseline: reference method, both models whole (transformers, bf16 deltas, cat, isclose)", "warm"),
    }
    for key, (label, cache) in names.items():
        r = s["runs"].get(key)
        if r:
            lines.append(
                f"| {label} | {cache} | {r['wall_s']:.2f} | {r['cpu_s']:.2f} | {gb(r['bytes_per_s'])} | {mib(r['peak_rss_bytes'])} |"
            )
    d = s["diff"]
    eng = d["engine"]
    en = s.get("engine_numba")
    k = s.get("kernels") or {}
    lines += [
        "",
        f"Wall times are whole processes (interpreter start, imports, listing); the diff engine itself took "
        f"{eng['wall_s']:.2f} s ({gb(eng['bytes_read'] / eng['wall_s'])} GB/s) with {eng['workers']} workers and the "
        f"{eng.get('kernel', 'numpy')} kernel in the last warm run"
        + (
            f", and {en['wall_s']:.2f} s ({gb(en['bytes_read'] / en['wall_s'])} GB/s) with the numba kernel forced "
            "(this includes importing numba and loading the cached kernel)."
            if en else "."
        ),
    ]
    if k:
        lines.append(
            f"Kernels, one core, one cache-resident 2**20-element unit (bitwise + abs:1e-5), same run: numpy "
            f"{gb(k['numpy_bytes_per_s'])} GB/s of bf16 input"
            + (
                f", fused numba {gb(k['numba_bytes_per_s'])} GB/s ({k['numba_bytes_per_s'] / k['numpy_bytes_per_s']:.1f}×); "
                f"importing numba and loading the cached kernel took {k['numba_import_and_load_s']:.2f} s."
                if k.get("numba_bytes_per_s") else "."
            )
        )
    lines += [
        "",
        f"Result: n = {d['total']:,}; bitwise sparsity {100 * d['bitwise']['sparsity']:.3f} %, "
        f"abs:1e-5 sparsity {100 * d['abs:1e-5']['sparsity']:.3f} %.",
    ]
    b = s["runs"].get("baseline_warm")
    r = s["ratios"]
    if b:
        br = b["result"]
        if b.get("reused_from"):
            lines.append(
                "The baseline row is reused from an earlier run of this benchmark on this machine (`--baseline-from`): it does "
                "not run this project's code and needs about 20 GiB of RAM, which a shared machine cannot always spare."
            )
        lines.append(
            f"Baseline result: n = {br['total']:,}; delta != 0 in bf16: {100 * (1 - br['changed_nonzero_bf16_delta'] / br['total']):.3f} % sparse, "
            f"isclose(atol=1e-5): {100 * (1 - br['changed_abs_1e-5_bf16_delta'] / br['total']):.3f} % "
            f"(load {b['result']['load_s']:.1f} s, diff {b['result']['diff_s']:.1f} s). The baseline subtracts in bf16, so its "
            "abs:1e-5 count can differ slightly from ours (float32 Δ); `paper:1e-5` is its arithmetic."
        )
        lines += [
            "",
            "| goal | target | measured | met |",
            "|---|---|---:|---|",
            f"| peak memory vs baseline | ≤ 1/10 | {r['rss_diff_over_baseline']:.3f} (1/{1 / r['rss_diff_over_baseline']:.0f}) | {'yes' if r['rss_diff_over_baseline'] <= 0.1 else 'no'} |",
            f"| wall time vs baseline | ≥ 3× faster | {r['wall_baseline_over_diff']:.1f}× | {'yes' if r['wall_baseline_over_diff'] >= 3 else 'no'} |",
        ]
    else:
        lines += ["", "| goal | target | measured | met |", "|---|---|---:|---|"]
    lines += [
        f"| throughput vs reading the files, warm | within 3× | diff takes {r['diff_over_raw_read_warm']:.2f}× the read time"
        + (f" ({r['diff_numba_over_raw_read_warm']:.2f}× with the numba kernel forced)" if "diff_numba_over_raw_read_warm" in r else "")
        + f" | {'yes' if r['diff_over_raw_read_warm'] <= 3 else 'no'} |",
        f"| throughput vs reading the files, cold | within 3× | diff takes {r['diff_over_raw_read_cold']:.2f}× the read time | {'yes' if r['diff_over_raw_read_cold'] <= 3 else 'no'} |",
        "",
        "Notes: peak RSS is each process's own `ru_maxrss` (from `os.wait4`), interpreter included. `diff` imports "
        "neither torch nor pyarrow for a bf16/float32 pair without `--mask`, and reads with `preadv` into per-worker "
        "buffers, so page-cache pages never count toward its RSS; the baseline's RSS is its two models (transformers), "
        "the bf16 deltas, their concatenation and the isclose temporaries. \"Cold\" evicts only the benchmark's "
        "files (`posix_fadvise(DONTNEED)`) and depends on the virtual disk and on the host's own cache; \"warm\" runs "
        "read from the page cache, where reading is a memcpy (about 20 GB/s) and `diff` is CPU-bound, so the warm "
        "ratio mostly measures the 2 shared cores. The fused numba kernel (bitwise compare on the uint16 bits; Δ in "
        "float32 from a 16-bit shift; the same definitions, branch-free, fastmath off, checked bit for bit against "
        "the numpy kernel in tests/test_criteria.py) makes counting cheap next to reading, but importing numba costs "
        "about as much as it saves on a 4 GB pair, so `diff` uses it only from 4 GB of bf16 input per worker "
        "(`RLSPARSITY_NUMBA_MIN_BYTES`). With `--mask` the same run takes longer (SHA-256 content hashes of both "
        "sides plus mask packing, numpy kernel).",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child-generate":
        print(json.dumps(generate(Path(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]))))
        sys.exit(0)
    if len(sys.argv) > 1 and sys.argv[1] == "--child-read":
        sys.exit(child_read(sys.argv[2:]))
    if len(sys.argv) > 1 and sys.argv[1] == "--child-kernels":
        sys.exit(child_kernels())
    if len(sys.argv) > 1 and sys.argv[1] == "--child-baseline":
        sys.exit(child_baseline(sys.argv[2], sys.argv[3]))
    sys.exit(main())
