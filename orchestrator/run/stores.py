"""Which store is reachable from where, and the database settings that keep long sweeps connected.

On one machine every store may be a local file. On a cluster the three stores are written from
different places, so `check_stores_for_cluster` refuses, before anything is uploaded, a spec whose
stores the writers cannot reach:

| store   | written by                                   | must be                                          |
|---------|----------------------------------------------|--------------------------------------------------|
| tune    | every trial worker (checkpoints), the driver | s3://, gs://, or a path under a shared mount     |
| mlflow  | every trial worker (metrics, artifacts)      | a tracking server, http(s)://, that workers reach |
| optuna  | the driver only (on the head, for a Ray Job) | PostgreSQL/MySQL, or SQLite on the head's disk   |
"""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Any
from urllib.parse import urlparse

from orchestrator.run.cluster import ClusterConfig
from orchestrator.spec.secrets import check_no_literal_secrets, redact_url
from orchestrator.spec.spec import SpecError, Storage

CLOUD_SCHEMES = ("s3", "gs", "gcs", "abfs", "az")
SERVER_DATABASES = ("postgresql", "mysql")
LOOPBACK = ("localhost", "127.0.0.1", "::1", "0.0.0.0")


def engine_kwargs(url: str) -> dict[str, Any]:
    """SQLAlchemy engine settings for an Optuna storage URL.

    SQLite: a busy timeout (the driver and `dreamsweep status` may touch the file at once).
    A database server: check each pooled connection before use and recycle it well before the
    server's or a load balancer's idle timeout, so a sweep that waits an hour between trials does not
    fail on a dropped connection; a small pool, since only the driver writes the study."""
    scheme = urlparse(url).scheme.split("+")[0]
    if scheme == "sqlite":
        return {"connect_args": {"timeout": 60}}
    if scheme in SERVER_DATABASES:
        return {"pool_pre_ping": True, "pool_recycle": 300, "pool_size": 2, "max_overflow": 4}
    return {}


def _under(path: str, mounts: list[str]) -> str | None:
    candidate = PurePosixPath(path)
    for mount in mounts:
        if candidate == PurePosixPath(mount) or PurePosixPath(mount) in candidate.parents:
            return mount
    return None


def _host(url: str) -> str:
    return (urlparse(url).hostname or "").lower()


def check_stores_for_cluster(storage: Storage, cluster: ClusterConfig, address: str) -> None:
    """Raise SpecError naming the field and the fix for a store that a cluster's writers cannot reach.

    `storage` is the spec's; a store left unset would be a file in the head's workspace. A URL with a
    literal password is refused: it would travel in the job's upload, and the head holds the secret."""
    check_no_literal_secrets(
        storage,
        ("optuna", "mlflow"),
        "which would travel to the cluster in the job's upload; the driver on the head takes it from the "
        "head's environment",
    )
    mounts = cluster.shared_mounts
    hint_mounts = f"cluster.shared_mounts lists {mounts}" if mounts else "cluster.shared_mounts declares none"
    tune = redact_url(storage.tune)
    if tune is None:
        raise SpecError(
            "storage.tune: not set, so Tune's results would be a folder on the head, which workers on "
            "other nodes cannot write their checkpoints to; set it to s3://bucket/prefix, gs://bucket/prefix "
            f"or a path under a file system mounted on every node ({hint_mounts})"
        )
    scheme = urlparse(tune).scheme
    if scheme not in CLOUD_SCHEMES:
        if scheme not in ("", "file") or _under(urlparse(tune).path or tune, mounts) is None:
            raise SpecError(
                f"storage.tune: {tune!r} is not shared storage; use s3://, gs:// or a path under a "
                f"mount that every node has ({hint_mounts}; add the mount there if it is one)"
            )

    mlflow = redact_url(storage.mlflow)
    if mlflow is None or urlparse(mlflow).scheme not in ("http", "https"):
        raise SpecError(
            f"storage.mlflow: {mlflow or 'not set (a SQLite file in the workspace)'!r} is not a tracking "
            "server; trial workers log metrics and artifacts from their own nodes, so set it to "
            "http(s)://HOST:PORT of an `mlflow server` they reach (see README: Clusters)"
        )
    if _host(mlflow) in LOOPBACK and _host(address) not in LOOPBACK:
        raise SpecError(
            f"storage.mlflow: {mlflow!r} is this machine's loopback address, which on every node of the "
            f"cluster at {address} means that node itself; use the server's cluster-wide host name"
        )

    optuna = redact_url(storage.optuna)
    if optuna is None:
        return  # SQLite in the head's workspace: the driver runs on the head
    scheme = urlparse(optuna).scheme.split("+")[0]
    if scheme == "sqlite":
        path = optuna.split(":///", 1)[-1]
        mount = _under("/" + path.lstrip("/"), mounts)
        if mount is not None:
            raise SpecError(
                f"storage.optuna: {optuna!r} is a SQLite file on the shared mount {mount!r}; SQLite's "
                "locking is unreliable on network file systems: put it on the head's local disk "
                "(or leave storage.optuna out) or use postgresql://"
            )
        return
    if scheme not in SERVER_DATABASES:
        raise SpecError(
            f"storage.optuna: {optuna!r}: use postgresql://, mysql:// or sqlite:/// on the head's local disk"
        )
    # A database host is resolved by the driver, on the head: 127.0.0.1 there is the head itself.
