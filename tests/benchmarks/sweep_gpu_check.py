"""A whole sweep on the GPU (gpu_check.sh, stage sweep_gpu): submit, kill -9 the driver, resume, check.

    python tests/benchmarks/sweep_gpu_check.py --workspace DIR [--pack 8] [--trials 8] [--steps 200]
        [--kill-at-step 110] [--name NAME] [--report FILE] [key=value ...]

`dreamsweep submit`s an ASD search (tests/benchmarks/gpu_sd21_asd.yaml: sd21-shaped, 64 px, the VAE
path, the occupancy grid; `key=value` words override its trainer keys) with `pack: K`, Optuna and
MLflow on SQLite in the workspace and the trial workers on the GPU. With --kill-at-step, once a trial
has logged that step the driver is killed with SIGKILL and `dreamsweep resume` continues the sweep.
Meanwhile `nvidia-smi`'s used memory is sampled every second. Then it checks and prints (markdown):

- every trial COMPLETE in the Optuna study, none RUNNING;
- one MLflow run per trial, FINISHED, holding train/loss over its steps and a turntable;
- GPU memory at each trial's end (`worker/cuda_*`, logged by the worker; and nvidia-smi's sample
  just after the run ended) against the worker's baseline after loading the prior: within 256 MiB,
  and no growth from the first trial to the last.

Exit status 0 only when every check passed. A CPU rehearsal runs the same plumbing on tiny sizes:
`--cpu` (tiny-sd, CPU, uniform sampler, 12 steps); the memory checks then say there is no GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

CONFIG = Path(__file__).with_name("gpu_sd21_asd.yaml")
TOLERANCE_MIB = 256.0
CPU_OVERRIDES = {
    "prior.name": "tiny-sd",
    "device": "cpu",
    "resolution": 32,
    "renderer.estimator": "uniform",
    "renderer.num_samples_per_ray": 16,
    "geometry.encoding.n_levels": 4,
    "geometry.encoding.log2_hashmap_size": 12,
}


def parse_value(text: str):
    return yaml.safe_load(text)


def sweep_spec(args: argparse.Namespace) -> dict:
    overrides = {
        "max_steps": args.steps,
        "logging.log_every": max(1, args.steps // 20),
        "logging.checkpoint_every": args.checkpoint_every,
        "logging.val_every": 0,
        "logging.turntable_frames": 12 if not args.cpu else 2,
        "logging.val_views": 1,
        **(CPU_OVERRIDES if args.cpu else {}),
        **{k: parse_value(v) for k, v in (word.split("=", 1) for word in args.overrides)},
    }
    packed = args.pack > 1
    gpus = 0 if args.cpu else (1 if packed else round(1 / args.per_gpu, 4))
    return {
        "name": args.name,
        "kind": "search",
        "base": str(CONFIG.resolve()),
        "overrides": overrides,
        "prompts": {"items": ["a ceramic teapot"]},
        "search": {
            "space": {
                "guidance.eta": {"type": "float", "low": 0.0, "high": 0.5},
                "guidance.cfg_scale": {"type": "float", "low": 5.0, "high": 30.0, "log": True},
            },
            "sampler": "random",
        },
        "objective": {"metric": "train/loss", "mode": "min", "aggregate": "mean"},
        "trials": args.trials,
        # packed: one worker holding every trial; pack 1: per_gpu Tune actors sharing the GPU
        "max_concurrent": args.trials if packed else args.per_gpu,
        # pack 1 is the default: left out, so the spec also validates where `pack` is not known yet
        **({"pack": args.pack} if packed else {}),
        "resources": {"gpus": gpus, "cpus": 4 if packed and not args.cpu else 1},
        "retries": 1,
        **({"cluster": {"num_cpus": 2}} if args.cpu else {}),
    }


class SmiSampler:
    """nvidia-smi's used memory (MiB) every `every_s` seconds, with wall-clock times, in a thread."""

    def __init__(self, every_s: float = 1.0):
        self.every_s, self.samples, self.stop = every_s, [], threading.Event()
        self.available = subprocess.run(["which", "nvidia-smi"], capture_output=True).returncode == 0
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        while not self.stop.wait(self.every_s):
            try:
                out = subprocess.run(
                    ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                    capture_output=True,
                    text=True,
                    timeout=10,
                ).stdout
                self.samples.append((time.time(), float(out.split()[0])))
            except (subprocess.SubprocessError, ValueError, IndexError):
                continue

    def __enter__(self):
        if self.available:
            self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        if self.available:
            self.thread.join(timeout=15)

    def at(self, when: float) -> float | None:
        """The first sample taken after `when` (a trial's end)."""
        later = [mib for t, mib in self.samples if t >= when]
        return later[0] if later else None


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "orchestrator.cli", *args]


def max_logged_step(mlflow_db: Path) -> int:
    """The largest step any run has logged train/loss at (read straight from MLflow's SQLite)."""
    import sqlite3

    if not mlflow_db.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{mlflow_db}?mode=ro", uri=True, timeout=5) as db:
            row = db.execute("SELECT MAX(step) FROM metrics WHERE key = 'train/loss'").fetchone()
    except sqlite3.Error:
        return 0
    return int(row[0] or 0)


