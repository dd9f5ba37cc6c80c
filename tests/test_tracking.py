"""MLflow tracking without Ray: the durable trial -> run map and metrics that continue at the right
steps after a resume, checked through MlflowClient on the SQLite store."""

import mlflow
import pytest

from orchestrator.track import tracking


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    # One SQLite store for the module (creating one runs MLflow's migrations: seconds).
    return mlflow.MlflowClient(f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}")


@pytest.fixture
def store(client, request, tmp_path):
    # One experiment per test, so tests never see each other's runs.
    experiment_id = tracking.ensure_experiment(client, request.node.name, (tmp_path / "artifacts").as_uri())
    spec = {"kind": "search", "objective": {"metric": "m", "mode": "min"}, "search": {"sampler": "tpe"}}
    parent = tracking.start_parent_run(client, experiment_id, "exp", spec, {"a": "Float(0,1)"})
    return client, experiment_id, parent


def identity(experiment_id, parent, trial_id="t1", number=3):
    return tracking.TrialIdentity(
        "exp", experiment_id, parent, trial_id, number, ["a cat"], {"a": 0.5}, "abc123"
    )


def test_a_trial_reopens_the_run_it_started_instead_of_creating_another(store):
    client, experiment_id, parent = store
    first = tracking.TrialRun.open(client, identity(experiment_id, parent), {"a": 0.5})
    first.log_metrics(1, {"loss": 1.0}, force=True)
    client.set_terminated(first.run_id, status="FAILED")  # e.g. the worker died
    again = tracking.TrialRun.open(client, identity(experiment_id, parent), {"a": 0.5})
    assert again.run_id == first.run_id and again.resumed
    assert client.get_run(again.run_id).info.status == "RUNNING"
    assert len(tracking.trial_runs(client, experiment_id)) == 1


def test_child_runs_are_nested_under_the_parent_and_carry_their_links(store):
    client, experiment_id, parent = store
    run = tracking.TrialRun.open(client, identity(experiment_id, parent), {"guidance.eta": 0.5})
    tags = client.get_run(run.run_id).data.tags
    assert tags[tracking.TAG_PARENT] == parent
    assert tags[tracking.TAG_OPTUNA_TRIAL] == "3" and tags[tracking.TAG_RAY_TRIAL] == "t1"
    assert tags[tracking.TAG_GIT] == "abc123" and tags[tracking.TAG_HOST]
    assert tags[tracking.TAG_RUN_NAME] == "trial-0003"
    assert client.get_run(run.run_id).data.params == {"guidance.eta": "0.5"}


def test_metrics_replayed_after_a_resume_from_an_older_checkpoint_are_not_duplicated(store):
    client, experiment_id, parent = store
    run = tracking.TrialRun.open(client, identity(experiment_id, parent), {})
    for step in range(1, 8):  # logged up to step 7, then killed; the last checkpoint was at step 4
        run.log_metrics(step, {"loss": 10.0 - step})
    run.flush()
    resumed = tracking.TrialRun.open(client, identity(experiment_id, parent), {})
    for step in range(5, 11):  # the resumed trainer replays 5..7, then continues
        resumed.log_metrics(step, {"loss": 10.0 - step, "eval": 1.0})
    resumed.flush()
    assert [m.step for m in client.get_metric_history(run.run_id, "loss")] == list(range(1, 11))
    assert [m.step for m in client.get_metric_history(run.run_id, "eval")] == list(range(5, 11))


def test_metrics_are_buffered_until_flushed(store):
    client, experiment_id, parent = store
    run = tracking.TrialRun(
        client,
        tracking.TrialRun.open(client, identity(experiment_id, parent), {}).run_id,
        False,
        flush_every_s=3600,
    )
    run.log_metrics(1, {"loss": 1.0})
    assert client.get_metric_history(run.run_id, "loss") == []
    run.flush()
    assert len(client.get_metric_history(run.run_id, "loss")) == 1


def test_finished_objective_is_only_given_for_finished_runs(store):
    client, experiment_id, parent = store
    run = tracking.TrialRun.open(client, identity(experiment_id, parent), {})
    run.log_metrics(4, {tracking.OBJECTIVE: 0.25}, force=True)
    assert tracking.finished_objective(tracking.find_trial_run(client, experiment_id, "t1")) is None
    run.finish()
    assert tracking.finished_objective(tracking.find_trial_run(client, experiment_id, "t1")) == 0.25
    assert tracking.finished_objective(tracking.find_trial_run(client, experiment_id, "unknown")) is None


def test_stale_runs_get_their_trials_final_status_and_orphans_are_killed(store):
    client, experiment_id, parent = store
    done = tracking.TrialRun.open(client, identity(experiment_id, parent, "t1", 0), {})
    orphan = tracking.TrialRun.open(client, identity(experiment_id, parent, "t2", 1), {})
    assert tracking.close_stale_runs(client, experiment_id, {"t1": "FINISHED"}) == 2
    assert client.get_run(done.run_id).info.status == "FINISHED"
    assert client.get_run(orphan.run_id).info.status == "KILLED"
    assert client.get_run(orphan.run_id).data.tags["dreamsweep.orphaned"] == "true"


def test_best_so_far_is_a_metric_history_on_the_parent(store):
    client, _, parent = store
    tracking.log_best_so_far(client, parent, 1, {"objective": 0.5, "trial": 0, "params": {"a": 1}})
    tracking.log_best_so_far(client, parent, 2, {"objective": 0.25, "trial": 1, "params": {"a": 2}})
    history = client.get_metric_history(parent, "best/objective")
    assert [(m.step, m.value) for m in history] == [(1, 0.5), (2, 0.25)]
    assert client.get_run(parent).data.tags["best.trial"] == "1"


def test_the_prompts_tag_of_a_100k_prompt_trial_is_valid_json_under_the_tag_limit():
    import json

    from orchestrator.track.report import prompts_tag

    prompts = [f"a prompt number {i}" for i in range(100_000)]
    tag = tracking.json_list_tag(prompts)
    kept = json.loads(tag)
    assert len(tag) <= tracking.MAX_TAG and kept == prompts[: len(kept)] and len(kept) > 100
    # what runs logged before (a list cut mid-string, '...' after it) reads as the prompts before the cut
    cut = json.dumps(prompts)[: tracking.MAX_TAG - 3] + "..."
    assert prompts_tag(cut) == prompts[: len(prompts_tag(cut))] and len(prompts_tag(cut)) > 100
