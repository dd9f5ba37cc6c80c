"""Ground-truth metrics for the procedural scenes: a trained model's renders against the true ones.

    evaluate_against_scene(render_fn, "a red cube", resolution=64, n_views=8)
      -> {"eval/psnr": ..., "eval/ssim": ..., "eval/iou": ..., "eval/depth_l1": ...}

`render_fn(cameras, width, height)` is anything that renders like `VolumeRenderer.render` (a dict with
"rgb" [B,H,W,3], "opacity" [B,H,W,1], "depth" [B,H,W,1]). Views are held out from the reference
prior's (see `trainers.reference.scenes.evaluation_cameras`); model and truth are both composited onto the scene's
background so that a learned background does not count as error. The metrics are pure functions of
tensors, each checked in tests/test_evaluation.py against an independent computation.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from trainers.cameras import CameraBatch, CameraConfig
from trainers.priors.base import default_cache_dir
from trainers.reference.scenes import (
    SceneConfig,
    cached_scene_views,
    evaluation_cameras,
    is_scene_prompt,
    scene_cache_dir,
)

METRIC_NAMES = ("eval/psnr", "eval/ssim", "eval/iou", "eval/depth_l1")
RenderFn = Callable[[CameraBatch, int, int], dict[str, torch.Tensor]]


# ---------------------------------------------------------------------------------------------------
# Pure metrics (images [B, H, W, C] in [0, data_range]; one value per image)


def psnr(pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio per image, in dB, capped at 100 dB (identical images) so that
    means over views and sweep objectives stay finite."""
    mse = (pred.float() - target.float()).pow(2).flatten(1).mean(dim=1)
    return 10 * torch.log10(data_range**2 / mse.clamp(min=1e-10 * data_range**2))


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(
    pred: torch.Tensor,
    target: torch.Tensor,
    data_range: float = 1.0,
    window_size: int = 11,
    sigma: float = 1.5,
) -> torch.Tensor:
    """Structural similarity per image (Wang et al. 2004: Gaussian 11x11 window, σ 1.5, K1 0.01,
    K2 0.03, over the 'valid' region, averaged over channels).

    Written out with conv2d because neither torch nor the installed packages ship SSIM; the window
    shrinks (to an odd size) for images smaller than it.
    """
    x = pred.float().permute(0, 3, 1, 2)
    y = target.float().permute(0, 3, 1, 2)
    channels = x.shape[1]
    size = min(window_size, x.shape[-1], x.shape[-2])
    size -= 1 - size % 2
    window = _gaussian_window(size, sigma).to(x)[None, None].expand(channels, 1, size, size)

    def local_mean(image: torch.Tensor) -> torch.Tensor:
        return F.conv2d(image, window, groups=channels)

    mu_x, mu_y = local_mean(x), local_mean(y)
    var_x = local_mean(x * x) - mu_x**2
    var_y = local_mean(y * y) - mu_y**2
    cov = local_mean(x * y) - mu_x * mu_y
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.flatten(1).mean(dim=1)


