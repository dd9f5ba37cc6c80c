"""The reference prior's settings, apart from the prior so that `PriorConfig` can hold them
(`prior.reference.*`) without importing the prior itself."""

from __future__ import annotations

from pydantic import field_validator

from trainers.cameras import CameraConfig
from trainers.config_base import ConfigBase
from trainers.scenes import SceneConfig, parse_prompt
from trainers.text_encoding import TextEncoderConfig


class ReferencePriorConfig(ConfigBase):
    # Cached renders per conditional prompt, drawn (quasi-randomly) from `camera`'s ranges.
    n_views: int = 32
    # Unconditional distribution: "singles" = the 48 single-object prompts, a list of scene prompts, or
    # "conditional" = the prompts the prior has been asked about so far. The first two are fixed when the
    # prior is built, so a prior cached and shared by a sweep's trials answers the same whatever order
    # the trials come in; "conditional" grows with every new prompt (order-dependent by design).
    uncond_prompts: str | list[str] = "singles"
    uncond_views: int = 8
    # A render whose view label differs from the prompt's suffix has prior weight `view_leak`
    # (0: only matching views; 1: the suffix is ignored).
    view_leak: float = 0.0
    # κ of the camera weighting exp(κ·cos∠(asked camera, render camera)) when `class_labels` carry
    # cameras; 0: ignored.
    camera_sharpness: float = 0.0
    scene: SceneConfig = SceneConfig()
    camera: CameraConfig = CameraConfig()
    text_encoder: TextEncoderConfig = TextEncoderConfig()

    @field_validator("n_views", "uncond_views")
    @classmethod
    def _views_positive(cls, value: int, info) -> int:
        if value < 1:
            raise ValueError(f"reference.{info.field_name} must be >= 1")
        return value

    @field_validator("uncond_prompts")
    @classmethod
    def _uncond_known(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, str) and value not in ("singles", "conditional"):
            raise ValueError(
                "reference.uncond_prompts must be 'singles', 'conditional' or a list of scene prompts"
            )
        if isinstance(value, list):
            for prompt in value:
                parse_prompt(prompt)  # its ValueError names the grammar
        return value

    @field_validator("view_leak")
    @classmethod
    def _leak_fraction(cls, value: float) -> float:
        if not 0 <= value <= 1:
            raise ValueError("reference.view_leak is a weight in [0, 1]")
        return value

    @field_validator("camera_sharpness")
    @classmethod
    def _sharpness_non_negative(cls, value: float) -> float:
        if value < 0:
            raise ValueError("reference.camera_sharpness must be >= 0")
        return value
