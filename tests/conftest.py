"""Shared fixtures.

``embedded_model_dir`` builds the embedded base model (θ0, "tiny-arith") once per test
session into a session-private cache (or ``$RLSPARSITY_TEST_CACHE``, kept across
sessions) and points ``RLSPARSITY_CACHE`` there, so every test that needs a pretrained
model (and every call to ``resolve_model("embedded")``) reuses that single build.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from services import free_port, load_infra, start_mlflow_server, stop_process_group


@pytest.fixture(scope="session")
def embedded_cache_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    # RLSPARSITY_TEST_CACHE: a developer's cache kept across sessions (CI builds afresh).
    keep = os.environ.get("RLSPARSITY_TEST_CACHE")
    root = Path(keep) if keep else tmp_path_factory.mktemp("rlsparsity-cache")
    old = os.environ.get("RLSPARSITY_CACHE")
    os.environ["RLSPARSITY_CACHE"] = str(root)
    yield root
    if old is None:
        os.environ.pop("RLSPARSITY_CACHE", None)
    else:
        os.environ["RLSPARSITY_CACHE"] = old


@pytest.fixture(scope="session")
def embedded_model_dir(embedded_cache_root: Path) -> Path:
    """Path of the pretrained embedded model, built once per session (about a minute)."""
    from rlsparsity.platform.models import ensure_embedded_model

    # The CI machine has 2 cores; more threads only add contention for this tiny model.
    threads = torch.get_num_threads()
    torch.set_num_threads(min(threads, 2))
    try:
        return ensure_embedded_model("tiny-arith")
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def ray_session() -> Iterator[object]:
    """One local Ray instance (2 CPUs, no dashboard) shared by every test that needs Ray.

    Starting Ray costs 5-10 s on the 2-core CI machine, so it happens at most once.
    """
    import ray

    from rlsparsity.platform.cluster import init_ray

    started = not ray.is_initialized()
    if started:
        init_ray(num_cpus=2)
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `mlflow server` on 127.0.0.1 serving artifacts itself (mlflow-artifacts:/ URIs)."""
    port = free_port()
    proc = start_mlflow_server(tmp_path_factory.mktemp("mlflow-server"), port)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_process_group(proc)


@pytest.fixture(scope="session")
def stack() -> Iterator[object]:
    """The one-machine tracking stack (infra/tracking_stack.py: PostgreSQL + SeaweedFS's S3 +
    `mlflow server --serve-artifacts`), started once per session (about 25 s)."""
    import shutil
    import tempfile
    import time

    tracking_stack = load_infra("tracking_stack")
    # Not under pytest's tmp_path: its 0700 parents keep the postgres user out.
    root = Path(tempfile.mkdtemp(prefix="rls-stack-", dir="/tmp"))
    t0 = time.perf_counter()
    try:
        started = tracking_stack.start(root)  # stops what it started if it fails
        print(f"tracking stack up in {time.perf_counter() - t0:.1f} s")
        yield started
    finally:
        tracking_stack.stop(root)
        shutil.rmtree(root, ignore_errors=True)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`gpu` tests run where CUDA is and are reported as skipped elsewhere."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (none here); make gpu-check runs these checks on a GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
