"""Volume rendering of a density/colour field with nerfacc, and the background behind it.

Two ray samplers share one compositing path:

- "uniform": stratified samples between each ray's entry and exit of the scene box, in nerfacc's
  batched [n_rays, n_samples] layout. Runs anywhere (nerfacc's weight and accumulation functions are
  plain PyTorch in that layout).
- "occgrid": nerfacc's occupancy-grid estimator (Instant-NGP's empty-space skipping) with packed
  samples. Its ray marching is a CUDA kernel, so it runs on CUDA only; "auto" picks it there, and an
  explicit "occgrid" elsewhere falls back to "uniform" with a warning (`resolve_estimator`).

All randomness (stratified jitter, background augmentation) comes from the `generator` passed to
`render`, so that a resumed run renders exactly what an uninterrupted one would.
"""

from __future__ import annotations

import itertools
import math
import warnings
from typing import Literal

import nerfacc
import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn

from trainers.cameras import CameraBatch, generate_rays
from trainers.config_base import ConfigBase
from trainers.nerfacc_cuda import ensure_nerfacc_cuda

# ---------------------------------------------------------------------------------------------------
# Background


class BackgroundConfig(ConfigBase):
    kind: Literal["env_map", "solid"] = "env_map"
    color: tuple[float, float, float] = (1.0, 1.0, 1.0)  # the "solid" background
    # Training only: with this probability an image's background is replaced by a random solid colour
    # (DreamFusion's augmentation), so that the geometry cannot paint the object into the background.
    random_aug_prob: float = Field(0.5, ge=0.0, le=1.0)

    @field_validator("color")
    @classmethod
    def _color_in_unit_range(cls, value: tuple[float, float, float]) -> tuple[float, float, float]:
        if not all(0.0 <= c <= 1.0 for c in value):
            raise ValueError(f"color must have three components in [0, 1], got {list(value)}")
        return value


