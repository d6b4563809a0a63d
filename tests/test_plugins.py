"""Plugins reach every process of a sweep: the README's custom algorithm runs in a real sweep
on Ray, a failing trial makes the sweep fail everywhere (exception, exit code, MLflow), and a
plugin that cannot be imported stops the sweep before anything runs."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
from artifacts import artifact_files, mask_files
from mlflow.tracking import MlflowClient

import rlsparsity
from rlsparsity.platform.algorithms import ALGORITHMS
from rlsparsity.sweeps.run import SweepFailed
from rlsparsity.sweeps.spec import SpecError

README = Path(__file__).parents[1] / "README.md"
BOOM = '''
from pathlib import Path

from rlsparsity.platform.algorithms import register_algorithm
from rlsparsity.platform.batches import masked_mean, token_logprobs

FAIL_WHILE = Path(__file__).with_name("BOOM")


@register_algorithm("boom", source="rollouts")
def boom(models, batch, cfg, train):
    if FAIL_WHILE.exists():
        raise RuntimeError("boom: this loss fails")
    logp = token_logprobs(models.policy, batch.tokens)
    return -masked_mean(logp * (batch.rewards - batch.rewards.mean())[:, None], batch.tokens.completion_mask), {}
'''
SMALL = ["seed=0", "dataset=add", "training.steps=2", "training.prompts_per_step=4",
         "training.eval_problems=8", "training.masks.every=2", "analysis=false"]


@pytest.fixture
def plugin_dir(tmp_path, monkeypatch):
    """A folder on the driver's sys.path (only there: the trial processes must be told) with
    the README's `my_algos` and a `boom_algos` whose loss raises while the file BOOM beside
    it exists (it does, until a test removes it)."""
    (code,) = [b for b in re.findall(r"```python\n(.*?)```", README.read_text(), re.S) if '@register_algorithm("reinforce"' in b]
    root = tmp_path / "plugins"
    root.mkdir()
    (root / "my_algos.py").write_text(code)
    (root / "boom_algos.py").write_text(BOOM)
    (root / "BOOM").touch()
    monkeypatch.syspath_prepend(str(root))
    yield root
    for name in ("reinforce", "boom"):
        ALGORITHMS.pop(name, None)
    for mod in ("my_algos", "boom_algos"):
        sys.modules.pop(mod, None)


@pytest.mark.slow
def test_readme_algorithm_runs_in_a_sweep_and_a_failing_trial_fails_everywhere(
    plugin_dir, embedded_model_dir, ray_session, tmp_path, monkeypatch
):
    monkeypatch.setenv("RLSPARSITY_RAY_STORAGE", str(tmp_path / "ray"))
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    spec = {"name": "plugins", "plugins": ["my_algos", "boom_algos"], "algorithm": ["reinforce", "boom"],
            "algorithm_config": {"reinforce": {"baseline": False}}, "tracking": {"uri": uri}}
    with_analysis = [s for s in SMALL if s != "analysis=false"]
    with pytest.raises(SweepFailed) as info:
        rlsparsity.sweep(spec, with_analysis)
    result = info.value.result
    # The README's algorithm completed in its Ray worker; the failing one is named with its error.
    assert [t["label"] for t in result.trials] == ["reinforce/add/s0"]
    assert result.trials[0]["test_accuracy_after"] >= 0
    assert len(result.failed) == 1 and result.failed[0].startswith("boom/add/s0: ")
    assert "boom: this loss fails" in result.failed[0] and "boom/add/s0" in str(info.value)

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("plugins")
    runs = {r.data.tags.get("rlsparsity.label", r.data.tags["rlsparsity.kind"]): r for r in client.search_runs([exp.experiment_id])}
    assert runs["reinforce/add/s0"].info.status == "FINISHED"
    assert runs["reinforce/add/s0"].data.params["algorithm_config.reinforce.baseline"] == "False"
    assert artifact_files(client, runs["reinforce/add/s0"].info.run_id, "masks") == mask_files([])
    assert runs["boom/add/s0"].info.status == "FAILED"
    assert "boom: this loss fails" in runs["boom/add/s0"].data.tags["rlsparsity.error"]
    assert runs["sweep"].info.status == "FAILED"
    assert runs["sweep"].data.tags["rlsparsity.plugins"] == '["my_algos", "boom_algos"]'
    assert "analysis" not in runs  # a sweep with a failed trial is not analysed

    # The fault is fixed; --resume runs the failed trial again. It failed at its first step,
    # before any checkpoint, so it runs into a new MLflow run; the failed attempt's run stays
    # FAILED, and the overlap analysis reads the finished one.
    (plugin_dir / "BOOM").unlink()
    resumed = rlsparsity.sweep(spec, with_analysis, resume=True)
    assert resumed.ok and sorted(t["label"] for t in resumed.trials) == ["boom/add/s0", "reinforce/add/s0"]
    after = client.search_runs([exp.experiment_id])
    boom_runs = {r.info.run_id: r.info.status for r in after if r.data.tags.get("rlsparsity.label") == "boom/add/s0"}
    assert sorted(boom_runs.values()) == ["FAILED", "FINISHED"]
    assert boom_runs[runs["boom/add/s0"].info.run_id] == "FAILED"
    (sweep_run,) = [r for r in after if r.data.tags["rlsparsity.kind"] == "sweep"]
    assert sweep_run.info.status == "FINISHED"
    (analysis,) = [r for r in after if r.data.tags["rlsparsity.kind"] == "analysis"]
    assert analysis.info.status == "FINISHED"
    read = json.loads(Path(client.download_artifacts(analysis.info.run_id, "overlap/result.json", str(tmp_path))).read_text())
    assert sorted(read["runs"]) == ["boom/add/s0", "reinforce/add/s0"]
    assert next(k for k, v in boom_runs.items() if v == "FINISHED") in read["meta"]["run_ids"]


@pytest.mark.slow
def test_cli_exits_nonzero_when_a_trial_fails(plugin_dir, embedded_model_dir, ray_session, tmp_path, monkeypatch, capsys):
    from rlsparsity.cli import main

    monkeypatch.setenv("RLSPARSITY_RAY_STORAGE", str(tmp_path / "ray"))
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    rc = main(["sweep", "sweeps/quickstart.yaml", "--set", "name=cli-fail", "--set", "plugins=[boom_algos]",
               "--set", "algorithm=boom", "--set", f"tracking.uri={uri}", *[a for s in SMALL for a in ("--set", s)]])
    assert rc == 1
    assert "1 of 1 trial(s) of sweep 'cli-fail' failed" in capsys.readouterr().err
    client = MlflowClient(tracking_uri=uri)
    statuses = sorted(r.info.status for r in client.search_runs([client.get_experiment_by_name("cli-fail").experiment_id]))
    assert statuses == ["FAILED", "FAILED"]  # the sweep and its trial


def test_a_missing_plugin_is_refused_before_anything_runs(tmp_path, capsys):
    from rlsparsity.cli import main

    db = tmp_path / "m.db"
    with pytest.raises(SpecError, match=r"plugins: cannot import module 'no_such_plugin_mod' \(ModuleNotFoundError"):
        rlsparsity.sweep({"plugins": ["no_such_plugin_mod"], "tracking": {"uri": f"sqlite:///{db}"}})
    rc = main(["sweep", "sweeps/quickstart.yaml", "--set", "plugins=[no_such_plugin_mod]", "--set", f"tracking.uri=sqlite:///{db}"])
    assert rc == 2
    assert "plugins: cannot import module 'no_such_plugin_mod'" in capsys.readouterr().err
    assert not db.exists()  # no MLflow store, no run, no Ray


@pytest.mark.parametrize("bad, message", [
    ({"plugins": "not a module!"}, r"plugins\[0\]: 'not a module!' is not a dotted Python module name"),
    ({"plugins": [3]}, r"plugins\[0\]: 3 is not a dotted Python module name"),
    ({"plugins": {"a": 1}}, r"plugins: expected a list of module names, got dict"),
])
def test_malformed_plugins_are_refused(bad, message):
    with pytest.raises(SpecError, match=message):
        rlsparsity.sweep(bad)


def test_plugins_are_not_a_grid_axis(plugin_dir):
    from rlsparsity.sweeps.spec import SweepSpec

    spec = SweepSpec({"plugins": ["my_algos"], "algorithm": ["grpo", "reinforce"]})
    assert list(spec.axes) == ["algorithm"]
    assert [t.plugins for t in spec.trials()] == [("my_algos",), ("my_algos",)]
    assert SweepSpec(spec.to_dict()).to_dict() == spec.to_dict()
