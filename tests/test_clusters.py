"""The way to a cluster, short of a cluster: the configs in clusters/, which stores a cluster accepts,
what is uploaded with a job, and how an unreachable or wrong address is reported."""

from __future__ import annotations

import re
import socket
import subprocess
import threading
import time
from pathlib import Path

import jsonschema
import pytest
import yaml

import orchestrator.run.jobs as jobs
from orchestrator.cli import main
from orchestrator.errors import ClusterError
from orchestrator.internals import ray_cluster_schema
from orchestrator.run.cluster import ClusterConfig, check_trial_fits, load_cluster
from orchestrator.run.stores import check_stores_for_cluster, engine_kwargs
from orchestrator.spec.spec import SpecError, Storage, load_sweep_spec
from trainers.config_base import ConfigError

CLUSTERS = Path(__file__).resolve().parents[1] / "clusters"
SHARED = ClusterConfig(shared_mounts=["/mnt/shared"])
GOOD = {"tune": "/mnt/shared/ray_results", "mlflow": "http://mlflow.internal:5000"}
# Ports in this project's test range (see tests/integration/conftest.py) that nothing listens on.
REFUSING_PORT, SILENT_PORT = 22951, 22950


# -- clusters/ -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["aws", "gcp"])
def test_cluster_launcher_configs_pass_rays_schema_with_an_autoscaling_gpu_worker(name):
    config = yaml.safe_load((CLUSTERS / f"{name}.yaml").read_text())
    jsonschema.validate(config, ray_cluster_schema())
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}  # trials never land on the head
    (gpu_name, gpu), *others = [(k, v) for k, v in types.items() if k != config["head_node_type"]]
    assert not others and gpu["min_workers"] == 0 < gpu["max_workers"] <= config["max_workers"]
    node = yaml.safe_dump(gpu["node_config"]).lower()
    assert ("spot" in node) and any(gpu_kind in node for gpu_kind in ("a100", "p4d", "h100", "p5"))
    assert any("pip install" in c and "-e /home/ubuntu/dreamsweep" in c for c in config["setup_commands"])
    start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in start and "mlflow server" in start and "--allowed-hosts" in start
    assert any("postgresql" in c for c in config["head_setup_commands"])
    # Every node reads the cluster's secrets before `ray start`: Ray's token, MLflow's credentials.
    starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    assert all(". ~/.dreamsweep/cluster.env" in c for c in starts if "ray start" in c)


def _check_ray_cluster_spec(spec: dict) -> None:
    head = spec["headGroupSpec"]
    assert spec["authOptions"]["mode"] == "token"  # the dashboard on the pod's address asks for Ray's token
    assert head["template"]["spec"]["containers"][0]["image"]
    (group,) = spec["workerGroupSpecs"]
    assert group["groupName"] and 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    assert "rayStartParams" in group
    pod = group["template"]["spec"]
    limits = pod["containers"][0]["resources"]["limits"]
    assert int(limits["nvidia.com/gpu"]) >= 1
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert spec["enableInTreeAutoscaling"] is True


