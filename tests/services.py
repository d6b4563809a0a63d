"""Helpers for tests that start real services on 127.0.0.1."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

INFRA = Path(__file__).resolve().parents[1] / "infra"


def load_infra(name: str) -> ModuleType:
    """A script of infra/ (not a package: it ships beside the code, not in it) as a module."""
    spec = importlib.util.spec_from_file_location(name, INFRA / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_http(url: str, proc: subprocess.Popen, what: str, timeout_s: float = 120) -> None:
    """Poll `url` until it answers; fail early, naming `what`, if the process exits."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return
        except urllib.error.HTTPError:
            return  # it answered, if only to ask for a token (Ray's token auth)
        except OSError:
            assert proc.poll() is None, f"{what} exited before answering {url}"
            assert time.monotonic() < deadline, f"{what} did not answer {url} within {timeout_s} s"
            time.sleep(0.5)


def start_mlflow_server(root: Path, port: int) -> subprocess.Popen:
    """`mlflow server` on 127.0.0.1:port, its store and artifacts in `root` (so a restart on
    the same root and port is the same server), serving artifacts itself; returns once it
    answers /health."""
    log = (root / "server.log").open("ab")
    proc = subprocess.Popen(
        [Path(sys.executable).parent / "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts"),
         "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        # MLflow 3's job execution starts a job runner and several huey consumers (about eight
        # more Python processes importing mlflow) that the platform never uses.
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
    )
    log.close()
    wait_for_http(f"http://127.0.0.1:{port}/health", proc, f"mlflow server (log: {root / 'server.log'})")
    return proc


def stop_process_group(proc: subprocess.Popen, timeout_s: float = 30) -> None:
    import contextlib
    import os
    import signal

    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=timeout_s)


def own_ray_processes(title: str) -> list:
    """Processes of this test's own Ray instance whose title starts with `title` (for
    example `ray::RayTrainWorker`): descendants of this process, which started Ray, so a
    fault test never kills another sweep's workers on the same machine."""
    import psutil

    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if (proc.cmdline() or [""])[0].startswith(title):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


@contextlib.contextmanager
def killing(title: str, when: Callable[[], bool], poll_s: float = 0.1) -> Iterator[list[int]]:
    """While the block runs (a sweep), a thread polls `when()`; once it is true, every one of
    this test's Ray processes titled `title` is SIGKILLed, once. Yields the killed pids."""
    killed: list[int] = []
    done = threading.Event()

    def watch() -> None:
        while not done.wait(poll_s):
            if when():
                for proc in own_ray_processes(title):
                    proc.kill()
                    killed.append(proc.pid)
                return

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        yield killed
    finally:
        done.set()
        watcher.join()
