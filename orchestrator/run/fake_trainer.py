"""A stand-in for `trainers.per_prompt.train` with a known cost: the orchestrator's plumbing tests and the
overhead benchmark use it to measure Ray/Optuna/MLflow cost apart from training cost.

It honours the same contract (callbacks, checkpoints, resume at the same step) and its loss is a
smooth function of the searched keys, so a search has something to find. Select it with
`SweepContext(train_fn="orchestrator.run.fake_trainer:train", load_prior_fn="orchestrator.run.fake_trainer:load_prior")`.
Seconds per step: $DREAMSWEEP_FAKE_STEP_S (default 0.01), busy-waiting so it costs CPU like training.
A config with `seed: 7` (FAIL_ONCE_SEED) raises once, just after its first checkpoint, to exercise
Tune's retries from the last checkpoint.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import imageio.v3 as iio
import numpy as np

from trainers.per_prompt import TrainResult

LOADS = {"count": 0}
FAIL_ONCE_SEED = 7


def load_prior(config, device):
    LOADS["count"] += 1
    return {"name": config.name, "device": str(device)}


def loss_at(config, step: int) -> float:
    g, o = config.guidance, config.optimizer
    t_max = g.t_max if isinstance(g.t_max, float) else 0.98
    target = (g.eta - 0.3) ** 2 + (g.cfg_scale / 100 - 0.075) ** 2 + (t_max - 0.8) ** 2 + o.lr_encoding
    return target + 1.0 / (1 + step)


def train(
    config,
    prior=None,
    *,
    on_metrics=None,
    on_checkpoint=None,
    on_artifact=None,
    resume_from=None,
    progress=True,
):
    step_s = float(os.environ.get("DREAMSWEEP_FAKE_STEP_S", "0.01"))
    out = Path(config.output_dir)
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(json.dumps({"prompt": config.prompt}))
    step = 0
    if resume_from is not None:
        step = json.loads((Path(resume_from) / "state.json").read_text())["step"]
    log, last, metrics = config.logging, None, {}
    while step < config.max_steps:
        deadline = time.perf_counter() + step_s
        while time.perf_counter() < deadline:
            pass
        step += 1
        marker = out / "failed_once"
        if config.seed == FAIL_ONCE_SEED and last is not None and not marker.exists():
            marker.write_text(str(step))
            raise RuntimeError(f"fake failure at step {step} (seed {FAIL_ONCE_SEED} fails once)")
        if step % log.log_every == 0 or step == config.max_steps:
            metrics = {"train/loss": loss_at(config, step), "train/t": 500.0}
            if on_metrics:
                on_metrics(step, metrics)
        if log.checkpoint_every and step % log.checkpoint_every == 0 or step == config.max_steps:
            last = out / "checkpoints" / f"step_{step:07d}"
            last.mkdir(parents=True, exist_ok=True)
            (last / "state.json").write_text(json.dumps({"step": step}))
            if on_checkpoint:
                on_checkpoint(step, last)
    grid = out / "validation" / f"step_{step:07d}.png"
    grid.parent.mkdir(parents=True, exist_ok=True)
    # A real (tiny) image whose shade follows the loss: the report and MLflow's image view can show it.
    shade = int(255 * min(1.0, loss_at(config, step)))
    iio.imwrite(grid, np.full((8, 16, 3), shade, dtype=np.uint8))
    if on_artifact:
        on_artifact(step, grid)
    final = {"train/loss": loss_at(config, step), "train/t": 500.0} if step else {}
    return TrainResult(final, out, last, [grid])
