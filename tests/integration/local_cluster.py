"""A real multi-node Ray cluster on this machine: a head and worker nodes started with `ray start`.

Every node gets its own ports (GCS, dashboard, dashboard agent, runtime-env agent, metrics, node and
object managers, worker ports) from one base port, so that several clusters (or other users' Ray)
can share the machine. Nodes are stopped by killing their own processes, never with `ray stop`
(which stops every Ray instance of the machine).
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import psutil


@functools.cache
def node_ip() -> str:
    """The address Ray picks for nodes on this machine (what `ray start` advertises)."""
    from ray.util import get_node_ip_address

    return get_node_ip_address()


def free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@dataclass
class Node:
    name: str
    node_manager_port: int
    ports: list[int]
    node_id: str | None = None

    def processes(self) -> list[psutil.Process]:
        """The raylet, its agents and its workers: every process that names this node's manager port."""
        marks = (
            f"--node_manager_port={self.node_manager_port}",
            f"--node-manager-port={self.node_manager_port}",
        )
        found = []
        for proc in psutil.process_iter(["cmdline"]):
            cmdline = " ".join(proc.info["cmdline"] or [])
            if any(mark in cmdline for mark in marks):
                found.append(proc)
        return found

    def kill(self) -> int:
        procs = self.processes()
        for proc in procs:
            try:
                proc.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(procs, timeout=10)
        return len(procs)


@dataclass
class LocalCluster:
    base_port: int
    temp_dir: Path
    head: Node | None = None
    workers: list[Node] = field(default_factory=list)
    head_pids: list[int] = field(default_factory=list)
    worker_env: dict[str, str] = field(default_factory=dict)
    common = ("--num-cpus=1", "--object-store-memory=80000000", "--disable-usage-stats")  # every node

    @property
    def gcs_address(self) -> str:
        return f"{node_ip()}:{self.base_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.base_port + 1}"

    def _ray(self, args: list[str], env: dict[str, str]) -> None:
        ray = Path(sys.executable).with_name("ray")
        proc = subprocess.run(
            [str(ray), "start", *args], env=env, capture_output=True, text=True, timeout=120
        )
        if proc.returncode != 0:
            raise RuntimeError(f"ray start {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")

    def marker(self, index: int) -> str:
        return f"test_node_w{index}"

    def worker_node_ids(self) -> dict[str, Node]:
        """Ray node id -> worker Node, from the head's state API."""
        from ray.util.state import list_nodes

        by_marker = {self.marker(i + 1): node for i, node in enumerate(self.workers)}
        found = {}
        for state in list_nodes(address=self.dashboard_url, detail=True):
            for key in state.resources_total or {}:
                if key in by_marker:
                    found[state.node_id] = by_marker[key]
        return found

    def _node_ports(self, index: int) -> dict[str, int]:
        # 20 ports per node from the base: index 0 the head.
        b = self.base_port + 20 * index
        return {
            "node-manager-port": b + 3,
            "object-manager-port": b + 4,
            "dashboard-agent-listen-port": b + 5,
            "dashboard-agent-grpc-port": b + 6,
            "runtime-env-agent-port": b + 7,
            "metrics-export-port": b + 8,
            "min-worker-port": b + 10,
            "max-worker-port": b + 19,
        }

    def start(self, workers: int, env: dict[str, str] | None = None) -> None:
        env = {
            **os.environ,
            # The head's workspace (the registry of the sweeps its jobs ran), inside this cluster's folder.
            "DREAMSWEEP_WORKSPACE": str(self.temp_dir / "head-workspace"),
            **(env or {}),
            # A Ray Job's entrypoint (`python -m orchestrator.cli ...`) runs the `python` on the node's
            # PATH, as on a real cluster. Here that must be the suite's own interpreter, also when the
            # suite runs without its venv activated (the system Python lacks the project's packages).
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_AUTH_MODE": "disabled",
        }
        env.pop("RAY_ADDRESS", None)
        busy = [p for p in range(self.base_port, self.base_port + 20) if not free(p)]
        if busy:
            raise RuntimeError(f"ports in use, pick another base port: {busy[:5]}")
        head_ports = self._node_ports(0)
        self._ray(
            [
                "--head",
                f"--port={self.base_port}",
                "--include-dashboard=true",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={self.base_port + 1}",
                f"--ray-client-server-port={self.base_port + 2}",
                f"--temp-dir={self.temp_dir}",
                "--num-gpus=0",
                *self.common,
                *(f"--{k}={v}" for k, v in head_ports.items()),
            ],
            env,
        )
        self.head = Node("head", head_ports["node-manager-port"], list(head_ports.values()))
        self.worker_env = env
        for _ in range(workers):
            self.add_worker()

    def add_worker(self) -> Node:
        """Start one more worker node (one logical GPU, one CPU), as a cluster replaces a lost machine."""
        i = len(self.workers) + 1
        ports = self._node_ports(i)
        busy = [p for p in range(self.base_port + 20 * i, self.base_port + 20 * (i + 1)) if not free(p)]
        if busy:
            raise RuntimeError(f"ports in use, pick another base port: {busy[:5]}")
        self._ray(
            [
                f"--address={self.gcs_address}",
                "--num-gpus=1",
                # A temp dir per node, as separate machines have: nodes sharing one would share
                # its runtime_resources, and a node unpacking a job's working_dir again would
                # replace the folder the driver on the head runs in.
                f"--temp-dir={self.temp_dir / f'w{i}'}",
                # A resource named after the node, so that tests can tell its Ray node id.
                f'--resources={{"{self.marker(i)}": 1}}',
                *self.common,
                *(f"--{k}={v}" for k, v in ports.items()),
            ],
            self.worker_env,
        )
        node = Node(f"worker{i}", ports["node-manager-port"], list(ports.values()))
        self.workers.append(node)
        return node

    def stop(self) -> None:
        """Kill every process of this cluster: the nodes' and the head's GCS, dashboard and monitors."""
        for node in [*self.workers, *([self.head] if self.head else [])]:
            node.kill()
        # The head's other processes name its temp dir, its GCS port or its client-server port.
        mine = re.compile(rf"{re.escape(str(self.temp_dir))}|[:=]({self.base_port}|{self.base_port + 2})\b")
        procs = []
        for proc in psutil.process_iter(["cmdline"]):
            if mine.search(" ".join(proc.info["cmdline"] or [])) and proc.pid != os.getpid():
                procs.append(proc)
        for proc in procs:
            try:
                proc.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(procs, timeout=10)
        if os.environ.get("DREAMSWEEP_KEEP_CLUSTER_LOGS") != "1":  # 1: keep the nodes' logs to read
            shutil.rmtree(self.temp_dir, ignore_errors=True)


def new_cluster(base_port: int) -> LocalCluster:
    # Short path: Ray's unix sockets live under the temp dir (path length limit ~107 bytes).
    return LocalCluster(base_port, Path(tempfile.mkdtemp(prefix=f"ds{base_port}-", dir="/tmp")))
