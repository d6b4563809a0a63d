"""Faults of a sweep's driver: SIGINT, SIGTERM, a killed driver, and `--resume` after them."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from artifacts import artifact_files, mask_files
from mlflow.tracking import MlflowClient
from services import free_port, start_mlflow_server, stop_process_group

from rlsparsity.sweeps.interrupt import TUNE_SIGINT_ENV, Interrupted, signals_interrupt

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def test_the_first_signal_interrupts_and_the_handlers_come_back():
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with pytest.raises(Interrupted) as info, signals_interrupt():
        assert os.environ[TUNE_SIGINT_ENV] == "1"  # Tune's own SIGINT handler stays out
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises here
    assert info.value.signal_name == "SIGTERM" and info.value.exit_code == 143
    assert {s: signal.getsignal(s) for s in before} == before
    assert TUNE_SIGINT_ENV not in os.environ


def test_nested_blocks_hand_the_signals_back_to_the_outer_one():
    # A study (outer block) runs sweeps (inner blocks): between them a signal still interrupts.
    # (What was there before need not be Python's default: a shell's background job starts
    # with SIGINT ignored.)
    before = signal.getsignal(signal.SIGINT)
    with signals_interrupt():
        outer = signal.getsignal(signal.SIGINT)
        with signals_interrupt():
            assert signal.getsignal(signal.SIGINT) is not outer
        assert signal.getsignal(signal.SIGINT) is outer and os.environ[TUNE_SIGINT_ENV] == "1"
        with pytest.raises(Interrupted) as info:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
        assert info.value.exit_code == 130
    assert signal.getsignal(signal.SIGINT) is before


def _sweep_cmd(db: Path, *extra: str) -> list[str]:
    # Two trials, one at a time, so that one has finished while the other runs.
    return _two_trials("faults", f"sqlite:///{db}", "training.steps=8", "training.checkpoint_every=2",
                       "resources.max_concurrent_trials=1", *extra)


def _two_trials(name: str, tracking_uri: str, *sets: str) -> list[str]:
    """`rlsparsity sweep` of a 2-trial grid (sft, grpo on add, seed 0), small; `sets` are more
    --set overrides, or flags (starting with --)."""
    base = [f"name={name}", "seed=0", "dataset=add", "algorithm=[sft,grpo]", "training.prompts_per_step=4",
            "training.eval_problems=20", f"tracking.uri={tracking_uri}"]
    return [str(BIN / "rlsparsity"), "sweep", "sweeps/quickstart.yaml",
            *(a for o in [*base, *sets] for a in ((o,) if o.startswith("--") else ("--set", o)))]


def _runs(db: Path) -> list:
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    exp = client.get_experiment_by_name("faults")
    return [] if exp is None else client.search_runs([exp.experiment_id], max_results=1000)


def _by_kind(runs: list, kind: str) -> list:
    return [r for r in runs if r.data.tags.get("rlsparsity.kind") == kind]


def _start(db: Path, tmp_path: Path, log_name: str) -> tuple[subprocess.Popen, Path]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RLSPARSITY_RAY_STORAGE"] = str(tmp_path / "ray")
    log = tmp_path / log_name
    proc = subprocess.Popen(_sweep_cmd(db), cwd=ROOT, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    return proc, log


def _wait_first_finished_second_running(proc: subprocess.Popen, db: Path, log: Path) -> None:
    deadline = time.time() + 600
    while time.time() < deadline:
        assert proc.poll() is None, log.read_text()[-4000:]
        # Read MLflow only once the sweep has made its store (two first openers race on the schema).
        trials = _by_kind(_runs(db), "trial") if "sweep faults:" in log.read_text(errors="replace") else []
        if sorted(r.info.status for r in trials) == ["FINISHED", "RUNNING"]:
            return
        time.sleep(1)
    raise AssertionError("the first trial did not finish within 600 s:\n" + log.read_text()[-4000:])


def _resume(db: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RLSPARSITY_RAY_STORAGE"] = str(tmp_path / "ray")
    return subprocess.run(_sweep_cmd(db, "--resume"), cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def _check_resumed(db: Path, before: list, proc: subprocess.CompletedProcess) -> None:
    """One sweep run, FINISHED; each trial label has one FINISHED run; the trial that had
    finished was not run again; nothing RUNNING."""
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    runs = _runs(db)
    assert [r.info.status for r in runs if r.info.status == "RUNNING"] == []
    (sweep_run,) = _by_kind(runs, "sweep")
    assert sweep_run.info.status == "FINISHED" and sweep_run.info.run_id == _by_kind(before, "sweep")[0].info.run_id
    finished = [r for r in _by_kind(runs, "trial") if r.info.status == "FINISHED"]
    assert sorted(r.data.tags["rlsparsity.label"] for r in finished) == ["grpo/add/s0", "sft/add/s0"]
    (kept,) = [r for r in _by_kind(before, "trial") if r.info.status == "FINISHED"]
    assert kept.info.run_id in {r.info.run_id for r in finished}, "the finished trial ran again"
    (analysis,) = _by_kind(runs, "analysis")
    assert analysis.info.status == "FINISHED"
    assert analysis.data.tags["mlflow.parentRunId"] == sweep_run.info.run_id


def _learner_state_registered(storage: Path) -> bool:
    """Whether Ray Train registered a learner state (not the final summary) of some trial."""
    for snapshot in storage.glob("*/checkpoint_manager_snapshot.json"):
        try:
            latest = json.loads(snapshot.read_text())["latest_checkpoint_result"]
        except (OSError, ValueError, KeyError):
            continue
        if latest and (snapshot.parent / latest["checkpoint_dir_name"] / "state.json").is_file():
            return True
    return False


def _fault_mid_sweep(db: Path, tmp_path: Path, fault, *, after_a_checkpoint: bool = False) -> tuple[int, str]:
    """Start the sweep, apply `fault(proc)` once its first trial finished and its second runs
    (and, with `after_a_checkpoint`, has a registered learner checkpoint); (exit code, log)."""
    proc, log = _start(db, tmp_path, "sweep.log")
    try:
        _wait_first_finished_second_running(proc, db, log)
        deadline = time.time() + 300
        while after_a_checkpoint and not _learner_state_registered(tmp_path / "ray"):
            assert proc.poll() is None and time.time() < deadline, log.read_text()[-4000:]
            time.sleep(0.1)
        fault(proc)
        rc = proc.wait(timeout=180)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    return rc, log.read_text()


def _kill_machine(proc: subprocess.Popen) -> None:
    """The driver's machine dies: the driver and every Ray process it started, at once."""
    for pid in [proc.pid, *(p.pid for p in psutil.Process(proc.pid).children(recursive=True))]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
