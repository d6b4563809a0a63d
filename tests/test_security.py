"""The local Ray instance the platform starts listens on loopback only."""

from __future__ import annotations

import ipaddress
import os
import socket
import urllib.request

import psutil
import pytest

pytestmark = pytest.mark.slow


def _is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip)
    mapped = getattr(addr, "ipv4_mapped", None)  # ::ffff:127.0.0.1
    return (mapped or addr).is_loopback


def _listeners() -> list[tuple[str, int, str]]:
    """(address, port, process name) of every listening TCP socket of this process's tree."""
    me = psutil.Process()
    procs = {p.pid: p for p in me.children(recursive=True)} | {me.pid: me}
    rows = []
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.pid in procs:
            try:
                name = procs[conn.pid].name()
            except psutil.NoSuchProcess:
                continue
            rows.append((conn.laddr.ip, conn.laddr.port, name))
    return rows


def _host_addresses() -> list[str]:
    return [a.address for addrs in psutil.net_if_addrs().values() for a in addrs
            if a.family == socket.AF_INET and not ipaddress.ip_address(a.address).is_loopback]


def _answers(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex((host, port)) == 0


def test_every_ray_listener_is_on_loopback(ray_session):
    ray = ray_session

    @ray.remote(num_cpus=0)
    class Probe:
        def pid(self) -> int:
            return os.getpid()

    @ray.remote(num_cpus=0)
    def task_pid() -> int:
        return os.getpid()

    actor = Probe.remote()
    pids = {ray.get(actor.pid.remote()), ray.get(task_pid.remote())}
    try:
        rows = _listeners()
        names = {name for _, _, name in rows}
        # Not vacuous: the core services and a worker of ours are among them.
        assert {"gcs_server", "raylet"} <= names, rows
        assert any(pid in pids for pid in {c.pid for c in psutil.net_connections("tcp")
                                           if c.status == psutil.CONN_LISTEN}), rows
        exposed = [r for r in rows if not _is_loopback(r[0])]
        assert exposed == [], f"{len(exposed)} of {len(rows)} listeners not on loopback: {exposed}"

        node = ray._private.worker.global_worker.node
        assert node.node_ip_address == "127.0.0.1"
        metrics = node.metrics_export_port
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=10) as r:
            assert r.status == 200
        for host in _host_addresses():  # nothing answers on the machine's network addresses
            reachable = [(ip, port, name) for ip, port, name in rows if _answers(host, port)]
            assert reachable == [], (host, reachable)
    finally:
        ray.kill(actor)
