import math

import pytest
import torch
from pydantic import ValidationError

from trainers.cameras import (
    CameraBatch,
    CameraConfig,
    CameraSampler,
    camera_pose,
    generate_rays,
    orbit_cameras,
    spread_cameras,
    turntable_cameras,
    view_dependent_prompt,
    view_direction_labels,
)
from trainers.config_base import ConfigError, build_config


def _expected_position(elevation_deg, azimuth_deg, distance):
    el, az = math.radians(elevation_deg), math.radians(azimuth_deg)
    return torch.tensor(
        [
            distance * math.cos(el) * math.cos(az),
            distance * math.cos(el) * math.sin(az),
            distance * math.sin(el),
        ]
    )


def test_sampler_stays_within_every_configured_range():
    cfg = CameraConfig(
        elevation_range=(-5.0, 30.0),
        azimuth_range=(-90.0, 120.0),
        distance_range=(1.2, 2.5),
        fovy_range=(30, 60),
    )
    cams = CameraSampler(cfg).sample(2000, torch.Generator().manual_seed(0))
    assert len(cams) == 2000
    for values, (low, high) in [
        (cams.elevation, cfg.elevation_range),
        (cams.azimuth, cfg.azimuth_range),
        (cams.distance, cfg.distance_range),
        (torch.rad2deg(cams.fovy), cfg.fovy_range),
    ]:
        assert values.min() >= low - 1e-4 and values.max() <= high + 1e-4
        # Uniform draws cover the range rather than sitting in one corner of it.
        span = high - low
        assert values.min() < low + 0.05 * span and values.max() > high - 0.05 * span
    positions = cams.c2w[:, :3, 3]
    assert torch.allclose(positions.norm(dim=-1), cams.distance, atol=1e-5)


def test_sampler_draws_all_randomness_from_the_generator():
    sampler = CameraSampler(CameraConfig())
    a = sampler.sample(8, torch.Generator().manual_seed(123))
    torch.manual_seed(999)  # the global RNG must not matter
    b = sampler.sample(8, torch.Generator().manual_seed(123))
    c = sampler.sample(8, torch.Generator().manual_seed(124))
    assert torch.equal(a.c2w, b.c2w) and torch.equal(a.fovy, b.fovy)
    assert not torch.equal(a.c2w, c.c2w)


def test_degenerate_range_samples_that_exact_value():
    cfg = CameraConfig(elevation_range=(20.0, 20.0), distance_range=(1.7, 1.7))
    cams = CameraSampler(cfg).sample(16, torch.Generator().manual_seed(0))
    assert torch.allclose(cams.elevation, torch.full((16,), 20.0))
    assert torch.allclose(cams.distance, torch.full((16,), 1.7))


def test_camera_sits_on_the_orbit_sphere_at_the_documented_position():
    cams = orbit_cameras(30.0, 60.0, 2.0, 45.0)
    assert torch.allclose(cams.c2w[0, :3, 3], _expected_position(30.0, 60.0, 2.0), atol=1e-5)
    front = orbit_cameras(0.0, 0.0, 1.5, 45.0)
    assert torch.allclose(front.c2w[0, :3, 3], torch.tensor([1.5, 0.0, 0.0]), atol=1e-6)  # azimuth 0 is +x


@pytest.mark.parametrize("elevation", [-30.0, 0.0, 45.0, 89.0, 90.0, -90.0])
def test_c2w_is_a_rotation_whose_minus_z_looks_at_the_origin(elevation):
    cams = orbit_cameras(elevation, torch.tensor([-170.0, -45.0, 0.0, 30.0, 135.0]), 1.8, 50.0)
    rotation, position = cams.c2w[:, :3, :3], cams.c2w[:, :3, 3]
    identity = torch.eye(3).expand(len(cams), 3, 3)
    assert torch.allclose(rotation.transpose(1, 2) @ rotation, identity, atol=1e-5)
    assert torch.allclose(torch.linalg.det(rotation), torch.ones(len(cams)), atol=1e-5)
    looking = -rotation[:, :, 2]
    assert torch.allclose(looking, -position / position.norm(dim=-1, keepdim=True), atol=1e-5)
    assert torch.equal(cams.c2w[:, 3], torch.tensor([0.0, 0.0, 0.0, 1.0]).expand(len(cams), 4))


def test_camera_up_points_towards_world_z_and_right_is_horizontal():
    cams = orbit_cameras(torch.tensor([-40.0, 0.0, 40.0]), torch.tensor([10.0, 100.0, -120.0]), 2.0, 50.0)
    up, right = cams.c2w[:, :3, 1], cams.c2w[:, :3, 0]
    assert (up[:, 2] > 0).all()
    assert torch.allclose(right[:, 2], torch.zeros(3), atol=1e-6)


def test_central_ray_hits_the_origin_and_all_rays_are_unit():
    cams = orbit_cameras(
        torch.tensor([10.0, -20.0]), torch.tensor([0.0, 77.0]), torch.tensor([1.5, 2.0]), 50.0
    )
    rays_o, rays_d = generate_rays(cams, width=9, height=7)  # odd sizes: a pixel sits on the axis
    assert rays_o.shape == rays_d.shape == (2, 7, 9, 3)
    assert torch.allclose(rays_d.norm(dim=-1), torch.ones(2, 7, 9), atol=1e-5)
    centre_o, centre_d = rays_o[:, 3, 4], rays_d[:, 3, 4]
    assert torch.allclose(centre_o + cams.distance[:, None] * centre_d, torch.zeros(2, 3), atol=1e-5)


