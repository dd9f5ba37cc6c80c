"""Scoring finished runs from their directories: what `dreamsweep eval RUN_DIR...` does.

    evaluate_runs(["outputs/cube", "outputs/torus"], clip="openai/clip-vit-large-patch14")

A run directory is a trainer's `output_dir` (config.yaml and checkpoints/step_*). Only the 3D model is
rebuilt from the last checkpoint (field, background, renderer): the diffusion prior is not loaded.
Every input is checked before anything is rendered: each directory has a config and a checkpoint, the
CLIP model exists and is a CLIP model. R@1 ranks each run's images against the distinct prompts of all
the runs given together (a fan-out sweep's runs are one such set); with one prompt it is undefined. The
overall figures are means over runs: over prompts, as in the paper, when each run has its own prompt.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from trainers.config_base import ConfigError
from trainers.evaluation.clip import (
    PAPER_CLIP,
    SINGLE_PROMPT_R_AT_1,
    load_clip,
    mean_or_none,
    orbit_renders,
    retrieval_scores,
)
from trainers.priors.base import resolve_device


class RunDirError(ConfigError):
    """A directory given to `dreamsweep eval` that is not a finished run."""


@dataclass
class FinishedRun:
    path: Path
    config: Any  # TrainConfig
    checkpoint: Path
    step: int


def find_run(run_dir: str | os.PathLike[str]) -> FinishedRun:
    """The run's config and last checkpoint, checked; loads no weights."""
    from trainers.checkpoint import latest_checkpoint
    from trainers.config import load_train_config

    path = Path(run_dir)
    if not path.is_dir():
        raise RunDirError(f"run directory {str(path)!r} does not exist")
    if not (path / "config.yaml").is_file():
        raise RunDirError(
            f"run directory {str(path)!r} has no config.yaml: give a trainer's output_dir "
            "(as `dreamsweep train` or a sweep trial's prompt_NNN folder writes it)"
        )
    checkpoint = latest_checkpoint(path / "checkpoints")
    if checkpoint is None:
        raise RunDirError(
            f"run directory {str(path)!r} has no checkpoint (checkpoints/step_*/state.pt): nothing to "
            f"render; finish or resume the run first (dreamsweep train {path / 'config.yaml'} --resume latest)"
        )
    config = load_train_config(path / "config.yaml")
    return FinishedRun(path, config, checkpoint, int(checkpoint.name.removeprefix("step_")))


def load_renderer(run: FinishedRun, device: torch.device):
    """The run's VolumeRenderer (field and background included) with its checkpointed weights, in eval mode."""
    from trainers.checkpoint import load_checkpoint
    from trainers.geometry.implicit_volume import ImplicitVolume
    from trainers.rendering import Background, VolumeRenderer

    config = run.config
    field = ImplicitVolume(config.geometry)
    renderer = VolumeRenderer(config.renderer, field, Background(config.background), config.geometry.radius)
    renderer.load_state_dict(load_checkpoint(run.checkpoint)["renderer"])
    return renderer.to(device).eval()


def evaluate_runs(
    run_dirs: Sequence[str | os.PathLike[str]],
    *,
    clip: str = PAPER_CLIP,
    views: int = 120,
    elevation: float = 15.0,
    resolution: int | None = None,
    batch_size: int = 32,
    device: torch.device | str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    on_progress=None,
    on_note=None,
) -> dict[str, Any]:
    """CLIP similarity and R@1 of each run (and their means), plus ground-truth metrics where the prompt
    has a ground truth. `on_progress(done, total, run)` is called as each run is scored; `on_note(text)`
    with what the caller should know before the rendering starts (R@1 undefined for one prompt)."""
    from trainers.evaluation.ground_truth import evaluate_against_scene
    from trainers.priors.base import default_cache_dir
    from trainers.reference.scenes import is_scene_prompt, scene_cache_dir

    if not run_dirs:
        raise RunDirError("no run directory given: name one or more trainers' output_dir")
    if views < 1:
        raise ConfigError(f"--views must be at least 1 (got {views})")
    runs = [find_run(run_dir) for run_dir in run_dirs]
    device = resolve_device(device)
    model = load_clip(clip, device=device, cache_dir=cache_dir, setting="--clip")
    prompts = list(dict.fromkeys(run.config.prompt for run in runs))
    if len(prompts) == 1 and on_note:
        on_note(SINGLE_PROMPT_R_AT_1)

    rows, image_embeds = [], []
    for done, run in enumerate(runs):
        renderer = load_renderer(run, device)
        config = run.config

        def render(cameras, width, height, renderer=renderer):
            return renderer.render(cameras.to(device), width, height, train=False)

        with torch.no_grad():
            images = orbit_renders(
                render, views, elevation, config.camera, resolution or config.resolution, batch_size
            )
            image_embeds.append(model.embed_images(images, batch_size))
            row: dict[str, Any] = {"run": str(run.path), "prompt": config.prompt, "step": run.step}
            if is_scene_prompt(config.prompt):
                row |= evaluate_against_scene(
                    render,
                    config.prompt,
                    resolution=config.resolution,
                    n_views=config.logging.eval_views,
                    camera_cfg=config.camera,
                    cache_dir=scene_cache_dir(default_cache_dir(config.prior)),
                )
        rows.append(row)
        if on_progress:
            on_progress(done + 1, len(runs), run)

    text = model.embed_texts(prompts)
    own = [prompts.index(run.config.prompt) for run in runs]
    for row, score in zip(rows, retrieval_scores(image_embeds, own, text), strict=True):
        row["clip_similarity"], row["clip_r_at_1"] = score["similarity"], score["recall_at_1"]
    result: dict[str, Any] = {
        "clip": clip,
        "views": views,
        "elevation": elevation,
        "prompts": len(prompts),
        "similarity": mean_or_none([row["clip_similarity"] for row in rows]),
        "recall_at_1": mean_or_none([row["clip_r_at_1"] for row in rows]),
        "runs": rows,
    }
    if result["recall_at_1"] is None:
        result["recall_at_1_undefined"] = SINGLE_PROMPT_R_AT_1
    return result
