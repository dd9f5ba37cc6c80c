"""Sweeps submitted to a real three-node Ray cluster on this machine through the Ray Jobs API,
with the Optuna study on PostgreSQL and tracking by an `mlflow server` on PostgreSQL.

The head has no GPU; each of the two worker nodes declares one logical GPU, and every trial asks for
one GPU, so trials can only run on the worker nodes, one at a time on each."""

from __future__ import annotations

import mlflow
import optuna
import pytest
from optuna.trial import TrialState
from ray.util.state import list_nodes

from orchestrator.run.trainable import TAG_NODES
from orchestrator.track import tracking
from tests.integration.sweeps import run_cli, wait_for, wait_for_job, write_spec

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stores(postgres, mlflow_server, tmp_path_factory):
    shared = tmp_path_factory.mktemp("shared-mount")
    return {
        "shared": shared,
        "storage": {
            "optuna": postgres.create_database("optuna_jobs"),
            "mlflow": mlflow_server.url,
            "tune": str(shared / "ray_results"),
        },
    }


def child_runs(mlflow_url: str, name: str) -> list:
    client = mlflow.MlflowClient(mlflow_url)
    experiment = client.get_experiment_by_name(name)
    return tracking.trial_runs(client, experiment.experiment_id)


def study_states(url: str, name: str) -> list[TrialState]:
    study = optuna.load_study(study_name=name, storage=url)
    return [t.state for t in study.get_trials(deepcopy=False)]


def test_a_sweep_runs_as_a_job_on_both_worker_nodes_one_trial_per_gpu(cluster, stores, tmp_path, capsys):
    address = cluster.dashboard_url
    spec = write_spec(
        tmp_path, "multinode", trials=4, steps=40, storage=stores["storage"], shared=stores["shared"]
    )
    code, out, err = run_cli(
        capsys, "submit", str(spec), "--address", address, "--runtime", str(tmp_path / "runtime.json")
    )
    assert code == 0, err
    assert "as job dreamsweep-multinode-submit-" in out and "dreamsweep logs multinode --follow" in out

    job = wait_for_job(capsys, "multinode", address, ("SUCCEEDED", "FAILED", "STOPPED"), timeout_s=420)
    code, log, _ = run_cli(capsys, "logs", "multinode", "--address", address)
    assert job["status"] == "SUCCEEDED", log[-3000:]
    assert "sweep multinode: 4 complete, 0 failed" in log

    code, listed, _ = run_cli(capsys, "list", "--address", address, "--format", "json")
    assert '"sweep": "multinode"' in listed and '"status": "SUCCEEDED"' in listed

    assert study_states(stores["storage"]["optuna"], "multinode") == [TrialState.COMPLETE] * 4
    runs = child_runs(stores["storage"]["mlflow"], "multinode")
    assert len(runs) == 4 and {r.info.status for r in runs} == {"FINISHED"}

    workers = {n.node_id for n in list_nodes(address=address) if not n.is_head_node}
    assert len(workers) == 2
    by_node: dict[str, list[tuple[int, int]]] = {}
    for run in runs:
        nodes = run.data.tags[TAG_NODES].split(",")
        assert len(nodes) == 1 and nodes[0] in workers  # never on the GPU-less head
        by_node.setdefault(nodes[0], []).append((run.info.start_time, run.info.end_time))
    assert set(by_node) == workers  # both worker nodes ran trials
    for intervals in by_node.values():  # one GPU per node: its trials never overlapped
        intervals.sort()
        assert all(
            end <= next_start for (_, end), (next_start, _) in zip(intervals, intervals[1:], strict=False)
        )


def test_stop_and_resume_act_on_the_job(cluster, stores, tmp_path, capsys):
    address = cluster.dashboard_url
    spec = write_spec(
        tmp_path, "stopped", trials=4, steps=100, storage=stores["storage"], shared=stores["shared"]
    )
    runtime = str(tmp_path / "runtime.json")
    assert run_cli(capsys, "submit", str(spec), "--address", address, "--runtime", runtime)[0] == 0

    def a_trial_checkpointed():
        experiment = mlflow.MlflowClient(stores["storage"]["mlflow"]).get_experiment_by_name("stopped")
        if experiment is None:
            return False
        return any(
            r.data.metrics.get("train/loss") for r in child_runs(stores["storage"]["mlflow"], "stopped")
        )

    wait_for(a_trial_checkpointed, 300, "a trial of the sweep to log metrics")
    code, out, err = run_cli(capsys, "stop", "stopped", "--address", address)
    assert code == 0, err
    assert "dreamsweep resume stopped --address" in out
    wait_for_job(capsys, "stopped", address, ("STOPPED", "FAILED", "SUCCEEDED"), timeout_s=90)
    states = study_states(stores["storage"]["optuna"], "stopped")
    assert states.count(TrialState.COMPLETE) < 4  # stopped before the end

    code, out, err = run_cli(capsys, "resume", "stopped", "--address", address)
    assert code == 0, err
    job = wait_for_job(capsys, "stopped", address, ("SUCCEEDED", "FAILED", "STOPPED"), timeout_s=420)
    log = run_cli(capsys, "logs", "stopped", "--address", address)[1]
    assert job["status"] == "SUCCEEDED" and job["action"] == "resume", log[-3000:]
    states = study_states(stores["storage"]["optuna"], "stopped")
    assert TrialState.RUNNING not in states and states.count(TrialState.COMPLETE) == 4


def test_a_trial_no_node_can_hold_is_refused_with_the_cluster_resources(cluster, stores, tmp_path, capsys):
    address = cluster.dashboard_url
    spec = write_spec(
        tmp_path, "toobig", trials=1, steps=10, storage=stores["storage"], shared=stores["shared"],
        resources={"cpus": 1, "gpus": 2},
    )  # fmt: skip
    code, _, err = run_cli(capsys, "submit", str(spec), "--address", address)
    assert code == 2
    assert "gpus=2" in err and "no node of the cluster" in err and "GPU=1" in err and "CPU=1" in err
    code, listed, _ = run_cli(capsys, "list", "--address", address)
    assert code == 0 and "toobig" not in listed  # refused before a job was submitted


@pytest.mark.parametrize("command", ["logs", "stop", "status", "resume"])
def test_unknown_sweep_on_the_cluster_lists_the_sweeps_it_ran(cluster, command, capsys):
    code, _, err = run_cli(capsys, command, "nope", "--address", cluster.dashboard_url)
    assert code == 2
    assert "no sweep named 'nope' on the cluster" in err and "sweeps there:" in err
