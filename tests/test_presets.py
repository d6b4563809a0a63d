"""Every preset under sweeps/ passes its dry run; the GPU presets' dry runs report what each
trial reserves and what the hub being offline left unchecked (issue 14, point 4)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from rlsparsity.cli import main
from rlsparsity.sweeps.spec import SpecError, SweepSpec

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "sweeps").rglob("*.yaml"))
GPU_PRESETS = [p for p in PRESETS if p.startswith("sweeps/gpu/")]
CPU_PRESETS = [p for p in PRESETS if p not in GPU_PRESETS]


def test_presets_are_found() -> None:
    assert "sweeps/smollm2.yaml" in CPU_PRESETS and "sweeps/paper/precision.yaml" in CPU_PRESETS
    assert {"sweeps/gpu/qwen2.5-0.5b-instruct.yaml", "sweeps/gpu/qwen2.5-1.5b-instruct.yaml",
            "sweeps/gpu/qwen2.5-7b-instruct.yaml"} <= set(GPU_PRESETS)


@pytest.mark.parametrize("preset", CPU_PRESETS)
def test_cpu_preset_dry_run(preset: str, capsys, monkeypatch) -> None:
    monkeypatch.chdir(ROOT)
    assert main(["sweep", preset, "--dry-run"]) == 0, capsys.readouterr().err
    out, err = capsys.readouterr()
    labels = out.split()
    assert labels and len(labels) == len(set(labels))
    assert "resources: " in err and "not checked" not in err


def _offline_dry_run(preset: str, tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    # A subprocess: huggingface_hub and datasets read HF_HUB_OFFLINE when imported. An empty
    # HF_HOME: CI's cache, like this machine's, holds neither Qwen nor GSM8K.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "HF_DATASETS_CACHE": str(tmp_path / "ds")}
    args = [a for o in overrides for a in ("--set", o)]
    return subprocess.run([sys.executable, "-m", "rlsparsity.cli", "sweep", preset, "--dry-run", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("preset", GPU_PRESETS)
def test_gpu_preset_dry_run(preset: str, tmp_path: Path, monkeypatch) -> None:
    """Resources, model id and dataset specs are checked; the hub's files are named as not."""
    import datasets.config
    from huggingface_hub import constants

    run = _offline_dry_run(preset, tmp_path)
    assert run.returncode == 0, run.stderr
    labels = run.stdout.split()
    assert len(labels) == 8 and "grpo/gsm8k/s0/lr=1e-06" in labels and "grpo/math/s1/lr=5e-07" in labels
    for module in (constants, datasets.config):  # offline in this process too, for the spec's fields
        monkeypatch.setattr(module, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "ds"))
    spec = SweepSpec.load(ROOT / preset, offline_ok=True)
    (trial, *_) = spec.trials()
    assert trial.model.startswith("Qwen/Qwen2.5-") and trial.model.endswith("B-Instruct")
    assert trial.rollout.backend == "vllm" and trial.rollout.gpus == 1 and trial.resources.gpus_per_learner == 1
    assert trial.training.precision == "amp"
    # A step's sequences on a learner: a micro-batch at a time (the estimates in the headers).
    micro = {"0.5B": 8, "1.5B": 4, "7B": 4}[trial.model.split("-")[1]]
    assert trial.training.micro_batch_size == micro and f"micro-batches of {micro})" in run.stderr
    if trial.model.endswith("7B-Instruct"):  # FSDP over 8 learner GPUs, and the vLLM engine's
        assert trial.resources.strategy == "fsdp" and trial.training.gradient_checkpointing
        assert trial.gpus() == 9 and "per trial 36 CPU, 9 GPU" in run.stderr and "precision amp, fsdp, micro-batches of 4)" in run.stderr
    else:
        assert trial.resources.strategy == "ddp" and trial.gpus() == 2 and "per trial 8 CPU, 2 GPU" in run.stderr
    # The dataset presets set each dataset's reward and chat prompts.
    rewards = {t.dataset_label: t.training.reward for t in spec.trials()}
    assert rewards == {"gsm8k": "gsm8k", "math": "boxed"}
    assert f"not checked: model '{trial.model}'" in run.stderr
    assert "not checked: dataset 'openai/gsm8k'" in run.stderr
    assert "not checked: dataset 'DigitalLearningGmbH/MATH-lighteval'" in run.stderr


def test_gpu_preset_dry_run_still_refuses_bad_fields(tmp_path: Path) -> None:
    """Offline, a dry run skips only what needs the hub."""
    preset = GPU_PRESETS[0]
    run = _offline_dry_run(preset, tmp_path, "rollout.vllm.tensor_parallel_size=2")
    assert run.returncode == 2
    assert "rollout: gpus: 1 per replica, but vllm.tensor_parallel_size 2 shards the engine over 2 GPUs; set gpus: 2" in run.stderr
    run = _offline_dry_run(preset, tmp_path, "model=Qwen/Qwen2.5-0.5B-Instruct@not a revision")
    assert run.returncode == 2 and "model:" in run.stderr


def test_a_run_offline_refuses_what_a_dry_run_left_unchecked(tmp_path: Path, monkeypatch) -> None:
    """Without offline_ok (a run), the hub dataset that cannot be loaded is an error."""
    import datasets.config
    from huggingface_hub import constants

    for module in (constants, datasets.config):
        monkeypatch.setattr(module, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "ds"))
    spec = {"name": "x", "seed": 0, "dataset": {"path": "no-such-org/no-such-dataset", "question": "q", "answer": "a",
                                                    "answer_format": "last_number"}}
    with pytest.raises(SpecError, match="no-such-org/no-such-dataset"):
        SweepSpec(spec)
    assert SweepSpec(spec, offline_ok=True).unchecked == [
        "dataset 'no-such-org/no-such-dataset': a hub dataset, not in the datasets cache; HF_HUB_OFFLINE is set "
        "(its field mapping is checked, its files and columns are not)"]


@pytest.mark.parametrize(("rollout", "error"), [
    ({"backend": "hf", "gpus": 1, "vllm": {"tensor_parallel_size": 2}}, "tensor_parallel_size: 2 applies to backend vllm"),
    ({"backend": "vllm", "gpus": 1.5}, "gpus: 1.5 per replica; above 1 a replica takes whole GPUs"),
    ({"backend": "vllm", "gpus": 0.5, "vllm": {"tensor_parallel_size": 2}}, "set gpus: 2"),
])
def test_rollout_gpus_must_fit_the_engine(rollout: dict, error: str) -> None:
    with pytest.raises(SpecError, match=error):
        SweepSpec({"name": "x", "seed": 0, "rollout": rollout})


def test_trial_resources_count_rollout_gpus() -> None:
    (t,) = SweepSpec({"name": "x", "seed": 0, "rollout": {"replicas": 2, "gpus": 0.25},
                      "resources": {"learners": 2, "gpus_per_learner": 0.5}}).trials()
    assert t.gpus() == 1.5
    assert t.describe_resources().endswith("per trial 2 CPU, 1.5 GPU")
