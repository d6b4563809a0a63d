"""KubeRay manifests (`ray.io/v1`) for rlsparsity: a RayCluster and a RayJob, on CPU or GPU.

    python infra/kuberay.py                      # rewrite the committed manifests in infra/k8s/
    python infra/kuberay.py --gpus 1 --image registry.example/rlsparsity:0.1 \\
        --spec sweeps/paper/table4_overlap.yaml --print rayjob

The image must hold the project installed with its dependencies (`pip install -e .` or
`.[vllm]` on CUDA); the job runs in the head pod with that image's Python, so no runtime_env
is needed. Credentials never appear in a manifest: the tracking URI and the object store's
keys come from the Secret named by `tracking_secret` (keys `MLFLOW_TRACKING_URI`,
`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `MLFLOW_S3_ENDPOINT_URL`, all optional but the
URI), and Ray's token comes from the operator (`authOptions.mode: token`).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

API_VERSION = "ray.io/v1"
RAY_VERSION = "2.60.0"
K8S_DIR = Path(__file__).resolve().parent / "k8s"
# Environment every Ray container gets from the tracking Secret: trials log to MLflow from the
# worker pods, so the workers need the URI and the store's keys as much as the head does.
SECRET_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID",
              "AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")


@dataclass(frozen=True)
class ClusterShape:
    """What a deployment varies: the image, each pod's resources and the worker count."""

    image: str = "ghcr.io/example/rlsparsity:0.1.0"
    head_cpus: int = 2
    head_memory: str = "8Gi"
    worker_cpus: int = 8
    worker_memory: str = "32Gi"
    gpus_per_worker: int = 0
    workers: int = 1
    max_workers: int = 4
    tracking_secret: str = "rlsparsity-tracking"
    # The model cache (the embedded θ0, converted checkpoints) lives here in every pod.
    cache_dir: str = "/var/cache/rlsparsity"
    extra_env: dict[str, str] = field(default_factory=dict)


def _env(shape: ClusterShape) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [
        {"name": name, "valueFrom": {"secretKeyRef": {
            "name": shape.tracking_secret, "key": name, "optional": name != "MLFLOW_TRACKING_URI"}}}
        for name in SECRET_ENV
    ]
    env.append({"name": "RLSPARSITY_CACHE", "value": shape.cache_dir})
    env += [{"name": k, "value": v} for k, v in sorted(shape.extra_env.items())]
    return env


def _container(name: str, shape: ClusterShape, cpus: int, memory: str, gpus: int) -> dict[str, Any]:
    resources: dict[str, Any] = {"cpu": str(cpus), "memory": memory}
    if gpus:
        resources["nvidia.com/gpu"] = str(gpus)
    container: dict[str, Any] = {
        "name": name,
        "image": shape.image,
        "imagePullPolicy": "IfNotPresent",
        # Requests equal limits: Ray schedules by the CPUs it is told, so it must get them.
        "resources": {"requests": dict(resources), "limits": dict(resources)},
        "env": _env(shape),
        "volumeMounts": [{"name": "model-cache", "mountPath": shape.cache_dir},
                         {"name": "ray-logs", "mountPath": "/tmp/ray"}],
    }
    if name == "ray-head":
        container["ports"] = [{"name": "gcs", "containerPort": 6379},
                              {"name": "dashboard", "containerPort": 8265},
                              {"name": "client", "containerPort": 10001}]
    return container


def _pod(container: dict[str, Any], gpus: int) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "containers": [container],
        "volumes": [{"name": "model-cache", "emptyDir": {}}, {"name": "ray-logs", "emptyDir": {}}],
    }
    if gpus:
        spec["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    return {"spec": spec}


def ray_cluster_spec(shape: ClusterShape) -> dict[str, Any]:
    """The `spec` of a RayCluster, shared by the RayCluster and the RayJob manifests."""
    if shape.workers < 0 or shape.max_workers < shape.workers:
        raise ValueError(f"workers={shape.workers}, max_workers={shape.max_workers}: "
                         "expected 0 <= workers <= max_workers")
    kind = "gpu" if shape.gpus_per_worker else "cpu"
    worker_start: dict[str, str] = {"num-cpus": str(shape.worker_cpus)}
    if shape.gpus_per_worker:
        worker_start["num-gpus"] = str(shape.gpus_per_worker)
    return {
        "rayVersion": RAY_VERSION,
        "enableInTreeAutoscaling": True,
        # Every request to the GCS and the dashboard needs the operator-made token.
        "authOptions": {"mode": "token"},
        "headGroupSpec": {
            # The head runs the sweep's driver and the Tune controller, no trials.
            "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"},
            "template": _pod(_container("ray-head", shape, shape.head_cpus, shape.head_memory, 0), 0),
        },
        "workerGroupSpecs": [{
            "groupName": f"{kind}-workers",
            "replicas": shape.workers,
            "minReplicas": 0 if shape.workers == 0 else 1,
            "maxReplicas": shape.max_workers,
            "rayStartParams": worker_start,
            "template": _pod(_container("ray-worker", shape, shape.worker_cpus, shape.worker_memory,
                                        shape.gpus_per_worker), shape.gpus_per_worker),
        }],
    }