def test_sigint_ends_every_run_killed_and_resume_runs_only_the_unfinished_trial(embedded_model_dir, tmp_path):
    db = tmp_path / "mlruns.db"
    # Ctrl-C sends SIGINT to the driver (and its group).
    rc, out = _fault_mid_sweep(db, tmp_path, lambda proc: proc.send_signal(signal.SIGINT))
    assert rc == 130, out[-6000:]
    assert "interrupted by SIGINT: 1 of 2 trial(s) finished" in out, out[-6000:]
    assert "To finish the sweep, resume with: rlsparsity sweep sweeps/quickstart.yaml --set name=faults" in out
    # Ray's log forwarding may print after it, so find the line rather than the log's end.
    (hint,) = [line for line in out.splitlines() if line.startswith("To finish the sweep, resume with:")]
    assert hint.rstrip().endswith("--resume"), hint
    assert "Tuner.restore" not in out  # Ray's hint is not the user's command
    runs = _runs(db)
    assert {r.info.status for r in runs} <= {"FINISHED", "KILLED"}, [(r.info.run_name, r.info.status) for r in runs]
    (sweep_run,) = _by_kind(runs, "sweep")
    assert sweep_run.info.status == "KILLED"
    statuses = sorted((r.info.status, r.data.tags.get("rlsparsity.error", "")) for r in _by_kind(runs, "trial"))
    assert statuses[0][0] == "FINISHED" and statuses[1][0] == "KILLED", statuses

    _check_resumed(db, runs, _resume(db, tmp_path))


