"""The private Ray, Optuna and MLflow details dreamsweep relies on still hold in the installed versions.

If this fails after an upgrade, the failing name says which use in orchestrator/ to revisit
(orchestrator/internals.py lists where each one is used and why)."""

import re
from pathlib import Path

import mlflow
import numpy as np

from orchestrator import internals
from orchestrator.internals import PRIVATE_DETAILS, check_all


def test_every_private_detail_still_holds():
    broken = check_all()
    assert broken == {}, "private Ray/Optuna/MLflow details broken by an upgrade:\n" + "\n".join(
        f"- {name}: {error}" for name, error in broken.items()
    )


def test_the_checks_detect_a_missing_detail(monkeypatch):
    import optuna

    monkeypatch.delattr(optuna.Study, "ask")  # a check that cannot fail would be no check
    assert "optuna.Study._storage.get_trial_id_from_study_id_trial_number" in check_all()
    assert len(PRIVATE_DETAILS) >= 6


def mlflow_ui_bundle() -> str:
    static = Path(mlflow.__file__).parent / "server" / "js" / "build" / "static" / "js"
    files = sorted(static.glob("*.js"))
    assert files, f"MLflow's web UI bundle is not where it used to be ({static})"
    return "\n".join(path.read_text(errors="ignore") for path in files)


def test_mlflows_ui_reads_the_experiment_kind_tag_and_knows_the_training_kind():
    bundle = mlflow_ui_bundle()
    assert f'"{internals.MLFLOW_EXPERIMENT_KIND_TAG}"' in bundle, "MLflow's UI no longer reads the kind tag"
    assert f'CUSTOM_MODEL_DEVELOPMENT="{internals.MLFLOW_TRAINING_EXPERIMENT}"' in bundle, (
        "MLflow's UI no longer knows the experiment kind dreamsweep sets"
    )


def test_mlflows_ui_keeps_its_workflow_type_where_dreamsweeps_app_sets_it():
    # orchestrator/track/mlflow_app.py stores "machine_learning" under this key for a fresh browser;
    # tests/test_report_browser.py shows the effect (an experiment opens on its runs)
    bundle = mlflow_ui_bundle()
    key, version = internals.MLFLOW_UI_WORKFLOW_KEY, internals.MLFLOW_UI_WORKFLOW_VERSION
    assert f'key:"{key}",version:{version}' in bundle, "MLflow's UI keeps its workflow type elsewhere"
    assert re.search(r"`\$\{\w+\}_v\$\{\w+\}`", bundle), "MLflow's UI no longer stores `${key}_v${version}`"
    assert internals.mlflow_ui_workflow_storage_key() == f"{key}_v{version}"
    assert f'MACHINE_LEARNING="{internals.MLFLOW_UI_MODEL_TRAINING_WORKFLOW}"' in bundle


def test_the_run_note_tag_is_mlflows_run_description():
    from mlflow.utils.mlflow_tags import MLFLOW_RUN_NOTE

    assert internals.MLFLOW_RUN_NOTE_TAG == MLFLOW_RUN_NOTE


def test_images_logged_with_a_step_are_found_again_by_key_and_step(tmp_path):
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.create_experiment("images", artifact_location=(tmp_path / "artifacts").as_uri())
    run = client.create_run(experiment).info.run_id
    image = np.zeros((4, 4, 3), dtype=np.uint8)
    for step in (3, 10):
        client.log_image(run, image, key="prompt_000/validation", step=step)
    client.log_image(run, image, key="validation", step=7)
    paths = [a.path for a in client.list_artifacts(run, "images")]
    assert internals.mlflow_image_steps(paths, "prompt_000/validation") == [3, 10]
    assert internals.mlflow_image_steps(paths, "validation") == [7]