def test_kuberay_raycluster_has_an_autoscaling_gpu_group():
    (doc,) = yaml.safe_load_all((CLUSTERS / "kuberay" / "raycluster.yaml").read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayCluster" and doc["metadata"]["name"]
    _check_ray_cluster_spec(doc["spec"])


def test_kuberay_rayjob_runs_a_sweep_spec_whose_stores_a_cluster_reaches():
    config_map, job = yaml.safe_load_all((CLUSTERS / "kuberay" / "rayjob.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    assert job["spec"]["entrypoint"].startswith("python -m orchestrator.cli submit /config/sweep.yaml")
    _check_ray_cluster_spec(job["spec"]["rayClusterSpec"])
    volumes = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["volumes"]
    assert {"name": "sweep", "configMap": {"name": config_map["metadata"]["name"]}} in volumes
    spec = load_sweep_spec(yaml.safe_load(config_map["data"]["sweep.yaml"]), check=False)
    check_stores_for_cluster(spec.storage, load_cluster(spec.cluster), "http://head:8265")


# -- clusters/ expose nothing without authentication, and hold no password --------------------------

CONFIG_FILES = sorted(p for p in CLUSTERS.rglob("*") if p.is_file())


def _documents(path: Path) -> list:
    return list(yaml.safe_load_all(path.read_text())) if path.suffix == ".yaml" else []


def _walk(node, found: list) -> list:
    """Every mapping in a YAML document."""
    if isinstance(node, dict):
        found.append(node)
        for value in node.values():
            _walk(value, found)
    elif isinstance(node, list):
        for value in node:
            _walk(value, found)
    return found


def exposed_without_authentication(path: Path) -> list[str]:
    """What in a config binds the Ray dashboard or an MLflow server to every interface (0.0.0.0) with no
    authentication in front: Ray's token (KubeRay's authOptions), MLflow's basic-auth."""
    problems = []
    for document in _documents(path):
        mappings = _walk(document, [])
        token = any((m.get("authOptions") or {}).get("mode") == "token" for m in mappings)
        for mapping in mappings:
            params = mapping.get("rayStartParams")
            if isinstance(params, dict) and params.get("dashboard-host") == "0.0.0.0" and not token:
                problems.append(f"{path.name}: dashboard-host 0.0.0.0 without authOptions.mode: token")
        commands = [
            c
            for m in mappings
            for key in ("head_start_ray_commands", "worker_start_ray_commands")
            for c in (m.get(key) or [])
        ]
        for command in commands:
            if "ray start" in command and re.search(r"--dashboard-host[ =]0\.0\.0\.0", command):
                problems.append(f"{path.name}: `ray start` binds the dashboard to 0.0.0.0")
            if "mlflow server" in command and "basic-auth" not in command:
                problems.append(f"{path.name}: an `mlflow server` without authentication")
            if re.search(r"mlflow server.*--host[ =]0\.0\.0\.0", command) and "basic-auth" not in command:
                problems.append(f"{path.name}: `mlflow server --host 0.0.0.0` without basic-auth")
    return problems


SECRET_NAME = re.compile(r"PASSWORD|TOKEN|SECRET", re.IGNORECASE)


def literal_passwords(path: Path) -> list[str]:
    """Passwords written into a config: in a URL, an SQL `PASSWORD '...'`, a `--from-literal`, or a
    Kubernetes env entry that is not a secretKeyRef."""
    from orchestrator.spec.secrets import literal_password

    text, problems = path.read_text(), []
    for url in re.findall(r"[a-z][a-z0-9+.-]*://[^\s\"'`)]+", text):
        if literal_password(url):
            problems.append(f"{path.name}: a password in the URL {url}")
    for value in re.findall(r"PASSWORD\s+'([^']*)'", text, flags=re.IGNORECASE):
        if value != "%s":
            problems.append(f"{path.name}: SQL PASSWORD '{value}'")
    for key, value in re.findall(r"--from-literal=([\w.-]+)=(\S+)", text):
        if SECRET_NAME.search(key) or key == "auth_token":
            if not value.startswith('"$('):  # generated on the spot, e.g. "$(openssl rand -hex 24)"
                problems.append(f"{path.name}: --from-literal={key} with a written value")
    for document in _documents(path):
        for mapping in _walk(document, []):
            if "name" in mapping and SECRET_NAME.search(str(mapping["name"])) and "value" in mapping:
                problems.append(f"{path.name}: env {mapping['name']} has a literal value")
            if "secretKeyRef" in mapping:
                assert mapping["secretKeyRef"].get("name"), path
    return problems


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: str(p.relative_to(CLUSTERS)))
def test_no_config_exposes_a_service_without_authentication_or_holds_a_password(path):
    assert exposed_without_authentication(path) == []
    assert literal_passwords(path) == []


def test_the_checks_find_what_the_old_configs_had(tmp_path):
    """The checks above fail on the configs this project shipped before (dashboard and MLflow on
    0.0.0.0 with no authentication, the PostgreSQL password `dreamsweep` in SQL and in a URL)."""
    old = tmp_path / "aws.yaml"
    old.write_text(
        yaml.safe_dump(
            {
                "head_setup_commands": [
                    "sudo -u postgres psql -c \"CREATE ROLE dreamsweep LOGIN PASSWORD 'dreamsweep'\""
                ],
                "head_start_ray_commands": [
                    "ray start --head --port=6379 --dashboard-host=0.0.0.0",
                    "nohup mlflow server --host 0.0.0.0 --port 5000 "
                    "--backend-store-uri postgresql://dreamsweep:dreamsweep@127.0.0.1/mlflow",
                ],
            }
        )
    )
    assert len(exposed_without_authentication(old)) == 3
    assert len(literal_passwords(old)) == 2
    kuberay = tmp_path / "raycluster.yaml"
    kuberay.write_text(
        yaml.safe_dump(
            {
                "spec": {
                    "headGroupSpec": {
                        "rayStartParams": {"dashboard-host": "0.0.0.0"},
                        "template": {
                            "spec": {"containers": [{"env": [{"name": "PGPASSWORD", "value": "x"}]}]}
                        },
                    }
                }
            }
        )
    )
    assert exposed_without_authentication(kuberay) and literal_passwords(kuberay)


def test_the_cluster_secrets_are_generated_and_turn_on_rays_token():
    from orchestrator.run.cluster_secrets import cluster_secrets

    first, second = cluster_secrets(), cluster_secrets()
    assert first["RAY_AUTH_MODE"] == "token"
    for key in (
        "RAY_AUTH_TOKEN",
        "DREAMSWEEP_PG_PASSWORD",
        "MLFLOW_TRACKING_PASSWORD",
        "MLFLOW_FLASK_SERVER_SECRET_KEY",
    ):
        assert len(first[key]) >= 48 and first[key] != second[key], key
    # What each launcher config sources: every key it uses is one the secret holds.
    for name in ("aws", "gcp"):
        text = (CLUSTERS / f"{name}.yaml").read_text()
        used = set(re.findall(r"\$\{?([A-Z][A-Z0-9_]+)", text)) - {"RAY_HEAD_IP", "HEAD_IP"}
        assert used <= set(first), used - set(first)


def test_local_cluster_is_the_embedded_default():
    assert load_cluster("local") == load_cluster(None) == ClusterConfig()


# -- stores ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "storage, field, fix",
    [
        ({"mlflow": GOOD["mlflow"]}, "storage.tune: not set", "s3://bucket/prefix"),
        ({**GOOD, "tune": "/home/me/ray_results"}, "storage.tune: '/home/me/ray_results'", "['/mnt/shared']"),
        ({"tune": GOOD["tune"]}, "storage.mlflow: 'not set", "http(s)://HOST:PORT"),
        ({**GOOD, "mlflow": "sqlite:////mnt/shared/mlflow.db"}, "storage.mlflow: 'sqlite", "mlflow server"),
        ({**GOOD, "mlflow": "http://127.0.0.1:5000"}, "loopback address", "cluster-wide host name"),
        (
            {**GOOD, "optuna": "sqlite:////mnt/shared/optuna.db"},
            "shared mount '/mnt/shared'",
            "postgresql://",
        ),
        ({**GOOD, "optuna": "redis://db:6379"}, "storage.optuna: 'redis://db:6379'", "postgresql://"),
    ],
)
def test_stores_a_cluster_cannot_reach_are_refused_naming_field_and_fix(storage, field, fix):
    with pytest.raises(SpecError) as error:
        check_stores_for_cluster(Storage(**storage), SHARED, "http://head.internal:8265")
    assert field in str(error.value) and fix in str(error.value)


@pytest.mark.parametrize(
    "storage",
    [
        GOOD,
        {**GOOD, "tune": "s3://bucket/sweeps", "optuna": "postgresql://u@db.internal/optuna"},
        {**GOOD, "tune": "gs://bucket/sweeps", "optuna": "sqlite:////var/lib/dreamsweep/optuna.db"},
        {**GOOD, "optuna": "mysql+pymysql://u@db/optuna"},
    ],
)
def test_stores_every_node_reaches_are_accepted(storage):
    check_stores_for_cluster(Storage(**storage), SHARED, "http://head.internal:8265")


def test_database_servers_get_pre_ping_and_recycled_pooled_connections():
    pg = engine_kwargs("postgresql+psycopg2://u@db/optuna")
    assert pg["pool_pre_ping"] is True and 0 < pg["pool_recycle"] <= 600
    assert engine_kwargs("sqlite:///x.db") == {"connect_args": {"timeout": 60}}


def test_a_trial_no_node_holds_is_refused_with_the_nodes_resources():
    nodes = [{"CPU": 1.0}, {"CPU": 1.0, "GPU": 1.0, "memory": 1e9}]
    check_trial_fits(1, 1, nodes, "the cluster")
    with pytest.raises(ConfigError) as error:
        check_trial_fits(1, 2, nodes, "the cluster at X")
    assert "gpus=2" in str(error.value) and "node 0: CPU=1; node 1: CPU=1, GPU=1" in str(error.value)


# -- addresses and submission ----------------------------------------------------------------------


def test_the_address_comes_from_the_flag_then_the_environment(monkeypatch):
    monkeypatch.delenv(jobs.ADDRESS_ENV, raising=False)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")  # what a job's own driver sees: not a Jobs address
    assert jobs.resolve_address(None) is None
    monkeypatch.setenv("RAY_ADDRESS", "http://head:8265/")
    assert jobs.resolve_address(None) == "http://head:8265"
    monkeypatch.setenv(jobs.ADDRESS_ENV, "http://other:8265")
    assert jobs.resolve_address(None) == "http://other:8265"
    assert jobs.resolve_address("https://given:8265") == "https://given:8265"
    with pytest.raises(ClusterError, match="http://HEAD:8265"):
        jobs.resolve_address("ray://head:10001")


def _import_the_clients() -> None:
    # The bound is on waiting for the cluster, not on importing Ray's client on a loaded machine.
    import ray.job_submission  # noqa: F401
    import requests  # noqa: F401


def test_a_port_that_refuses_is_reported_quickly(capsys):
    _import_the_clients()
    started = time.monotonic()
    assert main(["list", "--address", f"http://127.0.0.1:{REFUSING_PORT}"]) == 2
    assert time.monotonic() - started < 10
    assert f"cannot reach the Ray cluster at http://127.0.0.1:{REFUSING_PORT}" in capsys.readouterr().err


def test_an_address_that_accepts_but_never_answers_is_reported_within_10_s(capsys):
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", SILENT_PORT))
    listener.listen(8)
    accepted = []
    stop = threading.Event()

    def accept_and_say_nothing():
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except OSError:
                pass

    thread = threading.Thread(target=accept_and_say_nothing, daemon=True)
    thread.start()
    _import_the_clients()
    try:
        started = time.monotonic()
        assert main(["status", "any", "--address", f"http://127.0.0.1:{SILENT_PORT}"]) == 2
        elapsed = time.monotonic() - started
    finally:
        stop.set()
        thread.join()
        for conn in accepted:
            conn.close()
        listener.close()
    assert accepted and elapsed < 10
    assert "did not answer within" in capsys.readouterr().err


def test_a_local_only_store_with_a_remote_address_is_refused_before_any_upload(tmp_path, monkeypatch, capsys):
    def forbidden(*args, **kwargs):
        raise AssertionError("contacted the cluster or staged an upload for a spec it must refuse")

    monkeypatch.setattr(jobs, "connect", forbidden)
    monkeypatch.setattr(jobs, "stage", forbidden)
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        yaml.safe_dump({"name": "local-stores", "kind": "fanout", "prompts": {"items": ["a red cube"]}})
    )
    assert main(["submit", str(spec), "--address", "http://head.internal:8265"]) == 2
    err = capsys.readouterr().err
    assert "storage.tune: not set" in err and "shared_mounts" in err


