import math
import warnings

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from trainers import rendering
from trainers.cameras import CameraConfig, CameraSampler, generate_rays, orbit_cameras
from trainers.config_base import ConfigError, build_config
from trainers.geometry import HashGridConfig, ImplicitVolume, ImplicitVolumeConfig
from trainers.rendering import (
    Background,
    BackgroundConfig,
    EstimatorFallback,
    RendererConfig,
    VolumeRenderer,
    occgrid_update_due,
    ray_box_intersection,
    resolve_estimator,
)

TINY_GRID = HashGridConfig(n_levels=4, log2_hashmap_size=12, base_resolution=4, per_level_scale=2.0)


class Sphere(nn.Module):
    """A procedural field: constant density and colour inside a ball at the origin."""

    def __init__(self, radius: float, density: float, color=(0.9, 0.3, 0.1)):
        super().__init__()
        self.radius, self.value = radius, density
        self.register_buffer("color", torch.tensor(color))

    def forward(self, points):
        inside = points.norm(dim=-1) <= self.radius
        density = torch.where(inside, self.value, 0.0)
        return density, self.color.expand(points.shape[0], 3)


class HalfSpace(nn.Module):
    """Dense everything with x <= x_max (a slab whose face looks at the azimuth-0 camera)."""

    def __init__(self, x_max: float):
        super().__init__()
        self.x_max = x_max

    def forward(self, points):
        density = torch.where(points[:, 0] <= self.x_max, 1e4, 0.0)
        return density, torch.full((points.shape[0], 3), 0.5)


def _renderer(field, background=None, **overrides) -> VolumeRenderer:
    background = background or Background(BackgroundConfig(kind="solid", color=(0.2, 0.4, 0.6)))
    return VolumeRenderer(RendererConfig(**overrides), field, background, radius=1.0)


def test_empty_field_renders_the_background_with_zero_opacity():
    renderer = _renderer(Sphere(radius=0.5, density=0.0))
    out = renderer.render(orbit_cameras(20.0, 30.0, 2.0, 50.0), 8, 6)
    assert out["rgb"].shape == (1, 6, 8, 3) and out["opacity"].shape == out["depth"].shape == (1, 6, 8, 1)
    assert torch.allclose(out["opacity"], torch.zeros(1, 6, 8, 1))
    assert torch.allclose(out["rgb"], torch.tensor([0.2, 0.4, 0.6]).expand(1, 6, 8, 3))
    assert torch.allclose(out["depth"], torch.zeros(1, 6, 8, 1))


def test_dense_blob_covering_the_view_renders_opaque_in_its_own_colour():
    color = (0.9, 0.3, 0.1)
    renderer = _renderer(Sphere(radius=0.9, density=1e3, color=color))
    # At distance 2 the ball spans 26.7 degrees off-axis; a 30-degree view sees only the ball.
    cams = orbit_cameras(torch.tensor([0.0, 40.0]), torch.tensor([0.0, 135.0]), 2.0, 30.0)
    out = renderer.render(cams, 8, 8)
    assert torch.allclose(out["opacity"], torch.ones(2, 8, 8, 1), atol=1e-3)
    assert torch.allclose(out["rgb"], torch.tensor(color).expand(2, 8, 8, 3), atol=1e-3)


def test_depth_of_a_dense_ball_is_the_distance_to_its_surface():
    renderer = _renderer(Sphere(radius=0.5, density=1e4), num_samples_per_ray=128)
    cams = orbit_cameras(
        torch.tensor([0.0, 30.0]), torch.tensor([0.0, -60.0]), torch.tensor([2.0, 1.8]), 40.0
    )
    out = renderer.render(cams, 9, 9)
    centre_depth = out["depth"][:, 4, 4, 0]
    bin_width = 2.0 * math.sqrt(3.0) / 128
    assert torch.allclose(centre_depth, cams.distance - 0.5, atol=bin_width)
    assert out["opacity"][:, 0, 0, 0].max() < 1e-3  # the corners see past the ball


