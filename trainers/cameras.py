"""Orbit cameras around the scene: random training views, turntables, rays, view-dependent prompts.

Conventions every other module codes against:

- the world is z-up and the scene lives in the box [-radius, radius]^3;
- a camera at elevation `el`, azimuth `az` (degrees) and distance `d` sits at
  d * (cos el cos az, cos el sin az, sin el) and looks at the origin; azimuth 0 is the "front";
- `c2w` is OpenGL-style: the camera looks along its -z axis, +y is up in the image, +x is right.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
from pydantic import Field, field_validator, model_validator

from trainers.config_base import ConfigBase

ViewLabel = str  # "front" | "side" | "back" | "overhead"


class CameraConfig(ConfigBase):
    """Ranges the training cameras are drawn from (uniformly), and the fixed evaluation view."""

    elevation_range: tuple[float, float] = (-10.0, 45.0)  # degrees
    azimuth_range: tuple[float, float] = (-180.0, 180.0)  # degrees
    distance_range: tuple[float, float] = (1.5, 2.0)
    fovy_range: tuple[float, float] = (40.0, 70.0)  # degrees
    view_dependent_prompting: bool = True
    # 0: training cameras are drawn from the continuous ranges. N > 0: each is one of N fixed cameras
    # spread over the ranges (`spread_cameras`): the reference benchmark sets N to its prior's
    # `n_views`, so that the camera-conditioned prior has a true render at every training camera.
    fixed_views: int = Field(0, ge=0)
    # DreamFusion's view labels: |azimuth| < front_threshold is "front", > 180 - back_threshold is
    # "back", the rest "side"; elevation > overhead_threshold is "overhead" whatever the azimuth.
    front_threshold: float = Field(45.0, ge=0.0, le=180.0)  # degrees
    back_threshold: float = Field(45.0, ge=0.0, le=180.0)  # degrees
    overhead_threshold: float = Field(60.0, ge=-90.0, le=90.0)  # degrees
    # Validation grids and the final turntable.
    eval_elevation: float = Field(15.0, ge=-90.0, le=90.0)  # degrees
    eval_distance: float = Field(1.75, gt=0.0)
    eval_fovy: float = Field(50.0, gt=0.0, lt=180.0)  # degrees

    @field_validator("elevation_range", "azimuth_range", "distance_range", "fovy_range")
    @classmethod
    def _range_is_ordered(cls, value: tuple[float, float], info) -> tuple[float, float]:
        low, high = value
        if low > high:
            raise ValueError(f"{info.field_name} must be [low, high] with low <= high, got {list(value)}")
        return value

    @field_validator("elevation_range")
    @classmethod
    def _elevation_within_poles(cls, value: tuple[float, float]) -> tuple[float, float]:
        if value[0] < -90.0 or value[1] > 90.0:
            raise ValueError(f"elevation_range must lie within [-90, 90] degrees, got {list(value)}")
        return value

    @field_validator("distance_range")
    @classmethod
    def _distance_positive(cls, value: tuple[float, float]) -> tuple[float, float]:
        if value[0] <= 0.0:
            raise ValueError(f"distance_range must be > 0, got {list(value)}")
        return value

    @field_validator("fovy_range")
    @classmethod
    def _fovy_open_interval(cls, value: tuple[float, float]) -> tuple[float, float]:
        if value[0] <= 0.0 or value[1] >= 180.0:
            raise ValueError(f"fovy_range must lie in the open interval (0, 180) degrees, got {list(value)}")
        return value

    @model_validator(mode="after")
    def _front_and_back_do_not_overlap(self) -> CameraConfig:
        if self.front_threshold + self.back_threshold > 180.0:
            raise ValueError(
                "front_threshold + back_threshold must be <= 180 so that front and back views do not "
                f"overlap, got {self.front_threshold} + {self.back_threshold}"
            )
        return self


POSE_DIM = 16  # the flattened c2w at the front of a camera vector (`CameraBatch.camera_vector()`)


@dataclass
class CameraBatch:
    """B cameras. Angles are kept in degrees (for labels and logging) except `fovy` (radians)."""

    c2w: torch.Tensor  # [B, 4, 4]
    fovy: torch.Tensor  # [B] radians
    elevation: torch.Tensor  # [B] degrees
    azimuth: torch.Tensor  # [B] degrees
    distance: torch.Tensor  # [B]

    def __len__(self) -> int:
        return self.c2w.shape[0]

    def to(self, device: torch.device | str) -> CameraBatch:
        return CameraBatch(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def __getitem__(self, index: torch.Tensor | slice) -> CameraBatch:
        return CameraBatch(**{f.name: getattr(self, f.name)[index] for f in fields(self)})

    def camera_vector(self) -> torch.Tensor:
        """[B, 17]: the flattened c2w, then the fovy (radians). What guidance passes a camera-conditioned
        prior as `class_labels`; `camera_pose` reads the c2w back. The fovy is there because at a
        given pose it sets how large the object appears (tan(fovy/2) varies 2× over the default
        range), so a prior that is not told it cannot know the silhouette's size."""
        return torch.cat([self.c2w.reshape(len(self), POSE_DIM), self.fovy.reshape(len(self), 1)], dim=1)


