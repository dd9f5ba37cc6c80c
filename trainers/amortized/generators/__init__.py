"""Text-conditioned 3D generators: one network maps a prompt's embedding to a radiance field.

    generator = make_generator(cfg, text_dim=1024)
    codes = generator.codes(text [B, D], noise [B, Z] or None)   # one forward for the whole batch
    density, rgb = generator.query(points [N, 3], codes, i)        # the field of prompt i

- `hyper_ingp`: Hyper-iNGP (a shared hash grid; a hypernetwork writes each prompt's MLP weights).
- `conv3d`: the 3DConv-net (noise + text -> style w -> modulated 3D convolutions -> a voxel feature grid).
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from trainers.amortized.generators.base import ConditionedField, Generator
from trainers.amortized.generators.conv3d import Conv3DConfig, Conv3DGenerator
from trainers.amortized.generators.hyper_ingp import HyperINGP, HyperINGPConfig

GeneratorConfig = Annotated[HyperINGPConfig | Conv3DConfig, Field(discriminator="kind")]


def make_generator(cfg: HyperINGPConfig | Conv3DConfig, text_dim: int) -> Generator:
    return {"hyper_ingp": HyperINGP, "conv3d": Conv3DGenerator}[cfg.kind](cfg, text_dim)


__all__ = [
    "ConditionedField",
    "Conv3DConfig",
    "Conv3DGenerator",
    "Generator",
    "GeneratorConfig",
    "HyperINGP",
    "HyperINGPConfig",
    "make_generator",
]
