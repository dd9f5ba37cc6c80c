"""The per-prompt training loop: camera → render → guidance(prior) → gradient → optimizer.

`train()` knows nothing of Ray, Optuna or MLflow. It takes a config and (optionally) an already
loaded prior, and hands every logged value, checkpoint and artifact to callbacks, so an orchestrator
can forward them wherever it likes. Every random draw comes from one seeded generator whose state is
checkpointed, so a run resumed from a checkpoint ends bit-for-bit where an uninterrupted one does (CPU).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml
from tqdm.auto import tqdm

from trainers import evaluation
from trainers.cameras import (
    CameraSampler,
    orbit_cameras,
    turntable_cameras,
    view_dependent_prompt,
    view_direction_labels,
)
from trainers.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    restore_rng_state,
    rng_state,
    save_checkpoint,
)
from trainers.config import TrainConfig, config_to_dict
from trainers.geometry.implicit_volume import ImplicitVolume
from trainers.guidance import Guidance, make_guidance
from trainers.priors import load_prior, resolve_device
from trainers.priors.base import DiffusionPrior, out_of_memory_hint
from trainers.rendering import Background, VolumeRenderer
from trainers.step import NonFiniteLossError, StepInputs, StepResult, step_alone

__all__ = ["NonFiniteLossError", "TrainResult", "Trainer", "TrainingRun", "reported_metrics", "train"]
from trainers.visualize import save_render_grid, save_turntable

MetricsCallback = Callable[[int, dict[str, float]], None]
PathCallback = Callable[[int, Path], None]

VIEW_LABELS = ("front", "side", "back", "overhead")


@dataclass
class TrainResult:
    final_metrics: dict[str, float]
    output_dir: Path
    last_checkpoint: Path | None
    artifacts: list[Path] = field(default_factory=list)


def reported_metrics(config: TrainConfig) -> set[str]:
    """Every metric name `train` reports for this config (orchestrators validate objectives against it)."""
    names = {"train/loss", "train/loss_guidance", "train/grad_norm", "train/t", "train/t_min", "train/t_max"}
    names |= {"train/opacity", "train/it_per_s"}
    if config.guidance.method == "asd":
        names.add("train/t_plus")
    if config.guidance.method == "vsd":
        names.add("train/loss_lora")
    if config.loss.lambda_sparsity > 0:
        names.add("train/loss_sparsity")
    if config.loss.lambda_opacity > 0:
        names.add("train/loss_opacity")
    names |= evaluation.metric_names(config)
    return names


class TextConditioning:
    """The prompt's embeddings once per view label (view-dependent prompting) and the unconditional one."""

    def __init__(self, prior: DiffusionPrior, config: TrainConfig):
        self.view_dependent = config.camera.view_dependent_prompting
        labels = VIEW_LABELS if self.view_dependent else ("",)
        prompts = [
            view_dependent_prompt(config.prompt, label) if label else config.prompt for label in labels
        ]
        with torch.no_grad():
            self.by_label = dict(zip(labels, prior.encode_text(prompts), strict=True))
            self.uncond = prior.encode_text([config.negative_prompt])

    def for_views(self, elevation: torch.Tensor, azimuth: torch.Tensor, camera_cfg) -> torch.Tensor:
        if not self.view_dependent:
            return self.by_label[""].unsqueeze(0).expand(len(elevation), -1, -1)
        labels = view_direction_labels(elevation, azimuth, camera_cfg)
        return torch.stack([self.by_label[label] for label in labels])


