"""A learner's saved state, without Ray: a learner restarted from the state of step k ends
exactly where the uninterrupted one does (masks, masters, optimizer moments, metrics), and a
state that does not fit the trial is refused with the file and tensor named."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from rlsparsity.contracts.mask import read_mask
from rlsparsity.platform.engines import HFEngine, LocalRollout
from rlsparsity.platform.learner import Learner, LocalSink, run_learner
from rlsparsity.platform.learner_state import STATE_JSON, WEIGHTS_FILE, LearnerStateError
from rlsparsity.sweeps.spec import SweepSpec

BASE = {"id": "embedded", "hash": "h"}
TIMINGS = ("step_time_s", "sync_diff_s", "sync_send_s")


def _spec(algorithm: str, steps: int = 5, seed: int = 0, **training):
    overrides = {"algorithm": algorithm, "seed": seed, "dataset": "add",
                 "training": {"steps": steps, "prompts_per_step": 4, "samples_per_prompt": 4, "eval_problems": 8,
                              "warmup_steps": 1, "lr_schedule": "linear", "masks": {"every": 2}, **training},
                 "algorithm_config": {"ppo": {"critic": {"lr": 1e-4}}, "dpo": {"pairs": "offline"}}}
    (spec,) = SweepSpec(overrides).trials()
    return spec


def _learner(spec, model_dir: Path, out: Path) -> tuple[Learner, LocalSink]:
    engine = HFEngine(model_dir, threads=1)  # a fresh engine at θ0, as a restarted actor would be
    sink = LocalSink(out)
    learner = Learner(spec, model_dir, base=BASE, target={"run_id": "local"},
                      rollout=lambda named: LocalRollout(engine, named), sink=sink)
    return learner, sink


def _metrics_after(sink: LocalSink, step: int) -> list[tuple[int, dict[str, float]]]:
    return [(s, {k: v for k, v in m.items() if k not in TIMINGS}) for s, m in sink.metrics if s > step]


def _same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


@pytest.mark.parametrize("algorithm", ["grpo", "ppo", "prime", "dpo"])
def test_a_learner_restarted_from_its_state_ends_bit_identical(algorithm, embedded_model_dir, tmp_path):
    # ppo and prime train side models with their own optimizers; dpo reads pairs offline.
    spec = _spec(algorithm)
    state = tmp_path / "state"
    whole, whole_sink = _learner(spec, embedded_model_dir, tmp_path / "whole")

    def save_at_3(step, _metrics):
        if step == 3:
            whole.save_state(state)

    whole_summary = run_learner(whole, after_step=save_at_3)
    assert (state / STATE_JSON).is_file()

    resumed, resumed_sink = _learner(spec, embedded_model_dir, tmp_path / "resumed")
    resumed_summary = run_learner(resumed, resume_from=state)

    # Only the steps after the state's were run again, and the restart is on record.
    assert [s for s, _ in resumed_sink.metrics] == [3, 4, 5, 5]
    assert resumed_sink.metrics[0][1] == {"resumed_from_step": 3.0}
    got, want = _metrics_after(resumed_sink, 3), _metrics_after(whole_sink, 3)
    assert [s for s, _ in got] == [s for s, _ in want]
    for (step, g), (_, w) in zip(got, want, strict=True):
        assert g.keys() == w.keys(), step
        bad = {k: (g[k], w[k]) for k in g if not _same(g[k], w[k])}
        assert not bad, f"step {step}: {bad}"
    for key in whole_summary.keys() - set(TIMINGS):
        assert _same(resumed_summary[key], whole_summary[key]), key

    # Masks written after the restart equal the uninterrupted run's, bit for bit: every
    # criterion's, and the dynamics' (the ever-changed mask and the previous mask step's
    # bf16 view come from the state).
    files = sorted(str(p.relative_to(tmp_path / "resumed")) for p in (tmp_path / "resumed" / "masks").rglob("*.arrow"))
    series = ("", "masters/", "abs_1e-5/", "rel_0.001/", "since_prev/", "ever/")
    assert files == sorted(f"masks/{s}{n}" for s in series for n in ("step_000004.arrow", "final.arrow"))
    for name in files:
        a, b = read_mask(tmp_path / "whole" / name).to_dict(), read_mask(tmp_path / "resumed" / name).to_dict()
        assert a.keys() == b.keys()
        for tensor in a:
            np.testing.assert_array_equal(a[tensor], b[tensor], err_msg=f"{name}: {tensor}")
    assert whole_summary["final/changed_bf16"] > 0

    # So are the float32 masters of every trained model and every optimizer's state.
    for key, module in {"policy": whole.policy, **whole.aux_modules}.items():
        other = resumed.policy if key == "policy" else resumed.aux_modules[key]
        for (name, p), (_, q) in zip(module.named_parameters(), other.named_parameters(), strict=True):
            assert torch.equal(p, q), f"{key}: {name}"
    for o, r in zip(whole.optimized, resumed.optimized, strict=True):
        for p, q in zip(o.params, r.params, strict=True):
            for k, v in o.optimizer.state[p].items():
                assert torch.equal(v, r.optimizer.state[q][k]), k
        assert o.schedule.get_last_lr() == r.schedule.get_last_lr()


@pytest.fixture(scope="module")
def saved_state(embedded_model_dir, tmp_path_factory):
    spec = _spec("grpo", steps=3)
    learner, _ = _learner(spec, embedded_model_dir, tmp_path_factory.mktemp("out"))
    state = tmp_path_factory.mktemp("state")
    run_learner(learner, after_step=lambda step, _m: learner.save_state(state) if step == 1 else None)
    return spec, state


def _copy(state: Path, dest: Path) -> Path:
    dest.mkdir()
    for f in state.iterdir():
        (dest / f.name).write_bytes(f.read_bytes())
    return dest


def test_a_state_that_does_not_fit_the_trial_is_refused(saved_state, embedded_model_dir, tmp_path):
    spec, state = saved_state

    def restore(spec_, folder):
        learner, _ = _learner(spec_, embedded_model_dir, tmp_path / "out")
        learner.setup(folder)

    half = _copy(state, tmp_path / "half")
    (half / STATE_JSON).unlink()  # the writer died before the last file
    with pytest.raises(LearnerStateError, match=f"{half}: no state.json; the learner state was not completely written"):
        restore(spec, half)

    with pytest.raises(LearnerStateError, match=r"the state of trial 'grpo/add/s0', not of 'grpo/add/s1'"):
        restore(_spec("grpo", steps=3, seed=1), state)

    with pytest.raises(LearnerStateError, match=r"step 1 is outside 1\.\.0"):
        restore(_spec("grpo", steps=1), state)

    wrong = _copy(state, tmp_path / "wrong")
    tensors = load_file(str(wrong / WEIGHTS_FILE))
    name = next(iter(tensors))
    tensors[name] = tensors[name].flatten()[:3].clone()
    save_file(tensors, str(wrong / WEIGHTS_FILE))
    with pytest.raises(LearnerStateError, match=rf"weights.safetensors: tensor {name} is torch.float32 \(3,\), expected torch.float32"):
        restore(spec, wrong)

    foreign = _copy(state, tmp_path / "foreign")
    meta = json.loads((foreign / STATE_JSON).read_text())
    meta["format"] = "something/9"
    (foreign / STATE_JSON).write_text(json.dumps(meta))
    with pytest.raises(LearnerStateError, match=r"format 'something/9', expected 'rlsparsity.learner_state/1'"):
        restore(spec, foreign)
