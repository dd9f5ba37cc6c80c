"""Orchestration overhead of a sweep: wall time against the ideal, and prior loads against workers.

    python tests/benchmarks/bench_sweep_overhead.py                       # 16 trials of ~10 s, real trainer
    python tests/benchmarks/bench_sweep_overhead.py --trainer fake --trial-seconds 1

Runs one search sweep of `--trials` short trials on `--workers` concurrent workers through the whole
stack (spec validation, Ray Tune + OptunaSearch on a persistent SQLite study, MLflow parent and child
runs with metrics and artifacts, the final plots), then prints side by side:

- wall: from `submit()` to its return. The workspace's databases are created first (by another
  process, as an earlier sweep would have: a workspace serves many sweeps), then Ray is started as
  `submit` starts it; both are timed apart;
- ideal: the sum of the time the trials spent inside the trainer, divided by the number of workers
  (not counting the trainer's callbacks: MLflow logging and Tune reports, each of which waits for a
  round trip with the driver, are orchestration);
- overhead = wall / ideal - 1  (target <= 10 % for 10 s trials; Ray's release tests allow 20-30 %);
- prior loads, summed over worker processes (target: = workers, thanks to reused actors);
- where the overhead went: driver set-up, each worker's wait for its first trial (Tune starts every
  trial actor in a new process, which imports torch, diffusers and mlflow), the gaps between trials,
  the time inside a trial but outside the trainer (the first one loads the prior), the time in the
  trainer's callbacks, the idle tail,
  and the driver's finalisation.

Then, in the same run and on the same Ray instance, the same trials through plain Ray Tune: a function
trainable that builds the same trainer config and loads its prior, OptunaSearch on a SQLite study,
MLflowLoggerCallback (results and the trial folder as artifacts), checkpoints reported to Tune; its
figures are printed beside dreamsweep's (`--no-baseline` skips it). It runs second, so its driver
finds the libraries already imported; its workers are new processes like dreamsweep's.

The real trainer runs tiny-sd at 32x32 (`--prior tiny-sd`, diffusers' modules at toy size) or the
quickstart's reference-prior config (`--prior reference`, no diffusion library) with `--steps` steps
per trial (the default, 50, gives ~10 s trials with tiny-sd on the 2-core CPU, two trials at a time;
the printed mean trial time says what it was). `--trainer fake` replaces training by a busy loop of
known length, which isolates the orchestration cost.
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
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--trainer", choices=("real", "fake"), default="real")
    parser.add_argument(
        "--prior",
        choices=("tiny-sd", "reference"),
        default="tiny-sd",
        help="the real trainer's prior: tiny-sd (diffusers' UNet, VAE and CLIP at toy size) or the "
        "quickstart's reference prior (sweeps/configs/reference_cpu.yaml; no diffusion library)",
    )
    parser.add_argument("--steps", type=int, default=50, help="steps per trial (real trainer)")
    parser.add_argument("--trial-seconds", type=float, default=10.0, help="seconds per trial (fake trainer)")
    parser.add_argument(
        "--pack",
        type=int,
        default=2,
        help="also run the trials packed, this many per worker (max_concurrent = workers x pack, so the "
        "same CPUs); 1 skips it",
    )
    parser.add_argument("--no-baseline", action="store_true", help="skip the plain Ray Tune baseline")
    args = parser.parse_args()

    fake_steps = 20
    if args.trainer == "fake":
        # Read by orchestrator.run.fake_trainer in the workers, which inherit the driver's environment.
        os.environ["DREAMSWEEP_FAKE_STEP_S"] = str(args.trial_seconds / fake_steps)
    import ray

    from orchestrator.run.sweep import submit
    from orchestrator.run.workspace import Workspace

    steps = fake_steps if args.trainer == "fake" else args.steps
    logging = {"log_every": 5, "checkpoint_every": steps // 2, "val_views": 1, "turntable_frames": 4}
    if args.prior == "reference":  # the quickstart's trainer config, as its sweeps run it
        base = str(ROOT / "sweeps/configs/reference_cpu.yaml")
        overrides = {"max_steps": steps} | {f"logging.{key}": value for key, value in logging.items()}
    else:
        base = {
            "max_steps": steps,
            "resolution": 32,
            "geometry": {"encoding": {"n_levels": 4, "log2_hashmap_size": 12}},
            "renderer": {"num_samples_per_ray": 16},
            "logging": logging,
        }
        overrides = {}
    spec = {
        "name": "overhead",
        "kind": "search",
        "base": base,
        "overrides": overrides,
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
        ours = Figures("dreamsweep", outcome.complete, wall_s, started_at, outcome.timings, results)
        packed = None
        if args.pack > 1 and args.trainer == "real":  # the packed path runs the real trainer only
            packed_spec = spec | {
                "name": "overhead-packed",
                "pack": args.pack,
                "max_concurrent": args.workers * args.pack,
            }
            started, started_at = time.perf_counter(), time.time()
            outcome = submit(packed_spec, workspace=workspace)
            wall_s = time.perf_counter() - started
            packed = PackedFigures(
                f"pack: {args.pack}", outcome.complete, wall_s, started_at, outcome.timings, outcome.stats
            )
        baseline = None
        if not args.no_baseline:
            baseline = run_baseline(spec, args, runtime, root)
    ray.shutdown()

    prior = f", prior={args.prior}" if args.trainer == "real" else ""
    print(f"\nsweep of {args.trials} trials on {args.workers} workers, trainer={args.trainer}{prior}")
    print(f"  ray.init (not counted)    {ray_start_s:8.2f} s")
    print(f"  new workspace's databases {stores_s:8.2f} s   (not counted: once per workspace)")
    columns = [ours] + ([packed] if packed else []) + ([baseline] if baseline else [])
    print_side_by_side(columns, args.workers, args.trials)
    if baseline:
        for column in columns[:-1]:
            a, b = column.overhead_s(args.workers), baseline.overhead_s(args.workers)
            print(
                f"  {column.label}'s overhead is {100 * a / b:.0f} % of plain Tune's "
                f"({a:.2f} s vs {b:.2f} s; target <= 25 %)"
            )
    if packed:
        a, b = packed.overhead_s(args.workers), ours.overhead_s(args.workers)
        print(
            f"  pack: {args.pack} against pack: 1: overhead {a:.2f} s vs {b:.2f} s, wall {packed.wall_s:.2f} s "
            f"vs {ours.wall_s:.2f} s (target: no worse)"
        )
    if os.environ.get("BENCH_DUMP"):
        with open(os.environ["BENCH_DUMP"], "w") as f:
            json.dump({c.label: vars(c) for c in columns}, f, default=str)


class Figures:
    """One sweep's measurements: wall, per-phase timings and each trial's last Tune result."""

    def __init__(self, label, complete, wall_s, started_at, timings, results):
        self.label, self.complete, self.wall_s = label, complete, wall_s
        self.started_at, self.timings, self.results = started_at, timings, results

    def compute(self) -> list[float]:
        return [r.get("trial/compute_s", 0.0) for r in self.results]

    def ideal_s(self, workers: int) -> float:
        return sum(self.compute()) / workers

    def overhead_s(self, workers: int) -> float:
        return self.wall_s - self.ideal_s(workers)

    def prior_loads(self) -> tuple[int, int]:
        loads: dict[int, int] = defaultdict(int)
        if all("trial/prior_loads" in r for r in self.results):  # the baseline loads one per trial
            for result in self.results:
                loads[result["worker/pid"]] += result["trial/prior_loads"]
            return sum(loads.values()), len(loads)
        for result in self.results:
            pid = result["worker/pid"]
            loads[pid] = max(loads[pid], result["worker/prior_loads"])
        return sum(loads.values()), len(loads)

    def breakdown(self, workers: int) -> list[tuple[str, float]]:
        return breakdown(self.timings, self.started_at, self.results, workers)


class PackedFigures:
    """A packed sweep's measurements: its members share a worker's steps, so compute and the
    timeline are the workers' (orchestrator.run.packed.WorkerClock), not each trial's."""

    def __init__(self, label, complete, wall_s, started_at, timings, stats):
        self.label, self.complete, self.wall_s = label, complete, wall_s
        self.started_at, self.timings = started_at, timings
        self.clocks = list(stats["worker_clocks"].values())

    def compute(self) -> list[float]:
        """Each trial's share of its worker's compute (the trials of a pack are not separable)."""
        total = sum(c.compute_s for c in self.clocks)
        return [total / self.complete] * self.complete

    def ideal_s(self, workers: int) -> float:
        return sum(c.compute_s for c in self.clocks) / workers

    def overhead_s(self, workers: int) -> float:
        return self.wall_s - self.ideal_s(workers)

    def prior_loads(self) -> tuple[int, int]:
        return sum(c.prior_loads for c in self.clocks), len(self.clocks)

    def breakdown(self, workers: int) -> list[tuple[str, float]]:
        """The same rows as the Tune columns; per worker, its span is its first step's wait, its steps
        (compute and callbacks), its trials' starts and ends with the driver's round trips, and its idle
        tail, so the third is what remains."""
        fit_start = self.started_at + self.timings["setup"]
        fit_end = fit_start + self.timings["fit"]
        start = sum(c.first_step_at - fit_start for c in self.clocks)
        end_idle = sum(fit_end - c.last_step_at for c in self.clocks)
        hooks = sum(c.hooks_s for c in self.clocks)
        rest = sum(c.last_step_at - c.first_step_at - c.compute_s - c.hooks_s for c in self.clocks)
        start += (workers - len(self.clocks)) * self.timings["fit"]  # a worker that never stepped
        return [
            ("driver setup (spec -> Tuner.fit)", self.timings["setup"]),
            ("first trial start (per worker)", start / workers),
            ("trial starts and ends (per worker)", rest / workers),
            ("in the trainer's callbacks", hooks / workers),
            ("idle at the end (per worker)", end_idle / workers),
            ("finalize (stores agree, plots)", self.timings["finalize"]),
        ]

    def start_split(self) -> list[tuple[str, float]]:
        """A packed worker's first trial start, per worker: waiting for Ray to create it, importing
        (the actor's module, then __init__), then the driver's first trials reach it, its prior load,
        its first members' set-up, and the rest (its first step's own start)."""
        fit_start = self.started_at + self.timings["setup"]
        n = len(self.clocks) or 1
        created = sum(c.imports_from - fit_start for c in self.clocks) / n
        imports = sum(c.ready_at - c.imports_from for c in self.clocks) / n
        prior = sum(c.prior_s for c in self.clocks) / n
        first = sum(c.first_step_at - fit_start for c in self.clocks) / n
        # Set-up before the first step: all of a worker's set-up if it trained one pack, else unknown;
        # with trials of 10 s and no refill before the first step, it is the first members' set-up.
        setup = sum(c.first_setup_s for c in self.clocks) / n
        return [
            ("Ray creates the worker", created),
            ("imports (module, __init__)", imports),
            ("prior load", prior),
            ("first members' set-up", setup),
            ("waits (all workers up, driver)", first - created - imports - prior - setup),
        ]


FIXED = ("driver setup (spec -> Tuner.fit)", "first trial start (per worker)", "idle at the end (per worker)")
FIXED += ("finalize (stores agree, plots)",)


def fixed_and_marginal(rows: list[tuple[str, float]], workers: int, trials: int) -> tuple[float, float]:
    """(fixed cost per sweep, marginal cost per trial), in seconds of wall time: overhead = fixed +
    trials x marginal. Fixed: set-up, first starts, idle tail, finalisation; marginal: what each trial
    adds in its worker (its start and end, its callbacks), over the workers running in parallel."""
    fixed = sum(value for label, value in rows if label in FIXED)
    marginal = sum(value for label, value in rows if label not in FIXED) / trials
    return fixed, marginal


def print_side_by_side(columns: list[Figures], workers: int, trials: int) -> None:
    def row(label: str, values: list[str]) -> None:
        print(f"  {label:<34}" + "".join(f"{v:>14}" for v in values))

    row("", [c.label for c in columns])
    row("trials complete", [f"{c.complete}/{trials}" for c in columns])
    row("mean trial compute (s)", [f"{statistics.fmean(c.compute()):.2f}" for c in columns])
    row("ideal = compute / workers (s)", [f"{c.ideal_s(workers):.2f}" for c in columns])
    row("wall (s)", [f"{c.wall_s:.2f}" for c in columns])
    row("overhead = wall/ideal - 1", [f"{100 * (c.wall_s / c.ideal_s(workers) - 1):.1f} %" for c in columns])
    row("prior loads / worker processes", ["{} / {}".format(*c.prior_loads()) for c in columns])
    print("  where the overhead went (s of wall time):")
    breakdowns = [c.breakdown(workers) for c in columns]
    for i, (label, _) in enumerate(breakdowns[0]):
        row("  " + label, [f"{b[i][1]:.2f}" for b in breakdowns])
    costs = [fixed_and_marginal(b, workers, trials) for b in breakdowns]
    row("fixed cost per sweep (s)", [f"{fixed:.2f}" for fixed, _ in costs])
    row("marginal cost per trial (s)", [f"{marginal:.3f}" for _, marginal in costs])
    for column in columns:
        if isinstance(column, PackedFigures) and column.clocks:
            print(f"  {column.label}: its first trial start per worker, split (s):")
            for label, value in column.start_split():
                print(f"    {label:<32}{value:>8.2f}")
    print("  target: dreamsweep <= 8 % for 10 s trials, <= 1/4 of plain Tune's overhead; pack 2 no worse")


def run_baseline(spec: dict, args, runtime: dict, root: str) -> Figures:
    """The same trials through plain Ray Tune + OptunaSearch + MLflowLoggerCallback."""
    import optuna
    from mlflow import MlflowClient
    from ray import tune
    from ray.air.integrations.mlflow import MLflowLoggerCallback
    from ray.tune.search.optuna import OptunaSearch

    mlflow_uri = f"sqlite:///{root}/baseline-mlflow.db"
    optuna_url = f"sqlite:///{root}/baseline-optuna.db"
    # Created beforehand, as for dreamsweep (a tracking store and a study storage already exist). The
    # experiment keeps its artifacts beside it: MLflow's default would be ./mlruns in the project.
    MlflowClient(mlflow_uri).create_experiment("baseline", artifact_location=f"{root}/baseline-artifacts")
    storage = optuna.storages.RDBStorage(optuna_url, engine_kwargs={"connect_args": {"timeout": 60}})

    started, started_at = time.perf_counter(), time.time()
    trainable = tune.with_parameters(
        baseline_trial,
        base=spec["base"],
        overrides=spec["overrides"],
        prompt=spec["prompts"]["items"][0],
        runtime=runtime,
    )
    tuner = tune.Tuner(
        tune.with_resources(trainable, {"cpu": 1}),
        param_space={"eta": tune.uniform(0.0, 1.0)},
        tune_config=tune.TuneConfig(
            search_alg=OptunaSearch(metric="train/loss", mode="min", storage=storage, study_name="baseline"),
            num_samples=args.trials,
            max_concurrent_trials=args.workers,
        ),
        run_config=tune.RunConfig(
            name="baseline",
            storage_path=f"{root}/baseline_results",
            callbacks=[
                MLflowLoggerCallback(tracking_uri=mlflow_uri, experiment_name="baseline", save_artifact=True)
            ],
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            verbose=0,
        ),
    )
    fit_started = time.perf_counter()
    grid = tuner.fit()
    fit_ended = time.perf_counter()
    results = [r.metrics for r in grid]
    timings = {"setup": fit_started - started, "fit": fit_ended - fit_started, "finalize": 0.0}
    complete = sum(1 for r in grid if r.error is None)
    return Figures("plain Tune", complete, fit_ended - started, started_at, timings, results)


def baseline_trial(config: dict, base: dict | str, overrides: dict, prompt: str, runtime: dict) -> None:
    """A plain function trainable: build the config, load the prior, train, report to Tune."""
    import importlib

    from ray import tune

    from trainers.config import load_train_config

    entered, entered_at = time.perf_counter(), time.time()

    def function(path: str):
        module, _, name = path.partition(":")
        return getattr(importlib.import_module(module), name)

    train = function(runtime.get("train_fn", "trainers.per_prompt:train"))
    load_prior = function(runtime.get("load_prior_fn", "trainers.priors:load_prior"))
    trial_dir = tune.get_context().get_trial_dir()
    cfg = load_train_config(
        base,
        {**overrides, "guidance.eta": config["eta"], "prompt": prompt, "output_dir": f"{trial_dir}/out"},
    )
    prior = load_prior(cfg.prior, "cpu")
    latest: dict[str, float] = {}

    def on_metrics(step, metrics):
        latest.update(metrics)

    hooks_s = [0.0]

    def on_checkpoint(step, path):
        started = time.perf_counter()
        tune.report({**latest, "step": step}, checkpoint=tune.Checkpoint.from_directory(str(path)))
        hooks_s[0] += time.perf_counter() - started

    started = time.perf_counter()
    result = train(cfg, prior, on_metrics=on_metrics, on_checkpoint=on_checkpoint, progress=False)
    compute_s = time.perf_counter() - started - hooks_s[0]
    tune.report(
        {
            **result.final_metrics,
            "step": cfg.max_steps,
            "trial/compute_s": compute_s,
            "trial/hooks_s": hooks_s[0],
            "trial/wall_s": time.perf_counter() - entered,
            "trial/entered_at": entered_at,
            "trial/left_at": time.time(),
            "worker/pid": os.getpid(),
            "trial/prior_loads": 1,
        }
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


def lanes(results: list[dict], workers: int) -> list[list[dict]]:
    """The trials as at most `workers` lanes of trials that ran one after another, by time: a lane is a
    worker slot, whether its trials shared one process (dreamsweep reuses actors) or each had a new one
    (the baseline), in which case a new process's start counts as a gap between trials."""
    slots: list[list[dict]] = []
    for result in sorted(results, key=lambda r: r["trial/entered_at"]):
        free = [lane for lane in slots if lane[-1]["trial/left_at"] <= result["trial/entered_at"]]
        if free:
            min(free, key=lambda lane: lane[-1]["trial/left_at"]).append(result)
        elif len(slots) < workers:
            slots.append([result])
        else:  # timestamps overlap by a clock's jitter: the lane that frees first
            min(slots, key=lambda lane: lane[-1]["trial/left_at"]).append(result)
    return slots