def submit_kill_resume(args: argparse.Namespace, spec_path: Path, log) -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    workspace = Path(args.workspace)
    timings: dict[str, float] = {}
    started = time.monotonic()
    driver = subprocess.Popen(
        cli("submit", str(spec_path), "--workspace", str(workspace)), env=env, stdout=log, stderr=log
    )
    if args.kill_at_step:
        deadline = time.monotonic() + args.timeout
        while max_logged_step(workspace / "mlflow.db") < args.kill_at_step:
            if driver.poll() is not None:
                raise RuntimeError(
                    f"the sweep ended (status {driver.returncode}) before step {args.kill_at_step}"
                )
            if time.monotonic() > deadline:
                driver.kill()
                raise RuntimeError(f"no trial reached step {args.kill_at_step} in {args.timeout:.0f} s")
            time.sleep(0.5)
        time.sleep(1.5)  # let the driver record what it saw last
        timings["killed_at_s"] = time.monotonic() - started
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait()
        log.write(f"\n=== kill -9 of the driver at {timings['killed_at_s']:.0f} s; dreamsweep resume\n")
        log.flush()
        driver = subprocess.Popen(
            cli("resume", args.name, "--workspace", str(workspace)), env=env, stdout=log, stderr=log
        )
    try:
        rc = driver.wait(timeout=max(1.0, args.timeout - (time.monotonic() - started)))
    except subprocess.TimeoutExpired:
        driver.kill()
        raise RuntimeError(f"the sweep did not finish within {args.timeout:.0f} s") from None
    timings["total_s"] = time.monotonic() - started
    if rc != 0:
        raise RuntimeError(f"the sweep's driver exited with {rc}")
    return timings


def check(args: argparse.Namespace, smi: SmiSampler) -> tuple[list[str], bool]:
    import mlflow
    import optuna

    from orchestrator.run.workspace import Workspace
    from orchestrator.track import tracking

    record = Workspace(Path(args.workspace)).record(args.name)
    study = optuna.load_study(study_name=args.name, storage=record.stores.optuna_url)
    client = mlflow.MlflowClient(record.stores.mlflow_uri)
    lines, ok = [], True
    states = [t.state.name for t in study.trials]
    complete = [t.number for t in study.trials if t.state.name == "COMPLETE"]
    good = len(complete) == args.trials and "RUNNING" not in states
    ok &= good
    lines.append(
        f"- Optuna: {len(complete)} of {args.trials} trials COMPLETE ({', '.join(states)}): {'ok' if good else 'NO'}"
    )

    runs = tracking.trial_runs(client, record.experiment_id)
    by_trial: dict[int, list] = {}
    for run in runs:
        by_trial.setdefault(int(run.data.tags.get(tracking.TAG_OPTUNA_TRIAL, -1)), []).append(run)
    one_each = all(len(by_trial.get(n, [])) == 1 for n in complete)
    ok &= one_each
    lines.append(
        f"- MLflow: {len(runs)} trial runs for {len(complete)} complete trials, one each: {'ok' if one_each else 'NO'}"
    )

    rows, memory_rows = [], []
    for number in complete:
        for run in by_trial.get(number, []):
            run_id = run.info.run_id
            steps = [m.step for m in client.get_metric_history(run_id, "train/loss")]
            artifacts = list_artifacts(client, run_id)
            turntable = any("turntable" in path for path in artifacts)
            finished = run.info.status == "FINISHED"
            fine = finished and turntable and bool(steps) and max(steps) == args.steps
            ok &= fine
            rows.append(
                f"| {number} | {run.info.status} | {len(steps)} (to step {max(steps) if steps else '-'}) | "
                f"{'yes' if turntable else 'NO'} | {run.data.metrics.get('objective', float('nan')):.4g} |"
            )
            metrics = run.data.metrics
            if "worker/cuda_allocated_mib" in metrics:
                end = (run.info.end_time or 0) / 1000
                memory_rows.append((end, number, metrics, smi.at(end)))
    lines += [
        "",
        "| trial | run | train/loss points | turntable | objective |",
        "|---|---|---|---|---|",
        *rows,
        "",
    ]

    if args.cpu:
        lines.append(
            "- GPU memory: no GPU in this rehearsal (the worker logs worker/cuda_* only where CUDA is used)"
        )
    elif not memory_rows:
        ok = False
        lines.append(
            "- GPU memory: NO trial logged worker/cuda_* (a packed worker must log "
            "orchestrator.run.worker_memory.trial_end_metrics() where a member leaves)"
        )
    else:
        memory_rows.sort()
        lines += [
            "GPU memory at each trial's end (MiB; baseline: the worker's, after loading the prior):",
            "",
            "| trial | allocated | baseline | over | device used | device baseline | over | nvidia-smi after |",
            "|---|---|---|---|---|---|---|---|",
        ]
        overs = []
        for _, number, m, smi_mib in memory_rows:
            over = m["worker/cuda_allocated_mib"] - m["worker/cuda_baseline_mib"]
            dover = m["worker/cuda_device_used_mib"] - m["worker/cuda_device_baseline_mib"]
            overs.append((over, dover))
            lines.append(
                f"| {number} | {m['worker/cuda_allocated_mib']:.0f} | {m['worker/cuda_baseline_mib']:.0f} | {over:+.0f} | "
                f"{m['worker/cuda_device_used_mib']:.0f} | {m['worker/cuda_device_baseline_mib']:.0f} | {dover:+.0f} | "
                f"{'-' if smi_mib is None else f'{smi_mib:.0f}'} |"
            )
        within = all(o <= TOLERANCE_MIB for o, _ in overs)
        # Growth: per worker (a reused worker's trials in order), from its first trial's end to its last.
        by_worker: dict[float, list[float]] = {}
        for _, _, m, _ in memory_rows:
            by_worker.setdefault(m.get("worker/cuda_pid", 0.0), []).append(
                m["worker/cuda_allocated_mib"] - m["worker/cuda_baseline_mib"]
            )
        growth = max(values[-1] - values[0] for values in by_worker.values())
        # The device figure counts every worker on the GPU (pack 1: several share it), so it is shown,
        # and torch's allocated memory per worker decides.
        ok &= within and growth <= TOLERANCE_MIB
        lines += [
            "",
            f"- allocated at every trial's end within {TOLERANCE_MIB:.0f} MiB of the baseline: {'ok' if within else 'NO'}; "
            f"largest growth from a worker's first trial's end to its last ({len(by_worker)} workers, "
            f"{max(len(v) for v in by_worker.values())} trials at most each): {growth:+.0f} MiB "
            f"({'ok' if growth <= TOLERANCE_MIB else 'NO'})",
        ]
    if smi.samples:
        used = [mib for _, mib in smi.samples]
        lines.append(
            f"- nvidia-smi used memory over the sweep: min {min(used):.0f}, max {max(used):.0f} MiB ({len(used)} samples)"
        )
    return lines, ok


