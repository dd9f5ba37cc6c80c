"""Fixtures of the integration tests: real PostgreSQL, a real `mlflow server` on it, and real
multi-node Ray clusters on this machine, each started here and always stopped afterwards.

Ports: DREAMSWEEP_TEST_PORT_BASE (default 22000) and up to +999, so that parallel users of one
machine can keep apart. PostgreSQL missing: the tests skip, unless DREAMSWEEP_REQUIRE_SERVICES=1
(.ci/run sets it, after installing it), when they fail instead.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from tests.integration.local_cluster import LocalCluster, new_cluster
from tests.integration.services import postgres_bin, start_mlflow_server, start_postgres

PORT_BASE = int(os.environ.get("DREAMSWEEP_TEST_PORT_BASE", "22000"))
FAKE_STEP_S = "0.1"  # the fake trainer's seconds per step on the clusters' workers


def _require_postgres() -> None:
    if postgres_bin() is None:
        message = "PostgreSQL is not installed (apt-get install postgresql; .ci/run installs it)"
        if os.environ.get("DREAMSWEEP_REQUIRE_SERVICES") == "1":
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="session")
def postgres():
    _require_postgres()
    server = start_postgres(PORT_BASE + 900)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def mlflow_server(postgres):
    server = start_mlflow_server(PORT_BASE + 901, postgres.create_database("mlflow"))
    try:
        yield server
    finally:
        server.stop()


@contextmanager
def own_cluster(offset: int) -> Iterator[LocalCluster]:
    """A head and two worker nodes on ports PORT_BASE + offset..., stopped on the way out (a failed
    start included)."""
    cluster = new_cluster(PORT_BASE + offset)
    try:
        cluster.start(workers=2, env={"DREAMSWEEP_FAKE_STEP_S": FAKE_STEP_S})
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def cluster():
    """A head (no GPU) and two worker nodes with one logical GPU and one CPU each."""
    with own_cluster(0) as cluster:
        yield cluster
