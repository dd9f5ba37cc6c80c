"""Every private Ray, Optuna and MLflow detail dreamsweep relies on, in one place.

Each one is used because no public API does the job (the reason is at its use). `PRIVATE_DETAILS`
lists them with a check; tests/test_internals.py runs the checks against the installed versions, so
an upgrade that renames or removes one fails there, by name, instead of deep inside a sweep.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["PRIVATE_DETAILS", "ray_package_limit_bytes", "ray_cluster_schema", "check_all"]


def __getattr__(name: str):
    # `TrainingResult` on first use: importing ray.train costs a packed worker, which never needs it,
    # about 0.5 s with ray.tune (tests/test_lazy_imports.py).
    if name == "TrainingResult":
        from ray.train._internal.session import _TrainingResult

        return _TrainingResult
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def ray_package_limit_bytes() -> int:
    """The largest working_dir a job can upload: the GCS's package limit, and below it the head
    dashboard's HTTP request-body limit that the Jobs API's upload goes through (100 MiB in Ray 2.60;
    over it the upload fails with HTTP 413). Public only as errors after the upload was packed."""
    from ray._private.ray_constants import DASHBOARD_CLIENT_MAX_SIZE
    from ray._private.runtime_env.packaging import GCS_STORAGE_MAX_SIZE

    return min(int(GCS_STORAGE_MAX_SIZE), int(DASHBOARD_CLIENT_MAX_SIZE))


def ray_cluster_schema() -> dict:
    """The JSON schema Ray's cluster launcher validates `ray up` configs with (a file inside Ray's
    package, not a public API); tests/test_clusters.py checks clusters/*.yaml against it."""
    import json
    from pathlib import Path

    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def _training_result() -> None:
    import inspect

    from ray.train._internal.session import _TrainingResult as TrainingResult

    params = inspect.signature(TrainingResult).parameters
    assert {"checkpoint", "metrics"} <= set(params), f"_TrainingResult takes {list(params)}"


def _checkpoint_manager() -> None:
    # orchestrator.run.tuner.continue_from_surviving_checkpoints edits a trial's checkpoint list.
    from ray.train import CheckpointConfig
    from ray.train._internal.checkpoint_manager import _CheckpointManager

    manager = _CheckpointManager(CheckpointConfig(num_to_keep=2))
    assert isinstance(manager._checkpoint_results, list), "_CheckpointManager._checkpoint_results"
    assert callable(manager.register_checkpoint), "_CheckpointManager.register_checkpoint"


def _optuna_search() -> None:
    # orchestrator.run.tuner.SweepSearch reads and replaces OptunaSearch's study and trial map.
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    search = OptunaSearch(
        {"x": optuna.distributions.FloatDistribution(0, 1)}, metric="m", mode="min", storage=None
    )
    search.suggest("t0")
    assert isinstance(search._ot_study, optuna.Study), "OptunaSearch._ot_study"
    assert isinstance(search._ot_trials.get("t0"), optuna.Trial), "OptunaSearch._ot_trials"


def _search_generator() -> None:
    # orchestrator.run.tuner.SweepSearchGenerator.reconcile sets the trial counter and the limiter's slots.
    from ray.tune.search import ConcurrencyLimiter, SearchGenerator
    from ray.tune.search.optuna import OptunaSearch

    generator = SearchGenerator(ConcurrencyLimiter(OptunaSearch(metric="m", mode="min"), max_concurrent=2))
    assert isinstance(generator._counter, int), "SearchGenerator._counter"
    limiter = generator.searcher
    assert isinstance(limiter.live_trials, set), "ConcurrencyLimiter.live_trials"
    assert isinstance(limiter.num_unfinished_live_trials, int), (
        "ConcurrencyLimiter.num_unfinished_live_trials"
    )


def _optuna_storage() -> None:
    # orchestrator.run.tuner.SweepSearch.adopt_live_trials maps a trial number to its storage id.
    import optuna

    study = optuna.create_study()
    storage = study._storage
    study_id = storage.get_study_id_from_name(study.study_name)
    trial = study.ask()
    assert storage.get_trial_id_from_study_id_trial_number(study_id, trial.number) == trial._trial_id


def _package_limit() -> None:
    assert ray_package_limit_bytes() > 2**20, (
        "ray._private.runtime_env.packaging.GCS_STORAGE_MAX_SIZE, ray._private.ray_constants.DASHBOARD_CLIENT_MAX_SIZE"
    )


def _cluster_schema() -> None:
    schema = ray_cluster_schema()
    assert {"cluster_name", "provider"} <= set(schema["required"]), "ray-schema.json required keys"
    assert "available_node_types" in schema["properties"], "ray-schema.json available_node_types"


def _mlflow_server() -> None:
    # orchestrator.track.mlflow_app edits the page of MLflow's index view and wraps its Flask app.
    import inspect

    from mlflow.environment_variables import _MLFLOW_SGI_NAME
    from mlflow.server import app
    from mlflow.server.fastapi_app import create_fastapi_app

    assert MLFLOW_UI_PAGE_ENDPOINT in app.view_functions, (
        f"mlflow.server.app views: {sorted(app.view_functions)}"
    )
    assert any(
        r.endpoint == MLFLOW_UI_PAGE_ENDPOINT and r.rule.endswith("/") for r in app.url_map.iter_rules()
    )
    assert _MLFLOW_SGI_NAME.name == "_MLFLOW_SGI_NAME", "mlflow.environment_variables._MLFLOW_SGI_NAME"
    assert list(inspect.signature(create_fastapi_app).parameters) == ["flask_app"], "create_fastapi_app"


def optuna_trial_id(study, number: int) -> int:
    """A trial's storage id from its number: what `optuna.Trial(study, trial_id)` takes to report to,
    or set attributes of, a trial that this process did not `ask` for (a packed sweep's driver after a
    restart). Optuna's public API goes by number only in `tell`."""
    storage = study._storage
    return storage.get_trial_id_from_study_id_trial_number(
        storage.get_study_id_from_name(study.study_name), number
    )


# Optuna's GridSampler calls `study.stop()` once its grid is used up, and `stop` raises this outside
# `study.optimize`; `tell` has stored the trial's state before (its `finally`), so a driver that asks
# and tells by hand (orchestrator/run/packed.py) can ignore it.
OPTUNA_STOP_OUTSIDE_OPTIMIZE = "`Study.stop` is supposed to be invoked inside an objective function"


def tell_outside_optimize(study, number: int, value: float | None = None, state=None) -> None:
    """`study.tell`, for a driver that asks and tells by hand with any sampler (the grid one too)."""
    try:
        study.tell(number, value, state=state)
    except RuntimeError as error:
        if OPTUNA_STOP_OUTSIDE_OPTIMIZE not in str(error):
            raise


def _grid_sampler_stop() -> None:
    import optuna

    study = optuna.create_study(sampler=optuna.samplers.GridSampler({"x": [0]}))
    trial = study.ask({"x": optuna.distributions.CategoricalDistribution([0])})
    try:
        study.tell(trial.number, 1.0)
    except RuntimeError as error:
        assert OPTUNA_STOP_OUTSIDE_OPTIMIZE in str(error), f"GridSampler's stop now says: {error}"
    assert study.trials[0].state == optuna.trial.TrialState.COMPLETE, "tell stores the state before stop"
    assert optuna_trial_id(study, trial.number) == trial._trial_id, "optuna_trial_id"


PRIVATE_DETAILS: dict[str, Callable[[], None]] = {
    "ray.train._internal.session._TrainingResult(checkpoint, metrics)": _training_result,
    "ray.train._internal.checkpoint_manager._CheckpointManager._checkpoint_results": _checkpoint_manager,
    "ray.tune.search.optuna.OptunaSearch._ot_study / _ot_trials": _optuna_search,
    "SearchGenerator._counter, ConcurrencyLimiter.live_trials / num_unfinished_live_trials": _search_generator,
    "optuna.Study._storage.get_trial_id_from_study_id_trial_number": _optuna_storage,
    "optuna GridSampler's study.stop() in tell outside optimize; optuna_trial_id": _grid_sampler_stop,
    "ray._private.runtime_env.packaging.GCS_STORAGE_MAX_SIZE": _package_limit,
    "ray/autoscaler/ray-schema.json": _cluster_schema,
    "mlflow.server: the index view `serve`, _MLFLOW_SGI_NAME, fastapi_app.create_fastapi_app": _mlflow_server,
}


def check_all() -> dict[str, str]:
    """Run every check; returns {detail: error} for those that broke (empty: all hold)."""
    broken = {}
    for name, check in PRIVATE_DETAILS.items():
        try:
            check()
        except Exception as exc:  # an upgrade can break them in any way: report each by name
            broken[name] = f"{type(exc).__name__}: {exc}"
    return broken


# ---------------------------------------------------------------------------------------------------
# MLflow's UI (checked in tests/test_internals.py against the installed MLflow)

# MLflow 3.17's web UI (its built bundle under mlflow/server/js/build/static/js) picks the page an
# experiment opens on from the browser's "workflow type", not from the experiment: the address's
# `?workflowType=` (genai | machine_learning), else the browser's local storage under
# "mlflow.workflowType" (its useLocalStorage hook stores `${key}_v${version}` -> JSON), else "genai",
# which opens an experiment on its traces overview ("Traces 0", "No data available"). The experiment tag
# `mlflow.experimentKind` is read only while the UI's `shouldEnableWorkflowBasedNavigation` flag is off,
# and that flag is compiled in as on (3.17.2 and 3.18.0 alike), so the tag changes no page there. It is
# still set: it is what the UI itself writes when a user picks an experiment's kind, and UIs with the
# flag off read it. orchestrator/track/mlflow_app.py (`mlflow ui --app-name dreamsweep`) stores
# "machine_learning" as a fresh browser's choice instead. MLflow has no public constant for any of these.
MLFLOW_EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MLFLOW_TRAINING_EXPERIMENT = "custom_model_development"
MLFLOW_UI_WORKFLOW_KEY = "mlflow.workflowType"
MLFLOW_UI_WORKFLOW_VERSION = 1
MLFLOW_UI_MODEL_TRAINING_WORKFLOW = "machine_learning"
# The Flask view that serves the UI's index page (`/` under any --static-prefix).
MLFLOW_UI_PAGE_ENDPOINT = "serve"


def mlflow_ui_workflow_storage_key() -> str:
    """The local-storage key MLflow's UI keeps the workflow type under."""
    return f"{MLFLOW_UI_WORKFLOW_KEY}_v{MLFLOW_UI_WORKFLOW_VERSION}"


def mlflow_server_app(flask_app):
    """What an `mlflow.app` plugin returns: under MLflow's default server (uvicorn) its FastAPI wrapper of
    the Flask app, as MLflow's own basic-auth app does (the server names itself in a private variable);
    the Flask app itself under gunicorn or waitress."""
    from mlflow.environment_variables import _MLFLOW_SGI_NAME

    if _MLFLOW_SGI_NAME.get() == "uvicorn":
        from mlflow.server.fastapi_app import create_fastapi_app

        return create_fastapi_app(flask_app)
    return flask_app


# The run description MLflow's UI shows (and edits) on a run's overview page; documented as a system
# tag, kept here beside the other MLflow UI tag.
MLFLOW_RUN_NOTE_TAG = "mlflow.note.content"


def mlflow_image_steps(artifact_paths: list[str], key: str) -> list[int]:
    """The steps of the images MLflow's `log_image(key=..., step=...)` stored, from their file names
    under `images/` ("<key, '/' as '~'>+step+<step>+timestamp+<ms>+<uuid>.png", plus a compressed
    .webp copy): what MLflow's UI reads to show a key's images over steps."""
    prefix = key.replace("/", "~") + "+step+"
    steps = set()
    for path in artifact_paths:
        name = path.rsplit("/", 1)[-1]
        if name.startswith(prefix) and name.endswith(".png"):
            steps.add(int(name[len(prefix) :].split("+", 1)[0]))
    return sorted(steps)
