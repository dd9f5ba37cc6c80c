"""The trained 3D representation: density and colour fields on a hash-grid encoding (threestudio's
"implicit-volume", as Magic3D and ScaleDreamer use it)."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from trainers.config_base import ConfigBase
from trainers.geometry.hash_grid import HashGridConfig, make_hash_grid


class DensityConfig(ConfigBase):
    """How a field's raw output becomes density (shared by every field that the renderer draws)."""

    radius: float = Field(1.0, gt=0.0)  # the scene box is [-radius, radius]^3
    density_activation: Literal["softplus", "exp"] = "softplus"
    # Magic3D's initial blob: raw density + scale * (1 - |x| / std), so training starts from a
    # solid ball at the centre instead of empty space (which gives the guidance nothing to push on).
    density_bias: Literal["blob_magic3d", "none"] = "blob_magic3d"
    density_blob_scale: float = Field(10.0, ge=0.0)
    density_blob_std: float = Field(0.5, gt=0.0)


class ImplicitVolumeConfig(DensityConfig):
    encoding: HashGridConfig = HashGridConfig()
    hidden_dim: int = Field(64, ge=1)
    n_hidden_layers: int = Field(1, ge=0)


class _TruncExp(torch.autograd.Function):
    """exp whose backward clamps its input, as Instant-NGP does: a large raw density must not turn
    into an inf gradient. Not in torch, hence written here."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return torch.exp(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return grad * torch.exp(x.clamp(-15.0, 15.0))


def _mlp(in_dim: int, hidden_dim: int, n_hidden_layers: int, out_dim: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(n_hidden_layers):
        layers += [nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True)]
        in_dim = hidden_dim
    layers.append(nn.Linear(in_dim, out_dim))
    return nn.Sequential(*layers)


class ImplicitVolume(nn.Module):
    """points [N, 3] in world coordinates -> (density [N] >= 0, rgb [N, 3] in [0, 1])."""

    def __init__(self, cfg: ImplicitVolumeConfig):
        super().__init__()
        self.cfg = cfg
        self.radius = cfg.radius
        self.encoding = make_hash_grid(cfg.encoding, n_input_dims=3)
        # One small MLP for both heads (1 density + 3 colour outputs): the encoding carries the
        # capacity, and a single GEMM chain is the cheapest on the CPU.
        self.network = _mlp(self.encoding.output_dim, cfg.hidden_dim, cfg.n_hidden_layers, 4)

    def forward(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raw = self.network(self.encoding(self._to_unit_cube(points)))
        density = self._activate_density(raw[..., 0], points)
        rgb = torch.sigmoid(raw[..., 1:])
        return density, rgb

    def density(self, points: torch.Tensor) -> torch.Tensor:
        return self(points)[0]

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameters by module, for per-module learning rates (the grid wants a larger one)."""
        return {"encoding": list(self.encoding.parameters()), "network": list(self.network.parameters())}

    def _to_unit_cube(self, points: torch.Tensor) -> torch.Tensor:
        return (points + self.radius) / (2.0 * self.radius)

    def _activate_density(self, raw: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        return activate_density(raw, points, self.cfg)


def activate_density(raw: torch.Tensor, points: torch.Tensor, cfg: DensityConfig) -> torch.Tensor:
    """Raw network output -> density >= 0: the initial blob, the activation, zero outside the box.

    Shared by the per-prompt volume and the amortized generators (whose configs carry the same keys).
    """
    if cfg.density_bias == "blob_magic3d":
        distance = points.norm(dim=-1)
        raw = raw + cfg.density_blob_scale * (1.0 - distance / cfg.density_blob_std)
    density = F.softplus(raw) if cfg.density_activation == "softplus" else _TruncExp.apply(raw)
    inside = (points.abs() <= cfg.radius).all(dim=-1)
    return torch.where(inside, density, torch.zeros_like(density))
