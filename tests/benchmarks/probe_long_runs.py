"""Why long reference runs get worse: one prompt, PSNR at held-out views along one run, per setting.

    python tests/benchmarks/probe_long_runs.py "guidance.cfg_scale=1" "guidance.cfg_scale=7.5"
    python tests/benchmarks/probe_long_runs.py --snap-cameras "guidance.cfg_scale=1" "guidance.cfg_scale=7.5"

Each argument is one run's comma-separated overrides of `sweeps/configs/reference_cpu.yaml` (16 px,
1,000 steps, "a yellow cylinder on top of a pink cube"). `--snap-cameras` draws every training camera
from the prior's own `n_views` cameras and makes the camera weighting sharp (κ = 10⁴), so that the
camera-conditioned prior's answer at a training camera is that camera's true render: the experiment
behind docs/study.md's finding on the finite view set. It patches the trainer's camera sampler here,
in the probe only; it is not a config option (yet).
"""

from __future__ import annotations

import argparse

import torch

from trainers.cameras import CameraBatch
from trainers.config import load_train_config
from trainers.per_prompt import Trainer
from trainers.priors import load_prior

PROMPT = "a yellow cylinder on top of a pink cube"
MILESTONES = (150, 300, 600, 1000)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--snap-cameras", action="store_true")
    parser.add_argument("runs", nargs="+", help="comma-separated overrides per run")
    args = parser.parse_args()
    torch.set_num_threads(1)
    base = ["resolution=16", "prior.image_size=16", f"prompt={PROMPT}", "max_steps=1000", "device=cpu"]
    if args.snap_cameras:
        base.append("prior.reference.camera_sharpness=10000")
    prior = None
    for run in args.runs:
        config = load_train_config("sweeps/configs/reference_cpu.yaml", base + run.split(","))
        prior = prior or load_prior(config.prior, "cpu")
        trainer = Trainer(config, prior)
        if args.snap_cameras:
            trainer.cameras.sample = snapped_sampler(prior.cameras)
        for milestone in MILESTONES:
            while trainer.step < milestone:
                trainer.training_step()
            scores = trainer.evaluate()
            print(
                f"{run} step {milestone}: PSNR {scores['eval/psnr']:.2f} dB, IoU {scores['eval/iou']:.3f}",
                flush=True,
            )
        trainer.close()


def snapped_sampler(cameras: CameraBatch):
    def sample(batch: int, generator: torch.Generator) -> CameraBatch:
        index = torch.randint(0, len(cameras), (batch,), generator=generator)
        return CameraBatch(
            cameras.c2w[index], cameras.fovy[index], cameras.elevation[index], cameras.azimuth[index],
            cameras.distance[index],
        )  # fmt: skip

    return sample


if __name__ == "__main__":
    main()
