"""Orchestration overhead of a sweep: wall time against the ideal, and prior loads against workers.

    python tests/benchmarks/bench_sweep_overhead.py                       # 16 trials of ~10 s, real trainer
    python tests/benchmarks/bench_sweep_overhead.py --trainer fake --trial-seconds 1

Runs one search sweep of `--trials` short trials on `--workers` concurrent workers through the whole
stack (spec validation, Ray Tune + OptunaSearch on a persistent SQLite study, MLflow parent and child
runs with metrics and artifacts, the final plots), then prints side by side:

- wall: from `submit()` to its return (Ray itself already started, timed apart);
- ideal: the sum of the time the trials spent inside the trainer, divided by the number of workers;
- overhead = wall / ideal - 1  (target <= 10 % for 10 s trials; Ray's release tests allow 20-30 %);
- prior loads, summed over worker processes (target: = workers, thanks to reused actors).

The real trainer runs tiny-sd at 32x32 with `--steps` steps per trial (the default aims at ~10 s on an
idle 2-core CPU; the printed mean trial time says what it was). `--trainer fake` replaces training by
a busy loop of known length, which isolates the orchestration cost.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections import defaultdict


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--trainer", choices=("real", "fake"), default="real")
    parser.add_argument("--steps", type=int, default=40, help="steps per trial (real trainer)")
    parser.add_argument("--trial-seconds", type=float, default=10.0, help="seconds per trial (fake trainer)")
    args = parser.parse_args()

    fake_steps = 20
    if args.trainer == "fake":
        # Read by orchestrator.fake_trainer in the workers, which inherit the driver's environment.
        os.environ["DREAMSWEEP_FAKE_STEP_S"] = str(args.trial_seconds / fake_steps)
    import ray

    from orchestrator.sweep import submit
    from orchestrator.workspace import Workspace

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
            "train_fn": "orchestrator.fake_trainer:train",
            "load_prior_fn": "orchestrator.fake_trainer:load_prior",
        }

    started = time.perf_counter()
    ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False)
    ray_start_s = time.perf_counter() - started
    with tempfile.TemporaryDirectory() as root:
        workspace = Workspace(root)
        started = time.perf_counter()
        outcome = submit(spec, workspace=workspace, runtime=runtime)
        wall_s = time.perf_counter() - started

        from ray.tune import ExperimentAnalysis

        analysis = ExperimentAnalysis(f"{workspace.record('overhead').stores.tune_path}/overhead")
        compute = [t.last_result.get("trial/compute_s", 0.0) for t in analysis.trials]
        loads: dict[int, int] = defaultdict(int)
        for trial in analysis.trials:
            pid = trial.last_result["worker/pid"]
            loads[pid] = max(loads[pid], trial.last_result["worker/prior_loads"])
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
    print(
        f"  prior loads               {sum(loads.values()):8d}     over {len(loads)} worker processes (target = {args.workers})"
    )


if __name__ == "__main__":
    main()
