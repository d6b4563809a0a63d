"""infra/: the KubeRay manifests against KubeRay v1.7.0's CRD schemas, with no cluster."""

from __future__ import annotations

import copy
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from services import load_infra

ROOT = Path(__file__).resolve().parents[1]
SCHEMAS = ROOT.parent / "shared" / "schemas" / "kuberay-v1.7.0"
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}


kuberay = load_infra("kuberay")


def _closed(schema: Any) -> Any:
    """The schema as the API server's strict field validation applies it: an object schema
    that lists its properties rejects others, unless it says it keeps unknown fields."""
    if isinstance(schema, dict):
        out = {k: _closed(v) for k, v in schema.items()}
        if ("properties" in out and "additionalProperties" not in out
                and not out.get("x-kubernetes-preserve-unknown-fields")):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_closed(v) for v in schema]
    return schema


@cache
def _validator(kind: str, version: str = "v1") -> jsonschema.protocols.Validator:
    crd = yaml.safe_load((SCHEMAS / CRD_FILES[kind]).read_text())
    assert crd["spec"]["names"]["kind"] == kind
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    schema = _closed(served["schema"]["openAPIV3Schema"])
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    cls.check_schema(schema)
    return cls(schema)


def _errors(manifest: dict[str, Any]) -> list[str]:
    assert manifest["apiVersion"] == "ray.io/v1"
    v = _validator(manifest["kind"])
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in v.iter_errors(manifest)]


@pytest.mark.parametrize("fname", sorted(kuberay.manifests()))
def test_committed_manifest_is_the_builders_and_validates(fname):
    built = kuberay.manifests()[fname]
    committed_text = (ROOT / "infra" / "k8s" / fname).read_text()
    assert committed_text == kuberay.dump(built), f"infra/k8s/{fname} is stale: run python infra/kuberay.py"
    assert _errors(yaml.safe_load(committed_text)) == []


@pytest.mark.parametrize("gpus", [0, 2])
@pytest.mark.parametrize("workers", [0, 3])
def test_builder_parameters_validate(gpus, workers):
    shape = kuberay.ClusterShape(image="registry.local/r:1", gpus_per_worker=gpus, workers=workers,
                                 worker_cpus=16, worker_memory="100Gi")
    cluster = kuberay.ray_cluster("c", shape)
    job = kuberay.ray_job("j", shape, "sweeps/paper/table4_overlap.yaml", ("seed=[0,1]",))
    assert _errors(cluster) == [] and _errors(job) == []
    (group,) = cluster["spec"]["workerGroupSpecs"]
    container = group["template"]["spec"]["containers"][0]
    assert container["image"] == "registry.local/r:1" and group["replicas"] == workers
    assert container["resources"]["limits"].get("nvidia.com/gpu") == (str(gpus) if gpus else None)
    assert group["rayStartParams"].get("num-gpus") == (str(gpus) if gpus else None)
    assert job["spec"]["entrypoint"] == (
        "python -m rlsparsity.cli sweep sweeps/paper/table4_overlap.yaml --set 'seed=[0,1]'")


def test_manifests_hold_no_credentials():
    for fname, m in kuberay.manifests().items():
        text = kuberay.dump(m)
        assert "secretKeyRef" in text, fname
        for container in _containers(m):
            for env in container["env"]:
                if env["name"] in kuberay.SECRET_ENV:
                    assert "value" not in env, (fname, env)


def _containers(m: dict[str, Any]) -> list[dict[str, Any]]:
    spec = m["spec"].get("rayClusterSpec", m["spec"])
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def _broken(mutate) -> dict[str, Any]:
    m = copy.deepcopy(kuberay.manifests()["rayjob-gpu.yaml"])
    mutate(m)
    return m


@pytest.mark.parametrize("what, mutate, expected", [
    ("a misspelt field", lambda m: m["spec"].__setitem__("shutdownAfterJobFinish", True),
     "'shutdownAfterJobFinish' was unexpected"),
    ("a field in the wrong place", lambda m: m["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
     .__setitem__("image", "x"), "'image' was unexpected"),
    ("replicas as a string", lambda m: m["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
     .__setitem__("replicas", "1"), "'1' is not of type 'integer'"),
    ("a rayStartParams value that is not a string", lambda m: m["spec"]["rayClusterSpec"]
     ["workerGroupSpecs"][0]["rayStartParams"].__setitem__("num-gpus", 1), "1 is not of type 'string'"),
    ("a worker group without its name", lambda m: m["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
     .pop("groupName"), "'groupName' is a required property"),
    ("an unknown auth mode", lambda m: m["spec"]["rayClusterSpec"]["authOptions"]
     .__setitem__("mode", "password"), "'password' is not one of"),
    ("a container without an image name", lambda m: _containers(m)[0].pop("name"),
     "'name' is a required property"),
])
def test_a_broken_manifest_fails(what, mutate, expected):
    errors = _errors(_broken(mutate))
    assert any(expected in e for e in errors), (what, errors)


def test_builder_refuses_an_impossible_shape():
    with pytest.raises(ValueError, match="workers=5, max_workers=4"):
        kuberay.ray_cluster_spec(kuberay.ClusterShape(workers=5, max_workers=4))


def test_compose_stack_has_health_checks_loopback_ports_and_no_secrets():
    compose = yaml.safe_load((ROOT / "infra" / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"postgres", "s3", "mlflow"}
    for name, svc in services.items():
        assert svc["healthcheck"]["test"], name
        for port in svc.get("ports", []):
            assert port.startswith("127.0.0.1:"), (name, port)
        for key, value in (svc.get("environment") or {}).items():
            if any(word in key for word in ("PASSWORD", "SECRET", "ACCESS_KEY")):
                assert str(value).startswith("${"), (name, key)  # from the env file only
    assert services["mlflow"]["depends_on"] == {"postgres": {"condition": "service_healthy"},
                                                "s3": {"condition": "service_healthy"}}
    server = " ".join(services["mlflow"]["command"])
    assert "--serve-artifacts" in server and "postgresql://" in server and "s3://mlflow" in server
