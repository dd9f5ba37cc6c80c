"""The per-prompt trainer's config: every component's typed config composed in one tree.

    cfg = load_train_config("sweeps/configs/reference_cpu.yaml", ["guidance.eta=0.2", "max_steps=500"])

Defaults live in the pydantic models (here and next to each component); YAML and `key=value`
overrides only change fields. An unknown key is refused with the closest valid key.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, field_validator, model_validator

from trainers.cameras import CameraConfig
from trainers.config_base import (
    ConfigBase,
    ConfigError,
    build_config,
    config_source,
    deep_merge,
    overrides_tree,
)
from trainers.evaluation.config import EvaluationConfig
from trainers.geometry.implicit_volume import ImplicitVolumeConfig
from trainers.guidance import GuidanceConfig
from trainers.priors.base import PriorConfig
from trainers.reference.config import EXACT_REFERENCE_PRIORS
from trainers.rendering import BackgroundConfig, RendererConfig


class OptimizerConfig(ConfigBase):
    # Per-module learning rates: hash tables learn fast, MLPs slowly (Instant-NGP practice).
    lr_encoding: float = Field(1e-2, ge=0.0)
    lr_network: float = Field(1e-3, ge=0.0)
    lr_background: float = Field(1e-3, ge=0.0)
    betas: tuple[float, float] = (0.9, 0.99)
    eps: float = 1e-15  # tiny eps: hash-grid entries see sparse gradients


class LossConfig(ConfigBase):
    lambda_sparsity: float = 0.0  # mean opacity: discourages floaters
    lambda_opacity: float = 0.0  # binary-entropy of opacity: pushes it to 0 or 1


class LoggingConfig(ConfigBase):
    log_every: int = 10
    val_every: int = 0  # 0: only at the end
    val_views: int = 4
    checkpoint_every: int = 100  # 0: only at the end
    keep_checkpoints: int = 2
    turntable_frames: int = 24
    turntable_format: str = "gif"
    eval_views: int = 8  # ground-truth evaluation views (reference scenes only)


class TrainConfig(ConfigBase):
    prompt: str = "a red cube"
    negative_prompt: str = ""
    seed: int = 0
    max_steps: int = Field(1000, ge=1)
    batch_size: int = Field(1, ge=1)
    resolution: int = Field(64, ge=1)  # render width = height
    device: str = "auto"
    output_dir: str = "outputs/run"

    prior: PriorConfig = PriorConfig()
    guidance: GuidanceConfig = GuidanceConfig()
    geometry: ImplicitVolumeConfig = ImplicitVolumeConfig()
    renderer: RendererConfig = RendererConfig()
    background: BackgroundConfig = BackgroundConfig()
    camera: CameraConfig = CameraConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    loss: LossConfig = LossConfig()
    logging: LoggingConfig = LoggingConfig()
    evaluation: EvaluationConfig = EvaluationConfig()

    @field_validator("prompt")
    @classmethod
    def _prompt_not_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("prompt is empty: give the text to distil, e.g. prompt='a red cube'")
        return value

    @model_validator(mode="after")
    def _timesteps_ordered_at_every_step(self) -> TrainConfig:
        self.guidance.check_timesteps(self.max_steps)
        return self

    @model_validator(mode="after")
    def _fixed_views_are_the_reference_priors(self) -> TrainConfig:
        # Fixed training views only help if they are the views the reference prior rendered.
        if self.camera.fixed_views and self.prior.name in EXACT_REFERENCE_PRIORS:
            reference = self.prior.reference
            ranges = ("elevation_range", "azimuth_range", "distance_range", "fovy_range")
            if self.camera.fixed_views != reference.n_views or any(
                getattr(self.camera, key) != getattr(reference.camera, key) for key in ranges
            ):
                raise ValueError(
                    f"camera.fixed_views={self.camera.fixed_views} must equal prior.reference.n_views="
                    f"{reference.n_views}, and camera's ranges prior.reference.camera's, for the training "
                    "cameras to be the reference prior's; or camera.fixed_views=0"
                )
        return self

    @model_validator(mode="after")
    def _resolution_usable(self) -> TrainConfig:
        if self.resolution % 2:
            raise ValueError(f"resolution must be even (got {self.resolution}); e.g. resolution=64")
        return self


def load_train_config(
    source: str | Path | Mapping[str, Any] | None = None,
    overrides: Sequence[str] | Mapping[str, Any] = (),
) -> TrainConfig:
    """A YAML path or a dict, then dotted overrides (strings "a.b=1" or a {"a.b": 1} mapping)."""
    data, where = config_source(source)
    nested = overrides_tree(overrides)
    if nested:
        where = f"{where} with overrides"
    return build_config(TrainConfig, deep_merge(data, nested), where=where)


def config_to_dict(cfg: ConfigBase) -> dict[str, Any]:
    return cfg.model_dump(mode="json")


def save_config(cfg: ConfigBase, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


__all__ = [
    "ConfigError",
    "LoggingConfig",
    "LossConfig",
    "OptimizerConfig",
    "TrainConfig",
    "config_to_dict",
    "load_train_config",
    "save_config",
]
