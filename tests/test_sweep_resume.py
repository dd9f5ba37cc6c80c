"""`kill -9` of the sweep driver, then `dreamsweep resume`: the five promises of the issue, checked on
the real trainer (tiny-sd, CPU) with the driver in a subprocess, through MLflow's client and Optuna."""

import glob
import json
import os
import signal
import subprocess
import sys
import time

import mlflow
import optuna
import pytest
import yaml

from orchestrator.run.workspace import Workspace
from orchestrator.track import tracking

# Long enough that a trial seen at step <= MAX_STEPS // 3 is still training after the 1.2 s wait
# below even at ~0.1 s a step (an unloaded CPU): with 12 steps it could finish first, leaving no
# trial in flight to check promise 2 on.
MAX_STEPS, CHECKPOINT_EVERY, TRIALS = 30, 2, 3
SPEC = {
    "name": "killed",
    "kind": "search",
    "base": {
        "max_steps": MAX_STEPS,
        "resolution": 32,
        "geometry": {"encoding": {"n_levels": 4, "log2_hashmap_size": 12}},
        "renderer": {"num_samples_per_ray": 8},
        "logging": {
            "log_every": 1,
            "checkpoint_every": CHECKPOINT_EVERY,
            "val_views": 1,
            "turntable_frames": 2,
        },
    },
    "prompts": {"items": ["a red cube"]},
    "search": {"space": {"guidance.eta": {"type": "float", "low": 0.0, "high": 1.0}}, "n_startup_trials": 2},
    "objective": {"metric": "train/loss", "mode": "min"},
    "trials": TRIALS,
    "max_concurrent": 2,
    "resources": {"gpus": 1, "cpus": 1},
    "cluster": {"num_cpus": 2, "num_gpus": 2},
}


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "orchestrator.cli", *args]


def checkpoint_steps(ws, number: int) -> set[int]:
    pattern = f"{ws.root}/ray_results/killed/*optuna_trial={number},*/checkpoint_*/dreamsweep_panel.json"
    return {json.loads(open(path).read())["step"] for path in glob.glob(pattern)}


def wait_for_kill_point(
    ws, process, timeout=240, steps_of=checkpoint_steps, early=MAX_STEPS // 3, need_done=True
):
    """Until a trial is COMPLETE and another is RUNNING with a checkpoint: the interesting moment.

    `steps_of(ws, number)`: the steps of the checkpoints a trial has persisted; `early`: the latest
    checkpoint step at which a running trial still counts as early in its training; `need_done=False`:
    a checkpointed running trial is enough (for tests whose promise is about the trials in flight)."""
    deadline = time.monotonic() + timeout
    storage = f"sqlite:///{ws.root / 'optuna.db'}"
    while time.monotonic() < deadline:
        assert process.poll() is None, "the sweep ended before it could be killed"
        time.sleep(0.3)
        try:
            trials = optuna.load_study(study_name="killed", storage=storage).trials
        except (KeyError, Exception):
            continue
        done = [t.number for t in trials if t.state.name == "COMPLETE"]
        running = {t.number: steps_of(ws, t.number) for t in trials if t.state.name == "RUNNING"}
        # Early in a trial, so that it is still mid-training a moment later.
        in_flight = {n: steps for n, steps in running.items() if steps and max(steps) <= early}
        if in_flight and (done or not need_done):
            # Tune snapshots its state every second: let it record the trial and its checkpoint.
            time.sleep(1.2)
            return done, {n: steps_of(ws, n) for n in in_flight}
    raise AssertionError("no moment with a finished trial and a checkpointed running trial")


