"""The reference prior's settings, apart from the prior so that `PriorConfig` can hold them
(`prior.reference.*`) without importing the prior itself."""

from __future__ import annotations

from pydantic import Field, field_validator

from trainers.cameras import CameraConfig
from trainers.config_base import ConfigBase
from trainers.reference.scenes import SceneConfig, parse_prompt
from trainers.reference.text_encoder import TextEncoderConfig

# `prior.name` of the exact reference priors: text-conditioned (Stable-Diffusion-like) and
# camera-conditioned (MVDream-like); see trainers.reference.prior.
EXACT_REFERENCE_PRIORS = ("reference", "reference-mv")
# The learned one: a UNet trained on the same scenes (trainers.reference.learned).
LEARNED_REFERENCE_PRIOR = "reference-learned"
# Every prior of the procedural scenes: their prompts have a ground truth.
REFERENCE_PRIORS = (*EXACT_REFERENCE_PRIORS, LEARNED_REFERENCE_PRIOR)


class ReferencePriorConfig(ConfigBase):
    # Renders per prompt, from cameras spread (quasi-randomly) over `camera`'s ranges; the same cameras
    # for every prompt, so the unconditional set holds each conditional prompt's renders.
    n_views: int = Field(16, ge=1)
    # The unconditional distribution, each prompt weighted equally: "library" = every prompt of the
    # grammar (4,560; what an unconditional score of a prior trained on all of them would be),
    # "singles" = the 48 single-object prompts, or a list of scene prompts. Fixed when the prior is
    # built, so a prior cached and shared by a sweep's trials answers the same in any trial order.
    uncond_prompts: str | list[str] = "library"
    # A render whose view label differs from the prompt's suffix has prior weight `view_leak`
    # (0: only matching views; 1: the suffix is ignored).
    view_leak: float = Field(0.0, ge=0.0, le=1.0)
    # κ of the camera-conditioned prior's (reference-mv) weighting exp(κ·cos∠(asked camera, render
    # camera)); about 1/√κ radians (14° at 16) of angular spread around the asked camera.
    camera_sharpness: float = Field(16.0, ge=0.0)
    # prior.name=reference-learned: its weights directory (diffusers layout); None: the weights shipped in
    # the repository (trainers/reference/learned/weights). The other keys here are the exact priors'.
    learned_weights: str | None = None
    scene: SceneConfig = SceneConfig()
    camera: CameraConfig = CameraConfig()
    text_encoder: TextEncoderConfig = TextEncoderConfig()

    @field_validator("uncond_prompts")
    @classmethod
    def _uncond_known(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, str) and value not in ("library", "singles"):
            raise ValueError(
                "reference.uncond_prompts must be 'library' (every prompt), 'singles' or a list of scene "
                f"prompts, got {value!r}"
            )
        if isinstance(value, list):
            if not value:
                raise ValueError("reference.uncond_prompts is an empty list; use 'library' or name prompts")
            for prompt in value:
                parse_prompt(prompt)  # its ValueError names the grammar
        return value