@pytest.mark.slow
def test_a_killed_driver_is_resumed(embedded_model_dir, tmp_path):
    """The driver dies while its second trial trains, after that trial's learner checkpointed:
    `--resume` continues that trial's own MLflow run from the checkpoint."""
    db = tmp_path / "mlruns.db"
    _fault_mid_sweep(db, tmp_path, _kill_machine, after_a_checkpoint=True)
    runs = _runs(db)
    assert sorted(r.info.status for r in _by_kind(runs, "trial")) == ["FINISHED", "RUNNING"]
    assert _by_kind(runs, "sweep")[0].info.status == "RUNNING"  # what a dead driver leaves
    (cut,) = [r for r in _by_kind(runs, "trial") if r.info.status == "RUNNING"]

    resumed = _resume(db, tmp_path)
    _check_resumed(db, runs, resumed)
    after = {r.info.run_id: r for r in _by_kind(_runs(db), "trial")}
    assert len(after) == 2 and after[cut.info.run_id].info.status == "FINISHED"  # the same run, continued
    assert "rlsparsity.error" not in after[cut.info.run_id].data.tags
    (restart,) = MlflowClient(tracking_uri=f"sqlite:///{db}").get_metric_history(cut.info.run_id, "resumed_from_step")
    assert restart.value in (2, 4, 6), restart.value
    print(f"the driver died; the resumed trial continued from step {restart.value:.0f}")


def test_resume_refuses_what_it_cannot_resume(embedded_model_dir, tmp_path, capsys):
    from rlsparsity.cli import main

    db = tmp_path / "mlruns.db"
    args = ["sweep", "sweeps/quickstart.yaml", "--set", "name=faults", "--set", f"tracking.uri=sqlite:///{db}",
            "--resume"]
    assert main(args) == 2
    assert "--resume: experiment 'faults'" in capsys.readouterr().err
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    exp = client.create_experiment("faults")
    run = client.create_run(exp, tags={"rlsparsity.kind": "sweep", "rlsparsity.spec_key": "0123"})
    client.set_terminated(run.info.run_id, "KILLED")
    assert main(args) == 2
    assert f"sweep run {run.info.run_id} of 'faults' ran another spec" in capsys.readouterr().err
    client.set_terminated(run.info.run_id, "FINISHED")
    assert main(args) == 2
    assert f"the latest sweep run of 'faults', {run.info.run_id}, finished; nothing to resume" in capsys.readouterr().err
    assert main([*args[:-1], "--set", "subnetwork_stages={kinds: [learned]}", "--resume"]) == 2
    assert "a staged study resumes by running it again" in capsys.readouterr().err


def test_an_interrupt_is_found_under_the_error_ray_wraps_it_in():
    from rlsparsity.sweeps.interrupt import interrupt_in

    inner = Interrupted(signal.SIGINT)
    try:
        try:
            raise inner
        except Interrupted as e:
            raise SystemError("<cyfunction CoreWorker.wait> returned a result with an exception set") from e
    except SystemError as wrapped:
        assert interrupt_in(wrapped) is inner
    assert interrupt_in(ValueError("x")) is None


