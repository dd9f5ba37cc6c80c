"""The 3DConv-net (ScaleDreamer, after CC3D / StyleGAN): noise and text -> a voxel feature grid.

A 64-d noise vector z goes through two FC layers, is concatenated with the text embedding, and an FC
layer gives the style w. A learned 4³ constant is upsampled through modulated 3³ convolutions (weights
scaled per input channel by an affine map of w, then demodulated) to a grid of `feature_dim` channels.
The grid is sampled trilinearly and decoded by small density / colour MLPs shared by all prompts.
Training draws fresh noise every step; evaluation uses one fixed noise (`eval_noise_seed`).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn

from trainers.amortized.generators.base import Generator
from trainers.geometry.implicit_volume import DensityConfig, activate_density


class Conv3DConfig(DensityConfig):
    kind: Literal["conv3d"] = "conv3d"
    noise_dim: int = Field(64, ge=1)
    w_dim: int = Field(256, ge=1)
    # Channels after each x2 upsampling of the 4³ constant: the grid is 4 * 2^len(channels) per side
    # (the paper reaches 128³ x 32; [32, 32, 16] gives 32³, enough for a 2-core CPU).
    constant_channels: int = Field(64, ge=1)
    channels: list[int] = [64, 64, 32, 32, 32]
    feature_dim: int = Field(32, ge=1)
    mlp_hidden_dim: int = Field(32, ge=1)
    eval_noise_seed: int = 0
    # >0: a second, smaller hypernetwork writes each prompt's background (ScaleDreamer); 0: one shared
    background_hyper_dim: int = Field(0, ge=0)

    @field_validator("channels")
    @classmethod
    def _some(cls, value: list[int]) -> list[int]:
        if not value or min(value) < 1:
            raise ValueError(
                "generator.channels must list at least one positive channel count, e.g. [32, 16]"
            )
        return value


class ModulatedConv3d(nn.Module):
    """A 3D convolution whose weights each sample's style scales and demodulates (StyleGAN2)."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, kernel: int, demodulate: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel, kernel, kernel))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.affine = nn.Linear(w_dim, in_channels)
        nn.init.ones_(self.affine.bias)  # start as an unmodulated convolution
        self.demodulate = demodulate
        self.padding = kernel // 2

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        batch, in_channels = x.shape[:2]
        style = self.affine(w)  # [B, in]
        weight = self.weight[None] * style[:, None, :, None, None, None]  # [B, out, in, k, k, k]
        fan_in = weight[0, 0].numel()
        if self.demodulate:
            weight = weight * torch.rsqrt(weight.pow(2).sum(dim=(2, 3, 4, 5), keepdim=True) + 1e-8)
        else:
            weight = weight / fan_in**0.5
        # One grouped convolution for the whole batch: sample b's input channels meet only its weights.
        out = F.conv3d(
            x.reshape(1, batch * in_channels, *x.shape[2:]),
            weight.reshape(-1, *weight.shape[2:]),
            padding=self.padding,
            groups=batch,
        )
        return out.reshape(batch, -1, *out.shape[2:]) + self.bias.view(1, -1, 1, 1, 1)


class Conv3DGenerator(Generator):
    def __init__(self, cfg: Conv3DConfig, text_dim: int):
        super().__init__()
        self.cfg = cfg
        self.noise_dim = cfg.noise_dim
        self.noise_mapping = nn.Sequential(
            nn.Linear(cfg.noise_dim, cfg.w_dim),
            nn.LeakyReLU(0.2),
            nn.Linear(cfg.w_dim, cfg.w_dim),
            nn.LeakyReLU(0.2),
        )
        self.style = nn.Linear(cfg.w_dim + text_dim, cfg.w_dim)
        self.constant = nn.Parameter(torch.randn(1, cfg.constant_channels, 4, 4, 4))
        blocks, previous = [], cfg.constant_channels
        for channels in cfg.channels:
            blocks.append(ModulatedConv3d(previous, channels, cfg.w_dim, kernel=3))
            previous = channels
        self.blocks = nn.ModuleList(blocks)
        self.to_features = ModulatedConv3d(previous, cfg.feature_dim, cfg.w_dim, kernel=1, demodulate=False)
        self.decoder = nn.Sequential(
            nn.Linear(cfg.feature_dim, cfg.mlp_hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(cfg.mlp_hidden_dim, 4),
        )

    @property
    def grid_resolution(self) -> int:
        return 4 * 2 ** len(self.cfg.channels)

    def eval_noise(self, batch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.cfg.eval_noise_seed)
        return torch.randn(1, self.noise_dim, generator=generator).expand(batch, -1)

    def codes(self, text: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """text [B, D] (+ noise [B, Z]; None: the fixed evaluation noise) -> grids [B, F, R, R, R]."""
        if noise is None:
            noise = self.eval_noise(len(text))
        noise = noise.to(text)
        w = self.style(torch.cat([self.noise_mapping(noise), text], dim=-1))
        x = self.constant.expand(len(text), -1, -1, -1, -1)
        for block in self.blocks:
            x = F.interpolate(x, scale_factor=2, mode="trilinear", align_corners=False)
            x = F.leaky_relu(block(x, w), 0.2)
        return self.to_features(x, w)

    def query(self, points, codes, index):
        # grid_sample reads (x, y, z) against the grid's (W, H, D) axes, in [-1, 1].
        coords = (points / self.cfg.radius).view(1, -1, 1, 1, 3)
        features = F.grid_sample(codes[index : index + 1], coords, mode="bilinear", align_corners=True)
        raw = self.decoder(features.view(self.cfg.feature_dim, -1).T)
        return activate_density(raw[:, 0], points, self.cfg), torch.sigmoid(raw[:, 1:])