def camera_pose(camera_vectors: torch.Tensor) -> torch.Tensor:
    """[B, 16] flattened c2w of camera vectors [B, 17] (a bare [B, 16] c2w is returned as it is)."""
    return camera_vectors[..., :POSE_DIM]


def camera_position(camera_vectors: torch.Tensor) -> torch.Tensor:
    """[B, 3] camera centres (float32) of camera vectors [B, 17], or of a bare c2w [B, 16] or [B, 4, 4]."""
    return (
        camera_pose(camera_vectors.reshape(camera_vectors.shape[0], -1)).reshape(-1, 4, 4)[:, :3, 3].float()
    )


def _as_tensor(value: float | Sequence[float] | torch.Tensor) -> torch.Tensor:
    # Cameras are built on the CPU (a handful of numbers); `CameraBatch.to` moves them.
    return torch.as_tensor(value, dtype=torch.float32, device="cpu").reshape(-1)


def orbit_cameras(
    elevation: float | torch.Tensor,
    azimuth: float | torch.Tensor,
    distance: float | torch.Tensor,
    fovy_deg: float | torch.Tensor,
) -> CameraBatch:
    """Cameras on the orbit sphere looking at the origin. Arguments (degrees) broadcast to [B]."""
    elevation, azimuth, distance, fovy_deg = torch.broadcast_tensors(
        _as_tensor(elevation), _as_tensor(azimuth), _as_tensor(distance), _as_tensor(fovy_deg)
    )
    el, az = torch.deg2rad(elevation), torch.deg2rad(azimuth)
    position = distance[:, None] * torch.stack(
        [torch.cos(el) * torch.cos(az), torch.cos(el) * torch.sin(az), torch.sin(el)], dim=-1
    )
    forward = -position / distance[:, None]
    # right = normalize(forward x z_up) works out to (-sin az, cos az, 0); writing it from the
    # azimuth keeps it defined at the poles (elevation +-90) where the cross product vanishes.
    right = torch.stack([-torch.sin(az), torch.cos(az), torch.zeros_like(az)], dim=-1)
    up = torch.linalg.cross(right, forward)
    c2w = torch.zeros(len(el), 4, 4)
    c2w[:, :3, 0] = right
    c2w[:, :3, 1] = up
    c2w[:, :3, 2] = -forward  # OpenGL: the camera looks along its -z
    c2w[:, :3, 3] = position
    c2w[:, 3, 3] = 1.0
    return CameraBatch(
        c2w=c2w,
        fovy=torch.deg2rad(fovy_deg).clone(),
        elevation=elevation.clone(),
        azimuth=azimuth.clone(),
        distance=distance.clone(),
    )


def turntable_cameras(n_frames: int, elevation: float, distance: float, fovy: float) -> CameraBatch:
    """`n_frames` cameras evenly spaced around the full circle, starting at the front (azimuth 0)."""
    if n_frames < 1:
        raise ValueError(f"n_frames must be >= 1, got {n_frames}")
    azimuth = torch.arange(n_frames, dtype=torch.float32) * (360.0 / n_frames)
    azimuth = torch.where(azimuth > 180.0, azimuth - 360.0, azimuth)  # keep in (-180, 180]
    return orbit_cameras(elevation, azimuth, distance, fovy)