class Trainer:
    """The pieces of one run, built from a config. `train()` below drives it."""

    def __init__(self, config: TrainConfig, prior: DiffusionPrior | None = None):
        self.config = config
        self.device = resolve_device(config.device)
        seed_everything(config.seed)
        self.generator = torch.Generator(device="cpu").manual_seed(config.seed)
        self.prior = prior if prior is not None else load_prior(config.prior, self.device)
        self.field = ImplicitVolume(config.geometry).to(self.device)
        self.background = Background(config.background).to(self.device)
        self.renderer = VolumeRenderer(config.renderer, self.field, self.background, config.geometry.radius)
        self.renderer.to(self.device)
        self.guidance: Guidance = make_guidance(
            config.guidance, self.prior, config.max_steps, ground_truth_target_fn(config)
        )
        self.cameras = CameraSampler(config.camera)
        self.text = TextConditioning(self.prior, config)
        self.optimizer = torch.optim.Adam(
            self.parameter_groups(), betas=config.optimizer.betas, eps=config.optimizer.eps
        )
        self.step = 0

    def parameter_groups(self) -> list[dict]:
        opt = self.config.optimizer
        groups = self.field.parameter_groups()
        out = [
            {"params": list(groups["encoding"]), "lr": opt.lr_encoding, "name": "encoding"},
            {"params": list(groups["network"]), "lr": opt.lr_network, "name": "network"},
            {"params": list(self.background.parameters()), "lr": opt.lr_background, "name": "background"},
            {
                "params": self.guidance.trainable_parameters(),
                "lr": self.config.guidance.lora_lr,
                "name": "lora",
            },
        ]
        return [group for group in out if group["params"]]

    # -- state -------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "renderer": self.renderer.state_dict(),
            "guidance": self.guidance.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "rng": rng_state(self.generator),
        }

    def load_state_dict(self, state: dict) -> None:
        self.renderer.load_state_dict(state["renderer"])
        self.guidance.load_state_dict(state["guidance"])
        self.optimizer.load_state_dict(state["optimizer"])
        restore_rng_state(self.generator, state["rng"])
        self.step = int(state["step"])

    # -- one step ----------------------------------------------------------------------------------

    def render_step(self) -> StepInputs:
        """This step's renders at random cameras, with the text guidance conditions them on."""
        cfg = self.config
        self.renderer.train()
        self.renderer.update_step(self.step)
        cameras = self.cameras.sample(cfg.batch_size, self.generator).to(self.device)
        with out_of_memory_hint(f"the forward pass of step {self.step} (the render)"):
            out = self.renderer.render(
                cameras, cfg.resolution, cfg.resolution, train=True, generator=self.generator
            )
        cond = self.text.for_views(cameras.elevation, cameras.azimuth, cfg.camera)
        images = out["rgb"].permute(0, 3, 1, 2)
        return StepInputs(images, out["opacity"], cond, self.text.uncond, cameras, self.generator)

    def reduce_grads(self) -> None:
        pass

    def step_extras(self) -> dict[str, float]:
        return {}

    def training_step(self) -> dict[str, float]:
        """One step (trainers.step: render → guidance → loss → optimizer); NonFiniteLossError on NaN."""
        return step_alone(self)

    # -- looking at the result ---------------------------------------------------------------------

    @torch.no_grad()
    def render_views(self, cameras) -> dict[str, torch.Tensor]:
        self.renderer.eval()
        res = self.config.resolution
        return self.renderer.render(cameras.to(self.device), res, res, train=False)

    def validation_cameras(self, n_views: int):
        cam = self.config.camera
        azimuth = torch.linspace(-180.0, 180.0, n_views + 1)[:-1]
        return orbit_cameras(cam.eval_elevation, azimuth, cam.eval_distance, cam.eval_fovy)

    def save_validation(self, path: Path) -> Path:
        views = self.render_views(self.validation_cameras(self.config.logging.val_views))
        return save_render_grid(path, views["rgb"], views["opacity"])

    def save_turntable(self, path: Path) -> Path:
        cam = self.config.camera
        cameras = turntable_cameras(
            self.config.logging.turntable_frames, cam.eval_elevation, cam.eval_distance, cam.eval_fovy
        )
        return save_turntable(path, self.render_views(cameras)["rgb"])

    def evaluate(self) -> dict[str, float]:
        """Ground-truth metrics where the prompt has a ground truth (the reference scenes), CLIP similarity
        where `evaluation.clip` names a model, else {}."""
        return evaluation.evaluate_trainer(self)

    def close(self) -> None:
        self.guidance.close()