class Background(nn.Module):
    """rays_d [..., 3] -> rgb [..., 3]: a learned environment map of the view direction, or a colour.

    The environment map is a small MLP on a frequency encoding of the direction: the background is
    smooth, so a few frequencies suffice and a hash grid would only add parameters.
    """

    n_frequencies = 4
    hidden_dim = 32

    def __init__(self, cfg: BackgroundConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.kind == "env_map":
            in_dim = 3 + 3 * 2 * self.n_frequencies
            self.network = nn.Sequential(
                nn.Linear(in_dim, self.hidden_dim), nn.ReLU(inplace=True), nn.Linear(self.hidden_dim, 3)
            )
            self.register_buffer(
                "frequencies", math.pi * 2.0 ** torch.arange(self.n_frequencies), persistent=False
            )
        else:
            self.register_buffer("color", torch.tensor(cfg.color, dtype=torch.float32), persistent=False)

    def forward(self, rays_d: torch.Tensor) -> torch.Tensor:
        if self.cfg.kind == "solid":
            return self.color.to(rays_d.dtype).expand(*rays_d.shape[:-1], 3)
        d = F.normalize(rays_d, dim=-1)
        angles = (d[..., None, :] * self.frequencies[:, None]).flatten(-2)
        encoded = torch.cat([d, torch.sin(angles), torch.cos(angles)], dim=-1)
        return torch.sigmoid(self.network(encoded))


# ---------------------------------------------------------------------------------------------------
# Renderer


class RendererConfig(ConfigBase):
    # Uniform sampler: samples per ray. Occupancy grid: the marching step is the box diagonal divided
    # by this, so it sets the same resolution along the ray (GPU configs raise it, e.g. 512).
    num_samples_per_ray: int = Field(64, ge=1)
    estimator: Literal["auto", "uniform", "occgrid"] = "auto"  # auto: occgrid on CUDA, else uniform
    # The occupancy grid (nerfacc's OccGridEstimator, Instant-NGP's schedule): cells per side; refreshed
    # every `occgrid_update_every` training steps; during the first `occgrid_warmup_steps` every cell is
    # re-evaluated, afterwards a quarter of them (uniform + occupied) per update; each cell keeps an EMA
    # (decay `occgrid_ema_decay`) of density x marching step, and is skipped while that stays below
    # `occgrid_threshold` (capped by the grid's mean, so a thin scene never empties the grid).
    occgrid_resolution: int = Field(64, ge=1)
    occgrid_update_every: int = Field(16, ge=1)
    occgrid_warmup_steps: int = Field(256, ge=0)
    occgrid_ema_decay: float = Field(0.95, ge=0.0, le=1.0)
    occgrid_threshold: float = Field(0.01, ge=0.0)
    # Ray samples rendered at once outside training, to bound memory: a chunk holds this many samples'
    # worth of rays (at least one ray), so raising num_samples_per_ray shrinks the chunk instead of
    # multiplying the memory of a validation or turntable render.
    eval_chunk_samples: int = Field(16384 * 64, ge=1)


class EstimatorFallback(UserWarning):
    """renderer.estimator=occgrid was asked for on a device without nerfacc's CUDA kernels."""


def resolve_estimator(choice: str, device_type: str) -> tuple[Literal["uniform", "occgrid"], str | None]:
    """The ray sampler used for `renderer.estimator=choice` on a device: (sampler, fallback message)."""
    if choice == "uniform":
        return "uniform", None
    if device_type == "cuda":
        return "occgrid", None
    if choice == "occgrid":
        return "uniform", (
            "renderer.estimator=occgrid needs CUDA (nerfacc's grid traversal is a CUDA kernel); rendering "
            f"on {device_type} with the uniform sampler instead. Set renderer.estimator=auto to silence this"
        )
    return "uniform", None


def occgrid_update_due(step: int, cfg: RendererConfig) -> bool:
    """Whether training step `step` refreshes the occupancy grid (step 0 included)."""
    return step % cfg.occgrid_update_every == 0


def ray_box_intersection(
    rays_o: torch.Tensor, rays_d: torch.Tensor, radius: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Entry and exit distances of rays [R, 3] through the box [-radius, radius]^3 (slab method).

    Rays that miss get near == far == 0, i.e. empty intervals. Written here because nerfacc's
    `ray_aabb_intersect` is a CUDA kernel and the uniform sampler must run on the CPU.
    """
    safe_d = torch.where(rays_d.abs() < 1e-9, torch.full_like(rays_d, 1e-9), rays_d)
    t0 = (-radius - rays_o) / safe_d
    t1 = (radius - rays_o) / safe_d
    near = torch.minimum(t0, t1).amax(dim=-1).clamp_min(0.0)  # a camera inside the box starts at 0
    far = torch.maximum(t0, t1).amin(dim=-1)
    hit = far > near
    return torch.where(hit, near, 0.0), torch.where(hit, far, 0.0)


class VolumeRenderer(nn.Module):
    """Renders `field` (any module: points [N, 3] -> (density [N], rgb [N, 3])) from cameras.

    `field`, `background` and the occupancy grid are submodules, so `renderer.to(device)` moves them
    all and `renderer.state_dict()` holds them all.
    """

    def __init__(self, cfg: RendererConfig, field: nn.Module, background: Background, radius: float = 1.0):
        super().__init__()
        self.cfg = cfg
        self.field = field
        self.background = background
        self.radius = radius
        # The diagonal of the box over the sample count: the occupancy grid's marching step.
        self.render_step_size = 2.0 * math.sqrt(3.0) * radius / cfg.num_samples_per_ray
        self.estimator: nerfacc.OccGridEstimator | None = None
        if cfg.estimator != "uniform":
            aabb = torch.tensor([-radius] * 3 + [radius] * 3, dtype=torch.float32)
            self.estimator = nerfacc.OccGridEstimator(roi_aabb=aabb, resolution=cfg.occgrid_resolution)
            # Start with every cell occupied: until the first update (and if update_step is never
            # called) the grid then skips nothing instead of everything.
            self.estimator.binaries.fill_(True)
        self._warned_fallback = False

    # -- occupancy grid --------------------------------------------------------------------------

    def uses_occgrid(self, device: torch.device) -> bool:
        sampler, fallback = resolve_estimator(self.cfg.estimator, device.type)
        if fallback and not self._warned_fallback:
            warnings.warn(fallback, EstimatorFallback, stacklevel=2)
            self._warned_fallback = True
        occgrid = self.estimator is not None and sampler == "occgrid"
        if occgrid and device.type == "cuda":
            # nerfacc's grid kernels are built on their first use: once per node, not once per worker.
            ensure_nerfacc_cuda()
        return occgrid

    def update_step(self, step: int) -> None:
        """Refresh the occupancy grid on the steps `occgrid_update_due` picks; a no-op without it (CPU).

        Call once per training step, before rendering. (nerfacc draws the cells' sample points from
        torch's global RNG: on CUDA a resumed run is not bit-for-bit the uninterrupted one.)
        """
        if self.estimator is None or not self.training:
            return
        if not self.uses_occgrid(self.estimator.binaries.device) or not occgrid_update_due(step, self.cfg):
            return
        step_size = self.render_step_size
        self.estimator.update_every_n_steps(
            step=step,
            # nerfacc thresholds an opacity-like quantity: density times the marching step.
            occ_eval_fn=lambda x: self.field(x)[0] * step_size,
            occ_thre=self.cfg.occgrid_threshold,
            ema_decay=self.cfg.occgrid_ema_decay,
            warmup_steps=self.cfg.occgrid_warmup_steps,
            n=1,  # the schedule is decided above
        )

    # -- rendering -------------------------------------------------------------------------------

    def render(
        self,
        cameras: CameraBatch,
        width: int,
        height: int,
        *,
        train: bool = False,
        generator: torch.Generator | None = None,
        background_color: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Render B images.

        train=True: all rays at once, stratified jitter and random background augmentation drawn
        from `generator` (none without one). train=False: no randomness, rays rendered in chunks of
        `eval_chunk_samples` (wrap the call in torch.no_grad() for the memory bound to hold).
        `background_color` [B, 3] replaces the background with a solid colour per image.

        Returns "rgb" [B,H,W,3] (composited), "rgb_fg" [B,H,W,3] (before the background, i.e.
        premultiplied by opacity), "background" [B,H,W,3], "opacity" [B,H,W,1], "depth" [B,H,W,1]
        (expected distance along the ray given that it hits, 0 where nothing is hit). In training
        also the per-sample "weights" and sample distances "t", for regularisers: [B,H,W,S] from the
        uniform sampler; packed [n_samples] with "ray_indices" (into B*H*W) from the occupancy grid.
        """
        device = self._device()
        cameras = cameras.to(device)
        n_images = len(cameras)
        rays_o, rays_d = generate_rays(cameras, width, height)
        rays_o, rays_d = rays_o.reshape(-1, 3), rays_d.reshape(-1, 3)
        near, far = ray_box_intersection(rays_o, rays_d, self.radius)
        occgrid = self.uses_occgrid(device)
        draw = generator if train else None

        if train:
            out = self._render_rays(rays_o, rays_d, near, far, occgrid, draw)
        else:
            size = max(1, self.cfg.eval_chunk_samples // self.cfg.num_samples_per_ray)
            chunks = [
                self._render_rays(
                    rays_o[i : i + size],
                    rays_d[i : i + size],
                    near[i : i + size],
                    far[i : i + size],
                    occgrid,
                    None,
                )
                for i in range(0, rays_o.shape[0], size)
            ]
            out = {key: torch.cat([c[key] for c in chunks]) for key in ("rgb_fg", "opacity", "depth")}

        background = self._background(rays_d, n_images, draw, background_color)
        image_shape = (n_images, height, width)
        result = {
            "rgb_fg": out["rgb_fg"].reshape(*image_shape, 3),
            "opacity": out["opacity"].reshape(*image_shape, 1),
            "depth": out["depth"].reshape(*image_shape, 1),
            "background": background.reshape(*image_shape, 3),
        }
        result["rgb"] = result["rgb_fg"] + (1.0 - result["opacity"]) * result["background"]
        if train:
            if occgrid:
                result.update(weights=out["weights"], t=out["t"], ray_indices=out["ray_indices"])
            else:
                n_samples = out["weights"].shape[-1]
                result.update(
                    weights=out["weights"].reshape(*image_shape, n_samples),
                    t=out["t"].reshape(*image_shape, n_samples),
                )
        return result

    def _device(self) -> torch.device:
        tensor = next(itertools.chain(self.parameters(), self.buffers()), None)
        return torch.device("cpu") if tensor is None else tensor.device

    def _render_rays(
        self,
        rays_o: torch.Tensor,
        rays_d: torch.Tensor,
        near: torch.Tensor,
        far: torch.Tensor,
        occgrid: bool,
        generator: torch.Generator | None,
    ) -> dict[str, torch.Tensor]:
        if occgrid:
            return self._render_occgrid(rays_o, rays_d, near, far, generator)
        return self._render_uniform(rays_o, rays_d, near, far, generator)

    def _render_uniform(self, rays_o, rays_d, near, far, generator) -> dict[str, torch.Tensor]:
        n_rays, n_samples = rays_o.shape[0], self.cfg.num_samples_per_ray
        edges = torch.linspace(0.0, 1.0, n_samples + 1, device=rays_o.device)
        edges = near[:, None] + (far - near)[:, None] * edges  # [R, S + 1]
        t_starts, t_ends = edges[:, :-1], edges[:, 1:]
        if generator is None:
            offset = torch.full_like(t_starts, 0.5)
        else:  # stratified: one uniform draw inside each bin
            offset = _rand((n_rays, n_samples), generator, rays_o.device)
        t = t_starts + (t_ends - t_starts) * offset
        points = rays_o[:, None, :] + rays_d[:, None, :] * t[..., None]
        density, rgb = self.field(points.reshape(-1, 3))
        density, rgb = density.reshape(n_rays, n_samples), rgb.reshape(n_rays, n_samples, 3)

        weights, _, _ = nerfacc.render_weight_from_density(t_starts, t_ends, density)
        rgb_fg = nerfacc.accumulate_along_rays(weights, values=rgb)
        opacity = nerfacc.accumulate_along_rays(weights)
        depth = nerfacc.accumulate_along_rays(weights, values=t[..., None]) / _safe(opacity)
        return {"rgb_fg": rgb_fg, "opacity": opacity, "depth": depth, "weights": weights, "t": t}

    def _render_occgrid(self, rays_o, rays_d, near, far, generator) -> dict[str, torch.Tensor]:
        n_rays = rays_o.shape[0]

        def points_at(t_starts, t_ends, ray_indices):
            t_mid = (t_starts + t_ends)[:, None] / 2.0
            return rays_o[ray_indices] + rays_d[ray_indices] * t_mid

        def sigma_fn(t_starts, t_ends, ray_indices):
            return self.field(points_at(t_starts, t_ends, ray_indices))[0]

        def rgb_sigma_fn(t_starts, t_ends, ray_indices):
            density, rgb = self.field(points_at(t_starts, t_ends, ray_indices))
            return rgb, density

        t_min = near
        if generator is not None:
            # Stratify by shifting each ray's start within one step, drawn from our generator
            # (nerfacc's own `stratified=True` uses the global RNG, which a resume cannot replay).
            t_min = near + _rand((n_rays,), generator, rays_o.device) * self.render_step_size
        ray_indices, t_starts, t_ends = self.estimator.sampling(
            rays_o,
            rays_d,
            sigma_fn=sigma_fn,
            t_min=t_min,
            t_max=far,
            render_step_size=self.render_step_size,
            stratified=False,
        )
        rgb_fg, opacity, depth, extras = nerfacc.rendering(
            t_starts, t_ends, ray_indices, n_rays=n_rays, rgb_sigma_fn=rgb_sigma_fn
        )
        return {
            "rgb_fg": rgb_fg,
            "opacity": opacity,
            "depth": depth,
            "weights": extras["weights"],
            "t": (t_starts + t_ends) / 2.0,
            "ray_indices": ray_indices,
        }

    def _background(
        self,
        rays_d: torch.Tensor,
        n_images: int,
        generator: torch.Generator | None,
        background_color: torch.Tensor | None,
    ) -> torch.Tensor:
        """Per-ray background colour [R, 3]."""
        per_image = rays_d.reshape(n_images, -1, 3)
        if background_color is not None:
            color = torch.as_tensor(background_color, dtype=rays_d.dtype, device=rays_d.device)
            return color.reshape(n_images, 1, 3).expand_as(per_image).reshape(-1, 3)
        background = self.background(per_image)
        if generator is not None:
            replace = _rand((n_images,), generator, rays_d.device) < self.background.cfg.random_aug_prob
            random_color = _rand((n_images, 3), generator, rays_d.device)
            background = torch.where(replace[:, None, None], random_color[:, None, :], background)
        return background.reshape(-1, 3)


def _rand(shape: tuple[int, ...], generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """Uniform draws from `generator` (on its own device), moved to `device`."""
    return torch.rand(shape, generator=generator, device=generator.device).to(device)


def _safe(opacity: torch.Tensor) -> torch.Tensor:
    return opacity.clamp_min(torch.finfo(opacity.dtype).eps)
