"""`prior.name: reference-learned`: the learned reference prior, loaded like Stable Diffusion.

The weights directory (`trainers.reference.learned.model`) is read with diffusers' `from_pretrained`,
`UNet2DConditionModel` and `DDPMScheduler` each from their subfolder as for any Stable Diffusion
checkpoint; `prior.reference.learned_weights` points at another trained copy (default: the weights
shipped in the repository, `trainers/reference/learned/weights`).

Guidance passes each render's camera (`camera_vector()`: flattened c2w, then fovy) as `class_labels`, as for
`reference-mv`; the prior turns it into the `camera_features` of the version its weights were trained on,
for the UNet's class embedding.

`unet` is None on purpose: VSD's LoRA path (trainers.vsd.UNetLoRAScore) replaces the UNet's class
embedding with its own camera embedding, and here the class embedding *is* the camera condition, so
VSD uses the residual score it uses for the exact reference priors, which keeps the frozen prior exact
at initialisation and makes VSD the same method on both. The network is `model`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from trainers.config_base import ConfigError
from trainers.priors.base import DiffusionPrior, PriorConfig
from trainers.reference.learned.model import (
    INFO_FILE,
    KNOWN_CAMERA_FEATURES_VERSIONS,
    LearnedModelConfig,
    build_unet,
    camera_features,
)
from trainers.reference.text_encoder import SceneTextEncoder

SHIPPED_WEIGHTS = Path(__file__).resolve().parent / "weights"
RETRAIN_HINT = (
    "retrain it with `python -m trainers.reference.learned.train --out {path}` (about 2 hours on 2 idle "
    "CPU cores, see docs/learned_prior.md), or point prior.reference.learned_weights at a trained copy"
)


class LearnedWeightsError(ConfigError):
    """The weights directory of `prior.name: reference-learned` is missing or unreadable."""


def weights_error(path: Path, problem: str) -> LearnedWeightsError:
    return LearnedWeightsError(
        f"prior.name='reference-learned': the weights directory {path} {problem}; "
        + RETRAIN_HINT.format(path=path)
    )


class LearnedReferencePrior(DiffusionPrior):
    in_pixel_space = True
    camera_conditioned = True
    unet = None  # see the module docstring (VSD)

    def __init__(self, model, scheduler, info: dict, device: torch.device | str = "cpu", source: str = ""):
        self.model = model
        self.scheduler = scheduler
        self.info = info
        self.config = LearnedModelConfig(**info["model"])
        self.image_size = self.config.image_size
        self.device = torch.device(device)
        self.dtype = torch.float32
        self.source = source
        self.num_train_timesteps = int(scheduler.config.num_train_timesteps)
        self.alphas_cumprod = scheduler.alphas_cumprod.to(device=self.device, dtype=torch.float32)
        self.text_encoder = SceneTextEncoder(self.config.text_encoder)

    # -- loading -------------------------------------------------------------------------------------

    @classmethod
    def from_config(cls, cfg: PriorConfig, device: torch.device | str) -> LearnedReferencePrior:
        path = cfg.reference.learned_weights or SHIPPED_WEIGHTS
        prior = cls.from_pretrained(path, device)
        if cfg.image_size is not None and cfg.image_size != prior.image_size:
            raise ConfigError(
                f"prior.image_size={cfg.image_size}, but the learned reference prior at {path} was trained at "
                f"{prior.image_size} px: set prior.image_size={prior.image_size} or null (renders are resized "
                "to it)"
            )
        return prior

    @classmethod
    def from_pretrained(cls, path: str | Path, device: torch.device | str = "cpu") -> LearnedReferencePrior:
        """Load a weights directory (the layout `save_weights` writes) with diffusers' from_pretrained."""
        from diffusers import DDPMScheduler, UNet2DConditionModel

        path = Path(path).expanduser()
        if not path.is_dir():
            raise weights_error(path, "does not exist")
        for required in (
            "model_index.json",
            INFO_FILE,
            "unet/config.json",
            "scheduler/scheduler_config.json",
        ):
            if not (path / required).is_file():
                raise weights_error(path, f"is incomplete: it has no {required}")
        try:
            info = json.loads((path / INFO_FILE).read_text())
            LearnedModelConfig(**info["model"])
        except (ValueError, KeyError, TypeError) as exc:
            raise weights_error(path, f"has an unreadable {INFO_FILE} ({exc})") from exc
        if info.get("camera_features_version") not in KNOWN_CAMERA_FEATURES_VERSIONS:
            raise weights_error(
                path,
                f"was trained on camera features version {info.get('camera_features_version')}, this code "
                f"computes versions {list(KNOWN_CAMERA_FEATURES_VERSIONS)}",
            )
        try:
            model = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=torch.float32)
            scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
        except Exception as exc:  # diffusers raises OSError, ValueError, safetensors errors, ...
            raise weights_error(path, f"cannot be loaded ({type(exc).__name__}: {exc})") from exc
        model.requires_grad_(False).eval().to(device)
        return cls(model, scheduler, info, device, source=str(path))

    def untrained(self, seed: int = 0) -> LearnedReferencePrior:
        """The same network freshly initialised (seeded), with these weights' camera features: the
        baseline the docs and tests compare the trained weights with."""
        version = self.info["camera_features_version"]
        model = build_unet(self.config, seed=seed, camera_features_version=version).eval().to(self.device)
        return LearnedReferencePrior(model, self.scheduler, self.info, self.device)

    # -- the DiffusionPrior interface ----------------------------------------------------------------

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        return self.text_encoder.encode(prompts).to(self.device)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return images.float() * 2 - 1

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        return ((x0.float() + 1) / 2).clamp(0, 1)

    @torch.no_grad()
    def predict_noise(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        text_embeddings: torch.Tensor,
        class_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if class_labels is None:
            raise ValueError(
                "prior.name='reference-learned' is camera-conditioned: pass each render's camera "
                "(cameras.camera_vector()) as class_labels; guidance does so for priors with camera_conditioned=True"
            )
        features = camera_features(class_labels.to(self.device), self.info["camera_features_version"])
        out = self.model(
            x_t.to(self.device, torch.float32),
            t.to(self.device),
            encoder_hidden_states=text_embeddings.to(self.device, torch.float32),
            class_labels=features,
        ).sample
        return out.float()

    def describe(self) -> dict[str, object]:
        return super().describe() | {"weights": self.source, "trained_steps": self.info.get("trained_steps")}
