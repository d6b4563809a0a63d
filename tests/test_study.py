"""A staged subnetwork study on Ray: full trial -> learned and random masked trials -> the
closeness table, checked against brute force on the saved checkpoints; a re-run reuses the
finished stages."""

from __future__ import annotations

import json

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

import rlsparsity
from rlsparsity.cli import main
from rlsparsity.contracts.mask import read_mask
from rlsparsity.sweeps.spec import SpecError, SweepSpec

SMALL = {"steps": 4, "prompts_per_step": 4, "samples_per_prompt": 4, "eval_problems": 16, "lr": 1e-3,
         "weight_decay": 0.01, "masks": {"every": 2}}


def _study(uri: str) -> dict:
    return {"name": "study", "algorithm": "grpo", "dataset": "add", "seed": 0, "training": SMALL,
            "subnetwork_stages": {"kinds": ["learned", "random_global"], "random_seed": 3},
            "rollout": {"replicas": 1, "cpus": 0.5}, "tracking": {"uri": uri}}


def _bf16_as_f32(a: np.ndarray) -> np.ndarray:
    return (a.view(np.uint16).astype(np.uint32) << 16).view(np.float32)


def _bf16_tensors(path) -> dict[str, np.ndarray]:
    """A bf16 safetensors file's tensors as uint16 bit patterns, parsed from the format's
    own layout (8-byte header length, JSON header, raw data): numpy has no bfloat16."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        assert info["dtype"] == "BF16", (name, info["dtype"])
        lo, hi = info["data_offsets"]
        out[name] = np.frombuffer(raw[8 + n + lo : 8 + n + hi], dtype=np.uint16)
    return out


def _brute_force(sub_dir, full_dir) -> dict[str, float]:
    """θ_sub vs θ_full from the safetensors bytes alone: bitwise, |Δ| ≤ tol, |Δ| ≤ tol·max(|a|, |b|)."""
    a = _bf16_tensors(sub_dir / "model.safetensors")
    b = _bf16_tensors(full_dir / "model.safetensors")
    assert a.keys() == b.keys()
    same = dict.fromkeys(("bitwise", "abs:1e-5", "abs:1e-4", "rel:1e-3"), 0)
    n = 0
    for k in a:
        x, y = _bf16_as_f32(a[k]).ravel(), _bf16_as_f32(b[k]).ravel()
        d = np.abs(x - y)
        same["bitwise"] += int((a[k] == b[k]).sum())
        same["abs:1e-5"] += int((d <= np.float32(1e-5)).sum())
        same["abs:1e-4"] += int((d <= np.float32(1e-4)).sum())
        same["rel:1e-3"] += int((d <= np.float32(1e-3) * np.maximum(np.abs(x), np.abs(y))).sum())
        n += x.size
    return {k: v / n for k, v in same.items()}


@pytest.mark.slow
def test_a_staged_study_runs_every_stage_and_its_closeness_matches_brute_force(embedded_model_dir, ray_session, tmp_path, monkeypatch):
    monkeypatch.setenv("RLSPARSITY_RAY_STORAGE", str(tmp_path / "ray"))
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    result = rlsparsity.sweep(_study(uri))
    assert list(result.stages) == ["full", "learned", "random_global"] and result.reused == []
    assert [t["label"] for t in result.stages["learned"].trials] == ["grpo/add/s0/learned"]
    rows = {r["kind"]: r for r in result.table}
    assert set(rows) == {"learned", "random_global"}

    client = MlflowClient(tracking_uri=uri)
    full_id = result.stages["full"].trials[0]["mlflow_run_id"]
    full_dir = tmp_path / "full"
    client.download_artifacts(full_id, "", str(full_dir))
    full_mask = read_mask(full_dir / "masks" / "final.arrow")
    for kind, row in rows.items():
        run = client.get_run(row["run_id"])
        assert run.info.status == "FINISHED"
        assert run.data.tags["rlsparsity.subnetwork"] == kind
        assert run.data.tags["rlsparsity.subnetwork_source"] == full_id
        sub_dir = tmp_path / kind
        client.download_artifacts(row["run_id"], "", str(sub_dir))
        want = _brute_force(sub_dir / "weights", full_dir / "weights")
        assert row["identical"] == pytest.approx(want, abs=1e-12), kind
        # Overlap of the update sets, from the masks' bits.
        sub_mask = read_mask(sub_dir / "masks" / "final.arrow").to_dict()
        full_bits = full_mask.to_dict()
        both = sum(int((sub_mask[k] & full_bits[k]).sum()) for k in sub_mask)
        assert row["overlap_of_sub"] == pytest.approx(both / sum(int(v.sum()) for v in sub_mask.values()))
    # The learned run changes only entries the full run changed; the random one has the same
    # density as the full run's mask.
    assert rows["learned"]["overlap_of_sub"] == 1.0
    weights_manifest = json.loads((tmp_path / "random_global" / "weights" / "rlsparsity_weights.json").read_text())
    assert weights_manifest["subnetwork"]["density"] == pytest.approx(full_mask.total_changed / full_mask.total_elems, abs=1e-6)

    exp = client.get_experiment_by_name("study")
    runs = client.search_runs([exp.experiment_id])
    study = next(r for r in runs if r.data.tags["rlsparsity.kind"] == "study")
    assert study.info.status == "FINISHED"
    stage_runs = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == study.info.run_id]
    assert sorted(r.data.tags.get("rlsparsity.stage", "analysis") for r in stage_runs) == ["analysis", "full", "learned", "random_global"]
    analysis = next(r for r in stage_runs if r.data.tags["rlsparsity.kind"] == "analysis")
    assert analysis.data.metrics["grpo/add/s0/learned/identical_abs_1e-5"] == pytest.approx(rows["learned"]["identical"]["abs:1e-5"])

    # Run again: every stage is reused, nothing trains, the table is the same.
    again = rlsparsity.sweep(_study(uri))
    assert again.reused == ["full", "learned", "random_global"]
    assert again.table == result.table


def test_stage_kinds_are_checked_and_dry_run_lists_every_stage(capsys, tmp_path):
    with pytest.raises(SpecError, match="subnetwork_stages.kinds.0"):
        SweepSpec({"subnetwork_stages": {"kinds": ["lucky"]}})
    path = tmp_path / "s.yaml"
    path.write_text(json.dumps(_study(f"sqlite:///{tmp_path / 'm.db'}")))
    assert main(["sweep", str(path), "--dry-run"]) == 0
    assert capsys.readouterr().out.split() == ["grpo/add/s0", "grpo/add/s0/learned", "grpo/add/s0/random_global"]
    assert main(["sweep", "sweeps/paper/rq2_subnetwork.yaml", "--dry-run"]) == 0
    out = capsys.readouterr().out.split()
    assert len(out) == 16 and "dpo/add/s1/random_per_tensor" in out
