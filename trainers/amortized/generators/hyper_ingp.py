"""Hyper-iNGP (ScaleDreamer): a hash grid shared by all prompts, and per-prompt MLP weights that a
hypernetwork writes from the text embedding.

The grid is not conditioned on text. For each prompt the hypernetwork Linear(text → hidden) →
LayerNorm → SiLU → Linear(hidden → all weights) gives the weights of two bias-free MLPs on the grid
features, density F→H→1 and colour F→H→3 with ReLU between; the last bias starts at zero so that
every prompt starts from the same field (up to its weights' text-dependent part).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from trainers.amortized.generators.base import Generator
from trainers.geometry.hash_grid import HashGridConfig, make_hash_grid
from trainers.geometry.implicit_volume import DensityConfig, activate_density


class HyperINGPConfig(DensityConfig):
    kind: Literal["hyper_ingp"] = "hyper_ingp"
    # The paper: 16 levels x 2 features, 2^19 entries, base 16 (HashGridConfig's defaults).
    encoding: HashGridConfig = HashGridConfig()
    hidden_dim: int = Field(64, ge=1)  # the generated MLPs' width
    hyper_hidden_dim: int = Field(64, ge=1)  # the hypernetwork's width
    # >0: a second, smaller hypernetwork writes each prompt's background (ScaleDreamer); 0: one shared
    background_hyper_dim: int = Field(0, ge=0)


class HyperINGP(Generator):
    def __init__(self, cfg: HyperINGPConfig, text_dim: int):
        super().__init__()
        self.cfg = cfg
        self.encoding = make_hash_grid(cfg.encoding, n_input_dims=3)
        features, hidden = self.encoding.output_dim, cfg.hidden_dim
        # (name, in, out) of each generated matrix, in the order the hypernetwork emits them.
        self.shapes = [
            ("density_1", features, hidden),
            ("density_2", hidden, 1),
            ("colour_1", features, hidden),
            ("colour_2", hidden, 3),
        ]
        n_weights = sum(i * o for _, i, o in self.shapes)
        self.hypernet = nn.Sequential(
            nn.Linear(text_dim, cfg.hyper_hidden_dim),
            nn.LayerNorm(cfg.hyper_hidden_dim),
            nn.SiLU(),
            nn.Linear(cfg.hyper_hidden_dim, n_weights),
        )
        nn.init.zeros_(self.hypernet[-1].bias)

    def codes(self, text: torch.Tensor, noise: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """text [B, D] -> {name: weights [B, in, out]}."""
        flat = self.hypernet(text)
        out, start = {}, 0
        for name, fan_in, fan_out in self.shapes:
            size = fan_in * fan_out
            # Scaled like a default-initialised layer, so that the generated MLPs start well-conditioned.
            out[name] = flat[:, start : start + size].view(-1, fan_in, fan_out) / fan_in**0.5
            start += size
        return out

    def query(self, points, codes, index):
        unit = (points + self.cfg.radius) / (2.0 * self.cfg.radius)
        features = self.encoding(unit)
        density_hidden = torch.relu(features @ codes["density_1"][index])
        raw_density = (density_hidden @ codes["density_2"][index])[:, 0]
        colour_hidden = torch.relu(features @ codes["colour_1"][index])
        rgb = torch.sigmoid(colour_hidden @ codes["colour_2"][index])
        return activate_density(raw_density, points, self.cfg), rgb
