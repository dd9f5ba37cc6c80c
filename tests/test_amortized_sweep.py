"""An amortized sweep through the orchestrator: each trial one Ray Train run of 2 workers, each worker
holding one logical GPU, on a local Ray with 2 logical GPUs (one Ray instance for the module)."""

from pathlib import Path

import optuna
import pytest
import ray
from ray.tune import ExperimentAnalysis

from orchestrator.run.sweep import submit
from orchestrator.run.workspace import Workspace
from orchestrator.spec.spec import SpecError, load_sweep_spec
from orchestrator.track import tracking
from orchestrator.track.report import best_config_yaml
from tests.test_amortized_data_parallel import TINY

PROMPTS = ["a red cube", "a blue ball", "a green cone"]
HELD_OUT = "a purple torus"  # never trained on: the run shows it beside the training prompt


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def spec(**changes):
    base = {k: v for k, v in TINY.items() if k not in ("trainer", "prompts")}
    out = {
        "name": "amortized",
        "trainer": "amortized",
        "kind": "search",
        "base": {
            **base,
            "trainer": "amortized",
            "max_steps": 4,
            "eval_prompts": {"n_train": 1, "held_out": [HELD_OUT]},
            "logging": {**base["logging"], "val_every": 2},
        },
        "prompts": {"items": PROMPTS},
        "search": {"space": {"guidance.eta": {"type": "float", "low": 0.0, "high": 1.0}}},
        "objective": {"metric": "train/loss", "mode": "min"},
        "trials": 1,
        "resources": {"gpus": 1, "cpus": 1},
    }
    return out | changes


@pytest.fixture(scope="module")
def amortized_sweep(local_ray, tmp_path_factory):
    ws = Workspace(tmp_path_factory.mktemp("ws-amortized"))
    outcome = submit(spec(), workspace=ws)
    return ws, outcome


def test_an_amortized_trial_is_one_two_worker_run_each_worker_holding_a_gpu(amortized_sweep):
    ws, outcome = amortized_sweep
    record = ws.record("amortized")
    assert outcome.complete == 1
    study = optuna.load_study(study_name="amortized", storage=record.stores.optuna_url)
    assert [t.state.name for t in study.trials] == ["COMPLETE"]
    (trial,) = ExperimentAnalysis(f"{record.stores.tune_path}/amortized").trials
    assert trial.last_result["workers"] == 2
    assert trial.last_result["worker/num_gpus"] == 1  # rank 0's own GPU; every worker asked for one


def test_the_trials_mlflow_run_holds_rank_zeros_metrics_once_per_step_and_its_renders(amortized_sweep):
    ws, _ = amortized_sweep
    record = ws.record("amortized")
    client = tracking.MlflowClient(record.stores.mlflow_uri)
    (run,) = tracking.trial_runs(client, record.experiment_id)
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert steps == [1, 2, 3, 4]  # one value per step: only rank 0's reports are logged
    assert run.data.params["prompts.count"] == "3"
    assert run.info.status == "FINISHED"
    files = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "metrics.yaml", "evaluation_prompts.json", "validation", "renders"} <= files


def test_the_run_holds_a_turntable_per_evaluation_prompt_named_by_prompt_and_grids_over_steps(
    amortized_sweep, tmp_path
):
    import json

    from orchestrator import internals

    ws, _ = amortized_sweep
    record = ws.record("amortized")
    client = tracking.MlflowClient(record.stores.mlflow_uri)
    (run,) = tracking.trial_runs(client, record.experiment_id)
    run_id = run.info.run_id
    turntables = {a.path.rsplit("/", 1)[-1] for a in client.list_artifacts(run_id, "renders/turntables")}
    assert turntables == {"train_00_a_red_cube.gif", "held_out_00_a_purple_torus.gif", "prompts.json"}
    index = json.loads(
        Path(client.download_artifacts(run_id, "renders/turntables/prompts.json", str(tmp_path))).read_text()
    )
    assert [(e["group"], e["prompt"]) for e in index] == [("train", "a red cube"), ("held_out", HELD_OUT)]
    for entry in index:  # each a GIF of its prompt's frames, not an empty file
        gif = Path(client.download_artifacts(run_id, f"renders/turntables/{entry['file']}", str(tmp_path)))
        assert gif.read_bytes()[:6] == b"GIF89a" and gif.stat().st_size > 100
    grids = sorted(a.path.rsplit("/", 1)[-1] for a in client.list_artifacts(run_id, "validation"))
    assert grids == [
        "step_0000002.png", "step_0000002.txt", "step_0000004.png", "step_0000004.txt"
    ]  # fmt: skip
    labels = Path(client.download_artifacts(run_id, "validation/step_0000004.txt", str(tmp_path)))
    assert labels.read_text().splitlines() == ["a red cube", HELD_OUT]  # the grid's rows, in order
    images = [a.path for a in client.list_artifacts(run_id, "images")]
    assert internals.mlflow_image_steps(images, "validation") == [2, 4]  # MLflow's images over steps
    assert [a.path.rsplit("/", 1)[-1] for a in client.list_artifacts(run_id, "checkpoint")] == [
        "step_0000004"
    ]


def test_best_yaml_of_an_amortized_sweep_is_an_amortized_config(amortized_sweep, tmp_path):
    import yaml

    ws, _ = amortized_sweep
    best = yaml.safe_load(best_config_yaml("amortized", ws))
    assert best["trainer"] == "amortized" and best["prompts"]["items"] == PROMPTS


def test_an_amortized_fanout_and_an_unknown_objective_are_refused():
    with pytest.raises(SpecError, match="kind: an amortized sweep trains one generator"):
        load_sweep_spec(spec(kind="fanout", search={}, trials=None))
    with pytest.raises(
        SpecError, match="resources.gpus: an amortized sweep's resources are per data-parallel"
    ):
        load_sweep_spec(spec(resources={"gpus": 0.5}))
    with pytest.raises(SpecError, match="objective.metric 'eval/psnr' is never reported"):
        load_sweep_spec(spec(objective={"metric": "eval/psnr"}))