def test_depth_of_a_dense_slab_is_its_distance_along_the_view_axis_at_every_pixel():
    renderer = _renderer(HalfSpace(x_max=0.25), num_samples_per_ray=128)
    cams = orbit_cameras(0.0, 0.0, 2.0, 30.0)  # at +x looking along -x at the slab face x = 0.25
    out = renderer.render(cams, 7, 5)
    _, rays_d = generate_rays(cams, 7, 5)
    forward = -cams.c2w[0, :3, 2]
    z_depth = out["depth"][..., 0] * (rays_d @ forward)
    assert torch.allclose(out["opacity"], torch.ones_like(out["opacity"]), atol=1e-4)
    assert torch.allclose(z_depth, torch.full_like(z_depth, 1.75), atol=2.0 * math.sqrt(3.0) / 128)


def test_opacity_of_a_uniform_medium_follows_beer_lambert():
    sigma = 0.4
    renderer = _renderer(Sphere(radius=10.0, density=sigma))  # fills the whole box
    out = renderer.render(orbit_cameras(0.0, 0.0, 3.0, 10.0), 3, 3)
    # The central ray crosses the box along x: a path length of 2 * radius.
    assert out["opacity"][0, 1, 1, 0].item() == pytest.approx(1.0 - math.exp(-sigma * 2.0), rel=1e-4)