# -- what a job uploads ----------------------------------------------------------------------------


def test_the_upload_is_the_project_as_git_sees_it_minus_excludes(tmp_path):
    root = tmp_path / "project"
    (root / "pkg").mkdir(parents=True)
    (root / "pkg" / "code.py").write_text("x = 1\n")
    (root / "notes.md").write_text("untracked but not ignored\n")
    (root / "big.ckpt").write_bytes(b"0" * 1000)
    (root / "dreamsweep-workspace").mkdir()
    (root / "dreamsweep-workspace" / "mlflow.db").write_text("local store")
    (root / "mlruns" / "1").mkdir(parents=True)
    (root / "mlruns" / "1" / "model.bin").write_text("MLflow's default local store")
    (root / "data").mkdir()
    (root / "data" / "cache.bin").write_text("excluded by cluster.excludes")
    (root / ".gitignore").write_text("*.ckpt\n")
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run(["git", "add", "pkg", ".gitignore"], cwd=root, check=True)
    files = {p.as_posix() for p in jobs.project_files(root, ["data"])}
    assert files == {".gitignore", "pkg/code.py", "notes.md"}


def test_a_project_over_the_upload_limit_is_refused_naming_its_largest_files(tmp_path, monkeypatch):
    root = tmp_path / "project"
    root.mkdir()
    (root / "code.py").write_text("x = 1\n")
    (root / "renders.npz").write_bytes(b"0" * 5000)
    monkeypatch.setattr(jobs, "upload_limit_bytes", lambda: 4096)
    with pytest.raises(ClusterError, match=r"renders\.npz .*add them to \.gitignore or cluster\.excludes"):
        jobs.stage(None, [], root=root)