def test_rays_span_the_vertical_field_of_view_with_row_zero_at_the_top():
    fovy = 60.0
    cams = orbit_cameras(0.0, 0.0, 2.0, fovy)  # looking along -x, up is +z
    _, rays_d = generate_rays(cams, width=4, height=2000)
    top, bottom = rays_d[0, 0, 1], rays_d[0, -1, 1]
    assert top[2] > 0 > bottom[2]
    angle = torch.rad2deg(torch.acos((top * bottom).sum()))
    # Pixel centres are half a pixel inside the image edges.
    assert angle.item() == pytest.approx(fovy, abs=0.1)
    # Column 0 is the left of the image: from +x looking at the origin, left is -y.
    _, rays_d = generate_rays(cams, width=5, height=5)
    assert rays_d[0, 2, 0, 1] < 0 < rays_d[0, 2, -1, 1]


def test_turntable_goes_once_around_at_fixed_elevation_starting_in_front():
    cams = turntable_cameras(8, elevation=15.0, distance=1.75, fovy=50.0)
    assert len(cams) == 8
    assert cams.azimuth[0] == 0.0
    steps = torch.remainder(cams.azimuth.roll(-1) - cams.azimuth, 360.0)
    assert torch.allclose(steps, torch.full((8,), 45.0))
    assert torch.allclose(cams.elevation, torch.full((8,), 15.0))
    assert torch.allclose(torch.rad2deg(cams.fovy), torch.full((8,), 50.0))


def test_camera_batch_flattens_c2w_and_fovy_into_a_camera_vector_and_moves_devices():
    cams = orbit_cameras(torch.tensor([0.0, 10.0, 20.0]), 30.0, 2.0, torch.tensor([40.0, 50.0, 60.0]))
    vector = cams.camera_vector()
    assert vector.shape == (3, 17)
    assert torch.equal(camera_pose(vector)[1].reshape(4, 4), cams.c2w[1])
    assert torch.allclose(vector[:, 16], torch.deg2rad(torch.tensor([40.0, 50.0, 60.0])))
    moved = cams.to("cpu")
    assert isinstance(moved, CameraBatch) and torch.equal(moved.c2w, cams.c2w)


def test_view_labels_follow_the_thresholds():
    cfg = CameraConfig(front_threshold=30.0, back_threshold=60.0, overhead_threshold=50.0)
    elevation = [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 51.0, 49.0, 10.0]
    azimuth = [29.0, -29.0, 31.0, 119.0, 121.0, -179.0, 170.0, 170.0, 350.0]
    expected = ["front", "front", "side", "side", "back", "back", "overhead", "back", "front"]
    assert view_direction_labels(elevation, azimuth, cfg) == expected
    sampled = CameraSampler(cfg).sample(4, torch.Generator().manual_seed(3))
    assert len(view_direction_labels(sampled.elevation, sampled.azimuth, cfg)) == 4


def test_view_dependent_prompt_appends_the_view_label():
    assert view_dependent_prompt("a corgi", "side") == "a corgi, side view"


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"elevation_range": [30, 10]}, "elevation_range"),
        ({"azimuth_range": [10, -10]}, "azimuth_range"),
        ({"distance_range": [0.0, 2.0]}, "distance_range"),
        ({"distance_range": [2.0, 1.0]}, "distance_range"),
        ({"fovy_range": [0.0, 60.0]}, "fovy_range"),
        ({"fovy_range": [40.0, 180.0]}, "fovy_range"),
        ({"elevation_range": [-100, 10]}, "elevation_range"),
        ({"eval_fovy": 200.0}, "eval_fovy"),
        ({"eval_distance": -1.0}, "eval_distance"),
    ],
)
def test_invalid_camera_config_names_the_field(overrides, field):
    with pytest.raises(ConfigError, match=field):
        build_config(CameraConfig, overrides)
    with pytest.raises(ValidationError, match=field):
        CameraConfig(**overrides)


def test_camera_config_refuses_unknown_keys():
    with pytest.raises(ConfigError, match="elevation_range"):
        build_config(CameraConfig, {"elevation_rang": [0, 10]})


def test_fixed_views_draw_every_training_camera_from_the_same_spread_set():
    cfg = CameraConfig(fixed_views=5)
    spread = spread_cameras(5, cfg)
    cameras = CameraSampler(cfg).sample(64, torch.Generator().manual_seed(0))
    matches = (cameras.c2w[:, None] - spread.c2w[None]).abs().flatten(2).amax(-1) < 1e-6  # [64, 5]
    assert matches.any(dim=1).all()  # every draw is one of the five
    assert matches.any(dim=0).all()  # and each of the five is drawn


def test_fixed_views_must_be_the_reference_priors_views():
    from trainers.config import ConfigError, load_train_config

    with pytest.raises(ConfigError, match=r"camera.fixed_views=8 must equal prior.reference.n_views=16"):
        load_train_config(None, ["prior.name=reference-mv", "camera.fixed_views=8"])
    with pytest.raises(ConfigError, match="camera's ranges"):
        load_train_config(
            None, ["prior.name=reference-mv", "camera.fixed_views=16", "camera.elevation_range=[0,30]"]
        )
    load_train_config(None, ["prior.name=reference-mv", "camera.fixed_views=16"])  # the prior's own views
