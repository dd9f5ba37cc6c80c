"""The `evaluation` section of the per-prompt trainer's config (CLIP; ground truth needs no settings)."""

from __future__ import annotations

from pydantic import Field, field_validator

from trainers.config_base import ConfigBase


class EvaluationConfig(ConfigBase):
    # The CLIP model that scores the final renders (`eval/clip_similarity`): "openai/clip-vit-large-patch14"
    # (the paper's), a local directory holding a CLIP checkpoint, or "tiny-clip" (random weights, for
    # tests); null: no CLIP evaluation.
    clip: str | None = None
    # The protocol's orbit: `views` renders at `elevation` degrees (camera.eval_distance and eval_fovy).
    views: int = Field(120, ge=1)
    elevation: float = Field(15.0, ge=-90.0, le=90.0)
    # Also every N training steps (0: only at the end), so that ASHA can judge trials on it.
    every: int = Field(0, ge=0)
    # Render size for the CLIP views (resized to 224 for CLIP); null: the training resolution.
    resolution: int | None = Field(None, ge=8)
    batch_size: int = Field(32, ge=1)  # views rendered and embedded at once

    @field_validator("clip")
    @classmethod
    def _clip_not_empty(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError(
                "evaluation.clip is empty: name a CLIP model (e.g. openai/clip-vit-large-patch14) or null"
            )
        return value
