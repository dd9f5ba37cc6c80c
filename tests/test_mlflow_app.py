"""`mlflow ui --app-name dreamsweep` (orchestrator/track/mlflow_app.py): MLflow's own server, whose index
page stores "Model training" as a fresh browser's choice, so that an experiment opens on its runs.
tests/test_report_browser.py shows it in a browser; this is the page it serves."""

from importlib.metadata import entry_points

import pytest
from mlflow.server import app as mlflow_flask_app

from orchestrator import internals
from orchestrator.track.mlflow_app import create_app, default_workflow_script


@pytest.fixture(scope="module")
def app():
    """MLflow's Flask app with dreamsweep's hook (Flask takes hooks only before its first request, so
    once for the module), removed again afterwards: it is one app per process."""
    hooks = list(mlflow_flask_app.after_request_funcs.get(None, []))
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("_MLFLOW_SGI_NAME", raising=False)  # gunicorn/waitress: the Flask app itself
        assert create_app() is mlflow_flask_app
        create_app()  # a second worker start in one process adds nothing twice
    yield mlflow_flask_app
    mlflow_flask_app.after_request_funcs[None] = hooks


def test_the_index_page_stores_model_training_before_mlflows_script_runs(app):
    response = app.test_client().get("/")
    page = response.get_data(as_text=True)
    assert response.status_code == 200 and page.count(default_workflow_script()) == 1
    assert page.index(default_workflow_script()) < page.index("</head>")
    key = internals.mlflow_ui_workflow_storage_key()
    assert f'localStorage.getItem("{key}")===null' in page  # a choice the browser has is kept
    assert f'localStorage.setItem("{key}","\\"machine_learning\\"")' in page
    assert "ETag" not in response.headers and "Last-Modified" not in response.headers


def test_other_responses_are_left_as_mlflow_sends_them(app):
    response = app.test_client().get("/static-files/manifest.json")
    assert response.status_code == 200 and b"localStorage" not in response.get_data()


def test_the_app_is_registered_for_mlflow_ui():
    apps = {e.name: e.value for e in entry_points(group="mlflow.app")}
    assert apps.get("dreamsweep") == "orchestrator.track.mlflow_app:create_app", (
        "the `mlflow.app` entry point `dreamsweep` is not installed: reinstall (pip install -e .)"
    )
