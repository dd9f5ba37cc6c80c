"""The learned reference prior's network, its conditioning, and the weights directory it lives in.

The network is diffusers' `UNet2DConditionModel`, the class Stable Diffusion uses, in pixel space:
- the prompt enters as cross-attention states, the deterministic `SceneTextEncoder`'s token sequence
  [N, 16, 64] (all zeros for the empty, unconditional prompt);
- the camera enters as MVDream does it, through the class embedding added to the timestep embedding
  (`class_embed_type="projection"`): a 2-layer MLP of `camera_features`, computed from the camera
  vectors [B, 17] (flattened c2w, then fovy) that guidance passes as `class_labels`, so any camera can
  be asked, not only 16 views. Camera features version 2 includes the fovy; version 1 (the first
  weights) did not, and such weights marginalise over the training fovy range.

The weights directory is Stable Diffusion's layout minus the parts a pixel-space prior with a fixed
text encoder has no weights for:

    model_index.json      {"_class_name": "ReferenceLearnedPipeline", "unet": [...], "scheduler": [...]}
    unet/                 config.json + diffusion_pytorch_model.safetensors (UNet2DConditionModel)
    scheduler/            scheduler_config.json (DDPMScheduler, SD's scaled_linear betas)
    reference_learned.json  how the inputs are made: image size, text encoder, camera features, data
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from pydantic import Field

from trainers.cameras import POSE_DIM, camera_position
from trainers.config_base import ConfigBase
from trainers.reference.text_encoder import TextEncoderConfig

# Bump when `camera_features` changes meaning. Weights record the version they were trained on, and
# the prior computes that version's features; other versions are refused.
#   1: azimuth and elevation harmonics and the distance (13 features);
#   2: those and the fovy (14): at one pose the fovy sets the object's apparent size.
CAMERA_FEATURES_VERSION = 2
KNOWN_CAMERA_FEATURES_VERSIONS = (1, 2)
AZIMUTH_HARMONICS = 4
ELEVATION_HARMONICS = 2
# sin/cos of each harmonic of azimuth and elevation, plus the normalised distance (and fovy).
N_CAMERA_FEATURES_V1 = 2 * AZIMUTH_HARMONICS + 2 * ELEVATION_HARMONICS + 1
N_CAMERA_FEATURES = N_CAMERA_FEATURES_V1 + 1
# The distance and fovy features are (value − centre) / half-width of the default training ranges,
# distance (1.5, 2.0) and fovy (40°, 70°).
DISTANCE_CENTRE, DISTANCE_HALF_WIDTH = 1.75, 0.25
FOVY_CENTRE_DEG, FOVY_HALF_WIDTH_DEG = 55.0, 15.0
INFO_FILE = "reference_learned.json"


class LearnedModelConfig(ConfigBase):
    """The UNet's shape. Defaults: 16 px, 3 blocks of one layer, cross-attention in the two inner ones."""

    image_size: int = Field(16, ge=8)
    block_out_channels: tuple[int, ...] = (32, 64, 64)
    layers_per_block: int = Field(1, ge=1)
    # Which blocks attend to the text (the others are plain ResNet blocks).
    cross_attention: tuple[bool, ...] = (False, True, True)
    # Blocks whose attention layers both attend to the text (diffusers' `only_cross_attention`): no
    # self-attention over the pixels, which at 16 px would cost 256 × 256 per head.
    only_cross_attention: tuple[bool, ...] | None = None
    attention_head_dim: int = Field(32, ge=1)
    norm_num_groups: int = Field(16, ge=1)
    # A louder position code than the reference text encoder's default (2 against 0.5), so that word
    # order ("a cube on top of a cone") reaches the network: the shipped weights' stage 2 onwards.
    text_encoder: TextEncoderConfig = TextEncoderConfig(position_scale=2.0)