def test_the_upload_limit_is_the_dashboards_request_limit_where_that_is_lower():
    # The Jobs API uploads the package through the head's dashboard; over its request limit: HTTP 413.
    from ray._private.ray_constants import DASHBOARD_CLIENT_MAX_SIZE

    assert jobs.upload_limit_bytes() <= DASHBOARD_CLIENT_MAX_SIZE


def test_the_job_carries_a_self_contained_spec(tmp_path):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({"max_steps": 7}))
    (tmp_path / "prompts.txt").write_text("a red cube\na blue ball\na green torus\n")
    spec = load_sweep_spec(
        {
            "name": "portable",
            "kind": "fanout",
            "base": str(tmp_path / "base.yaml"),
            "prompts": {"path": str(tmp_path / "prompts.txt"), "select": {"indices": [2, 0]}},
            "storage": GOOD,
            "cluster": {"shared_mounts": ["/mnt/shared"], "address": "ignored"},
        }
    )
    staged = jobs.stage(spec, [], runtime={"report_every_s": 1.0})
    try:
        carried = yaml.safe_load((staged / jobs.SPEC_IN_JOB).read_text())
        assert (staged / "orchestrator" / "run" / "jobs.py").is_file()
        assert not (staged / ".git").exists()
    finally:
        import shutil

        shutil.rmtree(staged)
    assert carried["base"] == {"max_steps": 7}
    assert carried["prompts"] == {"items": ["a green torus", "a red cube"]}
    assert carried["cluster"]["shared_mounts"] == ["/mnt/shared"] and "address" not in carried["cluster"]
    assert load_sweep_spec(carried).name == "portable"  # loads on the head without the laptop's files
