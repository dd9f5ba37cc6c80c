"""`dreamsweep generate`: a trained generator's 3D result for any prompt, in one forward pass.

    result = generate("outputs/amortized", "a purple torus beside a red cube", "torus.gif")

The prompt need not have been trained on: its embedding comes from the prior's text encoder (the
same `GeneratorTextEncoder` the run's cache was built with), the generator maps it to a field, and
the renderer draws a turntable of it. No optimisation happens.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from trainers.amortized.config import AmortizedConfig
from trainers.amortized.loop import AmortizedModel, camera_slice, prompt_slug
from trainers.amortized.prompt_library import GeneratorTextEncoder, warn_truncated
from trainers.cameras import turntable_cameras
from trainers.checkpoint import latest_checkpoint, load_checkpoint
from trainers.priors import load_prior, resolve_device
from trainers.visualize import save_turntable


@dataclass
class Generated:
    path: Path
    forward_s: float  # text embedding + generator forward: the cost of a new prompt's 3D model
    render_s: float  # drawing the turntable's frames
    frames: torch.Tensor  # [N, H, W, 3]


def load_run(run_dir: str | Path, device: str | torch.device | None = None):
    """(config, model in eval mode, text encoder) of a finished or running amortized run."""
    run_dir = Path(run_dir)
    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        raise FileNotFoundError(f"{run_dir} is not an amortized run directory (no config.yaml)")
    config = AmortizedConfig.model_validate(yaml.safe_load(config_file.read_text()))
    checkpoint = latest_checkpoint(run_dir / "checkpoints")
    if checkpoint is None:
        raise FileNotFoundError(f"{run_dir}/checkpoints holds no checkpoint yet: train first")
    device = resolve_device(device or config.device)
    prior = load_prior(config.prior, device)
    encoder = GeneratorTextEncoder(prior)
    model = AmortizedModel(config, encoder.dim).to(device)
    model.load_state_dict(load_checkpoint(checkpoint)["model"])
    return config, model.eval(), encoder


@torch.no_grad()
def generate(
    run_dir: str | Path,
    prompt: str,
    output: str | Path | None = None,
    frames: int | None = None,
    device: str | torch.device | None = None,
) -> Generated:
    if not prompt.strip():
        raise ValueError("generate: the prompt is empty")
    config, model, encoder = load_run(run_dir, device)
    warn_truncated(encoder, [prompt])
    device = next(model.parameters()).device
    started = time.perf_counter()
    text = encoder.encode([prompt]).to(device)
    codes = model.codes(text, None)
    forward_s = time.perf_counter() - started

    cam = config.camera
    cameras = turntable_cameras(
        frames or config.logging.turntable_frames, cam.eval_elevation, cam.eval_distance, cam.eval_fovy
    ).to(device)
    started = time.perf_counter()
    model.select(codes, 0)
    res = config.resolution
    rgb = torch.cat(
        [
            model.renderer.render(camera_slice(cameras, i, i + 1), res, res, train=False)["rgb"]
            for i in range(len(cameras))
        ]
    )
    render_s = time.perf_counter() - started
    if output is None:
        output = Path(run_dir) / "generated" / f"{prompt_slug(prompt)}.{config.logging.turntable_format}"
    path = save_turntable(output, rgb)
    return Generated(Path(path), forward_s, render_s, rgb.cpu())
