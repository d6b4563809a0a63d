"""The GPU path. On CPU: the same code placed on the CPU, and the packing that keeps mask
bits on the device; where CUDA is (`gpu`): the learner on CUDA against the CPU, bit for bit."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from rlsparsity.analysis.criteria_kernels import pack_torch
from rlsparsity.platform.engines import HFEngine, LocalRollout
from rlsparsity.platform.learner import Learner, LocalSink
from rlsparsity.sweeps.spec import SweepSpec


@pytest.mark.parametrize("n", [1, 7, 8, 9, 1000, 4099])
def test_bits_packed_by_torch_equal_numpy_packbits(n):
    m = torch.from_numpy(np.random.default_rng(n).random(n) < 0.3)
    np.testing.assert_array_equal(pack_torch(m), np.packbits(m.numpy(), bitorder="little"))


@pytest.mark.parametrize("algorithm", ["ppo", "dpo"])
def test_every_model_batch_and_recorder_tensor_is_on_the_learners_device(algorithm, embedded_model_dir, tmp_path):
    """The placement bookkeeping: policy, θ0 reference, side models (PPO's critic with its new
    head), the sync state and the recorder all live on `device`. On a CPU-only machine this
    cannot catch a missing move (there is one device); `test_gpu_check_passes_on_cuda` can."""
    raw = {"algorithm": algorithm, "training": {"steps": 1, "prompts_per_step": 4, "samples_per_prompt": 4,
                                                "eval_problems": 8, "kl_coef": 0.05 if algorithm == "ppo" else 0.0},
           "algorithm_config": {"ppo": {"critic": {"lr": 1e-4}}, "dpo": {"pairs": "offline"}}}
    (spec,) = SweepSpec(raw).trials()
    engine = HFEngine(embedded_model_dir)
    learner = Learner(spec, embedded_model_dir, base={"id": "e", "hash": "h"}, device=torch.device("cpu"),
                      rollout=lambda named: LocalRollout(engine, named), sink=LocalSink(tmp_path))
    learner.setup()
    learner.step(1)
    modules = [learner.models.policy, learner.models.reference, *learner.models.aux.values()]
    tensors = [p for m in modules if m is not None for p in m.parameters()]
    tensors += [*learner.sync_state.last.values(), *learner.recorder.base_master.values(), *learner.recorder.prev_bf16.values(), *learner.recorder.ever.values()]
    assert len(modules) == (3 if algorithm == "ppo" else 2) and {t.device for t in tensors} == {learner.device}


@pytest.mark.gpu
def test_gpu_check_passes_on_cuda():
    """The bare-machine check itself, on this machine's GPU."""
    spec = importlib.util.spec_from_file_location("gpu_check", Path(__file__).parents[1] / "benchmarks" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    import tempfile

    with tempfile.TemporaryDirectory() as out:
        mod.check_learner("cuda", 3, Path(out))
    mod.check_diff_speed("cuda", 2)


def _rollout_gpus_spec(backend: str, gpus: float):
    (spec,) = SweepSpec({"rollout": {"backend": backend, "gpus": gpus}}).trials()
    return spec


def test_rollout_gpus_put_the_engine_on_cuda():
    """rollout.gpus > 0: the hf engine is built on CUDA, the vllm engine seeds each request (as
    vLLM can on CUDA); without GPUs neither option is set and the engines run as on CPU."""
    from rlsparsity.sweeps.trial import engine_options

    assert engine_options(_rollout_gpus_spec("hf", 0)) is None
    assert engine_options(_rollout_gpus_spec("hf", 0.5)) == {"device": "cuda"}
    assert "per_request_seed" not in engine_options(_rollout_gpus_spec("vllm", 0))
    assert engine_options(_rollout_gpus_spec("vllm", 1))["per_request_seed"] is True


def _engine_after_patch(model_dir: Path, device: str) -> dict[str, torch.Tensor]:
    from rlsparsity.platform.engines import make_engine
    from rlsparsity.platform.weight_sync import Bf16SyncState

    engine = make_engine("hf", model_dir, options={"device": device})
    named = [(n, p.detach().cpu().clone()) for n, p in engine.model.named_parameters()]
    state = Bf16SyncState(named)
    gen = torch.Generator().manual_seed(0)
    for _, p in named:
        p.add_(p.abs() * 1e-2 * torch.randn(p.shape, generator=gen) * (torch.rand(p.shape, generator=gen) < 0.1))
    patch = state.diff(named)
    assert 0 < patch.changed < patch.dense_bytes // 2
    engine.apply_patch(patch)
    assert {p.device.type for p in engine.model.parameters()} == {torch.device(device).type}
    served = engine.weights_bf16()
    for n, p in named:
        assert torch.equal(served[n], p.to(torch.bfloat16).view(torch.int16)), n
    return served


def test_hf_engine_on_its_device_applies_a_sparse_patch(embedded_model_dir):
    """The engine a GPU rollout actor builds (`make_engine` with its device option), on the CPU
    here: after a sparse patch it serves the patched bf16 view exactly."""
    _engine_after_patch(embedded_model_dir, "cpu")


@pytest.mark.gpu
def test_hf_engine_on_cuda_serves_what_the_cpu_engine_serves(embedded_model_dir):
    cuda, cpu = _engine_after_patch(embedded_model_dir, "cuda"), _engine_after_patch(embedded_model_dir, "cpu")
    assert all(torch.equal(cuda[n], cpu[n]) for n in cpu)