def test_ray_box_intersection_gives_entry_and_exit_and_empty_intervals_for_misses():
    rays_o = torch.tensor([[3.0, 0.0, 0.0], [3.0, 5.0, 0.0], [0.0, 0.0, 0.0]])
    rays_d = torch.tensor([[-1.0, 0.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    near, far = ray_box_intersection(rays_o, rays_d, radius=1.0)
    assert torch.allclose(near, torch.tensor([2.0, 0.0, 0.0]))
    assert torch.allclose(far, torch.tensor([4.0, 0.0, 1.0]))


def test_training_render_jitters_samples_from_the_generator_only():
    renderer = _renderer(ImplicitVolume(ImplicitVolumeConfig(encoding=TINY_GRID)))
    cams = orbit_cameras(10.0, 20.0, 2.0, 50.0)
    a = renderer.render(cams, 6, 6, train=True, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(123)
    b = renderer.render(cams, 6, 6, train=True, generator=torch.Generator().manual_seed(0))
    c = renderer.render(cams, 6, 6, train=True, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a["t"], b["t"]) and torch.equal(a["rgb"], b["rgb"])
    assert not torch.equal(a["t"], c["t"])
    # Evaluation samples the bin centres.
    e1, e2 = renderer.render(cams, 6, 6), renderer.render(cams, 6, 6)
    assert torch.equal(e1["rgb"], e2["rgb"])


def test_training_render_returns_per_sample_weights_that_sum_to_the_opacity():
    renderer = _renderer(Sphere(radius=0.6, density=5.0), num_samples_per_ray=16)
    out = renderer.render(orbit_cameras(0.0, 0.0, 2.0, 50.0), 5, 4, train=True, generator=torch.Generator())
    assert out["weights"].shape == out["t"].shape == (1, 4, 5, 16)
    assert torch.allclose(out["weights"].sum(-1, keepdim=True), out["opacity"], atol=1e-6)
    assert (out["t"].diff(dim=-1) >= 0).all()


def test_random_background_augmentation_paints_each_training_image_one_random_colour():
    background = Background(BackgroundConfig(kind="env_map", random_aug_prob=1.0))
    renderer = _renderer(Sphere(radius=0.5, density=0.0), background=background)
    cams = CameraSampler(CameraConfig()).sample(3, torch.Generator().manual_seed(0))
    out = renderer.render(cams, 4, 4, train=True, generator=torch.Generator().manual_seed(5))
    per_image = out["background"].reshape(3, 16, 3)
    assert torch.allclose(per_image, per_image[:, :1].expand_as(per_image))  # solid within an image
    assert not torch.allclose(per_image[0, 0], per_image[1, 0])  # but random across images
    again = renderer.render(cams, 4, 4, train=True, generator=torch.Generator().manual_seed(5))
    assert torch.equal(again["background"], out["background"])
    # Never in evaluation: there the environment map varies with the view direction.
    evaluated = renderer.render(cams, 4, 4)["background"].reshape(3, 16, 3)
    assert not torch.allclose(evaluated, evaluated[:, :1].expand_as(evaluated))


def test_background_augmentation_probability_zero_keeps_the_configured_background():
    background = Background(BackgroundConfig(kind="solid", color=(0.0, 1.0, 0.0), random_aug_prob=0.0))
    renderer = _renderer(Sphere(radius=0.5, density=0.0), background=background)
    out = renderer.render(orbit_cameras(0.0, 0.0, 2.0, 50.0), 3, 3, train=True, generator=torch.Generator())
    assert torch.allclose(out["rgb"], torch.tensor([0.0, 1.0, 0.0]).expand(1, 3, 3, 3))


def test_background_color_argument_replaces_the_background_per_image():
    renderer = _renderer(Sphere(radius=0.5, density=0.0))
    colors = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    cams = orbit_cameras(0.0, torch.tensor([0.0, 90.0]), 2.0, 50.0)
    out = renderer.render(cams, 3, 3, train=True, generator=torch.Generator(), background_color=colors)
    assert torch.allclose(out["rgb"], colors[:, None, None, :].expand(2, 3, 3, 3))


def test_env_map_background_is_a_learnable_function_of_direction_in_unit_range():
    background = Background(BackgroundConfig(kind="env_map"))
    directions = torch.randn(2, 5, 3)
    rgb = background(directions)
    assert rgb.shape == (2, 5, 3) and rgb.min() >= 0 and rgb.max() <= 1
    assert torch.allclose(background(directions * 3.0), rgb)  # depends on the direction only
    assert len(list(background.parameters())) > 0
    assert len(list(Background(BackgroundConfig(kind="solid")).parameters())) == 0


def test_chunked_evaluation_matches_a_single_pass():
    field = ImplicitVolume(ImplicitVolumeConfig(encoding=TINY_GRID))
    background = Background(BackgroundConfig())
    cams = orbit_cameras(torch.tensor([0.0, 30.0]), torch.tensor([0.0, 100.0]), 1.8, 45.0)
    whole = VolumeRenderer(RendererConfig(eval_chunk_samples=10_000 * 64), field, background).render(
        cams, 5, 7
    )
    chunked = VolumeRenderer(RendererConfig(eval_chunk_samples=7 * 64), field, background).render(cams, 5, 7)
    for key in ("rgb", "opacity", "depth"):
        assert torch.allclose(whole[key], chunked[key], atol=1e-6)


def test_an_evaluation_chunk_holds_at_most_eval_chunk_samples_samples():
    # A GPU config's 512 samples per ray must not turn a turntable into 8x the memory of a 64-sample one.
    field = ImplicitVolume(ImplicitVolumeConfig(encoding=TINY_GRID))
    cams = orbit_cameras(torch.tensor([0.0, 30.0]), torch.tensor([0.0, 100.0]), 1.8, 45.0)
    sizes: list[int] = []
    field.register_forward_hook(lambda module, args, out: sizes.append(args[0].shape[0]))
    config = RendererConfig(estimator="uniform", num_samples_per_ray=32, eval_chunk_samples=32 * 5)
    with torch.no_grad():
        VolumeRenderer(config, field, Background(BackgroundConfig())).render(cams, 5, 7)
    assert max(sizes) == 32 * 5 and sum(sizes) == 2 * 5 * 7 * 32


def test_rendered_pixels_backpropagate_into_the_field_and_the_background():
    field = ImplicitVolume(ImplicitVolumeConfig(encoding=TINY_GRID))
    background = Background(BackgroundConfig(kind="env_map", random_aug_prob=0.0))
    renderer = VolumeRenderer(RendererConfig(num_samples_per_ray=16), field, background)
    cams = CameraSampler(CameraConfig()).sample(2, torch.Generator().manual_seed(0))
    out = renderer.render(cams, 8, 8, train=True, generator=torch.Generator().manual_seed(1))
    out["rgb"].mean().backward()
    for name, params in [*field.parameter_groups().items(), ("background", list(background.parameters()))]:
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params), name


def test_auto_estimator_uses_uniform_sampling_on_cpu_and_update_step_is_a_no_op_there():
    renderer = _renderer(Sphere(radius=0.5, density=10.0), estimator="auto")
    assert not renderer.uses_occgrid(torch.device("cpu"))
    before = {k: v.clone() for k, v in renderer.estimator.state_dict().items()}
    for step in range(3):
        renderer.update_step(step)
    after = renderer.estimator.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    out = renderer.render(orbit_cameras(0.0, 0.0, 2.0, 30.0), 4, 4)
    assert out["opacity"][0, 1:3, 1:3].min() > 0.99


def test_occgrid_asked_for_on_cpu_warns_once_and_renders_with_the_uniform_sampler():
    sphere = Sphere(radius=0.5, density=10.0)
    renderer = _renderer(sphere, estimator="occgrid")
    cameras = orbit_cameras(0.0, 0.0, 2.0, 30.0)
    with pytest.warns(EstimatorFallback, match="renderer.estimator=occgrid needs CUDA.*uniform"):
        out = renderer.render(cameras, 4, 4)
    expected = _renderer(sphere, estimator="uniform").render(cameras, 4, 4)
    assert torch.equal(out["rgb"], expected["rgb"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second render does not repeat the message
        renderer.render(cameras, 4, 4)


@pytest.mark.parametrize(
    "choice, device, sampler, falls_back",
    [
        ("auto", "cuda", "occgrid", False),
        ("auto", "cpu", "uniform", False),
        ("occgrid", "cuda", "occgrid", False),
        ("occgrid", "cpu", "uniform", True),
        ("occgrid", "mps", "uniform", True),
        ("uniform", "cuda", "uniform", False),
    ],
)
def test_resolve_estimator_picks_the_occupancy_grid_only_on_cuda(choice, device, sampler, falls_back):
    chosen, message = resolve_estimator(choice, device)
    assert chosen == sampler
    assert (message is not None) == falls_back


def test_occgrid_update_schedule_is_every_n_steps_from_step_zero():
    cfg = RendererConfig(occgrid_update_every=16)
    assert [step for step in range(50) if occgrid_update_due(step, cfg)] == [0, 16, 32, 48]


def _occgrid_renderer_forced_on(monkeypatch, field, **overrides) -> VolumeRenderer:
    # The grid's update is plain PyTorch (only its ray traversal needs CUDA), so the CUDA branch of
    # update_step runs here once the device decision is made to say "occgrid".
    monkeypatch.setattr(rendering, "resolve_estimator", lambda choice, device_type: ("occgrid", None))
    renderer = _renderer(field, estimator="occgrid", occgrid_resolution=8, **overrides)
    renderer.train()
    return renderer


def test_occgrid_update_step_refreshes_the_grid_from_the_field_only_on_due_steps(monkeypatch):
    field = Sphere(radius=0.5, density=0.0)
    renderer = _occgrid_renderer_forced_on(
        monkeypatch, field, occgrid_update_every=4, occgrid_warmup_steps=100
    )
    assert renderer.estimator.binaries.all()  # starts fully occupied: nothing skipped before an update
    renderer.update_step(0)  # due: an empty field empties the grid
    assert not renderer.estimator.binaries.any()
    field.value = 1e3
    for step in (1, 2, 3):  # not due: the grid keeps what it saw at step 0
        renderer.update_step(step)
    assert not renderer.estimator.binaries.any()
    renderer.update_step(4)  # due (and in warm-up: every cell re-evaluated): the ball appears
    occupied = renderer.estimator.binaries.float().mean()
    ball_fraction = (4 / 3 * math.pi * 0.5**3) / 2.0**3
    assert 0.5 * ball_fraction < occupied < 2.0 * ball_fraction


def test_occgrid_update_uses_the_configured_threshold_and_decay(monkeypatch):
    calls = []
    renderer = _occgrid_renderer_forced_on(
        monkeypatch,
        Sphere(radius=0.5, density=1.0),
        occgrid_threshold=0.05,
        occgrid_ema_decay=0.9,
        occgrid_warmup_steps=7,
    )
    monkeypatch.setattr(renderer.estimator, "update_every_n_steps", lambda **kwargs: calls.append(kwargs))
    renderer.update_step(0)
    renderer.eval()
    renderer.update_step(16)  # no updates outside training
    assert len(calls) == 1
    assert {k: calls[0][k] for k in ("occ_thre", "ema_decay", "warmup_steps", "n")} == {
        "occ_thre": 0.05,
        "ema_decay": 0.9,
        "warmup_steps": 7,
        "n": 1,
    }


# ---------------------------------------------------------------------------------------------------
# The implicit volume


def test_implicit_volume_outputs_nonnegative_density_and_unit_range_colour():
    volume = ImplicitVolume(ImplicitVolumeConfig(encoding=TINY_GRID))
    points = torch.rand(500, 3, generator=torch.Generator().manual_seed(0)) * 2.0 - 1.0
    density, rgb = volume(points)
    assert density.shape == (500,) and rgb.shape == (500, 3)
    assert (density >= 0).all() and rgb.min() >= 0 and rgb.max() <= 1
    assert torch.equal(volume.density(points), density)


def test_implicit_volume_is_empty_outside_its_box():
    volume = ImplicitVolume(ImplicitVolumeConfig(radius=0.5, encoding=TINY_GRID, density_blob_std=10.0))
    outside = torch.tensor([[0.6, 0.0, 0.0], [0.0, -0.51, 0.0], [0.4, 0.4, 0.7]])
    inside = torch.tensor([[0.49, 0.0, 0.0], [0.0, 0.0, 0.0]])
    assert torch.equal(volume.density(outside), torch.zeros(3))
    assert (volume.density(inside) > 0).all()


@pytest.mark.parametrize("activation", ["softplus", "exp"])
def test_magic3d_blob_starts_dense_at_the_centre_and_thin_outside_its_radius(activation):
    cfg = ImplicitVolumeConfig(encoding=TINY_GRID, density_activation=activation)
    volume = ImplicitVolume(cfg)
    centre, rim = volume.density(torch.zeros(1, 3)), volume.density(torch.tensor([[0.0, 0.0, 0.9]]))
    assert centre.item() > 5.0
    assert rim.item() < 0.1
    flat = ImplicitVolume(cfg.model_copy(update={"density_bias": "none"}))
    assert flat.density(torch.zeros(1, 3)).item() < 2.0


def test_parameter_groups_split_the_parameters_into_encoding_and_network():
    volume = ImplicitVolume(ImplicitVolumeConfig(encoding=TINY_GRID, n_hidden_layers=2))
    groups = volume.parameter_groups()
    assert set(groups) == {"encoding", "network"}
    grouped = [id(p) for params in groups.values() for p in params]
    assert sorted(grouped) == sorted(id(p) for p in volume.parameters())
    assert {id(p) for p in groups["encoding"]} == {id(p) for p in volume.encoding.parameters()}


@pytest.mark.parametrize(
    ("model", "overrides", "field"),
    [
        (RendererConfig, {"num_samples_per_ray": 0}, "num_samples_per_ray"),
        (RendererConfig, {"estimator": "proposal"}, "estimator"),
        (RendererConfig, {"eval_chunk_samples": 0}, "eval_chunk_samples"),
        (RendererConfig, {"occgrid_threshold": -1.0}, "occgrid_threshold"),
        (RendererConfig, {"occgrid_ema_decay": 1.5}, "occgrid_ema_decay"),
        (RendererConfig, {"occgrid_warmup_steps": -1}, "occgrid_warmup_steps"),
        (BackgroundConfig, {"random_aug_prob": 1.5}, "random_aug_prob"),
        (BackgroundConfig, {"color": [0.0, 2.0, 0.0]}, "color"),
        (BackgroundConfig, {"kind": "sky"}, "kind"),
        (ImplicitVolumeConfig, {"radius": 0.0}, "radius"),
        (ImplicitVolumeConfig, {"density_activation": "relu"}, "density_activation"),
        (ImplicitVolumeConfig, {"encoding": {"n_levels": 0}}, "encoding.n_levels"),
    ],
)
def test_invalid_rendering_and_geometry_config_names_the_field(model, overrides, field):
    with pytest.raises(ConfigError, match=field):
        build_config(model, overrides)
    with pytest.raises(ValidationError, match=field.split(".")[-1]):
        model(**overrides)
