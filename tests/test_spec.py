"""Sweep spec: grid expansion, overrides, and errors that name the field and the allowed values."""

from __future__ import annotations

import pytest
import yaml

from rlsparsity.cli import main
from rlsparsity.sweeps.spec import SpecError, SweepSpec, apply_overrides


def test_any_field_may_be_a_list():
    spec = SweepSpec({"seed": [0, 1], "dataset": ["add", "mul"], "algorithm": ["grpo", "sft"],
                      "training": {"lr": [1e-4, 1e-5], "steps": 3}})
    trials = spec.trials()
    assert len(trials) == 16
    assert {t.training.lr for t in trials} == {1e-4, 1e-5}
    assert all(t.training.steps == 3 for t in trials)
    assert len({(t.seed, t.dataset, t.algorithm, t.training.lr) for t in trials}) == 16


def test_overrides_are_dotted_and_parsed_as_yaml():
    raw = apply_overrides({"seed": [0, 1], "training": {"steps": 30}}, ["training.steps=5", "seed=[3,4,5]", "training.lr=1e-3"])
    spec = SweepSpec(raw)
    assert [t.seed for t in spec.trials()] == [3, 4, 5]
    assert spec.trials()[0].training.steps == 5 and spec.trials()[0].training.lr == 1e-3


@pytest.mark.parametrize(
    ("override", "field", "allowed"),
    [
        ("algorithm=trpo", "algorithm", "allowed: dpo, grpo, kto, orpo, ppo, prime, raft, raftpp, rloo, sft, simpo"),
        # issue 5's bad configs: each names the field
        ("algorithm=dpo", "algorithm_config.dpo.pairs", "Field required"),
        ("algorithm=ppo", "algorithm_config.ppo.critic", "Field required"),
        ("algorithm_config.grpo.loss_type=foo", "algorithm_config.grpo.loss_type", "'grpo', 'bnpo', 'dr_grpo' or 'dapo'"),
        ("algorithm_config.ppo.critic.learning_rate=1", "algorithm_config.ppo.critic.learning_rate", "allowed here: lr,"),
        ("algorithm=sft;training.kl_coef=0.1", "training.kl_coef", "sft applies no KL penalty; set 0, or use one of: grpo, ppo, prime, rloo"),
        ("algorithm_config.nope.beta=1", "algorithm_config.nope", "unknown algorithm; allowed: dpo, grpo, kto, orpo, ppo, prime, raft, raftpp, rloo, sft, simpo"),
        ("dataset=gsm9k", "dataset", "allowed: add, gsm8k, math, mul"),
        ("training.foo=1", "training.foo", "allowed here: steps, lr"),
        ("rollout.backend=tgi", "rollout.backend", "'hf'"),
        ("resources.strategy=zero3", "resources.strategy", "'ddp' or 'fsdp'"),
        ("resources.strategy=fsdp;training.subnetwork.random.density=0.1", "resources.strategy",
         "fsdp does not train a subnetwork"),
    ],
)
def test_bad_specs_name_the_field_and_allowed_values(override, field, allowed):
    with pytest.raises(SpecError) as e:
        SweepSpec(apply_overrides({"seed": 0}, override.split(";")))
    assert f"  {field}:" in str(e.value) and allowed in str(e.value)


def test_a_bad_value_inside_a_grid_axis_names_the_grid_point():
    with pytest.raises(SpecError, match='"algorithm": "trpo"'):
        SweepSpec({"algorithm": ["grpo", "trpo"]})


