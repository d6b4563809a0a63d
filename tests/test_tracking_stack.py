"""A real sweep and the overlap job against the one-machine tracking stack (infra/tracking_stack.py):
PostgreSQL holds every run, the S3 store every mask, each mask's bits verified."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


# The `stack` fixture (conftest.py) is started once per session and shared with
# test_overlap_multinode.py.


def test_a_sweep_and_the_overlap_job_land_in_postgres_and_the_object_store(stack, embedded_model_dir, tmp_path):
    import boto3
    import psycopg
    from artifacts import DEFAULT_SERIES, artifact_files
    from mlflow.tracking import MlflowClient

    from rlsparsity.contracts.mask import read_mask

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(stack.env())  # no tracking.uri in the spec: $MLFLOW_TRACKING_URI is the default
    env["RLSPARSITY_RAY_STORAGE"] = str(tmp_path / "ray")
    t0 = time.perf_counter()
    sweep = subprocess.run(
        [BIN / "rlsparsity", "sweep", "sweeps/quickstart.yaml", "--set", "name=stack", "--set", "seed=0",
         "--set", "dataset=add", "--set", "algorithm=[sft,grpo]", "--set", "training.steps=2",
         "--set", "training.prompts_per_step=4", "--set", "training.eval_problems=20"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert sweep.returncode == 0, (sweep.stdout + sweep.stderr)[-6000:]
    assert f"MLflow {stack.tracking_uri}" in sweep.stdout
    # The overlap job on its own (the sweep ran it on Ray), from a clean cache: every mask
    # comes back through the server.
    overlap = subprocess.run(
        [BIN / "rlsparsity", "overlap", "--experiment", "stack", "--cache-dir", str(tmp_path / "cache"),
         "--no-progress", "--local"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert overlap.returncode == 0, (overlap.stdout + overlap.stderr)[-6000:]
    print(f"sweep + overlap against the stack: {time.perf_counter() - t0:.1f} s")

    client = MlflowClient(tracking_uri=stack.tracking_uri)
    exp = client.get_experiment_by_name("stack")
    runs = client.search_runs([exp.experiment_id])
    assert sorted(r.data.tags["rlsparsity.kind"] for r in runs) == ["analysis", "analysis", "sweep", "trial", "trial"]

    # PostgreSQL: the same runs, FINISHED, in the server's database.
    with psycopg.connect(stack.backend_uri) as db:
        rows = db.execute("SELECT run_uuid, status FROM runs WHERE experiment_id = %s",
                          (int(exp.experiment_id),)).fetchall()
    assert sorted(rows) == sorted((r.info.run_id, "FINISHED") for r in runs)

    # The object store: every mask artifact of every trial, byte for byte, bits verified.
    s3 = boto3.client("s3", endpoint_url=stack.s3_endpoint, aws_access_key_id=stack.s3_access_key,
                      aws_secret_access_key=stack.s3_secret_key, region_name="us-east-1")
    objects = {o["Key"]: o["Size"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket="mlflow")
               for o in page.get("Contents", [])}
    checked = 0
    for run in (r for r in runs if r.data.tags["rlsparsity.kind"] == "trial"):
        files = artifact_files(client, run.info.run_id, "masks")
        assert "masks/final.arrow" in files
        for path in sorted(f for f in files if f.endswith(".arrow")):
            (key,) = [k for k in objects if k.endswith(f"/{run.info.run_id}/artifacts/{path}")]
            local = tmp_path / "s3" / key
            local.parent.mkdir(parents=True, exist_ok=True)
            s3.download_file("mlflow", key, str(local))
            assert local.stat().st_size == objects[key]
            mask = read_mask(local, verify=True)  # checksum and counts against the bits
            assert mask.meta["total_elems"] > 0
            checked += 1
    assert checked >= 2 * len(DEFAULT_SERIES)  # two trials, a final mask in every series
    print(f"{checked} masks verified in the object store; {len(rows)} runs in PostgreSQL")