def camera_features(camera_vectors: torch.Tensor, version: int = CAMERA_FEATURES_VERSION) -> torch.Tensor:
    """Camera vectors [B, 17] (`CameraBatch.camera_vector()`: flattened c2w, then fovy in radians) ->
    [B, 14]: harmonics of the camera's azimuth and elevation and its distance, read from its position
    (the orbit convention of trainers.cameras: position = d·(cos el cos az, cos el sin az, sin el)),
    then its fovy. Version 1 stops before the fovy (13 features) and also takes a bare c2w [B, 16]."""
    if version not in KNOWN_CAMERA_FEATURES_VERSIONS:
        raise ValueError(f"unknown camera features version {version}: {KNOWN_CAMERA_FEATURES_VERSIONS}")
    camera_vectors = camera_vectors.reshape(camera_vectors.shape[0], -1)
    if version >= 2 and camera_vectors.shape[1] <= POSE_DIM:
        raise ValueError(
            "the learned prior's camera features (version 2) need each camera's fovy: pass "
            f"cameras.camera_vector() ([B, {POSE_DIM + 1}]: c2w, then fovy), not a bare c2w "
            f"[B, {camera_vectors.shape[1]}]"
        )
    position = camera_position(camera_vectors)
    distance = position.norm(dim=-1).clamp(min=1e-6)
    elevation = torch.asin((position[:, 2] / distance).clamp(-1, 1))
    azimuth = torch.atan2(position[:, 1], position[:, 0])
    parts = []
    for k in range(1, AZIMUTH_HARMONICS + 1):
        parts += [torch.sin(k * azimuth), torch.cos(k * azimuth)]
    for k in range(1, ELEVATION_HARMONICS + 1):
        parts += [torch.sin(k * elevation), torch.cos(k * elevation)]
    parts.append((distance - DISTANCE_CENTRE) / DISTANCE_HALF_WIDTH)
    if version >= 2:
        fovy_deg = torch.rad2deg(camera_vectors[:, POSE_DIM].float())
        parts.append((fovy_deg - FOVY_CENTRE_DEG) / FOVY_HALF_WIDTH_DEG)
    return torch.stack(parts, dim=-1)


def n_camera_features(version: int = CAMERA_FEATURES_VERSION) -> int:
    return N_CAMERA_FEATURES_V1 if version == 1 else N_CAMERA_FEATURES


def unet_kwargs(
    cfg: LearnedModelConfig, camera_features_version: int = CAMERA_FEATURES_VERSION
) -> dict[str, Any]:
    if len(cfg.cross_attention) != len(cfg.block_out_channels):
        raise ValueError("model.cross_attention needs one entry per block of model.block_out_channels")
    if cfg.only_cross_attention is not None and len(cfg.only_cross_attention) != len(cfg.block_out_channels):
        raise ValueError("model.only_cross_attention needs one entry per block of model.block_out_channels")
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in cfg.cross_attention)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(cfg.cross_attention))
    extra = {"only_cross_attention": tuple(cfg.only_cross_attention)} if cfg.only_cross_attention else {}
    return extra | dict(
        sample_size=cfg.image_size,
        in_channels=3,
        out_channels=3,
        down_block_types=down,
        up_block_types=up,
        mid_block_type="UNetMidBlock2DCrossAttn",
        block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        cross_attention_dim=cfg.text_encoder.dim,
        attention_head_dim=cfg.attention_head_dim,
        norm_num_groups=cfg.norm_num_groups,
        class_embed_type="projection",
        projection_class_embeddings_input_dim=n_camera_features(camera_features_version),
    )


def build_unet(
    cfg: LearnedModelConfig, seed: int = 0, camera_features_version: int = CAMERA_FEATURES_VERSION
):
    """A freshly initialised UNet (seeded, so the untrained baseline is reproducible)."""
    from diffusers import UNet2DConditionModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet2DConditionModel(**unet_kwargs(cfg, camera_features_version))


def build_scheduler():
    """SD's training noise schedule (scaled_linear 0.00085 → 0.012, 1000 steps), as a DDPMScheduler."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        clip_sample=False,
    )


def save_weights(unet, cfg: LearnedModelConfig, directory: str | Path, extra: dict[str, Any]) -> Path:
    """Write the weights directory (SD layout) atomically: into a sibling temp dir, then swapped in."""
    import shutil

    directory = Path(directory)
    tmp = directory.with_name(f".{directory.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    unet.save_pretrained(tmp / "unet", safe_serialization=True)
    build_scheduler().save_pretrained(tmp / "scheduler")
    from diffusers import __version__ as diffusers_version

    index = {
        "_class_name": "ReferenceLearnedPipeline",
        "_diffusers_version": diffusers_version,
        "unet": ["diffusers", "UNet2DConditionModel"],
        "scheduler": ["diffusers", "DDPMScheduler"],
    }
    (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    info = {
        "model": cfg.model_dump(mode="json"),
        "camera_features_version": CAMERA_FEATURES_VERSION,
        "prediction_type": "epsilon",
        **extra,
    }
    (tmp / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    old = directory.with_name(f".{directory.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if directory.exists():
        directory.rename(old)
    tmp.rename(directory)
    shutil.rmtree(old, ignore_errors=True)
    return directory


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def describe_size(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e5 else str(n)


__all__ = [
    "CAMERA_FEATURES_VERSION",
    "INFO_FILE",
    "LearnedModelConfig",
    "N_CAMERA_FEATURES",
    "N_CAMERA_FEATURES_V1",
    "n_camera_features",
    "build_scheduler",
    "build_unet",
    "camera_features",
    "math",
    "save_weights",
    "unet_kwargs",
]
