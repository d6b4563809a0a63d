"""The README's `ray job submit` against a local head started for the test, as the README
starts it (activated venv, token auth, a loopback-only head)."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
from artifacts import artifact_files, mask_files
from mlflow.tracking import MlflowClient
from services import free_port, wait_for_http

pytestmark = pytest.mark.slow


def _is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip)
    return (getattr(addr, "ipv4_mapped", None) or addr).is_loopback


def _listeners(pid: int) -> list:
    tree = {pid} | {p.pid for p in psutil.Process(pid).children(recursive=True)}
    return [c for c in psutil.net_connections("tcp") if c.status == psutil.CONN_LISTEN and c.pid in tree]
ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _tracebacks(logs: str) -> list[str]:
    """The lines that start a traceback, less those Ray logs after saying the error is safe
    to ignore (Ray Train's controller, when a resource request times out on a loaded CPU).
    Lines are told apart by the process that printed them, `(TrainController pid=420)`, as
    Ray interleaves the lines of several processes."""
    last: dict[str, str] = {}
    found = []
    for line in logs.splitlines():
        source = m.group(1) if (m := re.match(r"\s*(?:\x1b\[\d+m)?\(([^)]*pid=\d+)\)", line)) else ""
        if "Traceback" in line and "safe to ignore" not in last.get(source, ""):
            found.append(line)
        last[source] = line
    return found


def test_ray_job_submit_runs_a_sweep(embedded_model_dir, tmp_path):
    # Ray's unix sockets need a short path, so not pytest's deep tmp_path.
    temp_dir = tempfile.mkdtemp(prefix="rj", dir="/tmp")
    gcs, dash = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PATH"] = f"{BIN}:{env['PATH']}"  # `. .venv/bin/activate`
    # Pin Ray's state API (used by Ray Train inside the job) to this head, not another Ray here.
    env["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{dash}"
    # Token auth on (Ray's default for new clusters), stated so that the head and the job
    # client agree whatever an earlier ray.init() in this process left in the environment;
    # both use the token in ~/.ray/auth_token.
    env["RAY_AUTH_MODE"] = "token"
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # the README's loopback-only head
    # --block keeps `ray start` in the foreground as the parent of this head's processes, so
    # the test can stop exactly this cluster (`ray stop` would stop every Ray on the machine).
    head = subprocess.Popen(
        [BIN / "ray", "start", "--head", "--block", f"--port={gcs}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--include-dashboard=true",
         f"--temp-dir={temp_dir}", "--num-cpus=2", "--disable-usage-stats",
         # Another Ray on this machine (the suite's own) holds the default agent ports.
         *(f"--{name}={free_port()}" for name in (
             "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
             "metrics-export-port", "ray-client-server-port"))],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    db = tmp_path / "mlruns.db"
    address = f"http://127.0.0.1:{dash}"
    try:
        wait_for_http(f"{address}/api/version", head, "ray start --head")
        cmd = [BIN / "ray", "job", "submit", f"--address={address}", "--working-dir", ".", "--",
               "python", "-m", "rlsparsity.cli", "sweep", "sweeps/quickstart.yaml",
               "--set", "name=jobsub", "--set", "seed=0", "--set", "dataset=add", "--set", "algorithm=[grpo,sft]",
               "--set", "training.steps=2", "--set", "training.prompts_per_step=4", "--set", "training.eval_problems=20",
               "--set", f"tracking.uri=sqlite:///{db}"]
        for _ in range(30):
            proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
            # The dashboard answers before the node's job agent has registered with it.
            if "No available agent to submit job" not in proc.stdout + proc.stderr:
                break
            time.sleep(2)
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
        logs = proc.stdout + proc.stderr
        assert "succeeded" in logs.lower()
        # A successful job's log is clean: no traceback, from the driver or any trial.
        assert _tracebacks(logs) == [] and "SystemExit" not in logs, logs[-8000:]
        exposed = [c for c in _listeners(head.pid) if not _is_loopback(c.laddr.ip)]
        assert exposed == [], exposed
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            head.wait(timeout=60)
        with contextlib.suppress(ProcessLookupError):  # stragglers of this head only
            os.killpg(head.pid, signal.SIGKILL)

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    exp = client.get_experiment_by_name("jobsub")
    runs = client.search_runs([exp.experiment_id])
    kinds = sorted(r.data.tags["rlsparsity.kind"] for r in runs)
    assert kinds == ["analysis", "sweep", "trial", "trial"]
    assert all(r.info.status == "FINISHED" for r in runs)
    for r in runs:
        if r.data.tags["rlsparsity.kind"] == "trial":
            assert artifact_files(client, r.info.run_id, "masks") == mask_files([])
