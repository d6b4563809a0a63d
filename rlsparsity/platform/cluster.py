"""Connecting to Ray: the cluster named by RAY_ADDRESS, or a local instance on 127.0.0.1."""

from __future__ import annotations

import os
import socket

import ray


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_ray(num_cpus: int | None = None) -> None:
    """Connect once. `ray job submit` and `ray start` clusters set RAY_ADDRESS; otherwise start one.

    Ray Train's placement-group cleaner asks the state API (served by the dashboard) whether
    a trial's controller is still alive. Given no address, that API picks whichever Ray it
    finds on the machine, and with two instances it may ask the wrong one, conclude the
    controller is dead and remove a live trial's placement group. So a local instance gets
    a dashboard on 127.0.0.1 and its address is pinned in the environment its workers inherit.
    """
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
        return
    port = _free_port()
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    ray.init(num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port)
