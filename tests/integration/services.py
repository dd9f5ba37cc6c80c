"""Real services for the integration tests, started on 127.0.0.1 and stopped afterwards:
PostgreSQL (Debian's package, a throw-away cluster made with initdb) and an `mlflow server` on it."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path


def postgres_bin() -> Path | None:
    """The directory holding initdb/pg_ctl (Debian keeps them out of PATH)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _as_postgres(command: list[str]) -> list[str]:
    # initdb and the server refuse to run as root: use Debian's `postgres` user then.
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


@dataclass
class Postgres:
    port: int
    data: Path
    bin: Path

    def url(self, database: str, user: str = "postgres") -> str:
        # The plain scheme, as the README writes it (dreamsweep picks the driver: orchestrator.spec.secrets).
        return f"postgresql://{user}@127.0.0.1:{self.port}/{database}"

    def psql(self, sql: str) -> None:
        """Run `sql` as the superuser, given on stdin (a password in it never appears in a process list)."""
        subprocess.run(
            [str(self.bin / "psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-q",
             "-v", "ON_ERROR_STOP=1"],
            input=sql, text=True, check=True, capture_output=True, timeout=60,
        )  # fmt: skip

    def create_database(self, name: str, owner: str = "postgres") -> str:
        self.psql(f"CREATE DATABASE {name} OWNER {owner}")
        return self.url(name, owner)

    def create_role_with_password(self, name: str, password: str) -> None:
        """A role that must give its password (SCRAM) over TCP; the others keep the test cluster's trust."""
        self.psql(f"CREATE ROLE {name} LOGIN PASSWORD '{password}'")
        hba = self.data / "pg_hba.conf"
        hba.write_text(f"host all {name} 127.0.0.1/32 scram-sha-256\n" + hba.read_text())
        subprocess.run(
            _as_postgres([str(self.bin / "pg_ctl"), "-D", str(self.data), "reload"]),
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip

    def stop(self) -> None:
        subprocess.run(
            _as_postgres([str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop"]),
            capture_output=True, timeout=60,
        )  # fmt: skip
        shutil.rmtree(self.data.parent, ignore_errors=True)


def start_postgres(port: int) -> Postgres:
    bin_dir = postgres_bin()
    if bin_dir is None:
        raise FileNotFoundError("PostgreSQL is not installed: apt-get install postgresql (.ci/run does)")
    root = Path(tempfile.mkdtemp(prefix="ds-pg-"))
    data, sockets = root / "data", root / "sock"
    sockets.mkdir()
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
        shutil.chown(sockets, "postgres")
    subprocess.run(
        _as_postgres([str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"]),
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    options = f"-p {port} -k {sockets} -c listen_addresses=127.0.0.1 -c fsync=off"
    started = subprocess.run(
        _as_postgres([str(bin_dir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(root / "log"), "-w",
                      "-t", "60", "start"]),
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    if started.returncode != 0:
        log = (root / "log").read_text()[-2000:] if (root / "log").exists() else ""
        raise RuntimeError(f"PostgreSQL did not start on port {port}: {started.stderr}\n{log}")
    return Postgres(port, data, bin_dir)


@dataclass
class MlflowServer:
    url: str
    process: subprocess.Popen
    root: Path

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
        shutil.rmtree(self.root, ignore_errors=True)


def start_mlflow_server(
    port: int, backend: str, env: dict[str, str] | None = None, app: str | None = None
) -> MlflowServer:
    """`mlflow server` with `backend` as its store and a local artifact root served through it.

    --allowed-hosts: MLflow 3.5+ answers only Host headers it allows (DNS-rebinding protection);
    workers on other nodes reach the server by the head's address, which must be listed. `env`: the
    server's own (its database password, its basic-auth settings); `app`: its --app-name. It runs in
    its folder (where MLflow's basic-auth keeps its user store)."""
    root = Path(tempfile.mkdtemp(prefix="ds-mlflow-"))
    command = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", backend,
        "--artifacts-destination", str(root / "artifacts"),
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        "--allowed-hosts", f"127.0.0.1:{port},localhost:{port}",
        *(["--app-name", app] if app else []),
    ]  # fmt: skip
    log = open(root / "server.log", "w")
    process = subprocess.Popen(
        command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=root,
        env={**os.environ, **(env or {})},
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180  # schema migrations on PostgreSQL take a while on a busy machine
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return MlflowServer(url, process, root)
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"mlflow server did not start: {(root / 'server.log').read_text()[-3000:]}")
        time.sleep(0.5)
