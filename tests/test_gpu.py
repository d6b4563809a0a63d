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