def test_cli_exits_nonzero_with_the_field_name(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"name": "bad", "algorithm": ["grpo", "nope"]}))
    assert main(["sweep", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "algorithm: unknown algorithm 'nope'; allowed: dpo, grpo, kto, orpo, ppo, prime, raft, raftpp, rloo, sft, simpo" in err


def test_quickstart_spec_is_the_default_grid():
    spec = SweepSpec.load("sweeps/quickstart.yaml")
    trials = spec.trials()
    assert {t.seed for t in trials} == {0, 1}
    assert {t.dataset for t in trials} == {"add", "mul"}
    assert {t.algorithm for t in trials} == {"grpo", "sft"}


def test_data_seed_separates_the_training_problems_from_the_seed():
    from rlsparsity.platform.sources import StepContext
    from rlsparsity.platform.tasks import get_task

    spec = SweepSpec({"seed": [0, 1], "data_seed": [None, 0, 1]})
    by_key = {(t.seed, t.data_seed): t for t in spec.trials()}
    assert len({t.label for t in by_key.values()}) == 6  # distinct labels, MLflow run names
    assert by_key[(0, None)].label == "grpo/add/s0" and by_key[(1, 0)].label == "grpo/add/s1/d0"
    task = get_task("add")

    def problems(seed, data_seed, step=3):
        ctx = StepContext(by_key[(seed, data_seed)], step, rank=0, world=1, rollout=None, tokenizer=None, task=task)
        return [(p.prompt, p.answer) for p in ctx.problems()]

    # Without data_seed the seed picks the data; with it, only data_seed does.
    assert problems(0, None) == problems(0, 0) == problems(1, 0) != problems(1, None) == problems(0, 1)
    assert problems(0, 0, step=4) != problems(0, 0)


def test_the_summary_shows_data_seed_only_when_a_trial_sets_it():
    from rich.console import Console

    from rlsparsity.sweeps.run import SweepResult, print_summary

    def table(trials):
        console = Console(record=True, width=250)
        print_summary(SweepResult("s", "r", "u", trials=trials), console)
        return console.export_text()

    row = {"dataset": "add", "algorithm": "grpo", "test_accuracy_before": 0.5, "test_accuracy_after": 0.6}
    assert "data seed" not in table([{**row, "seed": 0, "data_seed": None}])
    out = table([{**row, "seed": 0, "data_seed": 1}, {**row, "seed": 0, "data_seed": None}, {**row, "seed": 0, "data_seed": 0}])
    assert "data seed" in out
    lines = [ln for ln in out.splitlines() if "grpo" in ln]
    assert [ln.split("│")[2].strip() for ln in lines] == ["—", "0", "1"]  # sorted, None first


def test_rewards_and_batch_sources_are_checked_against_their_registries():
    from rlsparsity.platform.algorithms import ALGORITHMS, register_algorithm
    from rlsparsity.platform.tasks import REWARDS, register_reward

    with pytest.raises(SpecError, match="training.reward: unknown reward 'nope'; allowed: boxed, exact, gsm8k, last_number"):
        SweepSpec({"training": {"reward": "nope"}})
    register_reward("always_one")(lambda text, answer: 1.0)
    register_algorithm("from_nowhere", source="nowhere")(lambda models, batch, cfg, train: None)
    try:
        (trial,) = SweepSpec({"training": {"reward": "always_one"}}).trials()
        assert trial.training.reward == "always_one"
        with pytest.raises(SpecError, match="algorithm: from_nowhere reads batch source 'nowhere', which is not registered; registered: dataset, pairs, rollouts"):
            SweepSpec({"algorithm": "from_nowhere"})
    finally:
        REWARDS.pop("always_one")
        ALGORITHMS.pop("from_nowhere")


def test_tracking_uri_defaults_to_the_environment_and_a_spec_value_wins(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert SweepSpec({}).trials()[0].tracking.uri == "sqlite:///mlruns.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert SweepSpec({}).trials()[0].tracking.uri == "http://127.0.0.1:5000"
    assert SweepSpec({"tracking": {"uri": "sqlite:///x.db"}}).trials()[0].tracking.uri == "sqlite:///x.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "bogus://x")
    with pytest.raises(SpecError, match="unknown tracking store scheme 'bogus'"):
        SweepSpec({})
