"""Whole sweeps on the real trainer (tiny-sd prior, CPU) through a local Ray with 2 logical GPUs.

One Ray instance for the module. A search sweep (each trial on a panel of two prompts) and a fan-out
(one trial per prompt); everything checked through MLflow's own client and the Optuna study.
"""

import json
from pathlib import Path

import mlflow
import optuna
import pytest
import ray
import yaml

from orchestrator.cli import main
from orchestrator.errors import SweepExistsError
from orchestrator.run.sweep import submit
from orchestrator.run.workspace import Workspace
from orchestrator.track import tracking
from orchestrator.track.report import compare, status
from trainers.config import load_train_config

TINY = {
    "max_steps": 4,
    "resolution": 32,
    "geometry": {"encoding": {"n_levels": 4, "log2_hashmap_size": 12}},
    "renderer": {"num_samples_per_ray": 8},
    "logging": {"log_every": 1, "checkpoint_every": 2, "val_every": 2, "val_views": 1, "turntable_frames": 2},
}
PROMPTS = ["a red cube", "a blue ball"]


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def search_sweep(local_ray, tmp_path_factory):
    ws = Workspace(tmp_path_factory.mktemp("ws-search"))
    spec = {
        "name": "search",
        "kind": "search",
        "base": TINY,
        "prompts": {"items": PROMPTS},
        "search": {
            "space": {"guidance.eta": {"type": "float", "low": 0.0, "high": 1.0}},
            "timesteps": {"t_min": [0.02, 0.2], "gap": [0.5, 0.7]},
        },
        "objective": {"metric": "train/loss", "mode": "min"},
        "trials": 2,
        "max_concurrent": 2,
        "resources": {"gpus": 1, "cpus": 1},
    }
    outcome = submit(spec, workspace=ws)
    return spec, ws, outcome


@pytest.fixture(scope="module")
def fanout_sweep(local_ray, tmp_path_factory, tiny_clip_dir):
    ws = Workspace(tmp_path_factory.mktemp("ws-fanout"))
    spec = {
        "name": "fan",
        "kind": "fanout",
        # Scored with the tiny CLIP on a 2-view orbit: the sweep ends with R@1 over its prompts.
        "base": {**TINY, "evaluation": {"clip": str(tiny_clip_dir), "views": 2}},
        "overrides": {"guidance.eta": 0.2},
        "prompts": {"items": PROMPTS},
        "objective": {"metric": "train/loss", "mode": "min"},
        "max_concurrent": 2,
        "resources": {"gpus": 0.5, "cpus": 1},
    }
    return spec, ws, submit(spec, workspace=ws)


def mlflow_of(ws: Workspace, name: str):
    record = ws.record(name)
    return mlflow.MlflowClient(record.stores.mlflow_uri), record


def test_search_sweep_completes_every_trial_in_the_optuna_study(search_sweep):
    spec, ws, outcome = search_sweep
    study = optuna.load_study(study_name="search", storage=ws.record("search").stores.optuna_url)
    states = [t.state.name for t in study.trials]
    assert outcome.complete == 2 and states == ["COMPLETE", "COMPLETE"]
    for trial in study.trials:
        assert (
            trial.params["guidance.t_min"] < trial.params["guidance.t_min"] + trial.params["guidance.t_gap"]
        )


def test_search_trials_each_held_one_logical_gpu_one_cpu_thread_and_loaded_the_prior_once(search_sweep):
    _, ws, _ = search_sweep
    rows = status("search", ws)
    from ray.tune import ExperimentAnalysis

    analysis = ExperimentAnalysis(f"{ws.record('search').stores.tune_path}/search")
    for trial in analysis.trials:
        assert trial.last_result["worker/num_gpus"] == 1
        # torch runs as many threads as the trial holds CPUs, not one per core of the machine
        assert trial.last_result["worker/torch_threads"] == 1
        assert trial.last_result["worker/prior_loads"] == 1  # per worker process, not per trial
    assert [r["state"] for r in rows] == ["TERMINATED", "TERMINATED"]
    assert all(r["step"] == 2 * TINY["max_steps"] for r in rows)  # a panel of two prompts


