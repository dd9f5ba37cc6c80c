"""One per-prompt run scored at several steps along the way, with its held-out renders at each.

    python tests/benchmarks/run_curve.py --config sweeps/configs/reference_learned_cpu.yaml \
        --prompt "a yellow cylinder on top of a pink cube" --steps 75,150,300,600 --png curve.png \
        prior.reference.learned_weights=/tmp/learned_step4000

`max_steps` is the last milestone, so t anneals over the whole run as in a run of that length. Prints
one JSON line: the ground-truth metrics (held-out views) at step 0 and at each milestone. The PNG has
one row of 4 held-out views each: the true scene, the untrained model, then each milestone.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from trainers.config import load_train_config
from trainers.config_base import parse_overrides
from trainers.per_prompt import Trainer
from trainers.reference.scenes import evaluation_cameras, render_scene


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="sweeps/configs/reference_learned_cpu.yaml")
    parser.add_argument("--prompt", default="a yellow cylinder on top of a pink cube")
    parser.add_argument("--steps", default="150,600", help="milestones, comma-separated")
    parser.add_argument("--png", type=Path, default=None)
    parser.add_argument("overrides", nargs="*", help="dotted key=value trainer overrides")
    args = parser.parse_args()
    torch.set_num_threads(1)
    milestones = sorted(int(s) for s in args.steps.split(","))
    overrides = {"device": "cpu", **parse_overrides(args.overrides)}
    overrides |= {"prompt": args.prompt, "max_steps": milestones[-1]}
    config = load_train_config(args.config, overrides)
    trainer = Trainer(config)
    cameras = evaluation_cameras(config.logging.eval_views, config.camera)[torch.arange(4)]

    def score() -> dict[str, float]:
        return {k: round(float(v), 3) for k, v in trainer.evaluate().items() if k.startswith("eval/")}

    @torch.no_grad()
    def views() -> torch.Tensor:
        out = trainer.render_views(cameras)
        return (out["rgb_fg"] + (1 - out["opacity"])).clamp(0, 1).cpu()  # onto the scenes' white

    truth = render_scene(args.prompt, cameras, config.resolution, config.prior.reference.scene)["rgb"]
    rows, curve = [truth, views()], {"0": score()}
    for milestone in milestones:
        while trainer.step < milestone:
            trainer.training_step()
        curve[str(milestone)] = score()
        rows.append(views())
    trainer.close()
    print(json.dumps({"prompt": args.prompt, "overrides": args.overrides, "curve": curve}), flush=True)
    if args.png:
        from PIL import Image

        grid = torch.cat([torch.cat(list(row), dim=1) for row in rows], dim=0)  # [rows·H, 4·W, 3]
        image = Image.fromarray((grid.numpy() * 255).round().astype(np.uint8))
        args.png.parent.mkdir(parents=True, exist_ok=True)
        image.resize((image.width * 2, image.height * 2), Image.NEAREST).save(args.png, optimize=True)


if __name__ == "__main__":
    main()