def breakdown(timings: dict[str, float], started_at: float, results: list[dict], workers: int) -> list:
    """Where the overhead went, in seconds of wall time (worker-side parts averaged over the lanes):
    wall - ideal = setup + finalize + (start delay + gaps + in-trial extra + callbacks + idle at end) / W."""
    fit_start = started_at + timings["setup"]
    fit_end = fit_start + timings["fit"]
    start_delay = gaps = extra = hooks = end_idle = 0.0
    by_lane = lanes(results, workers)
    for trials in by_lane:
        start_delay += trials[0]["trial/entered_at"] - fit_start
        gaps += sum(b["trial/entered_at"] - a["trial/left_at"] for a, b in itertools.pairwise(trials))
        hooks += sum(r["trial/hooks_s"] for r in trials)
        extra += sum(r["trial/wall_s"] - r["trial/compute_s"] - r["trial/hooks_s"] for r in trials)
        end_idle += fit_end - trials[-1]["trial/left_at"]
    # A lane that never ran a trial idles for the whole fit.
    start_delay += (workers - len(by_lane)) * timings["fit"]
    return [
        ("driver setup (spec -> Tuner.fit)", timings["setup"]),
        ("first trial start (per worker)", start_delay / workers),
        # Gaps between trials and a trial's time outside its trainer (actor reuse, run opening, final
        # report): together, as a packed worker cannot tell them apart.
        ("trial starts and ends (per worker)", (gaps + extra) / workers),
        ("in the trainer's callbacks", hooks / workers),
        ("idle at the end (per worker)", end_idle / workers),
        ("finalize (stores agree, plots)", timings["finalize"]),
    ]


if __name__ == "__main__":
    main()
