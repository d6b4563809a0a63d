"""The multi-node half of tests/test_overlap_multinode.py, run as a process of its own (so
that no Ray of the test session is connected, and the nodes inherit the S3 credentials from
this process's environment, as a cluster's workers get them from theirs).

    python tests/multinode_overlap.py CONFIG.json

Starts a Ray cluster of two nodes on 127.0.0.1 (`ray.cluster_utils.Cluster`, one CPU and
a custom resource each), runs the overlap job of the config's experiment three times
(fresh, cached, after each tampering of a mask in the store) and `diff --ray` of two
checkpoints in the store, and writes what it saw to the config's report. Spies in this
(the driver's) process only: MLflow downloads, the tasks' arguments, shard reads.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # every node listens on 127.0.0.1 only


def holds(value: Any, needle: str) -> bool:
    """Whether ``needle`` appears in any string, bytes or text array inside ``value``."""
    import numpy as np

    if isinstance(value, dict):
        return any(holds(k, needle) or holds(v, needle) for k, v in value.items())
    if isinstance(value, list | tuple | set):
        return any(holds(v, needle) for v in value)
    if isinstance(value, str):
        return needle in value
    if isinstance(value, bytes | bytearray):
        return needle.encode() in value
    if isinstance(value, np.ndarray) and value.dtype.kind in "USO":
        return any(holds(str(v), needle) for v in value.ravel())
    return False


def main(config: Path) -> None:
    cfg = json.loads(config.read_text())
    import boto3
    import mlflow.artifacts
    import ray
    from ray.cluster_utils import Cluster

    from rlsparsity.analysis import checkpoints
    from rlsparsity.analysis.diff import diff
    from rlsparsity.analysis.job import run_overlap_analysis
    from rlsparsity.analysis.overlap import engine
    from rlsparsity.contracts.mask import MaskError

    report: dict[str, Any] = {"downloads": 0, "specs": 0, "specs_with_keys": 0, "driver_shard_reads": 0}
    keys = [os.environ["AWS_SECRET_ACCESS_KEY"], os.environ["AWS_ACCESS_KEY_ID"]]

    def no_download(*args: Any, **kwargs: Any) -> Any:
        report["downloads"] += 1
        raise AssertionError("a mask was downloaded to the driver")

    mlflow.artifacts.download_artifacts = no_download
    task_specs = engine._task_specs

    def spied_specs(*args: Any, **kwargs: Any) -> list[dict[str, Any]]:
        specs = task_specs(*args, **kwargs)
        report["specs"] += len(specs)
        report["specs_with_keys"] += sum(any(holds(s, k) for k in keys) for s in specs)
        return specs

    engine._task_specs = spied_specs
    read_remote = checkpoints.Reader._read_remote

    def driver_read(self: Any, *args: Any) -> Any:
        report["driver_shard_reads"] += 1
        return read_remote(self, *args)

    checkpoints.Reader._read_remote = driver_read

    t0 = time.perf_counter()
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "resources": {"node_a": 1}, "include_dashboard": False,
                        "temp_dir": cfg["ray_tmp"]},  # fmt: skip
    )
    cluster.add_node(num_cpus=1, resources={"node_b": 1})
    try:
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        report["nodes"] = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
        report["cluster_s"] = time.perf_counter() - t0

        def job() -> dict[str, Any]:
            t = time.perf_counter()
            res = run_overlap_analysis(cfg["tracking_uri"], cfg["experiment"], cache_dir=cfg["cache"],
                                       workers=2, quiet=True)  # fmt: skip
            return {"seconds": time.perf_counter() - t, "labels": res.labels, "paths": res.paths,
                    "tensor_inter": res.tensor_inter.tolist(), "stats": res.stats,
                    "mask_reads": res.meta["mask_reads"]}  # fmt: skip

        report["first"] = job()
        report["again"] = job()
        s3 = boto3.client("s3", endpoint_url=os.environ["MLFLOW_S3_ENDPOINT_URL"], region_name="us-east-1")
        for name, (bucket, key, path) in cfg["tampered"].items():
            s3.put_object(Bucket=bucket, Key=key, Body=Path(path).read_bytes())
            try:
                job()
                report[name] = None
            except MaskError as e:
                report[name] = str(e)

        t = time.perf_counter()
        res = diff(cfg["diff"]["base"], cfg["diff"]["target"], ["bitwise", "abs:1e-5"], use_ray=True,
                   content_hash=True)  # fmt: skip
        report["diff"] = {"seconds": time.perf_counter() - t, "changed": [x.changed for x in res.tensors],
                          "names": [x.name for x in res.tensors], "base_hash": res.base["hash"],
                          "target_hash": res.target["hash"], "backend": res.timing["backend"]}  # fmt: skip
    finally:
        ray.shutdown()
        cluster.shutdown()
    Path(cfg["report"]).write_text(json.dumps(report, default=str))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