def list_artifacts(client, run_id: str, path: str | None = None) -> list[str]:
    found = []
    for item in client.list_artifacts(run_id, path):
        found += list_artifacts(client, run_id, item.path) if item.is_dir else [item.path]
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workspace", required=True)
    parser.add_argument("--name", default=None)
    parser.add_argument("--pack", type=int, default=8)
    parser.add_argument(
        "--per-gpu", type=int, default=4, help="pack 1: trials sharing the GPU (fractional GPUs)"
    )
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--checkpoint-every", type=int, default=100)
    parser.add_argument(
        "--kill-at-step", type=int, default=0, help="kill -9 the driver once a trial logged this step"
    )
    parser.add_argument("--timeout", type=float, default=420.0, help="seconds for the whole sweep")
    parser.add_argument("--cpu", action="store_true", help="rehearsal: tiny-sd on the CPU, tiny sizes")
    parser.add_argument("--report", help="append the markdown section to this file too")
    parser.add_argument("overrides", nargs="*", help="trainer key=value overrides")
    args = parser.parse_args()
    args.name = args.name or f"gpu-pack{args.pack}"
    workspace = Path(args.workspace)
    workspace.mkdir(parents=True, exist_ok=True)
    spec_path = workspace / f"{args.name}.yaml"
    spec_path.write_text(yaml.safe_dump(sweep_spec(args), sort_keys=False))

    title = (
        f"sweep {args.name}: pack {args.pack}, {args.trials} trials x {args.steps} steps"
        + (f", kill -9 at step {args.kill_at_step} then resume" if args.kill_at_step else "")
        + (" (CPU rehearsal)" if args.cpu else "")
    )
    lines, ok = [f"### {title}", ""], False
    with SmiSampler() as smi, open(workspace / f"{args.name}.log", "w") as log:
        try:
            timings = submit_kill_resume(args, spec_path, log)
            lines.append(
                f"- driver: {timings['total_s']:.0f} s in all"
                + (f", killed at {timings['killed_at_s']:.0f} s" if "killed_at_s" in timings else "")
            )
            checked, ok = check(args, smi)
            lines += checked
        except Exception as error:  # the report says what failed; the log has the rest
            lines += [f"- FAILED: {error}", "", "```", tail(workspace / f"{args.name}.log"), "```"]
    lines.append(f"- verdict: {'every check passed' if ok else 'SOME CHECK FAILED'}")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.report:
        with open(args.report, "a") as report:
            report.write(text + "\n")
    Path(workspace / f"{args.name}.json").write_text(json.dumps({"ok": ok, "lines": lines}, indent=2))
    sys.exit(0 if ok else 1)


def tail(path: Path, lines: int = 25) -> str:
    try:
        kept = [line for line in path.read_text(errors="replace").splitlines() if "it/s]" not in line]
        return "\n".join(kept[-lines:])
    except OSError:
        return "(no log)"


if __name__ == "__main__":
    main()
