"""Step time of SDS, CSD, ASD and VSD side by side: same prior, same resolution, same geometry.

    python tests/benchmarks/bench_guidance.py [--steps 20] [--prior tiny-sd] [--resolution 64] [key=value ...]

Prints the median step time of each method and its ratio to SDS. Targets: ASD <= 1.5 x SDS (three
prior evaluations against two, each in one batched forward) and VSD above ASD (it also trains a LoRA).
The timings are interleaved (SDS, CSD, ASD, VSD, SDS, ...) so that machine noise hits every method alike.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from trainers.config import load_train_config
from trainers.priors import load_prior, resolve_device
from trainers.train import Trainer

METHODS = ("sds", "csd", "asd", "vsd")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--prior", default="tiny-sd")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("overrides", nargs="*", help="extra dotted key=value trainer overrides")
    args = parser.parse_args()

    base = [f"prior.name={args.prior}", f"resolution={args.resolution}", "prompt=a red cube", *args.overrides]
    device = resolve_device("auto")
    prior = load_prior(load_train_config(None, base).prior, device)
    trainers = {m: Trainer(load_train_config(None, [*base, f"guidance.method={m}"]), prior) for m in METHODS}
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    for i in range(args.warmup + args.steps):
        for method, trainer in trainers.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            trainer.training_step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= args.warmup:
                times[method].append(time.perf_counter() - start)
    for trainer in trainers.values():
        trainer.close()

    sds = statistics.median(times["sds"])
    print(
        f"prior={args.prior} resolution={args.resolution} device={device} steps={args.steps} (median step time)"
    )
    print(f"{'method':<8}{'step [ms]':>12}{'x SDS':>8}")
    for method in METHODS:
        median = statistics.median(times[method])
        print(f"{method:<8}{median * 1e3:>12.1f}{median / sds:>8.2f}")
    asd, vsd = statistics.median(times["asd"]), statistics.median(times["vsd"])
    print(f"ASD <= 1.5 x SDS: {'yes' if asd <= 1.5 * sds else 'NO'} ({asd / sds:.2f})")
    print(f"VSD > ASD: {'yes' if vsd > asd else 'NO'} ({vsd / asd:.2f} x ASD)")


if __name__ == "__main__":
    main()
