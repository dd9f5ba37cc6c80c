"""What every trial of a sweep shares, whichever engine runs it (Ray Tune's trainable in
orchestrator.run.trainable, or a packed worker in orchestrator.run.packed): the sweep's context, the
per-process prior and MLflow client caches, a trial's prompts and overrides, and its torch threads.

It imports neither Ray Tune nor Ray Train, so a packed worker does not pay for them (about 0.5 s of its
start on the 2-core machine; tests/test_lazy_imports.py holds it).
"""

from __future__ import annotations

import importlib
import json
import os
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import ray

from orchestrator.run import worker_memory
from orchestrator.spec.space import PROMPT_INDEX, resolve_params

OBJECTIVE, STEP = "objective", "step"

# Per worker process: prior config -> loaded prior, and how many loads this process has made.
_PRIOR_CACHE: dict[str, Any] = {}
PRIOR_LOADS = {"count": 0}
_CLIENTS: dict[str, Any] = {}


def match_torch_threads() -> int:
    """Give torch the CPUs Ray assigned to this trial; returns the thread count.

    torch fixes its intra-op thread count when it is first imported, from OMP_NUM_THREADS or else the
    machine's cores. Anything that imports torch in a worker before Ray sets OMP_NUM_THREADS for the
    trial's `num_cpus` (a worker set-up hook did) leaves every worker with one thread per core of the
    machine: two workers on two cores then trained 7x slower, their threads spinning against each other."""
    import torch

    wanted = os.environ.get("OMP_NUM_THREADS")
    if not wanted:
        wanted = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
    threads = max(1, int(float(wanted)))
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads


@dataclass
class SweepContext:
    """What every trial of a sweep shares (picklable; sent once with `tune.with_parameters`)."""

    sweep: str
    kind: str
    prompts: list[str]
    base: dict[str, Any]
    overrides: dict[str, Any]
    objective_metric: str
    objective_mode: str
    aggregate: str
    mlflow_uri: str
    experiment_id: str
    parent_run_id: str
    git_commit: str = "unknown"
    # A Tune report stalls the trainer for a round trip with the driver (Tune's function API reports
    # synchronously) plus an MLflow flush: every 2 s, the callbacks took ~5 % of the trainer's time in a
    # profiling run on 2 CPUs (tests/benchmarks/bench_sweep_overhead.py, "in the trainer's callbacks").
    report_every_s: float = 5.0
    # "module:function" of the training function and the prior loader: the real trainer by default,
    # a fast fake in the orchestrator's plumbing tests.
    train_fn: str = "trainers.per_prompt:train"
    load_prior_fn: str = "trainers.priors:load_prior"
    extra_overrides: dict[str, Any] = field(default_factory=dict)
    trainer: str = "per-prompt"  # or "amortized": see run_amortized_trial
    trainer_keys: dict[str, Any] = field(default_factory=dict)  # amortized: {"prompts": the spec's source}
    # The sweep's Tune storage (amortized: its trials' Ray Train runs keep checkpoints there).
    tune_path: str = ""


def import_function(path: str) -> Callable:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def cached_prior(context: SweepContext, config) -> Any:
    """The prior for this config, loaded at most once per worker process."""
    from trainers.priors import resolve_device

    device = resolve_device(config.device)
    key = json.dumps(
        [config.prior.model_dump(mode="json"), str(device), context.load_prior_fn], sort_keys=True
    )
    if key not in _PRIOR_CACHE:
        _PRIOR_CACHE[key] = import_function(context.load_prior_fn)(config.prior, device)
        PRIOR_LOADS["count"] += 1
        worker_memory.record_baseline()
    return _PRIOR_CACHE[key]


def cached_client(uri: str):
    """One MlflowClient per worker process: opening a SQLite store checks its schema (seconds)."""
    import mlflow

    from orchestrator.spec.secrets import usable_url

    if uri not in _CLIENTS:  # `uri` as recorded: `${NAME}` and a *** password resolved in this worker
        _CLIENTS[uri] = mlflow.MlflowClient(usable_url(uri, "storage.mlflow"))
    return _CLIENTS[uri]


def aggregate(values: list[float], how: str) -> float:
    return float({"mean": statistics.fmean, "median": statistics.median, "min": min, "max": max}[how](values))


def trial_panel(context: SweepContext, params: dict[str, Any]) -> tuple[list[int], dict[str, Any]]:
    """The prompt positions this trial trains and its trainer overrides."""
    if context.kind == "fanout":
        return [int(params[PROMPT_INDEX])], {**context.overrides, **context.extra_overrides}
    overrides = {**context.overrides, **resolve_params(params), **context.extra_overrides}
    return list(range(len(context.prompts))), overrides