class CameraSampler:
    """Random training cameras: uniform in each configured range, or uniform over `fixed_views` cameras."""

    def __init__(self, cfg: CameraConfig):
        self.cfg = cfg
        self.fixed = spread_cameras(cfg.fixed_views, cfg) if cfg.fixed_views else None

    def sample(self, batch_size: int, generator: torch.Generator) -> CameraBatch:
        # Every draw comes from `generator`, in a fixed order, so that a resumed run that restores the
        # generator's state sees exactly the cameras an uninterrupted one would.
        if self.fixed is not None:
            index = torch.randint(
                0, len(self.fixed), (batch_size,), generator=generator, device=generator.device
            )
            return self.fixed[index.cpu()]
        u = torch.rand(4, batch_size, generator=generator, device=generator.device).cpu()

        def in_range(row: torch.Tensor, bounds: tuple[float, float]) -> torch.Tensor:
            low, high = bounds
            return low + (high - low) * row

        return orbit_cameras(
            elevation=in_range(u[0], self.cfg.elevation_range),
            azimuth=in_range(u[1], self.cfg.azimuth_range),
            distance=in_range(u[2], self.cfg.distance_range),
            fovy_deg=in_range(u[3], self.cfg.fovy_range),
        )


def spread_cameras(n_views: int, cfg: CameraConfig | None = None, seed: int = 0) -> CameraBatch:
    """`n_views` cameras spread over the training camera ranges (elevation, azimuth, distance, fovy).

    A scrambled Sobol sequence (torch.quasirandom) rather than i.i.d. draws, so that even a few dozen
    views cover the ranges evenly. The first n of a longer set are the set of n.
    """
    cfg = cfg or CameraConfig()
    u = torch.quasirandom.SobolEngine(4, scramble=True, seed=seed).draw(n_views)

    def in_range(column: torch.Tensor, bounds: tuple[float, float]) -> torch.Tensor:
        return bounds[0] + (bounds[1] - bounds[0]) * column

    return orbit_cameras(
        in_range(u[:, 0], cfg.elevation_range),
        in_range(u[:, 1], cfg.azimuth_range),
        in_range(u[:, 2], cfg.distance_range),
        in_range(u[:, 3], cfg.fovy_range),
    )


def generate_rays(cameras: CameraBatch, width: int, height: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pinhole rays through pixel centres: (origins [B,H,W,3], unit directions [B,H,W,3]).

    Row 0 is the top of the image, column 0 its left; the focal length follows from the vertical
    field of view and pixels are square.
    """
    device = cameras.c2w.device
    focal = 0.5 * height / torch.tan(0.5 * cameras.fovy)  # [B]
    rows, cols = torch.meshgrid(
        torch.arange(height, device=device, dtype=torch.float32) + 0.5,
        torch.arange(width, device=device, dtype=torch.float32) + 0.5,
        indexing="ij",
    )
    f = focal[:, None, None]
    x = (cols - 0.5 * width) / f  # [B, H, W]
    y = -(rows - 0.5 * height) / f  # image rows grow downwards, camera +y is up
    directions_cam = torch.stack([x, y, -torch.ones_like(x)], dim=-1)
    rotation = cameras.c2w[:, None, None, :3, :3]
    directions = (rotation @ directions_cam[..., None]).squeeze(-1)
    directions = torch.nn.functional.normalize(directions, dim=-1)
    origins = cameras.c2w[:, None, None, :3, 3].expand_as(directions)
    return origins, directions


def view_direction_labels(
    elevation: float | Sequence[float] | torch.Tensor,
    azimuth: float | Sequence[float] | torch.Tensor,
    cfg: CameraConfig,
) -> list[ViewLabel]:
    """DreamFusion's view labels ("front", "side", "back", "overhead"), one per camera."""
    elevation, azimuth = torch.broadcast_tensors(_as_tensor(elevation), _as_tensor(azimuth))
    # Wrap to (-180, 180] so that e.g. azimuth 350 counts as 10 degrees off the front.
    azimuth = torch.remainder(azimuth + 180.0, 360.0) - 180.0
    labels = []
    for el, az in zip(elevation.tolist(), azimuth.abs().tolist(), strict=True):
        if el > cfg.overhead_threshold:
            labels.append("overhead")
        elif az < cfg.front_threshold:
            labels.append("front")
        elif az > 180.0 - cfg.back_threshold:
            labels.append("back")
        else:
            labels.append("side")
    return labels


def view_dependent_prompt(prompt: str, label: ViewLabel) -> str:
    return f"{prompt}, {label} view"
