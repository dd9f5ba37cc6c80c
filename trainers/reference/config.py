"""The reference prior's settings, apart from the prior so that `PriorConfig` can hold them
(`prior.reference.*`) without importing the prior itself."""

from __future__ import annotations

from pydantic import Field, field_validator

from trainers.cameras import CameraConfig
from trainers.config_base import ConfigBase
from trainers.reference.scenes import SceneConfig, parse_prompt
from trainers.reference.text_encoder import TextEncoderConfig


class ReferencePriorConfig(ConfigBase):
    # Cached renders per conditional prompt, drawn (quasi-randomly) from `camera`'s ranges.
    n_views: int = Field(32, ge=1)
    # Unconditional distribution: "singles" = the 48 single-object prompts, a list of scene prompts, or
    # "conditional" = the prompts the prior has been asked about so far. The first two are fixed when the
    # prior is built, so a prior cached and shared by a sweep's trials answers the same whatever order
    # the trials come in; "conditional" grows with every new prompt (order-dependent by design).
    uncond_prompts: str | list[str] = "singles"
    uncond_views: int = Field(8, ge=1)
    # A render whose view label differs from the prompt's suffix has prior weight `view_leak`
    # (0: only matching views; 1: the suffix is ignored).
    view_leak: float = Field(0.0, ge=0.0, le=1.0)
    # κ of the camera weighting exp(κ·cos∠(asked camera, render camera)) when `class_labels` carry
    # cameras; 0: ignored.
    camera_sharpness: float = Field(0.0, ge=0.0)
    scene: SceneConfig = SceneConfig()
    camera: CameraConfig = CameraConfig()
    text_encoder: TextEncoderConfig = TextEncoderConfig()

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
