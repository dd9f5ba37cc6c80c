"""A real password, end to end: no byte a sweep leaves holds it.

PostgreSQL with a role that must give its password (SCRAM), an `mlflow server` on it behind MLflow's
basic-auth (dreamsweep's app composed with it, as clusters/ start it), and two sweeps:
- the recommended way, as a Ray Job on a local cluster: the URLs name no password, the head's
  environment has PGPASSWORD and MLFLOW_TRACKING_USERNAME/PASSWORD (as the launcher configs give it);
- with both passwords embedded in the spec's URLs: refused for the cluster, run on this machine with a
  warning.
Then every byte the sweeps left is searched for either password: both workspaces, Tune's folder, the
Ray cluster's and the local Ray's session folders (the jobs' uploads, metadata and logs), the MLflow
server's folder (artifacts, log), a dump of the MLflow and Optuna databases, the reports, the Ray jobs'
entrypoints and metadata, and everything the commands printed.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import urllib.request
from base64 import b64encode
from pathlib import Path

import pytest

from orchestrator.track.mlflow_app import default_workflow_script
from tests.integration.conftest import PORT_BASE
from tests.integration.local_cluster import new_cluster
from tests.integration.services import start_mlflow_server
from tests.integration.sweeps import run_cli, wait_for_job, write_spec

pytestmark = pytest.mark.slow
PG_SECRET = f"pgpw-{secrets.token_hex(8)}"
MLFLOW_SECRET = f"mlpw-{secrets.token_hex(8)}"
USER = "sweeper"
CREDENTIAL_ENV = ("PGPASSWORD", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")


@pytest.fixture(scope="module")
def secured(postgres):
    postgres.create_role_with_password(USER, PG_SECRET)
    backend = postgres.create_database(
        "mlflow_secured", owner=USER
    )  # postgresql://sweeper@.../mlflow_secured
    for name in ("optuna_recommended", "optuna_embedded"):
        postgres.create_database(name, owner=USER)
    server = start_mlflow_server(
        PORT_BASE + 902,
        backend,
        app="dreamsweep",
        env={
            "PGPASSWORD": PG_SECRET,  # the server's own secret, in its environment
            "DREAMSWEEP_MLFLOW_AUTH": "basic-auth",
            "MLFLOW_AUTH_ADMIN_USERNAME": USER,
            "MLFLOW_AUTH_ADMIN_PASSWORD": MLFLOW_SECRET,
            "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16),
        },
    )
    try:
        yield postgres, server
    finally:
        server.stop()


def http_get(url: str, password: str | None) -> tuple[int, str]:
    request = urllib.request.Request(url)
    if password is not None:
        request.add_header("Authorization", "Basic " + b64encode(f"{USER}:{password}".encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=60) as response:  # a loaded machine hashes slowly
            return response.status, response.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, ""


def files_holding(secret: str, *roots: Path) -> list[str]:
    found = []
    for root in roots:
        for path in Path(root).rglob("*"):
            try:
                if path.is_file() and not path.is_symlink() and secret.encode() in path.read_bytes():
                    found.append(str(path))
            except OSError:  # a socket or a file that vanished
                pass
    return found


def test_no_byte_a_sweep_leaves_holds_the_password(secured, tmp_path, capsys, monkeypatch):
    postgres, server = secured
    for key in CREDENTIAL_ENV:
        monkeypatch.delenv(key, raising=False)
    # The tracking server asks for its user, and its index page keeps dreamsweep's default view.
    search = f"{server.url}/api/2.0/mlflow/experiments/search?max_results=1"
    assert http_get(search, None)[0] == 401 and http_get(search, "wrong")[0] == 401
    assert http_get(search, MLFLOW_SECRET)[0] == 200
    status, page = http_get(f"{server.url}/", MLFLOW_SECRET)
    assert status == 200 and default_workflow_script() in page

    shared = tmp_path / "shared"
    printed: list[str] = []
    runtime = str(tmp_path / "runtime.json")

    def cli(*argv: str) -> tuple[int, str, str]:
        code, out, err = run_cli(capsys, *argv)
        printed.append(out + err)
        return code, out, err

    # 1. The recommended way: no secret in the spec; the head's environment holds them.
    cluster = new_cluster(PORT_BASE + 200)
    head_env = {
        "PGPASSWORD": PG_SECRET,
        "MLFLOW_TRACKING_USERNAME": USER,
        "MLFLOW_TRACKING_PASSWORD": MLFLOW_SECRET,
    }
    try:
        cluster.start(workers=1, env={**head_env, "DREAMSWEEP_FAKE_STEP_S": "0.05"})
        address = cluster.dashboard_url
        recommended = {
            "optuna": postgres.url("optuna_recommended", USER),
            "mlflow": server.url,
            "tune": str(shared / "ray_results"),
        }
        spec = write_spec(tmp_path, "recommended", trials=2, steps=20, storage=recommended, shared=shared)
        head_ws = tmp_path / "head-ws"
        code, _, err = cli(
            "submit", str(spec), "--address", address, "--workspace", str(head_ws), "--runtime", runtime
        )
        assert code == 0, err
        job = wait_for_job(capsys, "recommended", address, ("SUCCEEDED", "FAILED", "STOPPED"), timeout_s=300)
        code, log, _ = cli("logs", "recommended", "--address", address)
        assert job["status"] == "SUCCEEDED", log[-3000:]
        cli("status", "recommended", "--address", address)
        cli("list", "--address", address)
        from ray.job_submission import JobSubmissionClient

        jobs = repr(
            [(j.entrypoint, j.metadata, j.runtime_env) for j in JobSubmissionClient(address).list_jobs()]
        )

        # 2. Embedded in the URLs: refused for a cluster, without printing them...
        embedded = {
            "optuna": postgres.url("optuna_embedded", f"{USER}:{PG_SECRET}"),
            "mlflow": server.url.replace("http://", f"http://{USER}:{MLFLOW_SECRET}@"),
            "tune": str(shared / "ray_results"),
        }
        # (The user's own spec file holds them, in a folder of its own that the search leaves out.)
        user = tmp_path / "user"
        user.mkdir()
        spec = write_spec(user, "embedded", trials=1, steps=10, storage=embedded, shared=shared)
        code, _, err = cli("submit", str(spec), "--address", address, "--runtime", runtime)
        assert code == 2 and f"{USER}:***@127.0.0.1" in err and "embeds a password" in err
    finally:
        cluster_logs = cluster.temp_dir
        os.environ["DREAMSWEEP_KEEP_CLUSTER_LOGS"] = "1"  # searched below, then removed
        cluster.stop()
        os.environ.pop("DREAMSWEEP_KEEP_CLUSTER_LOGS")

    # ...and run on this machine, where it works, with one warning that says how to move it out.
    import ray

    local_ws = tmp_path / "local-ws"
    spec = write_spec(
        user, "embedded", trials=1, steps=10, storage=embedded, shared=shared,
        cluster={"num_cpus": 2, "num_gpus": 1, "include_dashboard": False, "log_to_driver": False},
    )  # fmt: skip
    saved = dict(os.environ)
    try:
        with pytest.warns(UserWarning, match=r"storage\.optuna: postgresql://sweeper:\*\*\*@127\.0\.0\.1"):
            code, out, err = cli("submit", str(spec), "--workspace", str(local_ws), "--runtime", runtime)
        assert code == 0, err
        local_session = Path(ray._private.worker._global_node.get_session_dir_path())
    finally:
        ray.shutdown()
        os.environ.clear()
        os.environ.update(saved)

    # Later commands take the passwords from their standard places, as the warning said.
    monkeypatch.setenv("PGPASSWORD", PG_SECRET)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", USER)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", MLFLOW_SECRET)
    # (The report, the slowest, for the sweep whose URLs held the passwords.)
    commands = [("compare", "recommended"), ("status", "recommended"), ("list",)]
    commands = [(c, head_ws) for c in commands] + [
        (c, local_ws) for c in (("compare", "embedded"), ("status", "embedded"), ("report", "embedded"))
    ]
    for command, ws in commands:
        code, _, err = cli(*command, "--workspace", str(ws))
        assert code == 0, (command, err)
    assert (local_ws / "sweeps" / "embedded" / "report" / "index.html").is_file()

    dumps = tmp_path / "dumps"
    dumps.mkdir()
    for database in ("mlflow_secured", "optuna_recommended", "optuna_embedded"):
        dump = subprocess.run(
            [str(postgres.bin / "pg_dump"), "-h", "127.0.0.1", "-p", str(postgres.port), "-U", "postgres", database],
            capture_output=True, check=True, timeout=120,
        )  # fmt: skip
        assert b"dreamsweep.sweep" in dump.stdout or database.startswith("optuna")  # a real dump
        (dumps / f"{database}.sql").write_bytes(dump.stdout)
    (dumps / "console.txt").write_text("\n".join(printed))
    (dumps / "jobs.txt").write_text(jobs)

    roots = (head_ws, local_ws, shared, dumps, cluster_logs, local_session, server.root)
    try:
        leaks = {secret: files_holding(secret, *roots) for secret in (PG_SECRET, MLFLOW_SECRET)}
        assert leaks == {PG_SECRET: [], MLFLOW_SECRET: []}
        assert "recommended" in jobs and "submit .dreamsweep/spec.yaml" in jobs  # what was searched is real
        assert any((cluster_logs).rglob("job-driver-*.log"))
    finally:
        import shutil

        shutil.rmtree(cluster_logs, ignore_errors=True)


def test_a_head_with_rays_token_answers_only_a_submitter_that_has_it():
    """Ray's token authentication (what clusters/ turn on): `dreamsweep` reaches the Jobs API with
    RAY_AUTH_MODE=token and the token, and without it is told, in one line, what to set."""
    from tests.integration.local_cluster import Node

    token = secrets.token_hex(32)
    cluster = new_cluster(PORT_BASE + 300)
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    ports = cluster._node_ports(0)
    dreamsweep = str(Path(sys.executable).with_name("dreamsweep"))
    try:
        cluster._ray(
            ["--head", f"--port={cluster.base_port}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
             f"--dashboard-port={cluster.base_port + 1}", f"--ray-client-server-port={cluster.base_port + 2}",
             f"--temp-dir={cluster.temp_dir}", "--num-gpus=0", "--num-cpus=1", "--disable-usage-stats",
             *(f"--{k}={v}" for k, v in ports.items())],
            env,
        )  # fmt: skip
        cluster.head = Node("head", ports["node-manager-port"], list(ports.values()))
        without = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS"))}
        listed = subprocess.run(
            [dreamsweep, "list", "--address", cluster.dashboard_url],
            env={**without, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token},
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert listed.returncode == 0 and "no sweeps ran on" in listed.stdout, listed.stderr[-2000:]
        refused = subprocess.run(
            [dreamsweep, "list", "--address", cluster.dashboard_url],
            env={**without, "RAY_AUTH_MODE": "disabled"}, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert refused.returncode == 2 and "asks for Ray's token" in refused.stderr
        assert "set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN" in refused.stderr
    finally:
        cluster.stop()