@pytest.mark.slow
def test_an_mlflow_server_down_for_30_s_loses_nothing(embedded_model_dir, tmp_path):
    """MLflow's client retries (5 times as the platform sets them, backoff 2 s doubling: about 60 s) carry the trials
    through the outage: every metric step and every mask arrives."""
    root, port = tmp_path / "server", free_port()
    root.mkdir()
    uri = f"http://127.0.0.1:{port}"
    server = {"proc": start_mlflow_server(root, port)}
    outage: dict[str, float] = {}

    def take_it_down_mid_trial() -> None:
        client = MlflowClient(tracking_uri=uri)
        deadline = time.time() + 600
        while time.time() < deadline:
            exp = client.get_experiment_by_name("outage")
            trials = [] if exp is None else client.search_runs([exp.experiment_id], "tags.`rlsparsity.kind` = 'trial'")
            if any(r.info.status == "RUNNING" and r.data.metrics for r in trials):  # training, logging
                break
            time.sleep(0.5)
        stop_process_group(server["proc"])
        outage["down"] = time.time()
        time.sleep(30)
        server["proc"] = start_mlflow_server(root, port)
        outage["up"] = time.time()

    chaos = threading.Thread(target=take_it_down_mid_trial, daemon=True)
    chaos.start()
    # A subprocess, as a user runs it (and so that this process starts no Ray of its own:
    # later tests assert that none is up).
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RLSPARSITY_RAY_STORAGE"] = str(tmp_path / "ray")
    try:
        proc = subprocess.run(_two_trials("outage", uri, "training.steps=6", "training.masks.every=2"),
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
        ended = time.time()
        chaos.join(timeout=120)
        assert outage.get("up", 0) - outage.get("down", 0) >= 30, outage  # the outage happened,
        assert outage["down"] < ended, outage  # while the sweep ran
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
        client = MlflowClient(tracking_uri=uri)
        runs = client.search_runs([client.get_experiment_by_name("outage").experiment_id])
        assert sorted(r.data.tags["rlsparsity.kind"] for r in runs) == ["analysis", "sweep", "trial", "trial"]
        assert {r.info.status for r in runs} == {"FINISHED"}
        for r in (r for r in runs if r.data.tags["rlsparsity.kind"] == "trial"):
            assert [m.step for m in client.get_metric_history(r.info.run_id, "loss")] == [1, 2, 3, 4, 5, 6]
            assert artifact_files(client, r.info.run_id, "masks") == mask_files([2, 4])
    finally:
        stop_process_group(server["proc"])


def test_a_dead_server_keeps_the_artifact_and_an_upload_sends_it_later(tmp_path, monkeypatch):
    """Unit level, against a real `mlflow server`: a mask logged while the server is down is
    kept in the spool, later calls fail at once, and `rlsparsity upload` sends it all."""
    from rlsparsity.cli import main
    from rlsparsity.platform.tracking import Tracker, TrackingUnavailable

    root, port = tmp_path / "server", free_port()
    root.mkdir()
    uri = f"http://127.0.0.1:{port}"
    server = start_mlflow_server(root, port)
    try:
        live = Tracker(uri)
        run_id = live.start_run(live.experiment("spool"), "t", kind="trial")
    finally:
        stop_process_group(server)
    mask = tmp_path / "step_000002.arrow"
    mask.write_bytes(b"mask bits")
    spool = tmp_path / "unsent"
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")  # this test's waits only
    down = Tracker(uri, spool=spool)
    with pytest.raises(TrackingUnavailable, match=rf"{uri} is unreachable.*rlsparsity upload {spool}"):
        down.log_artifact(run_id, mask, "masks")
    assert json.loads((spool / "UNREACHABLE").read_text())["uri"] == uri
    with pytest.raises(TrackingUnavailable):  # the marker: not tried again, kept
        down.log_metrics(run_id, {"loss": 0.5}, step=3)
    down.finish(run_id, False)  # a run's end waits in the spool, without raising
    assert (spool / run_id / "artifacts" / "masks" / "step_000002.arrow").read_bytes() == b"mask bits"

    assert main(["upload", str(spool)]) == 1  # still down: an error, and the spool is kept
    assert (spool / run_id / "artifacts" / "masks" / "step_000002.arrow").exists()
    server = start_mlflow_server(root, port)
    try:
        assert main(["upload", str(spool)]) == 0
        client = MlflowClient(tracking_uri=uri)
        assert [a.path for a in client.list_artifacts(run_id, "masks")] == ["masks/step_000002.arrow"]
        assert [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")] == [(3, 0.5)]
        assert client.get_run(run_id).info.status == "FAILED"
        assert not spool.exists() or not any(spool.iterdir())
    finally:
        stop_process_group(server)


@pytest.mark.slow
def test_an_mlflow_server_down_for_good_stops_the_sweep_in_bounded_time(embedded_model_dir, tmp_path):
    """The server dies mid-trial and stays down: the sweep exits 1 within about MLflow's retry
    window with one message naming the spool; once a server is back, `rlsparsity upload`
    leaves no run RUNNING and every mask of the trial in the store."""
    root, port = tmp_path / "server", free_port()
    root.mkdir()
    uri = f"http://127.0.0.1:{port}"
    server = {"proc": start_mlflow_server(root, port)}
    outage: dict[str, float] = {}

    def take_it_down_for_good() -> None:
        client = MlflowClient(tracking_uri=uri)
        deadline = time.time() + 600
        while time.time() < deadline:
            exp = client.get_experiment_by_name("down")
            trials = [] if exp is None else client.search_runs([exp.experiment_id], "tags.`rlsparsity.kind` = 'trial'")
            if any(r.info.status == "RUNNING" and r.data.metrics.get("loss") is not None for r in trials):
                break
            time.sleep(0.5)
        stop_process_group(server["proc"])
        outage["down"] = time.time()

    chaos = threading.Thread(target=take_it_down_for_good, daemon=True)
    chaos.start()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RLSPARSITY_RAY_STORAGE"] = str(tmp_path / "ray")
    # 3 retries wait about 12 s, not the default 5's 60 s (the sweep stopped 71 s after the
    # server went down with those): the same path, a minute less of CI.
    env["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "3"
    try:
        proc = subprocess.run(_two_trials("down", uri, "training.steps=200", "training.masks.every=5",
                                          "resources.max_concurrent_trials=1"),
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
        ended = time.time()
        chaos.join(timeout=60)
        out = proc.stdout + proc.stderr
        (tmp_path / "sweep.log").write_text(out)
        assert "down" in outage, out[-4000:]
        print(f"the sweep exited {ended - outage['down']:.0f} s after the server went down")
        assert proc.returncode == 1, out[-6000:]
        took = ended - outage["down"]
        assert took < 120, f"the sweep took {took:.0f} s to stop after the server went down"
        lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
        assert len(lines) == 1 and f"the tracking server {uri} is unreachable: no answer within MLflow's 3 retries" in lines[0], out[-4000:]
        assert "MaxRetryError" not in out and "Retrying (Retry(" not in out  # no urllib3 noise
        spool = Path(lines[0].split("send it with `rlsparsity upload ")[1].split("`")[0])
        assert spool.is_dir() and (spool / "UNREACHABLE").exists()
        assert f"\nthe sweep stopped; kept for 2 run(s) in {spool}: " in proc.stderr  # the sweep's and the trial's

        server["proc"] = start_mlflow_server(root, port)
        upload = subprocess.run([str(BIN / "rlsparsity"), "upload", str(spool)], cwd=ROOT, env=env,
                                capture_output=True, text=True, timeout=300)
        assert upload.returncode == 0, upload.stdout + upload.stderr
        client = MlflowClient(tracking_uri=uri)
        runs = client.search_runs([client.get_experiment_by_name("down").experiment_id])
        assert [r.info.status for r in runs if r.info.status == "RUNNING"] == [], [(r.info.run_name, r.info.status) for r in runs]
        (sweep_run,) = _by_kind(runs, "sweep")
        assert sweep_run.info.status == "FAILED"
        for trial in _by_kind(runs, "trial"):
            assert trial.info.status in ("FAILED", "KILLED")
            steps = sorted(m.step for m in client.get_metric_history(trial.info.run_id, "loss"))
            files = artifact_files(client, trial.info.run_id, "masks")
            # Every mask written before the learner stopped is in the store now, in every
            # series: those of the steps whose metrics arrived, and maybe one more (a step
            # logs its masks first).
            n = len([f for f in files if f.startswith("masks/step_") and f.endswith(".arrow")])
            assert files == mask_files(range(5, 5 * n + 1, 5), final=False), sorted(files)
            assert n >= max(steps, default=0) // 5, (sorted(files), steps)
    finally:
        stop_process_group(server["proc"])
