"""A whole (small) sweep on the real trainer, tracked by a real `mlflow server` on 127.0.0.1 instead of
the SQLite store: runs, nested child runs, metrics with steps and artifacts uploaded through HTTP."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest
import ray

from orchestrator.run.sweep import submit
from orchestrator.run.workspace import Workspace
from orchestrator.spec.secrets import CredentialInURLWarning
from orchestrator.track import tracking
from orchestrator.track.report import compare


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    command = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", f"sqlite:///{root / 'server.db'}",
        "--artifacts-destination", str(root / "artifacts"),
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    log = open(root / "server.log", "w")
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            pytest.fail(f"mlflow server did not start: {(root / 'server.log').read_text()[-2000:]}")
        time.sleep(0.5)
    yield url, root
    server.terminate()
    server.wait(timeout=30)


def test_sweep_tracked_by_an_mlflow_server(mlflow_server, tmp_path):
    url, server_root = mlflow_server
    ws = Workspace(tmp_path / "ws")
    spec = {
        "name": "served",
        "kind": "fanout",
        "base": {
            "max_steps": 2,
            "resolution": 32,
            "geometry": {"encoding": {"n_levels": 4, "log2_hashmap_size": 12}},
            "renderer": {"num_samples_per_ray": 8},
            "logging": {"log_every": 1, "checkpoint_every": 1, "val_views": 1, "turntable_frames": 2},
        },
        "prompts": {"items": ["a red cube"]},
        "objective": {"metric": "train/loss", "mode": "min"},
        "resources": {"gpus": 1, "cpus": 1},
        "storage": {"mlflow": url},
    }
    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False)
    try:
        outcome = submit(spec, workspace=ws)
    finally:
        ray.shutdown()
    assert outcome.complete == 1
    assert not (ws.root / "mlflow.db").exists()  # nothing went to the local SQLite store

    client = mlflow.MlflowClient(url)
    record = ws.record("served")
    assert record.stores.mlflow_uri == url
    (run,) = tracking.trial_runs(client, record.experiment_id)
    assert run.data.tags[tracking.TAG_PARENT] == record.parent_run_id
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [1, 2]
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"renders", "checkpoint", "config"}
    served = list(Path(server_root, "artifacts").rglob("turntable.*"))
    assert served and served[0].stat().st_size > 0  # uploaded through the server, stored by it
    rows = compare("served", ws)
    assert rows[0]["run_id"] == run.info.run_id and json.loads(run.data.tags[tracking.TAG_PROMPTS]) == [
        "a red cube"
    ]


def test_a_password_in_the_tracking_url_reaches_no_record(mlflow_server, tmp_path, capfd):
    """A URL with an embedded password (this server ignores it) and a `${NAME}` reference: the sweep
    runs, warns once, and no byte it left (workspace, Tune's state, the server's store and artifacts,
    the console) holds the password or the reference's value."""
    url, server_root = mlflow_server
    secret = "hunter2-tracking-secret"
    with_password = url.replace("http://", f"http://alice:{secret}@")
    ws = Workspace(tmp_path / "ws")
    os.environ["DREAMSWEEP_TEST_DB_DIR"] = str(tmp_path / "dbdir")  # resolved only where used
    (tmp_path / "dbdir").mkdir()
    spec = {
        "name": "secret",
        "kind": "fanout",
        "base": {
            "max_steps": 2,
            "resolution": 32,
            "geometry": {"encoding": {"n_levels": 4, "log2_hashmap_size": 12}},
            "renderer": {"num_samples_per_ray": 8},
            "logging": {"log_every": 1, "checkpoint_every": 1, "val_views": 1, "turntable_frames": 2},
        },
        "prompts": {"items": ["a red cube"]},
        "objective": {"metric": "train/loss", "mode": "min"},
        "resources": {"gpus": 1, "cpus": 1},
        "storage": {"mlflow": with_password, "optuna": "sqlite:///${DREAMSWEEP_TEST_DB_DIR}/optuna.db"},
    }
    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False)
    try:
        with pytest.warns(CredentialInURLWarning, match="storage.mlflow: http://alice:\\*\\*\\*@"):
            outcome = submit(spec, workspace=ws)
        rows = compare("secret", ws)  # a later command, from the record
    finally:
        ray.shutdown()
        for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "DREAMSWEEP_TEST_DB_DIR"):
            os.environ.pop(key, None)
    assert outcome.complete == 1 and len(rows) == 1
    assert (tmp_path / "dbdir" / "optuna.db").is_file()  # the reference was used...
    record = ws.record("secret")
    assert record.stores.optuna_url.endswith("${DREAMSWEEP_TEST_DB_DIR}/optuna.db")  # ...never recorded
    assert record.stores.mlflow_uri == url.replace("http://", "http://alice:***@")

    printed = capfd.readouterr()
    assert secret not in printed.out + printed.err
    leaks = [
        str(path)
        for root in (ws.root, server_root)
        for path in Path(root).rglob("*")
        if path.is_file() and secret.encode() in path.read_bytes()
    ]
    assert leaks == []
