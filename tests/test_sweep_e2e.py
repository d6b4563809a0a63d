"""A real sweep end to end: Ray Tune trials with rollout actors and Ray Train learners,
masks and metrics in a real `mlflow server` on 127.0.0.1, then the overlap analysis run."""

from __future__ import annotations

import json

import pytest
from artifacts import artifact_files, mask_files
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

import rlsparsity
from rlsparsity.contracts.mask import read_mask

pytestmark = pytest.mark.slow

SMALL = [
    "name=e2e",
    "seed=0",
    "dataset=add",
    "algorithm=[grpo,sft]",
    "training.steps=4",
    "training.masks.every=2",
    "training.prompts_per_step=8",
    "training.eval_problems=40",
]


def test_sweep_logs_trials_masks_and_analysis_to_mlflow_server(embedded_model_dir, mlflow_server, ray_session, tmp_path, monkeypatch):
    monkeypatch.setenv("RLSPARSITY_RAY_STORAGE", str(tmp_path / "ray"))
    result = rlsparsity.sweep("sweeps/quickstart.yaml", [*SMALL, f"tracking.uri={mlflow_server}"])
    assert result.ok, result.failed
    # Each trial removed its rollout placement group before its final report.
    rollout_pgs = [pg for pg in ray_session.util.placement_group_table().values() if pg["name"].startswith("rollout-")]
    assert {r["mlflow_run_id"] for r in result.trials} <= {pg["name"].removeprefix("rollout-") for pg in rollout_pgs}
    assert all(pg["state"] == "REMOVED" for pg in rollout_pgs), rollout_pgs

    client = MlflowClient(tracking_uri=mlflow_server)
    exp = client.get_experiment_by_name("e2e")
    runs = client.search_runs([exp.experiment_id])
    by_kind = {}
    for r in runs:
        by_kind.setdefault(r.data.tags["rlsparsity.kind"], []).append(r)
    (sweep_run,) = by_kind["sweep"]
    assert sweep_run.info.status == "FINISHED"
    assert json.loads(sweep_run.data.tags["rlsparsity.grid_axes"]) == ["algorithm"]

    trials = by_kind["trial"]
    assert sorted(r.data.tags["algorithm"] for r in trials) == ["grpo", "sft"]
    for r in trials:
        tags, params, metrics = r.data.tags, r.data.params, r.data.metrics
        assert r.info.status == "FINISHED"
        assert tags[MLFLOW_PARENT_RUN_ID] == sweep_run.info.run_id
        assert tags["seed"] == "0" and tags["dataset"] == "add" and tags["model"] == "embedded:tiny-arith"
        assert tags["base_hash"].startswith("sha256:") or len(tags["base_hash"]) >= 16
        assert tags["git_commit"]
        assert params["training.steps"] == "4" and params["algorithm"] == tags["algorithm"]
        for key in ("test_accuracy_before", "test_accuracy_after", "final/sparsity_bf16",
                    "final/changed_frac_masters", "sync_bytes_total", "sync_dense_bytes_total"):
            assert key in metrics, key
        assert any(k.startswith("sparsity/layer.") for k in metrics)
        history = client.get_metric_history(r.info.run_id, "sync_bytes")
        assert [m.step for m in history] == [1, 2, 3, 4]
        assert metrics["sync_bytes_total"] == sum(m.value for m in history)

        assert artifact_files(client, r.info.run_id, "masks") == mask_files([2])
        local = client.download_artifacts(r.info.run_id, "masks/final.arrow", str(tmp_path / r.info.run_id))
        mask = read_mask(local)  # verifies the checksum
        assert mask.meta["base"]["hash"] == tags["base_hash"]
        assert mask.meta["target"] == {"run_id": r.info.run_id, "step": 4}
        assert mask.meta["dtype"] == "bfloat16" and mask.meta["criterion"] == {
            "mode": "bitwise", "spec": "bitwise", "tol": None, "view": "bf16"}
        assert mask.sparsity == pytest.approx(metrics["final/sparsity_bf16"])
        assert mask.total_changed == metrics["final/changed_bf16"]
        # The tiny model ties lm_head to the embeddings: counted once, listed in the metadata.
        assert "lm_head.weight" not in mask.tensor_names()
        assert ["model.embed_tokens.weight", "lm_head.weight"] in mask.meta["tied"]

    (analysis,) = by_kind["analysis"]
    assert analysis.info.status == "FINISHED"
    assert analysis.data.tags["rlsparsity.sweep_run_id"] == sweep_run.info.run_id
    art = {a.path for a in client.list_artifacts(analysis.info.run_id, "overlap")}
    assert {"overlap/pairs.arrow", "overlap/heatmap.png"} <= art


def test_the_final_trial_result_uses_no_key_tune_reserves():
    """Tune stops a trial on a result whose `done` is set, and owns its other auto-filled keys."""
    from ray.tune import result as tune_result

    from rlsparsity.contracts.mlflow_layout import SUMMARY_METRICS as SUMMARY_KEYS
    from rlsparsity.sweeps.trial import COMPLETE_KEY

    reserved = {*tune_result.AUTO_RESULT_KEYS, tune_result.DONE, tune_result.SHOULD_CHECKPOINT, tune_result.RESULT_DUPLICATE}
    assert not reserved & {COMPLETE_KEY, "mlflow_run_id", *SUMMARY_KEYS}


