"""Orchestration overhead of a sweep: wall time against the ideal, and prior loads against workers.

    python tests/benchmarks/bench_sweep_overhead.py                       # 16 trials of ~10 s, real trainer
    python tests/benchmarks/bench_sweep_overhead.py --trainer fake --trial-seconds 1

Runs one search sweep of `--trials` short trials on `--workers` concurrent workers through the whole
stack (spec validation, Ray Tune + OptunaSearch on a persistent SQLite study, MLflow parent and child
runs with metrics and artifacts, the final plots), then prints side by side:

- wall: from `submit()` to its return. The workspace's databases are created first (by another
  process, as an earlier sweep would have: a workspace serves many sweeps), then Ray is started as
  `submit` starts it; both are timed apart;
- ideal: the sum of the time the trials spent inside the trainer, divided by the number of workers;
- overhead = wall / ideal - 1  (target <= 10 % for 10 s trials; Ray's release tests allow 20-30 %);
- prior loads, summed over worker processes (target: = workers, thanks to reused actors);
- where the overhead went: driver set-up, each worker's wait for its first trial (Tune starts every
  trial actor in a new process, which imports torch, diffusers and mlflow), the gaps between trials,
  the time inside a trial but outside the trainer (the first one loads the prior), the idle tail,
  and the driver's finalisation.

The real trainer runs tiny-sd at 32x32 with `--steps` steps per trial (the default aims at ~10 s on an
idle 2-core CPU; the printed mean trial time says what it was). `--trainer fake` replaces training by
a busy loop of known length, which isolates the orchestration cost.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--trainer", choices=("real", "fake"), default="real")
    parser.add_argument("--steps", type=int, default=115, help="steps per trial (real trainer)")
    parser.add_argument("--trial-seconds", type=float, default=10.0, help="seconds per trial (fake trainer)")
    args = parser.parse_args()

    fake_steps = 20
    if args.trainer == "fake":
        # Read by orchestrator.run.fake_trainer in the workers, which inherit the driver's environment.
        os.environ["DREAMSWEEP_FAKE_STEP_S"] = str(args.trial_seconds / fake_steps)
    import ray

    from orchestrator.run.sweep import submit
    from orchestrator.run.workspace import Workspace

    steps = fake_steps if args.trainer == "fake" else args.steps
    spec = {
        "name": "overhead",
        "kind": "search",
        "base": {
            "max_steps": steps,
            "resolution": 32,
            "geometry": {"encoding": {"n_levels": 4, "log2_hashmap_size": 12}},
            "renderer": {"num_samples_per_ray": 16},
            "logging": {
                "log_every": 5,
                "checkpoint_every": steps // 2,
                "val_views": 1,
                "turntable_frames": 4,
            },
        },
        "prompts": {"items": ["a red cube"]},
        "search": {"space": {"guidance.eta": {"type": "float", "low": 0.0, "high": 1.0}}},
        "objective": {"metric": "train/loss", "mode": "min"},
        "trials": args.trials,
        "max_concurrent": args.workers,
        "resources": {"cpus": 1, "gpus": 0},
        "retries": 0,
    }
    runtime = {}
    if args.trainer == "fake":
        runtime = {
            "train_fn": "orchestrator.run.fake_trainer:train",
            "load_prior_fn": "orchestrator.run.fake_trainer:load_prior",
        }

    from orchestrator.run.cluster import ClusterConfig, init_ray

    with tempfile.TemporaryDirectory() as root:
        workspace = Workspace(root)
        # A workspace is created once and holds many sweeps: its MLflow and Optuna databases (schema
        # migrations, ~1.5 s) exist before a sweep is submitted into it. Timed apart.
        started = time.perf_counter()
        create_stores(workspace, spec)
        stores_s = time.perf_counter() - started
        # Started as `submit` starts a local Ray, timed apart.
        started = time.perf_counter()
        init_ray(ClusterConfig(num_cpus=args.workers))
        ray_start_s = time.perf_counter() - started
        started, started_at = time.perf_counter(), time.time()
        outcome = submit(spec, workspace=workspace, runtime=runtime)
        wall_s = time.perf_counter() - started

        from ray.tune import ExperimentAnalysis

        analysis = ExperimentAnalysis(f"{workspace.record('overhead').stores.tune_path}/overhead")
        results = [t.last_result for t in analysis.trials]
        compute = [r.get("trial/compute_s", 0.0) for r in results]
        loads: dict[int, int] = defaultdict(int)
        for result in results:
            pid = result["worker/pid"]
            loads[pid] = max(loads[pid], result["worker/prior_loads"])
    ray.shutdown()

    ideal_s = sum(compute) / args.workers
    print(f"\nsweep of {args.trials} trials on {args.workers} workers, trainer={args.trainer}")
    print(f"  trials complete           {outcome.complete}/{args.trials}")
    print(f"  mean trial compute        {statistics.fmean(compute):8.2f} s")
    print(f"  ideal (compute/workers)   {ideal_s:8.2f} s")
    print(f"  wall (submit -> done)     {wall_s:8.2f} s")
    print(
        f"  overhead (wall/ideal - 1) {100 * (wall_s / ideal_s - 1):8.1f} %   target <= 10 % for 10 s trials"
    )
    print(f"  ray.init (not counted)    {ray_start_s:8.2f} s")
    print(f"  new workspace's databases {stores_s:8.2f} s   (not counted: once per workspace)")
    print(
        f"  prior loads               {sum(loads.values()):8d}     over {len(loads)} worker processes (target = {args.workers})"
    )
    print_breakdown(outcome.timings, started_at, results, args.workers)
    if os.environ.get("BENCH_DUMP"):
        with open(os.environ["BENCH_DUMP"], "w") as f:
            json.dump(
                {"timings": outcome.timings, "started_at": started_at, "results": results}, f, default=str
            )


def create_stores(workspace, spec: dict) -> None:
    """Create the workspace's databases in another process, as an earlier sweep would have: this
    process must not import anything before the timed `submit` that a fresh driver would not have."""
    code = (
        "import json, sys\n"
        "from mlflow import MlflowClient\n"
        "from orchestrator.spec.spec import load_sweep_spec\n"
        "from orchestrator.run.tuner import optuna_storage\n"
        "from orchestrator.run.workspace import Workspace\n"
        "workspace = Workspace(sys.argv[1])\n"
        "stores = workspace.stores_for(load_sweep_spec(json.loads(sys.argv[2])))\n"
        "workspace.root.mkdir(parents=True, exist_ok=True)\n"
        "MlflowClient(stores.mlflow_uri).search_experiments()\n"
        "optuna_storage(stores.optuna_url)\n"
    )
    subprocess.run([sys.executable, "-c", code, str(workspace.root), json.dumps(spec)], check=True)


def print_breakdown(timings: dict[str, float], started_at: float, results: list[dict], workers: int) -> None:
    """Where the overhead went, in seconds of wall time (worker-side parts averaged over the workers):
    wall - ideal = setup + finalize + (start delay + gaps between trials + in-trial extra + idle at end) / W."""
    fit_start = started_at + timings["setup"]
    fit_end = fit_start + timings["fit"]
    by_worker: dict[int, list[dict]] = defaultdict(list)
    for result in results:
        by_worker[result["worker/pid"]].append(result)
    start_delay = gaps = extra = end_idle = 0.0
    for trials in by_worker.values():
        trials.sort(key=lambda r: r["trial/entered_at"])
        start_delay += trials[0]["trial/entered_at"] - fit_start
        gaps += sum(b["trial/entered_at"] - a["trial/left_at"] for a, b in itertools.pairwise(trials))
        extra += sum(r["trial/wall_s"] - r["trial/compute_s"] for r in trials)
        end_idle += fit_end - trials[-1]["trial/left_at"]
    # A worker that never ran a trial idles for the whole fit.
    start_delay += (workers - len(by_worker)) * timings["fit"]
    rows = [
        ("driver setup (spec -> Tuner.fit)", timings["setup"]),
        ("first trial start (per worker)", start_delay / workers),
        ("between trials (per worker)", gaps / workers),
        ("in trial, outside the trainer", extra / workers),
        ("idle at the end (per worker)", end_idle / workers),
        ("finalize (stores agree, plots)", timings["finalize"]),
    ]
    print("  where the overhead went:")
    for label, seconds in rows:
        print(f"    {label:<34}{seconds:7.2f} s")


if __name__ == "__main__":
    main()
