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
from trainers.visualize import save_render_grid, save_turntable

MetricsCallback = Callable[[int, dict[str, float]], None]
PathCallback = Callable[[int, Path], None]

VIEW_LABELS = ("front", "side", "back", "overhead")


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN or inf: the run stops instead of silently training on garbage."""

    def __init__(self, step: int, term: str, value: float):
        self.step, self.term, self.value = step, term, value
        super().__init__(
            f"loss term {term!r} is {value} at step {step}; lower the learning rates or guidance.cfg_scale"
        )


@dataclass
class TrainResult:
    final_metrics: dict[str, float]
    output_dir: Path
    last_checkpoint: Path | None
    artifacts: list[Path] = field(default_factory=list)


def loss_terms(guided, opacity: torch.Tensor, loss_cfg, step: int) -> dict[str, torch.Tensor]:
    """The step's loss terms: guidance (and its own, e.g. VSD's LoRA loss) plus the opacity regularisers;
    NonFiniteLossError names the first term that is not finite. Shared by the per-prompt and amortized loops."""
    opacity = opacity.clamp(1e-5, 1 - 1e-5)
    terms = {"guidance": guided.loss, **guided.extra_losses}
    if loss_cfg.lambda_sparsity > 0:
        terms["sparsity"] = loss_cfg.lambda_sparsity * opacity.mean()
    if loss_cfg.lambda_opacity > 0:
        entropy = -(opacity * opacity.log() + (1 - opacity) * (1 - opacity).log()).mean()
        terms["opacity"] = loss_cfg.lambda_opacity * entropy
    for name, value in terms.items():
        if not torch.isfinite(value).all():
            raise NonFiniteLossError(step, name, float(value.detach()))
    return terms


def optimize(
    total: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    step: int,
    reduce_grads: Callable[[], None] | None = None,
) -> None:
    """Backward and update for one step; running out of memory in either raises the error that names the
    config keys reducing memory. `reduce_grads` runs in between (the amortized loop's cross-rank average).
    Shared by the per-prompt and amortized loops."""
    optimizer.zero_grad(set_to_none=True)
    # The backward holds the forward's activations: the VAE encoder's at image_size and the renderer's.
    with out_of_memory_hint(f"the backward pass of step {step}"):
        total.backward()
    if reduce_grads is not None:
        reduce_grads()
    with out_of_memory_hint(f"the optimizer step of step {step}"):
        optimizer.step()


def step_metrics(
    total: torch.Tensor,
    terms: dict[str, torch.Tensor],
    opacity: torch.Tensor,
    guided,
    timestep_range: tuple[float, float],
) -> dict[str, float]:
    """What a training step reports: the loss and its terms (VSD's LoRA fit left out: it is the LoRA's
    loss, not the 3D model's), the mean opacity, the guidance's diagnostics and the step's t range.
    Shared by the per-prompt and amortized loops."""
    t_min, t_max = timestep_range
    metrics = {"train/loss": float(total.detach()), "train/opacity": float(opacity.detach().mean())}
    metrics |= {f"train/loss_{name}": float(v.detach()) for name, v in terms.items() if name != "loss_lora"}
    metrics |= guided.metrics()
    metrics |= {"train/t_min": float(t_min), "train/t_max": float(t_max)}
    return metrics


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

    def training_step(self) -> dict[str, float]:
        cfg = self.config
        self.renderer.train()
        self.renderer.update_step(self.step)
        cameras = self.cameras.sample(cfg.batch_size, self.generator).to(self.device)
        with out_of_memory_hint(f"the forward pass of step {self.step} (render and guidance)"):
            out = self.renderer.render(
                cameras, cfg.resolution, cfg.resolution, train=True, generator=self.generator
            )
            images = out["rgb"].permute(0, 3, 1, 2)
            cond = self.text.for_views(cameras.elevation, cameras.azimuth, cfg.camera)
            guided = self.guidance(
                images,
                cond,
                self.text.uncond,
                step=self.step,
                generator=self.generator,
                cameras=cameras,
            )
        terms = loss_terms(guided, out["opacity"], cfg.loss, self.step)
        total = sum(terms.values())
        optimize(total, self.optimizer, self.step)
        self.step += 1
        return step_metrics(total, terms, out["opacity"], guided, self.guidance.timestep_range(self.step - 1))

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
    output_dir = Path(config.output_dir)
    checkpoint_dir = output_dir / "checkpoints"
    output_dir.mkdir(parents=True, exist_ok=True)
    config_yaml = yaml.safe_dump(config_to_dict(config), sort_keys=False)
    (output_dir / "config.yaml").write_text(config_yaml)

    trainer = Trainer(config, prior)
    evaluation.prepare(trainer)  # a bad evaluation.clip fails now, not after the last step
    if resume_from == "latest":
        resume_from = latest_checkpoint(checkpoint_dir)
    if resume_from is not None:
        trainer.load_state_dict(load_checkpoint(resume_from))

    log = config.logging
    artifacts: list[Path] = []
    last_checkpoint: Path | None = Path(resume_from) if resume_from else None
    last_metrics: dict[str, float] = {}

    def emit_artifact(path: Path) -> None:
        artifacts.append(path)
        if on_artifact:
            on_artifact(trainer.step, path)

    def checkpoint() -> None:
        nonlocal last_checkpoint
        last_checkpoint = save_checkpoint(
            checkpoint_dir, trainer.step, trainer.state_dict(), config_yaml, keep=log.keep_checkpoints
        )
        if on_checkpoint:
            on_checkpoint(trainer.step, last_checkpoint)

    bar = tqdm(
        total=config.max_steps,
        initial=trainer.step,
        disable=not progress,
        desc=config.guidance.method.upper(),
        dynamic_ncols=True,
    )
    window_start, window_steps = time.perf_counter(), 0
    try:
        while trainer.step < config.max_steps:
            metrics = trainer.training_step()
            window_steps += 1
            step = trainer.step
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['train/loss']:.4g}", t=int(metrics["train/t"]), refresh=False)
            if step % log.log_every == 0 or step == config.max_steps:
                elapsed = time.perf_counter() - window_start
                metrics["train/it_per_s"] = window_steps / max(elapsed, 1e-9)
                window_start, window_steps = time.perf_counter(), 0
                last_metrics = metrics
                if on_metrics:
                    on_metrics(step, metrics)
            if log.val_every and step % log.val_every == 0 and step < config.max_steps:
                emit_artifact(trainer.save_validation(output_dir / "validation" / f"step_{step:07d}.png"))
            if evaluation.due(config, step) and on_metrics:
                on_metrics(step, evaluation.evaluate_clip(trainer))
            if log.checkpoint_every and step % log.checkpoint_every == 0 and step < config.max_steps:
                checkpoint()
        bar.close()

        final = dict(last_metrics)
        evaluated = trainer.evaluate()
        if evaluated:
            final |= evaluated
            if on_metrics:
                on_metrics(trainer.step, evaluated)
        checkpoint()
        for path in evaluation.saved_files(config):  # the CLIP image embeddings: a fan-out's R@1 reads them
            emit_artifact(path)
        emit_artifact(trainer.save_validation(output_dir / "validation" / f"step_{trainer.step:07d}.png"))
        emit_artifact(trainer.save_turntable(output_dir / f"turntable.{log.turntable_format}"))
        (output_dir / "metrics.yaml").write_text(
            yaml.safe_dump({k: v for k, v in final.items() if math.isfinite(v)}, sort_keys=True)
        )
        return TrainResult(final, output_dir, last_checkpoint, artifacts)
    finally:
        bar.close()
        trainer.close()