def test_bad_spec_exits_nonzero_and_records_no_run(tmp_path, capsys):
    from rlsparsity.cli import main

    db = tmp_path / "m.db"
    rc = main(["sweep", "sweeps/quickstart.yaml", "--set", "algorithm=[grpo,nope]", "--set", f"tracking.uri=sqlite:///{db}"])
    assert rc == 2
    assert "algorithm: unknown algorithm 'nope'; allowed: dpo, grpo, kto, orpo, ppo, prime, raft, raftpp, rloo, sft, simpo" in capsys.readouterr().err
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    finished = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id]) if r.info.status == "FINISHED"]
    assert finished == []


def test_same_seed_gives_identical_masks_with_the_hf_engine(embedded_model_dir, ray_session, tmp_path, monkeypatch):
    """Two trials that differ only in how many test problems they evaluate train alike:
    same samples, same updates, so the same bf16 masks bit for bit (issue 6's hf baseline)."""
    monkeypatch.setenv("RLSPARSITY_RAY_STORAGE", str(tmp_path / "ray"))
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    overrides = [
        "name=determinism", "seed=0", "dataset=add", "algorithm=grpo", "training.steps=4",
        "training.masks.every=2", "training.prompts_per_step=8", "training.eval_problems=[40,41]",
        "analysis=false", f"tracking.uri={uri}",
    ]
    result = rlsparsity.sweep("sweeps/quickstart.yaml", overrides)
    assert result.ok, result.failed
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("determinism")
    trials = client.search_runs([exp.experiment_id], "tags.`rlsparsity.kind` = 'trial'")
    assert len(trials) == 2
    checksums, syncs = set(), set()
    for r in trials:
        for name in ("step_000002.arrow", "final.arrow"):
            local = client.download_artifacts(r.info.run_id, f"masks/{name}", str(tmp_path / r.info.run_id))
            checksums.add((name, read_mask(local).meta["checksum"]))
        syncs.add(tuple(m.value for m in sorted(client.get_metric_history(r.info.run_id, "sync_bytes"), key=lambda m: m.step)))
    assert len(checksums) == 2, checksums  # one per mask name, the same in both trials
    assert len(syncs) == 1


def test_chat_prompts_need_a_chat_template_and_run_with_one(embedded_model_dir, ray_session, tmp_path, monkeypatch):
    """training.prompt_format=chat: refused before anything runs for a tokenizer without a chat
    template (the embedded one); with a template, a GRPO trial trains on chat prompts."""
    import shutil

    from rlsparsity.sweeps.spec import SpecError

    monkeypatch.setenv("RLSPARSITY_RAY_STORAGE", str(tmp_path / "ray"))
    db = f"sqlite:///{tmp_path / 'chat.db'}"
    chat = ["name=chat", "seed=0", "dataset=add", "algorithm=grpo", "training.prompt_format=chat",
            "training.reward=last_number", "training.steps=2", "training.prompts_per_step=4",
            "training.eval_problems=8", "analysis=false", f"tracking.uri={db}"]
    with pytest.raises(SpecError, match="training.prompt_format: 'chat' needs a chat template"):
        rlsparsity.sweep("sweeps/quickstart.yaml", chat)
    assert MlflowClient(tracking_uri=db).get_experiment_by_name("chat") is None

    model = tmp_path / "chat-model"
    shutil.copytree(embedded_model_dir, model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}A:"
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    result = rlsparsity.sweep("sweeps/quickstart.yaml", [*chat, f"model={model}"])
    assert result.ok, result.failed
    (trial,) = result.trials
    run = MlflowClient(tracking_uri=db).get_run(trial["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert (run.data.params["training.prompt_format"], run.data.params["training.reward"]) == ("chat", "last_number")
    assert {"sync_diff_s", "sync_send_s"} <= set(run.data.metrics)


def test_trial_that_can_never_fit(embedded_model_dir, ray_session, tmp_path, monkeypatch) -> None:
    """rollout.cpus=4 on a 2-CPU cluster: refused with the numbers, before any run starts
    (Tune would wait for the placement group for ever)."""
    import mlflow

    import rlsparsity

    uri = f"sqlite:///{tmp_path}/m.db"
    monkeypatch.setenv("RLSPARSITY_RAY_STORAGE", str(tmp_path / "ray"))
    spec = {"name": "nofit", "seed": 0, "rollout": {"cpus": 4}, "tracking": {"uri": uri}, "analysis": False}
    from rlsparsity.sweeps.spec import SpecError

    with pytest.raises(SpecError, match=r"can never fit this Ray cluster: .*rollout.cpus=4 CPUs in one actor, the largest node has 2"):
        rlsparsity.sweep(spec)
    # A GPU rollout replica on a cluster without GPUs (a GPU preset run on this machine).
    spec["rollout"] = {"gpus": 1}
    with pytest.raises(SpecError, match=r"rollout.gpus=1 GPUs in one actor, the largest node has 0; 1 rollout replica\(s\) x "
                                        r"rollout.gpus=1 \+ 1 learner\(s\) x resources.gpus_per_learner=0 = 1 GPUs, the cluster has 0"):
        rlsparsity.sweep(spec)
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("nofit")
    assert exp is None or not client.search_runs([exp.experiment_id])
