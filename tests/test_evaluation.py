"""Ground-truth metrics: the pure functions against independent computations, and that they rank
models the way a person would (right scene > wrong scene, trained > initialisation)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from trainers.config import load_train_config
from trainers.evaluation.ground_truth import (
    METRIC_NAMES,
    depth_l1,
    evaluate_against_scene,
    mask_iou,
    metric_names,
    on_background,
    psnr,
    ssim,
)
from trainers.reference.scenes import SceneConfig, evaluation_cameras, render_scene, scene_field
from trainers.rendering import Background, BackgroundConfig, RendererConfig, VolumeRenderer

RES = 16


def images(seed: int, n: int = 2, size: int = RES) -> torch.Tensor:
    return torch.rand(n, size, size, 3, generator=torch.Generator().manual_seed(seed))


# -- pure metrics -------------------------------------------------------------------------------------


def test_psnr_matches_its_definition_per_image_and_is_capped_for_identical_images():
    a, b = images(0), images(1)
    expected = [
        10 * math.log10(1.0 / np.mean((x - y) ** 2)) for x, y in zip(a.numpy(), b.numpy(), strict=True)
    ]
    assert np.allclose(psnr(a, b).numpy(), expected, atol=1e-4)
    assert torch.allclose(psnr(a * 255, b * 255, data_range=255.0), psnr(a, b), atol=1e-3)
    assert torch.isfinite(psnr(a, a)).all() and (psnr(a, a) >= 99).all()


def _ssim_by_windows(x: np.ndarray, y: np.ndarray, size: int, sigma: float) -> float:
    """SSIM of one [H, W, C] pair by explicit weighted window statistics (Wang et al. 2004)."""
    coords = np.arange(size) - (size - 1) / 2
    g = np.exp(-(coords**2) / (2 * sigma**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = 0.01**2, 0.03**2
    values = []
    for c in range(x.shape[2]):
        for i in range(x.shape[0] - size + 1):
            for j in range(x.shape[1] - size + 1):
                px, py = x[i : i + size, j : j + size, c], y[i : i + size, j : j + size, c]
                mx, my = (w * px).sum(), (w * py).sum()
                vx, vy = (w * (px - mx) ** 2).sum(), (w * (py - my) ** 2).sum()
                cov = (w * (px - mx) * (py - my)).sum()
                values.append(((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    return float(np.mean(values))


def test_ssim_matches_explicit_window_statistics_and_is_one_for_identical_images():
    a, b = images(2, n=1, size=14), images(3, n=1, size=14)
    b = 0.6 * a + 0.4 * b  # correlated, so SSIM is well inside (0, 1)
    expected = _ssim_by_windows(a[0].double().numpy(), b[0].double().numpy(), 11, 1.5)
    assert math.isclose(float(ssim(a, b)), expected, abs_tol=1e-4)
    assert torch.allclose(ssim(a, a), torch.ones(1), atol=1e-5)


def test_ssim_falls_as_noise_grows():
    a = images(4, n=1)
    noise = torch.randn(a.shape, generator=torch.Generator().manual_seed(5))
    scores = [float(ssim(a, (a + level * noise).clamp(0, 1))) for level in (0.02, 0.1, 0.3)]
    assert scores[0] > scores[1] > scores[2]


def test_mask_iou_matches_set_intersection_over_union_and_two_empty_masks_agree():
    pred, true = images(6, n=1)[..., :1], images(7, n=1)[..., :1]
    p = {i for i, v in enumerate(pred.flatten().tolist()) if v > 0.5}
    t = {i for i, v in enumerate(true.flatten().tolist()) if v > 0.5}
    assert math.isclose(float(mask_iou(pred, true)), len(p & t) / len(p | t), rel_tol=1e-6)
    empty = torch.zeros(1, RES, RES, 1)
    assert float(mask_iou(empty, empty)) == 1.0
    assert float(mask_iou(torch.ones_like(empty), empty)) == 0.0


def test_depth_error_counts_only_pixels_both_silhouettes_cover():
    true_depth = torch.full((1, 2, 2, 1), 1.0)
    pred_depth = torch.tensor([1.5, 3.0, 9.0, 9.0]).view(1, 2, 2, 1)
    pred_mask = torch.tensor([1.0, 1.0, 0.0, 1.0]).view(1, 2, 2, 1)
    true_mask = torch.tensor([1.0, 1.0, 1.0, 0.0]).view(1, 2, 2, 1)
    assert math.isclose(float(depth_l1(pred_depth, true_depth, pred_mask, true_mask)), (0.5 + 2.0) / 2)
    assert math.isnan(float(depth_l1(pred_depth, true_depth, pred_mask, 1 - pred_mask)))


def test_renders_are_judged_on_the_scenes_background_from_their_premultiplied_foreground():
    foreground, opacity = images(8) * 0.5, images(9)[..., :1]
    render = {"rgb": foreground + (1 - opacity) * 0.3, "rgb_fg": foreground, "opacity": opacity}
    assert torch.allclose(on_background(render, (1.0, 1.0, 1.0)), foreground + (1 - opacity), atol=1e-6)
    assert on_background({"rgb": render["rgb"], "opacity": opacity}, (1.0, 1.0, 1.0)) is render["rgb"]


# -- against a scene ------------------------------------------------------------------------------------


def field_render_fn(field: torch.nn.Module, background=(1.0, 1.0, 1.0)):
    renderer = VolumeRenderer(
        RendererConfig(), field, Background(BackgroundConfig(kind="solid", color=background)), 1.0
    )
    renderer.eval()
    return lambda cameras, width, height: renderer.render(cameras, width, height, train=False)


class EmptyField(torch.nn.Module):
    """What a model looks like before it has learned anything: nothing in the box."""

    def forward(self, points):
        return torch.zeros(len(points)), torch.full((len(points), 3), 0.5)


@pytest.fixture(scope="module")
def scores(tmp_path_factory):
    cache = tmp_path_factory.mktemp("gt-cache")
    target = "a red cube"

    def score(model_prompt: str | None, background=(1.0, 1.0, 1.0)):
        field = EmptyField() if model_prompt is None else scene_field(model_prompt)
        return evaluate_against_scene(
            field_render_fn(field, background),
            target,
            resolution=RES,
            n_views=4,
            cache_dir=cache,
        )

    return score


def test_evaluation_reports_every_metric_name_it_declares(scores):
    result = scores("a red cube")
    assert set(result) == set(METRIC_NAMES)
    assert metric_names(load_train_config(overrides=["prompt=a red cube"])) == set(METRIC_NAMES)
    assert metric_names(load_train_config(overrides=["prompt=a photo of a cat"])) == set()


def test_the_true_scene_scores_perfectly(scores):
    result = scores("a red cube")
    assert result["eval/psnr"] >= 99 and result["eval/iou"] == 1.0
    assert result["eval/ssim"] > 0.999 and result["eval/depth_l1"] < 1e-6


def test_metrics_discriminate_right_scene_from_wrong_scene_and_from_an_empty_initialisation(scores):
    right, near_miss, wrong, empty = (
        scores("a red cube"),
        scores("an orange cube"),
        scores("a blue sphere"),
        scores(None),
    )
    # Colour alone: same silhouette, lower PSNR.
    assert near_miss["eval/iou"] > 0.99 and near_miss["eval/psnr"] < right["eval/psnr"] - 20
    # Another object entirely scores clearly below, and nothing at all scores lowest.
    assert wrong["eval/psnr"] < near_miss["eval/psnr"] - 1
    assert wrong["eval/iou"] < 0.9 * right["eval/iou"]
    assert empty["eval/psnr"] < wrong["eval/psnr"] and empty["eval/iou"] == 0.0


def test_a_model_rendered_on_another_background_is_judged_on_the_scenes_background(scores):
    on_grey = scores("a red cube", background=(0.3, 0.3, 0.3))
    assert on_grey["eval/psnr"] > 50 and on_grey["eval/iou"] == 1.0


def test_ground_truth_uses_held_out_views_at_the_requested_resolution():
    cameras = evaluation_cameras(3)
    truth = render_scene("a red cube", cameras, 12, SceneConfig())
    assert truth["rgb"].shape == (3, 12, 12, 3) and truth["opacity"].shape == (3, 12, 12, 1)
