"""Losing a worker node mid-trial, in the spirit of Ray's node-failure release test: the node's raylet
and its workers are killed while a trial runs there. The trial must continue from its last checkpoint
on the surviving node at the same params, and the three stores must end consistent."""

from __future__ import annotations

import json

import mlflow
import optuna
import pytest
from optuna.trial import TrialState

from orchestrator.run.trainable import TAG_NODES
from orchestrator.track import tracking
from tests.integration.conftest import own_cluster
from tests.integration.sweeps import run_cli, wait_for, wait_for_job, write_spec

pytestmark = pytest.mark.slow
CHECKPOINT_EVERY, STEPS, LOG_EVERY = 10, 100, 5


@pytest.fixture
def doomed_cluster():
    with own_cluster(100) as cluster:  # its own cluster: the test kills one of its nodes
        yield cluster


def test_a_lost_node_s_trial_resumes_on_the_survivor_and_the_stores_stay_consistent(
    doomed_cluster, postgres, mlflow_server, tmp_path, capsys
):
    address = doomed_cluster.dashboard_url
    storage = {
        "optuna": postgres.create_database("optuna_nodeloss"),
        "mlflow": mlflow_server.url,
        "tune": str(tmp_path / "shared" / "ray_results"),
    }
    spec = write_spec(
        tmp_path, "nodeloss", trials=3, steps=STEPS, storage=storage, shared=tmp_path / "shared"
    )
    code, _, err = run_cli(
        capsys, "submit", str(spec), "--address", address, "--runtime", str(tmp_path / "runtime.json")
    )
    assert code == 0, err
    workers = doomed_cluster.worker_node_ids()
    assert len(workers) == 2
    client = mlflow.MlflowClient(mlflow_server.url)

    def a_trial_past_its_third_checkpoint():
        experiment = client.get_experiment_by_name("nodeloss")
        if experiment is None:
            return None
        for run in tracking.trial_runs(client, experiment.experiment_id):
            history = client.get_metric_history(run.info.run_id, "train/loss")
            if (
                run.info.status == "RUNNING"
                and max((m.step for m in history), default=0) >= 4 * CHECKPOINT_EVERY
            ):
                return run
        return None

    victim = wait_for(
        a_trial_past_its_third_checkpoint, 300, "a trial past its third checkpoint", every_s=0.5
    )
    (doomed_node_id,) = victim.data.tags[TAG_NODES].split(",")
    (survivor_id,) = set(workers) - {doomed_node_id}
    assert workers[doomed_node_id].kill() > 0  # its raylet, agents and trial worker

    job = wait_for_job(capsys, "nodeloss", address, ("SUCCEEDED", "FAILED", "STOPPED"), timeout_s=600)
    log = run_cli(capsys, "logs", "nodeloss", "--address", address)[1]
    assert job["status"] == "SUCCEEDED", log[-3000:]
    assert "sweep nodeloss: 3 complete, 0 failed" in log

    study = optuna.load_study(study_name="nodeloss", storage=storage["optuna"])
    trials = study.get_trials(deepcopy=False)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3  # none stale RUNNING, none FAILed

    experiment = client.get_experiment_by_name("nodeloss")
    runs = tracking.trial_runs(client, experiment.experiment_id)
    assert len(runs) == 3 and {r.info.status for r in runs} == {"FINISHED"}  # one run per trial
    (resumed,) = [r for r in runs if r.info.run_id == victim.info.run_id]
    assert resumed.data.tags[TAG_NODES].split(",") == [doomed_node_id, survivor_id]
    # From its last checkpoint, not from the start:
    resumed_at = resumed.data.metrics["trial/resumed_at_step"]
    assert resumed_at >= 3 * CHECKPOINT_EVERY and resumed_at % CHECKPOINT_EVERY == 0
    assert "dreamsweep.resumed_from" in resumed.data.tags
    # At the same params: the run's Optuna trial has the params the run was opened with.
    number = int(resumed.data.tags[tracking.TAG_OPTUNA_TRIAL])
    params = json.loads(resumed.data.tags[tracking.TAG_PARAMS])
    assert trials[number].params["guidance.eta"] == pytest.approx(params["guidance.eta"])
    # Its metrics continue at the right steps: every logged step up to the last, ending at the last.
    steps = {m.step for m in client.get_metric_history(resumed.info.run_id, "train/loss")}
    assert steps == set(range(LOG_EVERY, STEPS + 1, LOG_EVERY))
    assert resumed.data.metrics["objective"] == pytest.approx(trials[number].value)