def submit_kill_9_and_resume(tmp_path, spec: dict, **kill_point):
    """Submits `spec` as sweep "killed", kills the driver with SIGKILL at the kill point (one trial done,
    one checkpointed in flight), resumes it to the end, and returns (workspace, trials done before the
    kill, the trial in flight, the kill's time in ms)."""
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    ws = Workspace(tmp_path / "ws")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    log = open(tmp_path / "submit.log", "w")
    driver = subprocess.Popen(
        cli("submit", str(spec_path), "--workspace", str(ws.root)), env=env, stdout=log, stderr=log
    )
    done_before, in_flight = wait_for_kill_point(ws, driver, **kill_point)
    kill_time_ms = time.time() * 1000
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait()

    resumed = subprocess.run(
        cli("resume", "killed", "--workspace", str(ws.root)),
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    return ws, done_before, in_flight, kill_time_ms


def test_resume_after_kill_9_continues_trials_once_each_at_their_checkpoints(tmp_path):
    ws, done_before, in_flight, kill_time_ms = submit_kill_9_and_resume(tmp_path, SPEC)

    record = ws.record("killed")
    study = optuna.load_study(study_name="killed", storage=record.stores.optuna_url)
    client = mlflow.MlflowClient(record.stores.mlflow_uri)
    runs = {
        int(r.data.tags[tracking.TAG_OPTUNA_TRIAL]): r
        for r in tracking.trial_runs(client, record.experiment_id)
    }

    # 3. no stale RUNNING trial, exactly the requested number of COMPLETE ones (orphans asked just
    # before the kill, if any, are FAIL and never counted).
    states = [t.state.name for t in study.trials]
    assert "RUNNING" not in states and states.count("COMPLETE") == TRIALS
    # 4. every trial maps to exactly one run, and its metrics run once over every step. A trial the
    # driver had started but Tune had not yet recorded (an orphan) is FAIL, its run KILLED.
    complete = [t.number for t in study.trials if t.state.name == "COMPLETE"]
    all_runs = tracking.trial_runs(client, record.experiment_id)
    assert len(all_runs) == len(runs) and len({r.data.tags[tracking.TAG_RAY_TRIAL] for r in all_runs}) == len(
        runs
    )
    for number in complete:
        steps = [m.step for m in client.get_metric_history(runs[number].info.run_id, "train/loss")]
        assert steps == list(range(1, MAX_STEPS + 1)), steps
        assert runs[number].info.status == "FINISHED"
    for number in set(runs) - set(complete):
        assert study.trials[number].state.name == "FAIL" and runs[number].info.status == "KILLED"
    # 1. completed trials were not run again.
    for number in done_before:
        assert runs[number].info.end_time < kill_time_ms
        assert not client.get_metric_history(runs[number].info.run_id, "trial/resumed_at_step")
    # 2. in-flight trials continued from a checkpoint they had written, with the same params.
    for number, steps in in_flight.items():
        resumed_at = [
            m.value for m in client.get_metric_history(runs[number].info.run_id, "trial/resumed_at_step")
        ]
        state = (study.trials[number].state.name, runs[number].info.status, runs[number].data.tags)
        assert resumed_at and int(resumed_at[0]) in steps | {max(steps) + CHECKPOINT_EVERY}, (
            resumed_at,
            steps,
            state,
        )
        assert float(runs[number].data.params["guidance.eta"]) == study.trials[number].params["guidance.eta"]


# The promises about a trial in flight, for an amortized sweep: its one trial is a Ray Train run (one
# worker: the 2-worker gloo run and a killed worker's resume are tests/test_amortized_data_parallel.py's;
# a trial finished before the kill is not rerun is the per-prompt test's, the same Tune restore).
# Reports and checkpoints every 2 steps (each a Ray Train report and an MLflow write).
AMORTIZED_STEPS, AMORTIZED_EVERY = 12, 2


def amortized_spec() -> dict:
    from tests.test_amortized_data_parallel import TINY

    base = {k: v for k, v in TINY.items() if k not in ("trainer", "prompts")}
    return {
        **SPEC,
        "trainer": "amortized",
        "base": {
            **base,
            "trainer": "amortized",
            "max_steps": AMORTIZED_STEPS,
            "logging": {**base["logging"], "log_every": AMORTIZED_EVERY, "checkpoint_every": AMORTIZED_EVERY},
            "data_parallel": {"num_workers": 1},
        },
        "prompts": {"items": ["a red cube", "a blue ball", "a green cone"]},
        "trials": 1,
        "max_concurrent": 1,
    }


def amortized_checkpoint_steps(ws, number: int) -> set[int]:
    """The steps of the checkpoints Ray Train surely holds for trial `number` (what a resume gets).

    All but the newest checkpoint on disk: Ray Train registers a checkpoint after its workers have
    written it, so the newest may not be registered yet; the older ones are."""
    from trainers.checkpoint import load_checkpoint

    pattern = f"{ws.root}/ray_results/killed/*optuna_trial={number},*/ray_train/**/state.pt"
    steps = set()
    for path in glob.glob(pattern, recursive=True):
        try:
            steps.add(int(load_checkpoint(os.path.dirname(path))["step"]))
        except (OSError, RuntimeError, EOFError):  # being written right now
            pass
    return set(sorted(steps)[:-1])


@pytest.mark.slow  # ~1.5 min on 2 cores: a Ray Train worker group starts, and another after the kill
def test_an_amortized_sweep_resumes_after_kill_9_with_one_run_per_trial(tmp_path):
    ws, done_before, in_flight, kill_time_ms = submit_kill_9_and_resume(
        tmp_path,
        amortized_spec(),
        steps_of=amortized_checkpoint_steps,
        early=AMORTIZED_STEPS // 2,
        need_done=False,
    )

    record = ws.record("killed")
    study = optuna.load_study(study_name="killed", storage=record.stores.optuna_url)
    client = mlflow.MlflowClient(record.stores.mlflow_uri)
    all_runs = tracking.trial_runs(client, record.experiment_id)
    runs = {int(r.data.tags[tracking.TAG_OPTUNA_TRIAL]): r for r in all_runs}

    assert [t.state.name for t in study.trials] == ["COMPLETE"] and done_before == []
    assert list(in_flight) == [0]
    # One run for the trial (the durable map: the run found again by its Tune trial id), with rank 0's
    # metrics once per step although the resumed trial replayed steps after its checkpoint.
    assert sorted(runs) == [0] and len(all_runs) == 1
    for number, run in runs.items():
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
        assert steps == list(range(AMORTIZED_EVERY, AMORTIZED_STEPS + 1, AMORTIZED_EVERY)), (number, steps)
        assert run.info.status == "FINISHED"
    for number, steps in in_flight.items():  # continued from a checkpoint it had persisted
        history = client.get_metric_history(runs[number].info.run_id, "trial/resumed_at_step")
        resumed_at = [int(m.value) for m in history]
        assert resumed_at and resumed_at[0] in steps | {max(steps) + AMORTIZED_EVERY}, (resumed_at, steps)
        assert float(runs[number].data.params["guidance.eta"]) == study.trials[number].params["guidance.eta"]


# A packed sweep's kill -9 resume (every member from its own committed checkpoint, finished trials not
# run again) is checked after each of the 3 driver kills of tests/integration/test_packed_chaos.py.