def mask_iou(pred_opacity: torch.Tensor, true_opacity: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Intersection over union of the silhouettes (opacity > threshold) per image; two empty masks
    agree perfectly (1)."""
    pred = (pred_opacity > threshold).flatten(1)
    true = (true_opacity > threshold).flatten(1)
    intersection = (pred & true).sum(dim=1).float()
    union = (pred | true).sum(dim=1).float()
    return torch.where(union > 0, intersection / union.clamp(min=1), torch.ones_like(union))


def depth_l1(
    pred_depth: torch.Tensor,
    true_depth: torch.Tensor,
    pred_opacity: torch.Tensor,
    true_opacity: torch.Tensor,
    threshold: float = 0.5,
) -> torch.Tensor:
    """Mean |depth error| per image over the pixels both silhouettes cover (NaN where they share none)."""
    both = ((pred_opacity > threshold) & (true_opacity > threshold)).flatten(1)
    error = (pred_depth.float() - true_depth.float()).abs().flatten(1)
    count = both.sum(dim=1)
    mean = (error * both).sum(dim=1) / count.clamp(min=1)
    return torch.where(count > 0, mean, torch.full_like(mean, math.nan))


def on_background(render: dict[str, torch.Tensor], color: tuple[float, float, float]) -> torch.Tensor:
    """The render's colour over a solid `color`: from "rgb_fg" (premultiplied, as VolumeRenderer
    returns it) where present, so that a learned or augmented background does not count as error;
    otherwise "rgb" as it is."""
    if "rgb_fg" not in render:
        return render["rgb"]
    background = torch.tensor(color, dtype=render["rgb_fg"].dtype, device=render["rgb_fg"].device)
    return render["rgb_fg"] + (1 - render["opacity"]) * background


def render_metrics(pred: dict[str, torch.Tensor], truth: dict[str, torch.Tensor]) -> dict[str, float]:
    """The `eval/...` metrics of renders against ground truth (both dicts as VolumeRenderer returns)."""
    rgb, true_rgb = pred["rgb"].float().clamp(0, 1), truth["rgb"].float()
    values = {
        "eval/psnr": psnr(rgb, true_rgb),
        "eval/ssim": ssim(rgb, true_rgb),
        "eval/iou": mask_iou(pred["opacity"], truth["opacity"]),
        "eval/depth_l1": depth_l1(pred["depth"], truth["depth"], pred["opacity"], truth["opacity"]),
    }
    out = {}
    for name, per_view in values.items():
        finite = per_view[torch.isfinite(per_view)]
        out[name] = float(finite.mean()) if len(finite) else math.nan
    return out


# ---------------------------------------------------------------------------------------------------
# Against a scene


def ground_truth(
    prompt: str,
    resolution: int,
    n_views: int = 8,
    camera_cfg: CameraConfig | None = None,
    scene_cfg: SceneConfig | None = None,
    cache_dir: str | Path | None = None,
) -> tuple[CameraBatch, dict[str, torch.Tensor]]:
    """The held-out evaluation cameras and the scene's true renders from them."""
    cameras = evaluation_cameras(n_views, camera_cfg)
    return cameras, cached_scene_views(prompt, cameras, resolution, scene_cfg, cache_dir)


@torch.no_grad()
def evaluate_against_scene(
    render_fn: RenderFn,
    prompt: str,
    *,
    resolution: int,
    n_views: int = 8,
    camera_cfg: CameraConfig | None = None,
    scene_cfg: SceneConfig | None = None,
    cache_dir: str | Path | None = None,
) -> dict[str, float]:
    """Render the model at held-out views and score it against the scene `prompt` describes.

    The model's renders are put on the scene's background (see `on_background`) before comparing.
    """
    scene_cfg = scene_cfg or SceneConfig()
    cameras, truth = ground_truth(prompt, resolution, n_views, camera_cfg, scene_cfg, cache_dir)
    pred = {
        key: value.detach().float().cpu()
        for key, value in render_fn(cameras, resolution, resolution).items()
        if key in ("rgb", "rgb_fg", "opacity", "depth")
    }
    pred["rgb"] = on_background(pred, scene_cfg.background_color)
    return render_metrics(pred, truth)


# ---------------------------------------------------------------------------------------------------
# The hooks trainers.per_prompt calls


def metric_names(config) -> set[str]:
    """The `eval/...` metrics a run of `config` (a TrainConfig) reports: those of a scene prompt."""
    return set(METRIC_NAMES) if is_scene_prompt(config.prompt) else set()


def evaluate_trainer(trainer) -> dict[str, float]:
    """Ground-truth metrics of a `trainers.per_prompt.Trainer` whose prompt is a scene prompt, else {}."""
    config = trainer.config
    if not is_scene_prompt(config.prompt):
        return {}
    return evaluate_against_scene(
        lambda cameras, width, height: trainer.render_views(cameras),
        config.prompt,
        resolution=config.resolution,
        n_views=config.logging.eval_views,
        camera_cfg=config.camera,
        cache_dir=scene_cache_dir(default_cache_dir(config.prior)),
    )
