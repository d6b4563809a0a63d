"""Helpers for tests that start real services on 127.0.0.1."""

from __future__ import annotations

import socket
import subprocess
import time
import urllib.error
import urllib.request


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