def ground_truth_target_fn(config: TrainConfig):
    """What `guidance.method: supervised` fits: the true scene at the training cameras (None otherwise)."""
    if config.guidance.method != "supervised":
        return None
    from trainers.reference.scenes import is_scene_prompt
    from trainers.reference.supervised import ground_truth_target

    if not is_scene_prompt(config.prompt):
        return None  # make_guidance says what supervised needs

    return ground_truth_target(config.prompt, config.resolution, config.prior.reference.scene)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class TrainingRun:
    """One run of one prompt around its `Trainer`: the config written, the resume, and after each step
    what `train` does between steps (progress, metrics, validation grids, CLIP evaluations, checkpoints),
    then the final evaluation, checkpoint and artifacts.

    `train` drives one run; a pack (`trainers.pack`) drives several, each stepping in a shared
    `trainers.step.training_step`. Callbacks get this run's own step numbers."""

    def __init__(
        self,
        config: TrainConfig,
        prior: DiffusionPrior | None = None,
        *,
        on_metrics: MetricsCallback | None = None,
        on_checkpoint: PathCallback | None = None,
        on_artifact: PathCallback | None = None,
        resume_from: str | Path | None = None,
        progress: bool = True,
    ):
        self.config = config
        self.on_metrics, self.on_checkpoint, self.on_artifact = on_metrics, on_checkpoint, on_artifact
        self.output_dir = Path(config.output_dir)
        self.checkpoint_dir = self.output_dir / "checkpoints"
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.config_yaml = yaml.safe_dump(config_to_dict(config), sort_keys=False)
        (self.output_dir / "config.yaml").write_text(self.config_yaml)

        self.trainer = Trainer(config, prior)
        try:
            evaluation.prepare(self.trainer)  # a bad evaluation.clip fails now, not after the last step
            if resume_from == "latest":
                resume_from = latest_checkpoint(self.checkpoint_dir)
            if resume_from is not None:
                self.trainer.load_state_dict(load_checkpoint(resume_from))
        except BaseException:
            self.trainer.close()
            raise
        self.artifacts: list[Path] = []
        self.last_checkpoint: Path | None = Path(resume_from) if resume_from else None
        self.last_metrics: dict[str, float] = {}
        self.bar = tqdm(
            total=config.max_steps,
            initial=self.trainer.step,
            disable=not progress,
            desc=config.guidance.method.upper(),
            dynamic_ncols=True,
        )
        self.window_start, self.window_steps = time.perf_counter(), 0

    @property
    def step(self) -> int:
        return self.trainer.step

    @property
    def done(self) -> bool:
        return self.trainer.step >= self.config.max_steps

    def emit_artifact(self, path: Path) -> None:
        self.artifacts.append(path)
        if self.on_artifact:
            self.on_artifact(self.trainer.step, path)

    def checkpoint(self) -> None:
        self.last_checkpoint = save_checkpoint(
            self.checkpoint_dir,
            self.trainer.step,
            self.trainer.state_dict(),
            self.config_yaml,
            keep=self.config.logging.keep_checkpoints,
        )
        if self.on_checkpoint:
            self.on_checkpoint(self.trainer.step, self.last_checkpoint)

    def after_step(self, metrics: dict[str, float]) -> None:
        """Everything between two steps, once the trainer has taken one and reported `metrics`."""
        config, log, step = self.config, self.config.logging, self.trainer.step
        self.window_steps += 1
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{metrics['train/loss']:.4g}", t=int(metrics["train/t"]), refresh=False)
        if step % log.log_every == 0 or step == config.max_steps:
            elapsed = time.perf_counter() - self.window_start
            metrics["train/it_per_s"] = self.window_steps / max(elapsed, 1e-9)
            self.window_start, self.window_steps = time.perf_counter(), 0
            self.last_metrics = metrics
            if self.on_metrics:
                self.on_metrics(step, metrics)
        if log.val_every and step % log.val_every == 0 and step < config.max_steps:
            path = self.output_dir / "validation" / f"step_{step:07d}.png"
            self.emit_artifact(self.trainer.save_validation(path))
        if evaluation.due(config, step) and self.on_metrics:
            self.on_metrics(step, evaluation.evaluate_clip(self.trainer))
        if log.checkpoint_every and step % log.checkpoint_every == 0 and step < config.max_steps:
            self.checkpoint()

    def finish(self) -> TrainResult:
        """The final evaluation, checkpoint and artifacts, once the last step is taken."""
        self.bar.close()
        trainer, config = self.trainer, self.config
        final = dict(self.last_metrics)
        evaluated = trainer.evaluate()
        if evaluated:
            final |= evaluated
            if self.on_metrics:
                self.on_metrics(trainer.step, evaluated)
        self.checkpoint()
        for path in evaluation.saved_files(config):  # the CLIP image embeddings: a fan-out's R@1 reads them
            self.emit_artifact(path)
        validation = self.output_dir / "validation" / f"step_{trainer.step:07d}.png"
        self.emit_artifact(trainer.save_validation(validation))
        turntable = self.output_dir / f"turntable.{config.logging.turntable_format}"
        self.emit_artifact(trainer.save_turntable(turntable))
        (self.output_dir / "metrics.yaml").write_text(
            yaml.safe_dump({k: v for k, v in final.items() if math.isfinite(v)}, sort_keys=True)
        )
        return TrainResult(final, self.output_dir, self.last_checkpoint, self.artifacts)

    def handle(self, result: StepResult) -> None:
        """After a shared step: its metrics, or its own NonFiniteLossError raised."""
        if result.error is not None:
            raise result.error
        self.after_step(result.metrics)

    def close(self) -> None:
        self.bar.close()
        self.trainer.close()


def train(
    config: TrainConfig,
    prior: DiffusionPrior | None = None,
    *,
    on_metrics: MetricsCallback | None = None,
    on_checkpoint: PathCallback | None = None,
    on_artifact: PathCallback | None = None,
    resume_from: str | Path | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train one prompt. `resume_from`: a checkpoint dir, or "latest" for the newest in output_dir."""
    run = TrainingRun(
        config,
        prior,
        on_metrics=on_metrics,
        on_checkpoint=on_checkpoint,
        on_artifact=on_artifact,
        resume_from=resume_from,
        progress=progress,
    )
    try:
        while not run.done:
            run.after_step(run.trainer.training_step())
        return run.finish()
    finally:
        run.close()