def _metadata(name: str, component: str) -> dict[str, Any]:
    return {"name": name, "labels": {"app.kubernetes.io/name": "rlsparsity",
                                     "app.kubernetes.io/component": component}}


def ray_cluster(name: str, shape: ClusterShape) -> dict[str, Any]:
    """A long-lived RayCluster to `ray job submit` sweeps to (port-forward its dashboard)."""
    return {"apiVersion": API_VERSION, "kind": "RayCluster", "metadata": _metadata(name, "cluster"),
            "spec": ray_cluster_spec(shape)}


def ray_job(name: str, shape: ClusterShape, spec_path: str, overrides: tuple[str, ...] = ()) -> dict[str, Any]:
    """A RayJob: a cluster made for one sweep, deleted when it ends.

    The entrypoint names no tracking store: the sweep reads MLFLOW_TRACKING_URI from the
    environment the Secret gives the head pod.
    """
    argv = ["python", "-m", "rlsparsity.cli", "sweep", spec_path]
    for o in overrides:
        argv += ["--set", o]
    return {
        "apiVersion": API_VERSION,
        "kind": "RayJob",
        "metadata": _metadata(name, "sweep"),
        "spec": {
            "entrypoint": shlex.join(argv),
            "submissionMode": "K8sJobMode",
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": 3600,
            # A sweep retried from scratch would log a second parent run: fail once, loudly.
            "backoffLimit": 0,
            "rayClusterSpec": ray_cluster_spec(shape),
        },
    }


def manifests(image: str | None = None, spec_path: str = "sweeps/quickstart.yaml") -> dict[str, dict[str, Any]]:
    """The committed set: file name -> manifest, for a CPU and a GPU deployment."""
    base = ClusterShape() if image is None else ClusterShape(image=image)
    gpu = ClusterShape(image=base.image, worker_cpus=8, worker_memory="64Gi", gpus_per_worker=1,
                       workers=1, max_workers=8)
    return {
        "raycluster-cpu.yaml": ray_cluster("rlsparsity-cpu", base),
        "raycluster-gpu.yaml": ray_cluster("rlsparsity-gpu", gpu),
        "rayjob-cpu.yaml": ray_job("rlsparsity-sweep-cpu", base, spec_path),
        "rayjob-gpu.yaml": ray_job("rlsparsity-sweep-gpu", gpu, spec_path,
                                   ("resources.gpus_per_learner=1",)),
    }


def dump(manifest: dict[str, Any]) -> str:
    header = "# Generated by infra/kuberay.py; edit the builder, not this file.\n"
    return header + yaml.safe_dump(manifest, sort_keys=False, width=100)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image", help="container image with rlsparsity installed")
    p.add_argument("--spec", default="sweeps/quickstart.yaml", help="sweep spec path inside the image")
    p.add_argument("--gpus", type=int, default=None, help="GPUs per worker (0: a CPU cluster)")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--print", choices=("raycluster", "rayjob"), help="print one manifest instead of writing infra/k8s/")
    args = p.parse_args(argv)
    if args.print:
        shape = ClusterShape(**{k: v for k, v in (("image", args.image), ("gpus_per_worker", args.gpus),
                                                   ("workers", args.workers)) if v is not None})
        shape = ClusterShape(**{**shape.__dict__, "max_workers": max(shape.max_workers, shape.workers)})
        m = ray_cluster("rlsparsity", shape) if args.print == "raycluster" else ray_job("rlsparsity-sweep", shape, args.spec)
        sys.stdout.write(dump(m))
        return 0
    K8S_DIR.mkdir(exist_ok=True)
    for fname, m in manifests(args.image, args.spec).items():
        (K8S_DIR / fname).write_text(dump(m))
        print(f"wrote {K8S_DIR / fname}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
