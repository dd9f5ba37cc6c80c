"""The interface every diffusion prior offers to the guidance methods.

A prior is a frozen ε-prediction model with a noise schedule. Guidance only ever calls the methods below,
so a diffusers Stable Diffusion pipeline, the random-weight `tiny-sd` and the exact reference prior
(`trainers.reference.prior`) are interchangeable.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import torch
from pydantic import field_validator

from trainers.config_base import ConfigBase
from trainers.reference.config import REFERENCE_PRIORS, ReferencePriorConfig


class PriorConfig(ConfigBase):
    # "tiny-sd" (built-in random weights), "reference" (exact prior of the procedural scenes),
    # a hub id such as "stabilityai/stable-diffusion-2-1-base", or a local directory in that layout.
    name: str = "tiny-sd"
    # fp16 on CUDA and fp32 on the CPU when "auto".
    dtype: Literal["auto", "fp16", "fp32"] = "auto"
    # The image size the prior takes (renders are resized to it); None: the prior's native size.
    image_size: int | None = None
    # Where built-in priors are written once and hub downloads are cached; None: ~/.cache/dreamsweep.
    cache_dir: str | None = None
    # Settings of `name: reference` (views cached per prompt, the unconditional set, ...); unused otherwise.
    reference: ReferencePriorConfig = ReferencePriorConfig()
    # Offload: enable attention slicing / channels-last etc. on CUDA.
    enable_memory_efficient_attention: bool = True

    @field_validator("name")
    @classmethod
    def _name_not_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("prior.name is empty: use 'tiny-sd', 'reference', a hub id or a local path")
        if value.startswith("reference") and value not in REFERENCE_PRIORS:
            raise ValueError(
                f"prior.name={value!r} is no reference prior; use one of {', '.join(REFERENCE_PRIORS)}"
            )
        return value

    @field_validator("image_size")
    @classmethod
    def _image_size_positive(cls, value: int | None) -> int | None:
        # Divisibility depends on the prior's architecture and is checked when it is loaded.
        if value is not None and value <= 0:
            raise ValueError(
                "prior.image_size must be a positive number of pixels, or null for the native size"
            )
        return value


def default_cache_dir(cfg: PriorConfig | None = None) -> Path:
    """cfg.cache_dir, else $DREAMSWEEP_CACHE, else ~/.cache/dreamsweep."""
    chosen = (cfg.cache_dir if cfg else None) or os.environ.get("DREAMSWEEP_CACHE") or "~/.cache/dreamsweep"
    return Path(chosen).expanduser()


def resolve_device(device: torch.device | str | None = None) -> torch.device:
    """None or "auto": CUDA when present, else the CPU; anything else as torch reads it."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class DiffusionPrior:
    """What guidance needs from a prior. Subclasses fill these in."""

    num_train_timesteps: int
    alphas_cumprod: torch.Tensor  # [T], float32, on `device`
    image_size: int  # the (square) image size the prior takes
    in_pixel_space: bool  # True: x0 are images scaled to [-1, 1]; False: VAE latents
    device: torch.device
    dtype: torch.dtype
    unet: torch.nn.Module | None = None  # for VSD's LoRA; None when the prior has no UNet
    # True: every predict_noise call takes each row's camera (flattened c2w) as `class_labels`.
    camera_conditioned: bool = False

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """Prompts -> conditioning embeddings [N, L, D] (the empty string is the unconditional one)."""
        raise NotImplementedError

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Renders [B, 3, H, W] in [0, 1] at `image_size` -> x0 (latents, or pixels in [-1, 1]), float32."""
        raise NotImplementedError

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """x0 -> images [B, 3, H, W] in [0, 1]."""
        raise NotImplementedError

    def predict_noise(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        text_embeddings: torch.Tensor,
        class_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One batched forward: ε̂(x_t, t, text) for every row, returned as float32."""
        raise NotImplementedError

    def describe(self) -> dict[str, object]:
        return {
            "num_train_timesteps": self.num_train_timesteps,
            "image_size": self.image_size,
            "in_pixel_space": self.in_pixel_space,
            "dtype": str(self.dtype).removeprefix("torch."),
            "device": str(self.device),
        }
