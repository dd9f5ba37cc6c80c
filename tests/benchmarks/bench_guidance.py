"""Step time of SDS, CSD, ASD and VSD side by side: same prior, same resolution, same geometry.

    python tests/benchmarks/bench_guidance.py [--steps 20] [--prior tiny-sd] [--resolution 64] [key=value ...]

Prints the median time of a whole training step and of its distillation part alone (prior forwards,
VSD's LoRA update, the loss's backward to the render) for each method, with ratios to SDS. Targets: ASD <= 1.5 x SDS (three
prior evaluations against two, each in one batched forward) and VSD above ASD (it also trains a LoRA).
The timings are interleaved (SDS, CSD, ASD, VSD, SDS, ...) so that machine noise hits every method alike.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from trainers.config import load_train_config
from trainers.per_prompt import Trainer
from trainers.priors import load_prior, resolve_device

METHODS = ("sds", "csd", "asd", "vsd")


def timed(device: torch.device, fn) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def guidance_only(trainer: Trainer) -> None:
    """The distillation part of a step alone: prior forward(s), VSD's LoRA step, the loss and its backward
    to the render (no rendering, no 3D model), on a fixed render-sized image."""
    res = trainer.config.resolution
    images = torch.rand(trainer.config.batch_size, 3, res, res, device=trainer.device, requires_grad=True)
    cond = trainer.text.by_label[next(iter(trainer.text.by_label))].unsqueeze(0)
    cameras = torch.eye(4, device=trainer.device).reshape(1, 16)
    out = trainer.guidance(
        images, cond, trainer.text.uncond, step=0, generator=trainer.generator, camera_vectors=cameras
    )
    (out.loss + sum(out.extra_losses.values())).backward()


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
    guidance_times: dict[str, list[float]] = {m: [] for m in METHODS}
    for _ in range(args.warmup + args.steps):
        for method, trainer in trainers.items():
            times[method].append(timed(device, trainer.training_step))
            guidance_times[method].append(timed(device, lambda t=trainer: guidance_only(t)))
    for trainer in trainers.values():
        trainer.close()

    steps = {m: statistics.median(v[args.warmup :]) for m, v in times.items()}
    guidance = {m: statistics.median(v[args.warmup :]) for m, v in guidance_times.items()}
    print(f"prior={args.prior} resolution={args.resolution} device={device} steps={args.steps} (medians)")
    print(f"{'method':<8}{'step [ms]':>12}{'x SDS':>8}{'guidance [ms]':>16}{'x SDS':>8}")
    for m in METHODS:
        print(
            f"{m:<8}{steps[m] * 1e3:>12.1f}{steps[m] / steps['sds']:>8.2f}"
            f"{guidance[m] * 1e3:>16.1f}{guidance[m] / guidance['sds']:>8.2f}"
        )
    for label, table in (("whole step", steps), ("guidance alone", guidance)):
        sds, asd, vsd = table["sds"], table["asd"], table["vsd"]
        print(
            f"{label}: ASD <= 1.5 x SDS: {'yes' if asd <= 1.5 * sds else 'NO'} ({asd / sds:.2f}); "
            f"VSD > ASD: {'yes' if vsd > asd else 'NO'} ({vsd / asd:.2f} x ASD)"
        )


if __name__ == "__main__":
    main()
