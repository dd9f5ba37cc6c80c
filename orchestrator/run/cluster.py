"""Which Ray cluster a sweep runs on. Local by default; `address` joins an existing cluster.

`dreamsweep submit --address ray://head:10001` (the clusters issue) only has to fill `address`;
everything below already takes it. Logical GPUs (`num_gpus` on a CPU machine) let Ray schedule
GPU-owning trials without a GPU, which is how the tests exercise GPU scheduling.
"""

from __future__ import annotations

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


def load_cluster(source: str | Path | dict[str, Any] | None) -> ClusterConfig:
    if source is None:
        return ClusterConfig()
    if isinstance(source, dict):
        return build_config(ClusterConfig, source, where="cluster")
    path = Path(source)
    if not path.suffix and not path.is_file():  # a name: one of the project's clusters/*.yaml
        path = Path(__file__).resolve().parents[1] / "clusters" / f"{source}.yaml"
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
    if cluster.address is not None:
        ray.init(address=cluster.address, log_to_driver=cluster.log_to_driver)
        return
    ray.init(
        num_cpus=cluster.num_cpus,
        num_gpus=cluster.num_gpus,
        include_dashboard=cluster.include_dashboard,
        log_to_driver=cluster.log_to_driver,
        configure_logging=False,
    )
