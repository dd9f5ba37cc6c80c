"""SDS, CSD, ASD and VSD at the real model size: step time, ratios to SDS, peak memory, and the step split.

    python tests/benchmarks/bench_real_size.py [--steps 2] [--warmup 1] [--prior sd21-shaped]
        [--resolution 64] [--json FILE] [key=value ...]

The prior is `sd21-shaped` (SD 2.1-base's architecture, random weights) unless --prior says otherwise,
loaded once and shared by the four methods, on the device `device=` picks (CUDA when present). Each
method trains its own 3D model for --warmup + --steps steps; the median step time is reported with:

- the split of a step: render (the volume renderer), VAE (the prior's image encoder: the authors' 64 px
  -> 512 px -> VAE path by default), UNet (every UNet forward of the step, VSD's LoRA ones included),
  backward (loss.backward(): through the VAE encoder, the renderer and VSD's LoRA), other (optimizer,
  noise, text lookups). CUDA timings synchronize at each boundary, so the parts add up to the step;
- peak memory while the method's steps ran: on CUDA torch's peak allocated bytes; on the CPU the peak
  resident set of the process (the shared prior's weights and all four 3D models included), sampled every
  5 ms after handing freed heap back to the system, so one method's peak is not another's leftover.

The methods run side by side, one step each per round, the order reversed every other round (SDS CSD ASD
VSD, then VSD ASD CSD SDS): a drift in the machine's load hits every method alike instead of whichever ran
last, and the ratios are measured in one run. VSD's LoRA stays on the shared UNet throughout, switched off
outside VSD's own calls (peft then calls the base layers directly). Targets: ASD <= 1.5 x SDS (3 against 2
batched UNet rows; the ratio is lower when the VAE and renderer are a large share of the step) and VSD
above ASD.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import statistics
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch

from trainers.config import load_train_config
from trainers.per_prompt import Trainer
from trainers.priors import load_prior, resolve_device

METHODS = ("sds", "csd", "asd", "vsd")
PARTS = ("render", "vae", "unet", "backward")


class StepClock:
    """Seconds spent in each part of the current step, measured by wrapping the parts' entry points."""

    def __init__(self, device: torch.device):
        self.device = device
        self.parts: dict[str, float] = defaultdict(float)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def wrap(self, part: str, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            self.sync()
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.sync()
                self.parts[part] += time.perf_counter() - start

        return timed

    @contextmanager
    def module(self, part: str, module: torch.nn.Module):
        starts: list[float] = []

        def before(*_):
            self.sync()
            starts.append(time.perf_counter())

        def after(*_):
            self.sync()
            self.parts[part] += time.perf_counter() - starts.pop()

        handles = [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    @contextmanager
    def backward(self):
        original = torch.Tensor.backward
        torch.Tensor.backward = self.wrap("backward", original)
        try:
            yield
        finally:
            torch.Tensor.backward = original


class PeakMemory:
    """Peak memory over blocks: CUDA's allocator peak, or the CPU process's sampled resident set."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_bytes = 0

    @staticmethod
    def rss_bytes() -> int:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    @staticmethod
    def release_freed_heap() -> None:
        """glibc keeps freed blocks resident; trimming them makes the next block's RSS peak its own."""
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc: the peak may include earlier blocks' freed memory
            pass

    @contextmanager
    def measure(self):
        """Raise peak_bytes to this block's peak (it accumulates over the blocks measured)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            yield
            torch.cuda.synchronize(self.device)
            self.peak_bytes = max(self.peak_bytes, torch.cuda.max_memory_allocated(self.device))
            return
        self.release_freed_heap()
        stop = threading.Event()
        peak = [self.rss_bytes()]

        def sample():
            while not stop.wait(0.005):
                peak[0] = max(peak[0], self.rss_bytes())

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            yield
        finally:
            stop.set()
            sampler.join()
            self.peak_bytes = max(self.peak_bytes, peak[0], self.rss_bytes())


class MethodRun:
    """One method's trainer and what its steps measured."""

    def __init__(self, method: str, base: list[str], prior, device: torch.device):
        self.method = method
        self.trainer = Trainer(load_train_config(None, [*base, f"guidance.method={method}"]), prior)
        self.memory = PeakMemory(device)
        self.step_times: list[float] = []
        self.splits: list[dict[str, float]] = []

    def step(self, clock: StepClock, timed: bool, label: str) -> None:
        clock.parts.clear()
        with self.memory.measure():
            clock.sync()
            start = time.perf_counter()
            self.trainer.training_step()
            clock.sync()
            elapsed = time.perf_counter() - start
        if timed:
            self.step_times.append(elapsed)
            split = {part: clock.parts.get(part, 0.0) for part in PARTS}
            split["other"] = elapsed - sum(split.values())
            self.splits.append(split)
        print(f"  {self.method} step {label}: {elapsed:.2f} s", file=sys.stderr, flush=True)

    def result(self) -> dict:
        return {
            "step_s": statistics.median(self.step_times),
            "step_times_s": self.step_times,
            "split_s": {part: statistics.median(s[part] for s in self.splits) for part in (*PARTS, "other")},
            "peak_memory_bytes": self.memory.peak_bytes,
        }


def run_side_by_side(methods: list[str], base: list[str], prior, device, steps: int, warmup: int) -> dict:
    """Round-robin over the methods, one step each per round, the order reversed every other round."""
    runs = [MethodRun(method, base, prior, device) for method in methods]
    clock = StepClock(device)
    prior.encode_images = clock.wrap("vae", prior.encode_images)
    try:
        with clock.module("unet", prior.unet), clock.backward():
            for run in runs:  # the renderer is each trainer's own
                run.trainer.renderer.render = clock.wrap("render", run.trainer.renderer.render)
            for i in range(warmup + steps):
                for run in runs if i % 2 == 0 else reversed(runs):
                    run.step(clock, timed=i >= warmup, label=f"{i + 1}/{warmup + steps}")
    finally:
        del prior.encode_images  # the instance attribute: the class method shows through again
        for run in runs:
            run.trainer.close()
    return {run.method: run.result() for run in runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2, help="timed steps per method (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (allocations, caches)")
    parser.add_argument("--prior", default="sd21-shaped")
    parser.add_argument("--resolution", type=int, default=64, help="render size in pixels")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("overrides", nargs="*", help="extra dotted key=value trainer overrides")
    args = parser.parse_args()

    base = [f"prior.name={args.prior}", f"resolution={args.resolution}", "prompt=a red cube", *args.overrides]
    config = load_train_config(None, base)
    device = resolve_device(config.device)
    start = time.perf_counter()
    prior = load_prior(config.prior, device)
    load_s = time.perf_counter() - start
    baseline = PeakMemory.rss_bytes() if device.type == "cpu" else torch.cuda.memory_allocated(device)
    methods = [m for m in METHODS if m in args.methods.split(",")]
    results = run_side_by_side(methods, base, prior, device, args.steps, args.warmup)

    describe = prior.describe()
    header = (
        f"prior={args.prior} resolution={args.resolution} device={device} "
        f"({torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.processor() or 'cpu'}, "
        f"{torch.get_num_threads()} threads) dtype={describe['dtype']} image_size={describe['image_size']} "
        f"encoder={describe.get('encoder')} attention={describe.get('attention')} "
        f"channels_last={describe.get('channels_last')} compile_unet={describe.get('compile_unet')} "
        f"torch={torch.__version__} steps={args.steps} warmup={args.warmup} (medians; methods side by side)"
    )
    memory_label = "peak GPU alloc" if device.type == "cuda" else "peak RSS"
    print(header)
    print(f"prior loaded in {load_s:.1f} s; memory after loading: {baseline / 2**30:.2f} GiB")
    print(
        f"{'method':<7}{'step [ms]':>11}{'it/s':>8}{'x SDS':>7}{'render':>9}{'VAE':>9}{'UNet':>9}"
        f"{'backward':>10}{'other':>8}{memory_label:>16}"
    )
    sds = results.get("sds", {}).get("step_s")
    for method, result in results.items():
        ms = {part: 1e3 * seconds for part, seconds in result["split_s"].items()}
        ratio = f"{result['step_s'] / sds:.2f}" if sds else "-"
        print(
            f"{method:<7}{1e3 * result['step_s']:>11.0f}{1 / result['step_s']:>8.2f}{ratio:>7}"
            f"{ms['render']:>9.0f}{ms['vae']:>9.0f}{ms['unet']:>9.0f}{ms['backward']:>10.0f}"
            f"{ms['other']:>8.0f}{result['peak_memory_bytes'] / 2**30:>12.2f} GiB"
        )
    print("(render / VAE / UNet / backward / other: ms per step, medians)")
    if {"sds", "asd", "vsd"} <= results.keys():
        asd, vsd = results["asd"]["step_s"], results["vsd"]["step_s"]
        unet_ratio = results["asd"]["split_s"]["unet"] / max(results["sds"]["split_s"]["unet"], 1e-9)
        print(
            f"ASD <= 1.5 x SDS: {'yes' if asd <= 1.5 * sds else 'NO'} ({asd / sds:.2f}; UNet alone "
            f"{unet_ratio:.2f}); VSD > ASD: {'yes' if vsd > asd else 'NO'} ({vsd / asd:.2f} x ASD)"
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {"header": header, "load_s": load_s, "memory_after_load_bytes": baseline, "methods": results},
                indent=2,
            )
            + "\n"
        )


if __name__ == "__main__":
    main()
