"""Which Ray cluster a sweep runs on. Local by default; `address` joins an existing cluster.

`dreamsweep submit --address http://HEAD:8265` sends the sweep's driver to a cluster as a Ray Job
(orchestrator.run.jobs); the driver then runs on the head and joins the cluster through the
$RAY_ADDRESS that Ray Jobs sets for it. The fields below that only matter there (`shared_mounts`,
`excludes`, `autoscaling`) say what the cluster looks like to the stores check and the upload.
Logical GPUs (`num_gpus` on a CPU machine) let Ray schedule GPU-owning trials without a GPU, which is
how the tests exercise GPU scheduling.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import Field

from trainers.config_base import ConfigBase, ConfigError, build_config, load_yaml


class ClusterConfig(ConfigBase):
    # None: start a local Ray instance in this process; "auto" or "ray://host:port": join a cluster.
    address: str | None = None
    # Local instance only: the CPUs / GPUs Ray may schedule (None: what the machine has). GPUs may be
    # declared without hardware: Ray treats them as logical resources.
    num_cpus: int | None = Field(None, ge=0)
    num_gpus: float | None = Field(None, ge=0.0)
    include_dashboard: bool = False
    # Forward workers' stdout/stderr to the console. Off: the live progress view is the console.
    log_to_driver: bool = False
    # Paths mounted at the same place on every node (NFS, EFS, Filestore): Tune results may live there.
    shared_mounts: list[str] = []
    # Extra gitignore-style patterns left out of the code uploaded with a job (.gitignore is honoured).
    excludes: list[str] = []
    # Nodes join on demand (Ray's autoscaler, KubeRay): the nodes running now need not fit a trial.
    autoscaling: bool = False


def load_cluster(source: str | Path | dict[str, Any] | None) -> ClusterConfig:
    if source is None:
        return ClusterConfig()
    if isinstance(source, dict):
        return build_config(ClusterConfig, source, where="cluster")
    path = Path(source)
    if not path.suffix and not path.is_file():  # a name: one of the project's clusters/*.yaml
        path = Path(__file__).resolve().parents[2] / "clusters" / f"{source}.yaml"
    if not path.is_file():
        raise ConfigError(f"cluster: {str(path)!r} does not exist (a clusters/*.yaml file or a mapping)")
    return build_config(ClusterConfig, load_yaml(path), where=str(path))


def init_ray(cluster: ClusterConfig) -> None:
    """Start or join Ray unless this process is already connected (tests share one instance).

    No worker set-up hook: Tune starts every trial actor in a new worker process (it gives trainable
    actors a runtime_env of their own, which Ray's prestarted workers never match), so a hook that
    imports the trainer stack only moves those imports earlier inside the same cold process, and
    makes torch fix its thread count before Ray sets OMP_NUM_THREADS for the trial (measured with
    tests/benchmarks/bench_sweep_overhead.py: no faster, and 7x slower trials until
    orchestrator.run.trainable.match_torch_threads). Making Tune's actors take prestarted workers that
    imported the stack in advance needs two Ray internals (the hook's environment variable, Tune's
    actor class cache) and measured 13.1 -> 12.2 % overhead for ~0.65 GB per prestarted worker (one
    per CPU): not worth it."""
    import ray

    if ray.is_initialized():
        return
    # A Ray Job's driver (`dreamsweep submit --address`) gets its cluster's address in $RAY_ADDRESS.
    address = cluster.address or os.environ.get("RAY_ADDRESS") or None
    if address is not None:
        ray.init(address=address, log_to_driver=cluster.log_to_driver)
        return
    ray.init(
        num_cpus=cluster.num_cpus,
        num_gpus=cluster.num_gpus,
        include_dashboard=cluster.include_dashboard,
        log_to_driver=cluster.log_to_driver,
        configure_logging=False,
    )


def node_resources_text(nodes: list[dict[str, float]]) -> str:
    shown = [
        ", ".join(f"{key}={value:g}" for key, value in sorted(n.items()) if key in ("CPU", "GPU"))
        or "no CPU/GPU"
        for n in nodes
    ]
    return "; ".join(f"node {i}: {text}" for i, text in enumerate(shown)) or "no nodes"


def check_trial_fits(cpus: float, gpus: float, nodes: list[dict[str, float]], where: str) -> None:
    """Refuse a trial that no node can hold, instead of leaving it pending forever.

    `nodes`: each alive node's total resources (Ray's {"CPU": 4.0, "GPU": 1.0, ...})."""
    from trainers.config_base import ConfigError

    if any(n.get("CPU", 0.0) >= cpus and n.get("GPU", 0.0) >= gpus for n in nodes):
        return
    raise ConfigError(
        f"resources: a trial asks for cpus={cpus:g}, gpus={gpus:g}, but no node of {where} has that "
        f"({node_resources_text(nodes)}); lower resources.gpus/cpus, add a node that fits, or set "
        "cluster.autoscaling: true if the cluster starts such nodes on demand"
    )


def check_ray_fits(cpus: float, gpus: float, cluster: ClusterConfig) -> None:
    """The connected Ray cluster's alive nodes (driver side) against one trial's resources."""
    import ray

    if cluster.autoscaling:
        return
    nodes = [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]
    check_trial_fits(cpus, gpus, nodes, f"the Ray cluster at {ray.get_runtime_context().gcs_address}")
