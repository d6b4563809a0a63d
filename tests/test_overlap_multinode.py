"""Overlap across nodes with no shared disk (issue 16): a two-node Ray cluster on one machine
(`ray.cluster_utils.Cluster`, in tests/multinode_overlap.py) runs the overlap job of a
sweep whose masks live in the tracking stack's S3 store (SeaweedFS, behind a real `mlflow
server`). Its tasks read their rows from the store; the driver downloads nothing. Checked
against a local run on the same files, and against masks tampered in the store."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from test_diff import save_sharded
from test_overlap import random_masks, write_mask

from rlsparsity.analysis.diff import diff
from rlsparsity.analysis.overlap import compute_overlap
from rlsparsity.analysis.overlap.layout import _read_layout
from rlsparsity.contracts.mask import CHUNK_ELEMS, MaskError, read_meta

pytestmark = pytest.mark.slow
HERE = Path(__file__).resolve().parent

# A few chunks per mask: tensors of 3 chunks (the last short), one of exactly one, a norm.
SHAPES: dict[str, tuple[int, ...]] = {
    "model.embed_tokens.weight": (1000, 2100),
    "model.layers.0.self_attn.q_proj.weight": (1024, 1024),
    "model.layers.0.input_layernorm.weight": (1024,),
    "model.layers.0.mlp.up_proj.weight": (2048, 1100),
    "lm_head.weight": (1000, 2100),
}
DENSITIES = (0.05, 0.2, 0.5, 0.8)


def _tampered(src: Path, dst: Path, *, keep_count: bool) -> Path:
    """A copy of a mask with bits of its first row changed and its metadata (checksum,
    counts) left as they were: one bit flipped (its 'changed' no longer matches), or two
    differing neighbouring bits swapped (only the checksum can tell)."""
    raw = bytearray(src.read_bytes())
    lay = _read_layout(str(src), "src")
    at, n = int(lay.pos[0]), int(lay.nbytes[0])
    k = next(i for i in range(at, at + n) if raw[i] not in (0, 255))
    if keep_count:
        bit = next(b for b in range(7) if ((raw[k] >> b) & 1) != ((raw[k] >> (b + 1)) & 1))
        raw[k] ^= 3 << bit
    else:
        raw[k] ^= 1
    dst.write_bytes(bytes(raw))
    return dst


def test_overlap_job_across_nodes_reads_masks_from_the_store(stack, tmp_path, monkeypatch) -> None:
    import boto3
    from mlflow import MlflowClient

    monkeypatch.delenv("MLFLOW_ARTIFACTS_DESTINATION", raising=False)
    t_start = time.perf_counter()
    assert sum(np.prod(s) > CHUNK_ELEMS for s in SHAPES.values()) >= 3
    rng = np.random.default_rng(16)
    local = [
        write_mask(tmp_path / "masks" / f"m{k}.arrow", random_masks(rng, d, SHAPES), target=f"t{k}")
        for k, d in enumerate(DENSITIES)
    ]
    labels = [f"trial{k}" for k in range(len(local))]
    reference = compute_overlap(local, labels, use_ray=False, use_cache=False)

    # A sweep in the tracking server; its masks go through the server into S3.
    client = MlflowClient(stack.tracking_uri)
    exp = client.create_experiment("multinode")
    sweep = client.create_run(exp, tags={"rlsparsity.kind": "sweep"}, run_name="sweep")
    run_ids = []
    for k, path in enumerate(local):
        run = client.create_run(exp, run_name=labels[k], tags={
            "rlsparsity.kind": "trial", "mlflow.parentRunId": sweep.info.run_id, "rlsparsity.label": labels[k]})  # fmt: skip
        staged = tmp_path / "stage" / str(k) / "final.arrow"
        staged.parent.mkdir(parents=True)
        staged.write_bytes(path.read_bytes())
        client.log_artifact(run.info.run_id, str(staged), "masks")
        client.set_terminated(run.info.run_id, "FINISHED")
        run_ids.append(run.info.run_id)
    client.set_terminated(sweep.info.run_id, "FINISHED")
    s3 = boto3.client("s3", endpoint_url=stack.s3_endpoint, aws_access_key_id=stack.s3_access_key,
                      aws_secret_access_key=stack.s3_secret_key, region_name="us-east-1")  # fmt: skip
    key = f"artifacts/{exp}/{run_ids[1]}/artifacts/masks/final.arrow"
    assert s3.head_object(Bucket="mlflow", Key=key)["ContentLength"] == local[1].stat().st_size

    # Without the server's destination the masks would go through the server, which (MLflow
    # 3.17, remote store) answers a Range request with the whole file: downloaded, and said so.
    from rich.console import Console

    from rlsparsity.analysis.job import run_overlap_analysis

    console = Console(record=True, width=200)
    via_server = run_overlap_analysis(stack.tracking_uri, "multinode", use_ray=False, use_cache=False,
                                      log=False, console=console)  # fmt: skip
    assert via_server.meta["mask_reads"] == ["downloaded", "local"]
    assert "does not answer Range requests" in console.export_text()
    np.testing.assert_array_equal(via_server.tensor_inter, reference.tensor_inter)

    # Two checkpoints in the store for diff --ray, and their local diff as the reference.
    g = torch.Generator().manual_seed(16)
    base = {f"model.layers.{i}.mlp.up_proj.weight": torch.randn(600, 900, generator=g).to(torch.bfloat16) for i in range(3)}
    target = {n: (t.float() + (torch.rand(t.shape, generator=g) < 0.2) * 1e-2).to(torch.bfloat16) for n, t in base.items()}
    sides = {"base": save_sharded(tmp_path / "ck" / "base", base, shards=2, config={}),
             "target": save_sharded(tmp_path / "ck" / "target", target, shards=3)}  # fmt: skip
    for side, root in sides.items():
        for f in root.iterdir():
            s3.upload_file(str(f), "mlflow", f"checkpoints/{side}/{f.name}")
    local_diff = diff(sides["base"], sides["target"], ["bitwise", "abs:1e-5"], content_hash=True)

    driver = tmp_path / "driver"  # the driver's cwd
    driver.mkdir()
    cfg = {
        "tracking_uri": stack.tracking_uri, "experiment": "multinode", "cache": str(driver / "cache"),
        "report": str(tmp_path / "report.json"),
        "tampered": {
            "flipped": ["mlflow", key, str(_tampered(local[1], tmp_path / "flipped.arrow", keep_count=False))],
            "swapped": ["mlflow", key, str(_tampered(local[1], tmp_path / "swapped.arrow", keep_count=True))],
        },
        "diff": {"base": "s3://mlflow/checkpoints/base", "target": "s3://mlflow/checkpoints/target"},
    }  # fmt: skip
    # The driver's TMPDIR, also Ray's: its sockets need a short path (AF_UNIX: 107 bytes).
    tmp = Path(tempfile.mkdtemp(prefix="rls-mn-", dir="/tmp"))
    cfg["ray_tmp"] = str(tmp / "ray")
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(stack.env(), TMPDIR=str(tmp))
    assert env["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://")
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, str(HERE / "multinode_overlap.py"), str(tmp_path / "cfg.json")],
                              cwd=driver, env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
        written = [f for d in (driver, tmp) for f in d.rglob("*") if f.is_file()]
        masks_written = [f for f in written if _is_mask(f)]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    rep = json.loads(Path(cfg["report"]).read_text())
    first, again = rep["first"], rep["again"]
    print(f"cluster up in {rep['cluster_s']:.1f} s; jobs {first['seconds']:.2f} / {again['seconds']:.2f} s; "
          f"child {time.perf_counter() - t0:.1f} s; whole test {time.perf_counter() - t_start:.1f} s")  # fmt: skip

    # The tasks ran on both nodes, and the result is the local run's, exactly.
    assert len(rep["nodes"]) == 2
    assert {t["node"] for t in first["stats"]["task_log"]} == set(rep["nodes"])
    assert first["labels"] == labels and first["mask_reads"] == ["s3"]
    assert all(p.startswith("s3://mlflow/artifacts/") for p in first["paths"])
    np.testing.assert_array_equal(np.asarray(first["tensor_inter"]), reference.tensor_inter)

    # Each task read its own rows' bits and little else; every row was read once, by one task.
    bits = sum(int(_read_layout(str(p), "m").nbytes.sum()) for p in local)
    log = first["stats"]["task_log"]
    assert sum(t["bits"] for t in log) == bits
    for t in log:  # its rows' bits, plus the headers between record batches read through
        assert t["bits"] <= t["bytes"] <= 1.05 * t["bits"] + len(local) * (64 << 10), t
    # The driver read footers and small columns only: no mask whole, on disk or in memory.
    remote = first["stats"]["remote"]
    assert remote["meta_bytes"] + remote["layout_bytes"] < 0.25 * sum(p.stat().st_size for p in local), remote
    assert rep["downloads"] == 0
    assert written and not masks_written, masks_written
    # No key in any task's arguments: the tasks take endpoint and keys from their environment.
    assert rep["specs"] >= 2 and rep["specs_with_keys"] == 0

    # Again: every pair from the cache, every mask's identity (ETag) unchanged: no bits read.
    assert again["stats"]["bytes_read"] == 0 and again["stats"]["pairs_cached"] == 6
    np.testing.assert_array_equal(np.asarray(again["tensor_inter"]), reference.tensor_inter)

    # A mask tampered in the store (same key, its original checksum kept) is refused, with
    # the cache holding its pairs: its new ETag sends it back to verification.
    uri = first["paths"][1]
    assert rep["flipped"] and "trial1" in rep["flipped"] and uri in rep["flipped"], rep["flipped"]
    assert "tensor 'model.embed_tokens.weight' chunk 0" in rep["flipped"]
    assert "'changed' does not match its bits" in rep["flipped"]
    assert rep["swapped"] and f"trial1 ({uri}): checksum mismatch" in rep["swapped"], rep["swapped"]

    # diff --ray of two checkpoints in the store: the workers read the shards, the driver
    # only their headers; the counts and content hashes are the local diff's.
    d = rep["diff"]
    assert d["backend"] == "ray" and rep["driver_shard_reads"] == 0
    assert d["names"] == [t.name for t in local_diff.tensors]
    assert d["changed"] == [t.changed for t in local_diff.tensors]
    assert (d["base_hash"], d["target_hash"]) == (local_diff.base["hash"], local_diff.target["hash"])


def _is_mask(path: Path) -> bool:
    try:
        read_meta(path)
    except (MaskError, OSError):
        return False
    return True
