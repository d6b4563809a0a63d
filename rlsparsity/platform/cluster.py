"""Connecting to Ray: the cluster named by RAY_ADDRESS, or a local instance on 127.0.0.1 only."""

from __future__ import annotations

import os
import socket

import ray
from ray._private import ray_constants

# Ray's switch for a machine-local instance (its default on macOS and Windows): the node's IP
# is the loopback address, so the GCS, raylet, workers and agents listen on it alone.
# `ray.init(_node_ip_address="127.0.0.1")` cannot do this: Ray replaces a loopback address
# with the machine's routable one. Ray reads the variable once, at import.
LOCAL_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


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

    A local instance listens on 127.0.0.1 only (gcs, raylet, workers, agents, the dashboard
    and /metrics), so nothing on the network reaches it. To serve other machines, start a
    cluster with `ray start` and the flags it needs and name it in RAY_ADDRESS.
    """
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
        return
    os.environ[LOCAL_ONLY_ENV] = "0"  # the processes Ray starts
    ray_constants.ENABLE_RAY_CLUSTER = False  # this one, which imported Ray already
    port = _free_port()
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    ray.init(num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port)
