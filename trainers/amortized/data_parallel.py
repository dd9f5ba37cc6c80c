"""The amortized loop on N Ray Train workers: TorchTrainer with DDP (gloo on CPU, nccl on GPU).

    result = fit(config)                          # data_parallel.num_workers ranks, one process each

The one Ray piece beside the trainer: it builds the TorchTrainer, and each worker runs `loop.train`
with its global rank and the world size (the loop does the sharding and the DDP wrapping). Every rank
reports to Ray Train at the same steps (a Train V2 report is a collective); rank 0 attaches the
checkpoint, which Ray Train persists under `<output_dir>/ray_train/<run name>`. A worker group that
fails restarts from it (`data_parallel.max_failures`), and a new `fit` with the same output dir
continues from it too, at the step it recorded.

Only Ray Train's public API is used here (Train V2: the default in the installed Ray).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from trainers.amortized.config import AmortizedConfig
from trainers.config import config_to_dict

log = logging.getLogger(__name__)

RUN_NAME = "amortized"


class ClusterTooSmallError(RuntimeError):
    """The data-parallel layout asks for more than the Ray cluster has."""


def wants_gpu(config: AmortizedConfig, cluster: dict[str, float]) -> bool:
    use = config.data_parallel.use_gpu
    return bool(cluster.get("GPU", 0) > 0) if use == "auto" else bool(use)


def check_resources(config: AmortizedConfig, cluster: dict[str, float]) -> None:
    """Refuse a world size the cluster cannot hold, naming the cluster's resources (a pure function)."""
    dp = config.data_parallel
    n = dp.num_workers
    have = f"CPU={cluster.get('CPU', 0):g}, GPU={cluster.get('GPU', 0):g}"
    if wants_gpu(config, cluster) and cluster.get("GPU", 0) < n:
        raise ClusterTooSmallError(
            f"data_parallel.num_workers={n} needs {n} GPUs (one per worker); the Ray cluster has {have}: "
            "lower data_parallel.num_workers or add GPU nodes"
        )
    if cluster.get("CPU", 0) < n * dp.cpus_per_worker:
        raise ClusterTooSmallError(
            f"data_parallel.num_workers={n} x cpus_per_worker={dp.cpus_per_worker:g} needs "
            f"{n * dp.cpus_per_worker:g} CPUs; the Ray cluster has {have}: lower one of them"
        )


def backend(config: AmortizedConfig, use_gpu: bool) -> str:
    """auto: nccl for GPU workers when this process's torch has CUDA, else gloo (also for logical GPUs
    on a CPU-only machine). A CPU-only head driving GPU workers names nccl explicitly."""
    import torch

    chosen = config.data_parallel.backend
    if chosen != "auto":
        return chosen
    return "nccl" if use_gpu and torch.cuda.is_available() else "gloo"


def build_trainer(
    config: AmortizedConfig,
    *,
    resume_from: str | None = None,
    storage_path: str | None = None,
    name: str = RUN_NAME,
    callbacks: Sequence[Any] = (),
    report_keys: dict[str, str] | None = None,
):
    """The TorchTrainer of one amortized run (not started). Refuses a layout the cluster cannot hold."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from trainers.amortized.loop import read_prompts

    read_prompts(config, config.data_parallel.num_workers)  # a bad library fails here, not in N workers
    cluster = ray.cluster_resources()
    check_resources(config, cluster)
    use_gpu = wants_gpu(config, cluster)
    dp = config.data_parallel
    resources = {"CPU": dp.cpus_per_worker} | ({"GPU": 1} if use_gpu else {})
    storage = storage_path or str(Path(config.output_dir).resolve() / "ray_train")
    return TorchTrainer(
        train_loop_per_worker=worker_loop,
        train_loop_config={
            "config": config_to_dict(config),
            "resume_from": resume_from,
            "report_keys": report_keys or {},
        },
        scaling_config=ScalingConfig(
            num_workers=dp.num_workers, use_gpu=use_gpu, resources_per_worker=resources
        ),
        torch_config=TorchConfig(backend=backend(config, use_gpu)),
        run_config=RunConfig(
            name=name,
            storage_path=storage,
            failure_config=FailureConfig(max_failures=dp.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=config.logging.keep_checkpoints),
            callbacks=list(callbacks),
        ),
    )


def fit(config: AmortizedConfig, *, resume_from: str | None = None, **kwargs):
    """Run `config` on `data_parallel.num_workers` Ray Train workers; starts local Ray if none is up."""
    import ray

    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=True)
    return build_trainer(config, resume_from=resume_from, **kwargs).fit()


def worker_loop(loop_config: dict[str, Any]) -> None:
    """One rank: the amortized loop with Ray Train's rank, world size and device."""
    import ray.train
    import torch

    from trainers.amortized.config import AmortizedConfig
    from trainers.amortized.loop import train

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    config = AmortizedConfig.model_validate(loop_config["config"])
    report_keys: dict[str, str] = loop_config.get("report_keys") or {}
    # Ray sets OMP_NUM_THREADS to the worker's CPUs; torch read its thread count before that.
    threads = int(float(os.environ.get("OMP_NUM_THREADS", config.data_parallel.cpus_per_worker)))
    torch.set_num_threads(max(1, threads))
    device = ray.train.torch.get_device() if torch.cuda.is_available() else torch.device("cpu")
    if config.device not in ("auto",):
        device = torch.device(config.device)

    resume_from = loop_config.get("resume_from")
    restored = ray.train.get_checkpoint()
    if restored is not None:  # a restarted worker group, or a new fit() of the same run
        resume_from = restored.to_directory()
    latest: dict[str, float] = {}
    pid_file = Path(config.output_dir) / f"worker_{rank}.pid"
    pid_file.parent.mkdir(parents=True, exist_ok=True)
    pid_file.write_text(str(os.getpid()))  # for people (and the kill test) who look for a worker

    def with_keys(step: int, metrics: dict[str, float]) -> dict[str, Any]:
        out: dict[str, Any] = {**latest, "step": step, "worker/num_gpus": len(ray.get_gpu_ids())}
        for alias, key in report_keys.items():
            if key in latest:
                out[alias] = latest[key]
        return out

    def on_metrics(step: int, metrics: dict[str, float]) -> None:
        latest.update(metrics)
        ray.train.report(with_keys(step, metrics))

    def on_checkpoint(step: int, path: Path | None) -> None:
        checkpoint = ray.train.Checkpoint.from_directory(str(path)) if path is not None else None
        ray.train.report(with_keys(step, latest), checkpoint=checkpoint)

    train(
        config,
        on_metrics=on_metrics,
        on_checkpoint=on_checkpoint,
        resume_from=resume_from,
        progress=rank == 0,
        rank=rank,
        world_size=world,
        device=device,
    )
