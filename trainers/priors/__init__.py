"""Diffusion priors: one config key (`prior.name`) picks one, `load_prior` loads it.

- "tiny-sd": random weights in the Stable Diffusion layout, built once into the cache directory.
- "sd21-shaped": random weights in exactly SD 2.1-base's architecture (real sizes, for speed and memory).
- "reference", "reference-mv": the exact priors of the procedural scenes (`trainers.reference.prior`).
- "reference-learned": a UNet trained on those scenes, shipped in the repository (`trainers.reference.learned`).
- anything else: a hub id or a local directory in the Stable Diffusion layout.

diffusers and transformers take seconds to import, so they are imported only when a prior is loaded:
reading or validating a config (`PriorConfig`) stays fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from trainers.config_base import ConfigError
from trainers.priors.base import DiffusionPrior, PriorConfig, default_cache_dir, resolve_device
from trainers.reference.config import EXACT_REFERENCE_PRIORS, LEARNED_REFERENCE_PRIOR, REFERENCE_PRIORS

if TYPE_CHECKING:
    from trainers.priors.stable_diffusion import StableDiffusionPrior
    from trainers.priors.tiny_sd import build_tiny_sd

__all__ = [
    "DiffusionPrior",
    "PriorConfig",
    "StableDiffusionPrior",
    "build_tiny_sd",
    "default_cache_dir",
    "load_prior",
    "resolve_device",
]

BUILTIN_PRIORS = ("tiny-sd", "sd21-shaped", *REFERENCE_PRIORS)


def load_prior(cfg: PriorConfig, device: torch.device | str | None = None) -> DiffusionPrior:
    """The prior `cfg.name` names, frozen, on `device` (None / "auto": CUDA when present)."""
    device = resolve_device(device)
    if cfg.name in EXACT_REFERENCE_PRIORS:
        return _reference_prior_class().from_config(cfg, device=device)
    if cfg.name == LEARNED_REFERENCE_PRIOR:
        from trainers.reference.learned.prior import LearnedReferencePrior

        return LearnedReferencePrior.from_config(cfg, device)

    from trainers.priors.stable_diffusion import StableDiffusionPrior

    if cfg.name == "tiny-sd":
        from trainers.priors.tiny_sd import build_tiny_sd

        directory = build_tiny_sd(default_cache_dir(cfg) / "tiny-sd")
        # From here on tiny-sd is an ordinary local directory: the same loading path as real weights.
        return StableDiffusionPrior.from_config(cfg.model_copy(update={"name": str(directory)}), device)
    if cfg.name == "sd21-shaped":
        from trainers.priors.sd21_shaped import build_sd21_shaped

        directory = build_sd21_shaped(default_cache_dir(cfg) / "sd21-shaped")
        return StableDiffusionPrior.from_config(cfg.model_copy(update={"name": str(directory)}), device)
    return StableDiffusionPrior.from_config(cfg, device)


def _reference_prior_class() -> Any:
    try:
        from trainers.reference.prior import ReferencePrior
    except ModuleNotFoundError as exc:
        if exc.name != "trainers.reference.prior":
            raise  # the module exists but something it imports is missing: show that error
        raise ConfigError(
            "prior.name='reference': the reference prior (trainers/reference/prior.py) is not part of this "
            "installation yet; use prior.name=tiny-sd, a hub id, or a local Stable Diffusion directory"
        ) from exc
    return ReferencePrior


def __getattr__(name: str) -> Any:
    # Lazy exports, so that importing this package does not import diffusers.
    if name == "StableDiffusionPrior":
        from trainers.priors.stable_diffusion import StableDiffusionPrior

        return StableDiffusionPrior
    if name == "build_tiny_sd":
        from trainers.priors.tiny_sd import build_tiny_sd

        return build_tiny_sd
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