def test_search_parent_run_holds_spec_best_so_far_and_plots(search_sweep):
    _, ws, outcome = search_sweep
    client, record = mlflow_of(ws, "search")
    parent = client.get_run(record.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert client.get_experiment(parent.info.experiment_id).name == "search"
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    plots = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert {"spec.json", "search_space.json"} <= artifacts
    assert {"plots/optimization_history.png", "plots/parallel_coordinate.png"} <= plots
    best = client.get_metric_history(parent.info.run_id, "best/objective")
    assert best[-1].value == pytest.approx(outcome.best_value)


def test_search_child_runs_are_nested_tagged_and_hold_config_metrics_and_artifacts(search_sweep):
    _, ws, _ = search_sweep
    client, record = mlflow_of(ws, "search")
    runs = tracking.trial_runs(client, record.experiment_id)
    study = optuna.load_study(study_name="search", storage=record.stores.optuna_url)
    assert len(runs) == 2
    for run in runs:
        tags, params = run.data.tags, run.data.params
        trial = study.trials[int(tags[tracking.TAG_OPTUNA_TRIAL])]
        assert tags[tracking.TAG_PARENT] == record.parent_run_id
        assert tags[tracking.TAG_RAY_TRIAL] == trial.user_attrs["ray_trial_id"]
        assert json.loads(tags[tracking.TAG_PROMPTS]) == PROMPTS
        assert tags[tracking.TAG_GIT] and tags[tracking.TAG_HOST]
        assert float(params["guidance.eta"]) == pytest.approx(trial.params["guidance.eta"])
        assert params["resolution"] == "32"
        for prefix, offset in (("prompt_000/", 0), ("prompt_001/", TINY["max_steps"])):
            steps = [m.step for m in client.get_metric_history(run.info.run_id, prefix + "train/loss")]
            assert steps == [offset + s for s in range(1, TINY["max_steps"] + 1)]
        assert run.data.metrics["objective"] == pytest.approx(trial.value)
        files = {a.path for a in client.list_artifacts(run.info.run_id, "prompt_000")}
        assert {
            "prompt_000/validation",
            "prompt_000/renders",
            "prompt_000/checkpoint",
            "prompt_000/config",
        } <= files
        renders = [a.path for a in client.list_artifacts(run.info.run_id, "prompt_000/renders")]
        assert any(path.endswith(".gif") for path in renders)


def test_compare_json_lists_trials_best_first_with_run_ids(search_sweep, capsys):
    _, ws, outcome = search_sweep
    assert main(["compare", "search", "--workspace", str(ws.root), "--format", "json", "--top", "1"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 1
    assert {"trial", "run_id", "state", "params", "objective"} <= set(rows[0])
    assert rows[0]["trial"] == outcome.best_trial and rows[0]["objective"] == pytest.approx(
        outcome.best_value
    )


def test_best_yaml_is_a_train_config_with_the_best_params(search_sweep, tmp_path):
    _, ws, outcome = search_sweep
    out = tmp_path / "best.yaml"
    assert main(["best", "search", "--workspace", str(ws.root), "--output", str(out)]) == 0
    config = load_train_config(out)
    best = compare("search", ws, top=1)[0]
    assert config.guidance.eta == pytest.approx(best["params"]["guidance.eta"])
    assert config.guidance.t_max == pytest.approx(best["params"]["guidance.t_max"])
    assert yaml.safe_load(out.read_text())["prompt"] == PROMPTS[0]


def test_submitting_an_existing_name_is_refused(search_sweep):
    spec, ws, _ = search_sweep
    with pytest.raises(SweepExistsError, match="dreamsweep resume search"):
        submit(spec, workspace=ws)


def test_fanout_runs_one_trial_per_prompt(fanout_sweep):
    _, ws, outcome = fanout_sweep
    client, record = mlflow_of(ws, "fan")
    runs = tracking.trial_runs(client, record.experiment_id)
    assert outcome.complete == 2
    assert sorted(json.loads(r.data.tags[tracking.TAG_PROMPTS])[0] for r in runs) == sorted(PROMPTS)
    for run in runs:
        assert run.data.params["guidance.eta"] == "0.2"
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
        assert steps == list(range(1, TINY["max_steps"] + 1))
    assert sorted(r["params"]["prompt_index"] for r in status("fan", ws)) == [0, 1]


def test_fanout_ends_with_clip_r_at_1_over_its_prompts_as_dreamsweep_eval_computes_it(
    fanout_sweep, tiny_clip_dir, capsys
):
    _, ws, _ = fanout_sweep
    client, record = mlflow_of(ws, "fan")
    recall = {
        json.loads(run.data.tags[tracking.TAG_PROMPTS])[0]: run.data.metrics["eval/clip_r_at_1"]
        for run in tracking.trial_runs(client, record.experiment_id)
    }
    parent = client.get_run(record.parent_run_id).data.metrics["eval/clip_r_at_1"]
    assert parent == pytest.approx(sum(recall.values()) / len(PROMPTS))
    # The trials' final checkpoints scored again, together, by `dreamsweep eval`: the same R@1 per prompt.
    run_dirs = sorted(str(p.parent) for p in Path(record.stores.tune_path).rglob("prompt_*/config.yaml"))
    assert len(run_dirs) == 2
    assert main(["eval", *run_dirs, "--clip", str(tiny_clip_dir), "--views", "2", "--format", "json"]) == 0
    rescored = json.loads(capsys.readouterr().out)
    assert {row["prompt"]: row["clip_r_at_1"] for row in rescored["runs"]} == pytest.approx(recall)

    assert main(["compare", "fan", "--workspace", str(ws.root)]) == 0
    out = capsys.readouterr().out
    assert (
        "clip_r_at_1" in out.splitlines()[0]
        and f"CLIP R@1 over the sweep's finished prompts: {parent:.4f}" in out
    )


@pytest.fixture(scope="module")
def asha_sweep(local_ray, tmp_path_factory):
    # ASHA plumbing with the fast fake trainer (orchestrator.run.fake_trainer, 0.01 s a step): what is
    # checked is the bookkeeping of stopped trials, not training.
    ws = Workspace(tmp_path_factory.mktemp("ws-asha"))
    spec = {
        "name": "asha",
        "kind": "search",
        "base": {"max_steps": 40, "logging": {"log_every": 5, "checkpoint_every": 10}},
        "prompts": {"items": ["a red cube"]},
        "search": {"space": {"guidance.eta": {"type": "float", "low": 0.0, "high": 1.0}}, "seed": 3},
        "objective": {"metric": "train/loss", "mode": "min"},
        "trials": 4,
        "max_concurrent": 2,
        "resources": {"gpus": 1, "cpus": 1},
        "early_stopping": {"grace_period": 10, "reduction_factor": 2},
    }
    fake = {
        "train_fn": "orchestrator.run.fake_trainer:train",
        "load_prior_fn": "orchestrator.run.fake_trainer:load_prior",
    }
    return ws, submit(spec, workspace=ws, runtime=fake)


def test_asha_stopped_trials_are_complete_in_optuna_and_closed_in_mlflow(asha_sweep):
    ws, outcome = asha_sweep
    client, record = mlflow_of(ws, "asha")
    study = optuna.load_study(study_name="asha", storage=record.stores.optuna_url)
    assert [t.state.name for t in study.trials].count("COMPLETE") == 4 and outcome.complete == 4
    steps = {r["ray_trial_id"]: r["step"] for r in status("asha", ws)}
    for run in tracking.trial_runs(client, record.experiment_id):
        assert run.info.status == "FINISHED"
        stopped = steps[run.data.tags[tracking.TAG_RAY_TRIAL]] < 40
        assert (run.data.tags.get("dreamsweep.stopped_early") == "true") == stopped
        assert "objective" in run.data.metrics  # stopped or not, compare can rank it


def test_a_failing_trial_is_retried_from_its_last_checkpoint_in_the_same_run(local_ray, tmp_path):
    from orchestrator.run.fake_trainer import FAIL_ONCE_SEED

    ws = Workspace(tmp_path / "ws")
    spec = {
        "name": "retry",
        "kind": "fanout",
        "base": {
            "seed": FAIL_ONCE_SEED,
            "max_steps": 30,
            "logging": {"log_every": 5, "checkpoint_every": 10},
        },
        "prompts": {"items": ["a red cube"]},
        "objective": {"metric": "train/loss", "mode": "min"},
        "resources": {"gpus": 1, "cpus": 1},
        "retries": 1,
    }
    fake = {
        "train_fn": "orchestrator.run.fake_trainer:train",
        "load_prior_fn": "orchestrator.run.fake_trainer:load_prior",
    }
    assert submit(spec, workspace=ws, runtime=fake).complete == 1
    client, record = mlflow_of(ws, "retry")
    (run,) = tracking.trial_runs(client, record.experiment_id)
    assert run.info.status == "FINISHED" and "fake failure" in run.data.tags["dreamsweep.error"]
    assert [m.value for m in client.get_metric_history(run.info.run_id, "trial/resumed_at_step")] == [10.0]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [
        5,
        10,
        15,
        20,
        25,
        30,
    ]
