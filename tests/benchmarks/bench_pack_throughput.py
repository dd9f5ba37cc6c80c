"""Aggregate trial-steps per second on one device: K trials packed in one process, against N processes.

    python tests/benchmarks/bench_pack_throughput.py [--ks 1,2,4,8,16] [--modes eager,cuda_graph]
        [--procs 1,2,4] [--steps 10] [--warmup 3] [--split-steps 3] [--config YAML] [--json FILE]
        [key=value ...]

Rows of one table, from one run:

- **packed** (`eager`, `cuda_graph`): a `trainers.pack.Pack` of K `TrainingRun`s sharing one loaded
  prior (one VAE encode and one UNet call over all K members' rows per step), K = 1, 2, 4, 8, 16. Each
  member is its own trial: its own seed and prompt. `cuda_graph` is the same pack with the UNet call
  replayed from a CUDA graph captured at the pack's row count (`prior.cuda_graph`); off CUDA it is the
  same padding run eagerly (`GraphedCall(capture=False)`), which checks the code path, not the speed.
- **processes**: the baseline a user tries first, N = 1, 2, 4 separate processes on the same device
  (fractional GPUs: Ray gives each the same `CUDA_VISIBLE_DEVICES`), each a pack of one, launched by
  this script, their timed steps started together; with `nvidia-cuda-mps-control` on the PATH the
  same again under MPS (`--mps auto`).

For each row: trial-steps/s (K members × steps / seconds, from `--steps` steps timed as a whole, no
synchronisation inside), its ratio to K = 1, ms per step split into render / VAE / UNet / backward /
rest (from `--split-steps` further steps, synchronising at each part's boundaries on CUDA so the parts
add up to the step; medians), peak memory (CUDA: torch's max allocated; CPU: peak resident set) and
CPU cores busy (process CPU seconds / wall seconds over the timed steps, children included).

The defaults are the GPU check's (tests/benchmarks/gpu_sd21_asd.yaml: ASD, sd21-shaped, 64 px, the VAE
path, the occupancy grid). A CPU rehearsal: `--ks 1,2 --procs 1,2 --steps 2 --warmup 1
prior.name=tiny-sd device=cpu renderer.estimator=uniform renderer.num_samples_per_ray=32 resolution=32`.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

# bench_real_size.py beside this file: the part clock and the peak-memory meter
from bench_real_size import PeakMemory, StepClock

from trainers.config import load_train_config
from trainers.pack import Pack
from trainers.per_prompt import TrainingRun
from trainers.priors import load_prior, resolve_device
from trainers.priors.cuda_graph import GraphedCall

CONFIG = Path(__file__).with_name("gpu_sd21_asd.yaml")
PARTS = ("render", "vae", "unet", "backward")
PROMPTS = ("a ceramic teapot", "a red apple", "a wooden chair", "a small cactus in a pot")
MPS_CONTROL = "nvidia-cuda-mps-control"


def member_overrides(index: int, workdir: Path, extra: list[str]) -> list[str]:
    """A member that never finishes inside the benchmark and writes nothing between steps."""
    return [
        f"prompt={PROMPTS[index % len(PROMPTS)]}",
        f"seed={index}",
        "max_steps=1000000",
        "logging.log_every=1000000",
        "logging.val_every=0",
        "logging.checkpoint_every=0",
        f"output_dir={workdir / f'member_{index:02d}'}",
        *extra,
    ]


def cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def graphed(prior, enabled: bool):
    """The prior's UNet call through fresh CUDA graphs (captured at this pack's shape) for the block."""
    if not enabled:
        yield None
        return
    before = getattr(prior, "graphed_unet", None)
    prior.graphed_unet = GraphedCall(prior._unet_forward, capture=prior.device.type == "cuda")
    try:
        yield prior.graphed_unet
    finally:
        prior.graphed_unet = before


def measure_pack(
    prior,
    config_path: Path,
    k: int,
    extra: list[str],
    steps: int,
    warmup: int,
    split_steps: int,
    cuda_graph: bool,
) -> dict:
    """Step a pack of k members: warm-up, `steps` timed as a whole, then `split_steps` split into parts."""
    device = prior.device
    workdir = Path(tempfile.mkdtemp(prefix=f"pack-k{k}-"))
    pack = Pack()
    memory = PeakMemory(device)
    try:
        for i in range(k):
            config = load_train_config(config_path, member_overrides(i, workdir, extra))
            pack.add(i, TrainingRun(config, prior, progress=False))
        with graphed(prior, cuda_graph) as graph, memory.measure():
            for _ in range(warmup):
                step_or_raise(pack)
            sync(device)
            wall, cpu = time.perf_counter(), cpu_seconds()
            for _ in range(steps):
                step_or_raise(pack)
            sync(device)
            wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
            splits = split_into_parts(pack, prior, split_steps)
            captured = graph.captured_sizes() if graph is not None else []
    finally:
        for key in list(pack.members):
            pack.remove(key)
        shutil.rmtree(workdir, ignore_errors=True)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {
        "k": k,
        "steps": steps,
        "seconds": wall,
        "trial_steps_per_s": k * steps / wall,
        "step_ms": 1e3 * wall / steps,
        "cores_busy": cpu / wall,
        "split_ms": {part: 1e3 * statistics.median(s[part] for s in splits) for part in (*PARTS, "rest")}
        if splits
        else {},
        "peak_memory_bytes": memory.peak_bytes,
        "graph_rows": captured,
    }


def step_or_raise(pack: Pack) -> None:
    events = pack.step()
    for key, event in events.items():
        if event.failed:
            raise RuntimeError(f"pack member {key} failed: {event.error!r}") from event.error
        raise RuntimeError(f"pack member {key} finished inside the benchmark (max_steps too low)")


def split_into_parts(pack: Pack, prior, split_steps: int) -> list[dict[str, float]]:
    """`split_steps` more steps with a clock on each part (synchronising at each boundary on CUDA)."""
    if split_steps <= 0:
        return []
    clock = StepClock(prior.device)
    originals = {"encode_images": prior.encode_images, "predict_noise": prior.predict_noise}
    # The UNet part is the prior call (the UNet, eager or replayed from a graph, and its casts).
    prior.encode_images = clock.wrap("vae", originals["encode_images"])
    prior.predict_noise = clock.wrap("unet", originals["predict_noise"])
    renderers = [run.trainer.renderer for run in pack.members.values()]
    for renderer in renderers:
        renderer.render = clock.wrap("render", renderer.render)
    splits = []
    try:
        with clock.backward():
            for _ in range(split_steps):
                clock.parts.clear()
                clock.sync()
                start = time.perf_counter()
                step_or_raise(pack)
                clock.sync()
                elapsed = time.perf_counter() - start
                split = {part: clock.parts.get(part, 0.0) for part in PARTS}
                split["rest"] = elapsed - sum(split.values())
                splits.append(split)
    finally:
        del prior.encode_images, prior.predict_noise  # the class's methods show through again
        for renderer in renderers:
            del renderer.render
    return splits


# ---------------------------------------------------------------------------------------------------
# The separate-process baseline


def worker_main(args: argparse.Namespace) -> None:
    """One process of the baseline: load the prior, warm up, wait for the others, time, report."""
    barrier = Path(args.barrier)
    config = load_train_config(args.config, args.overrides)
    device = resolve_device(config.device)
    started = time.perf_counter()
    prior = load_prior(config.prior, device)
    load_s = time.perf_counter() - started
    state = {"prior": prior, "load_s": load_s}

    def wait_for_go():
        (barrier / f"ready-{args.worker}").touch()
        deadline = time.monotonic() + 600
        while not (barrier / "go").exists():
            if time.monotonic() > deadline:
                raise TimeoutError("the benchmark never started the timed steps")
            time.sleep(0.01)

    state["wait"] = wait_for_go
    result = measure_pack_synchronised(state, Path(args.config), args)
    result["load_s"] = load_s
    Path(args.result).write_text(json.dumps(result))


def measure_pack_synchronised(state: dict, config_path: Path, args: argparse.Namespace) -> dict:
    """measure_pack for one member, but the timed steps start when every process is ready."""
    prior = state["prior"]
    workdir = Path(tempfile.mkdtemp(prefix="pack-proc-"))
    pack = Pack()
    memory = PeakMemory(prior.device)
    try:
        config = load_train_config(config_path, member_overrides(args.worker, workdir, args.overrides))
        pack.add(0, TrainingRun(config, prior, progress=False))
        with memory.measure():
            for _ in range(args.warmup):
                step_or_raise(pack)
            sync(prior.device)
            state["wait"]()
            wall, cpu = time.perf_counter(), cpu_seconds()
            for _ in range(args.steps):
                step_or_raise(pack)
            sync(prior.device)
            wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
            splits = split_into_parts(pack, prior, args.split_steps)
    finally:
        for key in list(pack.members):
            pack.remove(key)
        shutil.rmtree(workdir, ignore_errors=True)
    return {
        "steps": args.steps,
        "seconds": wall,
        "cpu_s": cpu,
        "split_ms": {part: 1e3 * statistics.median(s[part] for s in splits) for part in (*PARTS, "rest")}
        if splits
        else {},
        "peak_memory_bytes": memory.peak_bytes,
    }


def run_processes(n: int, args: argparse.Namespace, env: dict[str, str], label: str) -> dict:
    """N processes of one member each, timed together; their steps/s add up."""
    barrier = Path(tempfile.mkdtemp(prefix=f"procs-{n}-"))
    threads = max(1, (os.cpu_count() or 1) // n)  # each its share of the cores, as Ray's num_cpus gives
    procs = []
    for i in range(n):
        command = [
            sys.executable,
            __file__,
            "--worker",
            str(i),
            "--barrier",
            str(barrier),
            "--result",
            str(barrier / f"result-{i}.json"),
            "--config",
            str(args.config),
            "--steps",
            str(args.steps),
            "--warmup",
            str(args.warmup),
            "--split-steps",
            str(args.split_steps),
            *args.overrides,
        ]
        log = open(barrier / f"worker-{i}.log", "w")  # noqa: SIM115 (closed below)
        procs.append(
            (
                subprocess.Popen(
                    command,
                    env={**env, "OMP_NUM_THREADS": str(threads)},
                    stdout=log,
                    stderr=subprocess.STDOUT,
                ),
                log,
            )
        )
    try:
        deadline = time.monotonic() + args.proc_timeout
        while len(list(barrier.glob("ready-*"))) < n:
            dead = [i for i, (p, _) in enumerate(procs) if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                raise RuntimeError(
                    f"{label}: worker(s) {dead or 'all'} did not get ready; see {barrier}/worker-*.log:\n"
                    + tail(barrier / f"worker-{(dead or [0])[0]}.log")
                )
            time.sleep(0.05)
        (barrier / "go").touch()
        for i, (p, log) in enumerate(procs):
            rc = p.wait(timeout=max(1.0, deadline - time.monotonic()))
            log.close()
            if rc != 0:
                raise RuntimeError(
                    f"{label}: worker {i} exited with {rc}:\n" + tail(barrier / f"worker-{i}.log")
                )
    finally:
        for p, log in procs:
            if p.poll() is None:
                p.kill()
            log.close()
    results = [json.loads((barrier / f"result-{i}.json").read_text()) for i in range(n)]
    shutil.rmtree(barrier, ignore_errors=True)
    wall = max(r["seconds"] for r in results)  # the timed windows start together
    splits = [r["split_ms"] for r in results if r["split_ms"]]
    return {
        "n": n,
        "steps": args.steps,
        "seconds": wall,
        "trial_steps_per_s": sum(r["steps"] / r["seconds"] for r in results),
        "step_ms": statistics.mean(1e3 * r["seconds"] / r["steps"] for r in results),
        "cores_busy": sum(r["cpu_s"] for r in results) / wall,
        "split_ms": {part: statistics.mean(s[part] for s in splits) for part in (*PARTS, "rest")}
        if splits
        else {},
        "peak_memory_bytes": sum(r["peak_memory_bytes"] for r in results),
        "load_s": [round(r["load_s"], 1) for r in results],
    }


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@contextmanager
def mps_daemon(env: dict[str, str]):
    """An MPS control daemon for the block (its pipes and logs in a temporary folder), stopped after."""
    folder = Path(tempfile.mkdtemp(prefix="mps-"))
    mps_env = {
        **env,
        "CUDA_MPS_PIPE_DIRECTORY": str(folder / "pipe"),
        "CUDA_MPS_LOG_DIRECTORY": str(folder / "log"),
    }
    for sub in ("pipe", "log"):
        (folder / sub).mkdir()
    subprocess.run([MPS_CONTROL, "-d"], env=mps_env, check=True, timeout=30)
    try:
        yield mps_env
    finally:
        subprocess.run([MPS_CONTROL], input="quit\n", text=True, env=mps_env, timeout=30)


# ---------------------------------------------------------------------------------------------------
# The table


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, {os.cpu_count()} cores"
    return f"{platform.processor() or 'cpu'}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"


def print_table(rows: list[dict], device: torch.device, notes: list[str]) -> None:
    memory = "peak GPU alloc" if device.type == "cuda" else "peak RSS"
    print(
        f"{'mode':<12}{'K':>4}{'N':>4}{'step [ms]':>11}{'trial-steps/s':>15}{'x K=1':>7}{'render':>8}{'VAE':>8}"
        f"{'UNet':>8}{'backward':>10}{'rest':>7}{memory:>16}{'cores busy':>12}"
    )
    base = next((r["trial_steps_per_s"] for r in rows if r["mode"] == "eager" and r["k"] == 1), None)
    for row in rows:
        ms = row.get("split_ms") or {}
        cells = {part: f"{ms[part]:.0f}" if part in ms else "-" for part in (*PARTS, "rest")}
        ratio = f"{row['trial_steps_per_s'] / base:.2f}" if base else "-"
        print(
            f"{row['mode']:<12}{row['k']:>4}{row['n']:>4}{row['step_ms']:>11.0f}{row['trial_steps_per_s']:>15.2f}"
            f"{ratio:>7}{cells['render']:>8}{cells['vae']:>8}{cells['unet']:>8}{cells['backward']:>10}"
            f"{cells['rest']:>7}{row['peak_memory_bytes'] / 2**30:>12.2f} GiB{row['cores_busy']:>12.2f}"
        )
    print(
        "(K: trials packed in one process; N: processes; trial-steps/s: all trials together; x K=1: against "
        "eager K=1; render / VAE / UNet / backward / rest: ms per step, medians of the split steps; "
        "processes: mean per process, memory summed)"
    )
    for note in notes:
        print(note)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ks", default="1,2,4,8,16", help="pack sizes (trials per process)")
    parser.add_argument("--modes", default="eager,cuda_graph", help="eager and/or cuda_graph")
    parser.add_argument("--procs", default="1,2,4", help="process counts for the baseline ('' for none)")
    parser.add_argument(
        "--mps", choices=("auto", "off"), default="auto", help="also run the processes under MPS"
    )
    parser.add_argument("--steps", type=int, default=10, help="timed steps per row")
    parser.add_argument(
        "--warmup", type=int, default=3, help="untimed steps first (allocations, graph capture)"
    )
    parser.add_argument("--split-steps", type=int, default=3, help="further steps split into parts")
    parser.add_argument("--config", type=Path, default=CONFIG, help="the members' trainer config")
    parser.add_argument("--proc-timeout", type=float, default=300.0, help="seconds for one process row")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--barrier", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="dotted key=value trainer overrides for every member")
    args = parser.parse_args()
    if args.worker is not None:
        worker_main(args)
        return

    config = load_train_config(args.config, args.overrides)
    device = resolve_device(config.device)
    started = time.perf_counter()
    prior = load_prior(config.prior, device)
    load_s = time.perf_counter() - started
    after_load = PeakMemory.rss_bytes() if device.type == "cpu" else torch.cuda.memory_allocated(device)
    describe = prior.describe()
    header = (
        f"prior={config.prior.name} method={config.guidance.method} resolution={config.resolution} "
        f"encoder={describe.get('encoder')} estimator={config.renderer.estimator} device={device} "
        f"({describe_device(device)}) dtype={describe['dtype']} torch={torch.__version__} "
        f"steps={args.steps} warmup={args.warmup} split_steps={args.split_steps}"
    )
    print(header, flush=True)
    print(f"prior loaded in {load_s:.1f} s; memory after loading: {after_load / 2**30:.2f} GiB", flush=True)

    rows, notes = [], []
    ks = [int(k) for k in args.ks.split(",") if k]
    for mode in [m for m in args.modes.split(",") if m]:
        if mode not in ("eager", "cuda_graph"):
            raise SystemExit(f"--modes: unknown mode {mode!r}; use eager and/or cuda_graph")
        if mode == "cuda_graph" and not hasattr(prior, "_unet_forward"):
            notes.append(f"cuda_graph rows: prior {config.prior.name} has no UNet call to capture")
            continue
        if mode == "cuda_graph" and device.type != "cuda":
            notes.append(
                "cuda_graph rows: no CUDA here, so the padded call ran eagerly (code path only, not speed)"
            )
        for k in ks:
            try:
                row = measure_pack(
                    prior,
                    args.config,
                    k,
                    args.overrides,
                    args.steps,
                    args.warmup,
                    args.split_steps,
                    mode == "cuda_graph",
                )
            except torch.OutOfMemoryError as error:
                notes.append(f"{mode} K={k}: out of memory ({str(error).splitlines()[0]}); larger K not run")
                break
            row |= {"mode": mode, "n": 1}
            rows.append(row)
            print(
                f"  {mode} K={k}: {row['trial_steps_per_s']:.2f} trial-steps/s", file=sys.stderr, flush=True
            )
    del prior
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the processes below get the device to themselves

    procs = [int(n) for n in args.procs.split(",") if n]
    env = dict(os.environ)
    runs = [("processes", env)] if procs else []
    mps = shutil.which(MPS_CONTROL)
    if procs and device.type == "cuda" and args.mps == "auto":
        if mps:
            runs.append(("processes+MPS", None))
        else:
            notes.append(f"MPS: {MPS_CONTROL} is not on this machine's PATH, so no MPS rows")
    for mode, run_env in runs:
        with mps_daemon(env) if run_env is None else _as_is(run_env) as use_env:
            for n in procs:
                try:
                    row = run_processes(n, args, use_env, f"{mode} N={n}")
                except (RuntimeError, subprocess.TimeoutExpired) as error:
                    notes.append(f"{mode} N={n}: FAILED: {error}")
                    break
                row |= {"mode": mode, "k": 1}
                rows.append(row)
                print(
                    f"  {mode} N={n}: {row['trial_steps_per_s']:.2f} trial-steps/s (loads {row['load_s']} s)",
                    file=sys.stderr,
                    flush=True,
                )

    print_table(rows, device, notes)
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "header": header,
                    "load_s": load_s,
                    "memory_after_load_bytes": after_load,
                    "rows": rows,
                    "notes": notes,
                },
                indent=2,
            )
            + "\n"
        )


@contextmanager
def _as_is(env: dict[str, str]):
    yield env


if __name__ == "__main__":
    main()
