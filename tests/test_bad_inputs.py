"""Bad input that once slipped through or crashed: each gets a clear error, exit 2, and
nothing starts (issue 15, point 4). The one that needs Ray, a trial that can never fit the
cluster, is in test_sweep_e2e.py with the other tests that share the session's Ray."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from rlsparsity.cli import main
from rlsparsity.contracts.mask import MaskError, MaskWriter, read_meta
from rlsparsity.sweeps.spec import SweepSpec

BASE = "name: bad\nseed: 0\ndataset: add\nalgorithm: grpo\n"


def _dry_run(tmp_path: Path, text: str, *overrides: str) -> int:
    spec = tmp_path / "spec.yaml"
    spec.write_text(text)
    return main(["sweep", str(spec), "--dry-run", *[a for o in overrides for a in ("--set", o)]])


# (spec text, --set overrides, what the error must say)
SPEC_CASES = {
    "grad norm -1": (BASE + "training: {max_grad_norm: -1}\n", (), "training.max_grad_norm: Input should be greater than 0"),
    "grad norm 0": (BASE, ("training.max_grad_norm=0",), "training.max_grad_norm: Input should be greater than 0"),
    "lr yes": (BASE + "training: {lr: yes}\n", (), "training.lr: expected float, got the boolean true"),
    "steps true": (BASE + "training: {steps: true}\n", (), "training.steps: expected int, got the boolean true"),
    "seed true": ("name: bad\nseed: true\n", (), "seed: expected int, got the boolean true"),
    "algorithm epsilon yes": (BASE + "algorithm_config: {grpo: {epsilon: yes}}\n", (),
                              "algorithm_config.grpo.epsilon: expected float, got the boolean true"),
    "critic lr on": (BASE + "algorithm_config: {ppo: {critic: {lr: on}}}\n", ("algorithm=ppo",),
                     "algorithm_config.ppo.critic.lr: expected float, got the boolean true"),
    "missing model": (BASE + "model: /nonexistent/model\n", (), "model: cannot resolve model '/nonexistent/model' (no such local directory)"),
    "unknown embedded": (BASE + "model: embedded:nope\n", (), "model: unknown embedded model 'nope'; known: "),
    "sweep-wide list": ("name: [a, b]\nseed: 0\n", (), "name: is sweep-wide and cannot be a list"),
    "tracking list": (BASE + "tracking: {uri: [sqlite:///a.db, sqlite:///b.db]}\n", (), "tracking.uri: is sweep-wide"),
    "same label": ("name: bad\nseed: [0, '0']\n", (), "seed: grid points"),
    "duplicate key": (BASE + "seed: 1\n", (), "found duplicate key 'seed' (first at line 2)"),
    "duplicate value": ("name: bad\nseed: [0, 0]\n", (), "seed: 0 is listed twice"),
    "malformed --set": (BASE, ("seed=[0, 1",), "--set 'seed=[0, 1': the value is not valid YAML"),
    "bogus tracking": (BASE + "tracking: {uri: 'bogus://x'}\n", (), "tracking.uri: unknown tracking store scheme 'bogus'"),
    "checkpoint every 0": (BASE, ("training.checkpoint_every=0",), "training.checkpoint_every: Input should be greater than or equal to 1"),
    "max failures -1": (BASE, ("resources.max_failures=-1",), "resources.max_failures: Input should be greater than or equal to 0"),
}


@pytest.mark.parametrize("case", list(SPEC_CASES))
def test_bad_spec_exits_2(case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text, overrides, expected = SPEC_CASES[case]
    assert _dry_run(tmp_path, text, *overrides) == 2
    err = capsys.readouterr().err
    assert expected in err, err
    assert "Traceback" not in err


def test_good_values_still_accepted(tmp_path: Path) -> None:
    """The strictness does not refuse what YAML users write: 1e-4 (a string to YAML 1.1),
    integers for floats, null to disable clipping, and file paths as tracking URIs."""
    spec = SweepSpec(
        {"name": "ok", "seed": [0, 1], "training": {"lr": "1e-4", "kl_coef": 0, "max_grad_norm": None},
         "tracking": {"uri": str(tmp_path / "mlruns")}, "analysis": False}
    )  # fmt: skip
    t = spec.trials()[0]
    assert t.training.lr == 1e-4 and t.training.max_grad_norm is None
    for uri in ("sqlite:///x.db", "postgresql+psycopg2://u@127.0.0.1/db", "http://127.0.0.1:5000", "file:///tmp/m"):
        SweepSpec({"name": "ok", "tracking": {"uri": uri}})


def test_every_axis_enters_the_label() -> None:
    """Axes beyond algorithm/dataset/seed used to give every trial of a column one label."""
    spec = SweepSpec({"seed": [0, 1], "training": {"lr": [1e-4, 1e-5], "masks": {"every": [5, 10]}},
                      "rollout": {"sync": {"mode": ["sparse", "dense"]}}})  # fmt: skip
    labels = [t.label for t in spec.trials()]
    assert len(set(labels)) == len(labels) == 16
    assert "grpo/add/s1/lr=1e-05/every=10/mode=dense" in labels
    assert spec.trial({"seed": 0, "training.lr": 1e-4, "training.masks.every": 5,
                       "rollout.sync.mode": "sparse"}).label == "grpo/add/s0/lr=0.0001/every=5/mode=sparse"  # fmt: skip


def test_mask_base_not_a_mapping(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "m.arrow"
    with MaskWriter(path, criterion={"mode": "bitwise"}, dtype="bfloat16", base={"id": "b", "hash": "h"}, target={"id": "t"}) as w:
        w.add("w", (4, 4), np.zeros((4, 4), dtype=bool))
    with pa.memory_map(str(path)) as f:
        table = pa.ipc.open_file(f).read_all()
    md = dict(table.schema.metadata)
    md[b"base"] = json.dumps("just-a-string").encode()
    bad = tmp_path / "bad.arrow"
    table = table.replace_schema_metadata(md)
    with pa.OSFile(str(bad), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    with pytest.raises(MaskError, match="metadata field 'base' is str 'just-a-string', expected a mapping"):
        read_meta(bad)
    assert main(["overlap", str(path), str(bad), "--local", "--no-cache", "-q", "--no-progress"]) == 2
    assert "expected a mapping" in capsys.readouterr().err


def test_diff_mask_into_uncreatable_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    rc = main(["diff", str(tmp_path / "base"), str(tmp_path / "target"), "--mask", str(blocker / "sub" / "m.arrow")])
    err = capsys.readouterr().err
    assert rc == 2 and f"--mask {blocker / 'sub' / 'm.arrow'}: cannot create the directory" in err, err
    assert "Traceback" not in err


def test_overlap_on_missing_experiment_creates_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(["overlap", "--experiment", "nope", "--local", "-q", "--no-progress"]) == 2
    assert "no MLflow tracking database at mlruns.db" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
