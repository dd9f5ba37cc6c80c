"""`mlflow ui --app-name dreamsweep`: MLflow's own tracking server, with its UI opening experiments on
their runs.

MLflow 3.17's UI does not pick an experiment's page from the experiment: it picks it from the browser's
"workflow type" (the GenAI / Model training switch at the top left), read from the address's
`?workflowType=` and else from the browser's local storage, where nothing is stored until the user
flips the switch, so it defaults to GenAI and every experiment opens on its traces overview. Its
`mlflow.experimentKind` tag is only read when that switch is turned off in the UI's build, which it is
not (orchestrator/internals.py has the evidence). So a fresh browser can only be told on the page
itself: this app (MLflow's documented `mlflow.app` plugin interface, as its own `basic-auth` app uses)
adds one line to MLflow's index page that stores "Model training" as the browser's choice where it has
none yet. A choice the user made later, with the switch, is kept.

MLflow's server takes one `--app-name`, so its `basic-auth` app would replace this one. With
DREAMSWEEP_MLFLOW_AUTH=basic-auth this app is MLflow's basic-auth app as well (the same Flask app,
passed through MLflow's own `mlflow.server.auth.create_app`; it needs `pip install "mlflow[auth]"`):
the launcher configs in clusters/ start their tracking server that way.
"""

from __future__ import annotations

import json
import os

from flask import Flask, Response, request
from mlflow.server import app as mlflow_flask_app

from orchestrator import internals


def default_workflow_script() -> str:
    key = json.dumps(internals.mlflow_ui_workflow_storage_key())
    value = json.dumps(json.dumps(internals.MLFLOW_UI_MODEL_TRAINING_WORKFLOW))  # stored as JSON
    # only where the browser has no choice yet; storage can be refused (private windows): then GenAI
    return f"<script>try{{localStorage.getItem({key})===null&&localStorage.setItem({key},{value})}}catch(e){{}}</script>"


def open_on_runs(response: Response) -> Response:
    """MLflow's index page (the UI's one HTML page; every route of the UI is under its #) with the
    default set before MLflow's own script, which is deferred, runs."""
    if request.endpoint != internals.MLFLOW_UI_PAGE_ENDPOINT or response.status_code != 200:
        return response
    response.direct_passthrough = False  # a file response: read it to edit it
    page = response.get_data(as_text=True)
    if "</head>" not in page:  # not the built UI (MLflow's "index.html not found" text): leave it
        return response
    response.set_data(page.replace("</head>", default_workflow_script() + "</head>", 1))
    # no validators: a browser that cached MLflow's plain page must not be told it is still current
    for header in ("ETag", "Last-Modified"):
        response.headers.pop(header, None)
    response.headers["Cache-Control"] = "no-cache"
    return response


AUTH_ENV = "DREAMSWEEP_MLFLOW_AUTH"


def create_app(app: Flask = mlflow_flask_app):
    """The entry point `mlflow.app: dreamsweep` (pyproject.toml); MLflow's server calls it once per worker."""
    if open_on_runs not in app.after_request_funcs.get(None, []):
        app.after_request(open_on_runs)
    auth = os.environ.get(AUTH_ENV, "")
    if auth == "basic-auth":
        # MLflow's basic-auth app on the same Flask app: every request needs a user (its admin comes from
        # MLFLOW_AUTH_ADMIN_USERNAME/PASSWORD at the first start), and the index page keeps this default.
        from mlflow.server.auth import create_app as basic_auth_app

        return basic_auth_app(app)
    if auth:
        raise ValueError(f"{AUTH_ENV}={auth!r}: the one authentication this app adds is 'basic-auth'")
    return internals.mlflow_server_app(app)
