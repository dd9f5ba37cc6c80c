"""A text-conditioned background: ScaleDreamer's second, smaller hypernetwork.

It writes, per prompt, the weights of the environment map the per-prompt trainer learns once
(`trainers.rendering.Background`: a frequency encoding of the view direction -> hidden -> RGB), so
each prompt gets its own backdrop. With `generator.background_hyper_dim: 0` the amortized model uses
the shared `Background` instead.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from trainers.rendering import Background, BackgroundConfig


class HyperBackground(nn.Module):
    """rays_d [..., 3] -> rgb [..., 3] for the selected prompt; the renderer calls it like `Background`."""

    def __init__(self, cfg: BackgroundConfig, text_dim: int, hyper_dim: int, hidden_dim: int = 16):
        super().__init__()
        if cfg.kind != "env_map":
            raise ValueError("generator.background_hyper_dim > 0 needs background.kind=env_map")
        self.cfg = cfg  # the renderer reads random_aug_prob from here, as from Background
        self.n_frequencies = Background.n_frequencies
        self.in_dim = 3 + 3 * 2 * self.n_frequencies
        self.hidden_dim = hidden_dim
        n_weights = self.in_dim * hidden_dim + hidden_dim * 3
        self.hypernet = nn.Sequential(
            nn.Linear(text_dim, hyper_dim),
            nn.LayerNorm(hyper_dim),
            nn.SiLU(),
            nn.Linear(hyper_dim, n_weights),
        )
        nn.init.zeros_(self.hypernet[-1].bias)
        self.register_buffer(
            "frequencies", math.pi * 2.0 ** torch.arange(self.n_frequencies), persistent=False
        )
        self._codes: torch.Tensor | None = None
        self._index = 0

    def codes(self, text: torch.Tensor) -> torch.Tensor:
        return self.hypernet(text)

    def select(self, codes: torch.Tensor | None, index: int) -> None:
        self._codes, self._index = codes, index

    def forward(self, rays_d: torch.Tensor) -> torch.Tensor:
        if self._codes is None:
            raise RuntimeError("HyperBackground: select(codes, index) a prompt before rendering")
        flat = self._codes[self._index]
        split = self.in_dim * self.hidden_dim
        w1 = flat[:split].view(self.in_dim, self.hidden_dim) / self.in_dim**0.5
        w2 = flat[split:].view(self.hidden_dim, 3) / self.hidden_dim**0.5
        d = F.normalize(rays_d, dim=-1)
        angles = (d[..., None, :] * self.frequencies[:, None]).flatten(-2)
        encoded = torch.cat([d, torch.sin(angles), torch.cos(angles)], dim=-1)
        return torch.sigmoid(torch.relu(encoded @ w1) @ w2)
