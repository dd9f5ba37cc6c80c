"""The procedural scenes: prompt grammar, split, analytic fields, renders and their cache."""

from __future__ import annotations

import pytest
import torch

from trainers.cameras import CameraConfig, view_dependent_prompt
from trainers.reference.scenes import (
    COLOURS,
    SHAPES,
    SceneConfig,
    all_prompts,
    benchmark_panel,
    cached_scene_views,
    canonical_prompt,
    evaluation_cameras,
    is_scene_prompt,
    parse_prompt,
    primitive_sdf,
    prompt_split,
    reference_cameras,
    scene_field,
    split_view_suffix,
)

# -- grammar -----------------------------------------------------------------------------------------


def test_grammar_yields_at_least_200_distinct_prompts_that_all_parse_back():
    prompts = all_prompts()
    assert len(prompts) >= 200
    assert len(set(prompts)) == len(prompts)
    for prompt in prompts[:: max(1, len(prompts) // 300)]:
        assert parse_prompt(prompt).prompt == prompt


def test_grammar_covers_every_colour_shape_and_both_relations():
    words = " ".join(all_prompts())
    assert all(colour in words for colour in COLOURS)
    assert all(shape in words for shape in SHAPES)
    assert " on top of " in words and " beside " in words


def test_parser_accepts_case_articles_trailing_period_and_view_suffix():
    spec = parse_prompt("An Orange torus on top of a blue cone, side view.")
    assert [(o.colour, o.shape) for o in spec.objects] == [("orange", "torus"), ("blue", "cone")]
    assert spec.relation == "on top of"
    assert canonical_prompt("A RED CUBE, front view") == "a red cube"


def test_view_suffix_is_split_off_with_or_without_comma():
    assert split_view_suffix(view_dependent_prompt("a red cube", "back")) == ("a red cube", "back")
    assert split_view_suffix("a red cube overhead view") == ("a red cube", "overhead")
    assert split_view_suffix("a red cube") == ("a red cube", None)


@pytest.mark.parametrize(
    ("prompt", "names"),
    [
        ("a teal cube", "colours are"),
        ("a red teapot", "shapes are"),
        ("a photo of a cat", "not a scene prompt"),
    ],
)
def test_parser_refuses_text_outside_the_grammar_naming_what_is_allowed(prompt, names):
    assert not is_scene_prompt(prompt)
    with pytest.raises(ValueError, match=names):
        parse_prompt(prompt)


def test_split_holds_out_whole_colour_shape_combinations_made_of_seen_words():
    split = prompt_split()
    assert split.train and split.test
    assert set(split.train).isdisjoint(split.test)
    assert len(split.train) + len(split.test) == len(all_prompts())
    held = set(split.held_out)
    train_pairs = {(o.colour, o.shape) for p in split.train for o in parse_prompt(p).objects}
    assert held.isdisjoint(train_pairs)
    # Every test prompt contains a held-out pair, and its colours and shapes all occur in training.
    train_colours = {c for c, _ in train_pairs}
    train_shapes = {s for _, s in train_pairs}
    for prompt in split.test[:: max(1, len(split.test) // 100)]:
        objects = parse_prompt(prompt).objects
        assert any((o.colour, o.shape) in held for o in objects)
        assert all(o.colour in train_colours and o.shape in train_shapes for o in objects)


def test_benchmark_panel_is_made_of_training_prompts():
    assert set(benchmark_panel()) <= set(prompt_split().train)


# -- analytic fields ----------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
def test_primitive_sdf_is_negative_at_its_centre_positive_far_away_and_1_lipschitz(shape):
    generator = torch.Generator().manual_seed(0)
    inside = torch.tensor([[0.0, 0.0, -0.3]]) if shape == "cone" else torch.zeros(1, 3)
    if shape == "torus":
        inside = torch.tensor([[0.7, 0.0, 0.0]])  # on the tube's core circle
    assert primitive_sdf(shape, inside).item() < 0
    assert primitive_sdf(shape, torch.tensor([[3.0, 0.0, 0.0]])).item() > 1.5
    a = torch.rand(2000, 3, generator=generator) * 3 - 1.5
    b = torch.rand(2000, 3, generator=generator) * 3 - 1.5
    gap = (primitive_sdf(shape, a) - primitive_sdf(shape, b)).abs()
    assert (gap <= (a - b).norm(dim=-1) + 1e-4).all()


def test_cone_sdf_matches_brute_force_distance_to_its_surface():
    # Independent check: sample the cone's surface densely (base disc + slanted side) and take the
    # nearest sample; the analytic distance must agree up to the sampling resolution.
    r, h = 0.9, 0.9
    n = 200
    radial = torch.linspace(0, 1, n)
    angles = torch.linspace(0, 2 * torch.pi, 4 * n)[:-1]
    rr, aa = torch.meshgrid(radial, angles, indexing="ij")
    base = torch.stack([r * rr * torch.cos(aa), r * rr * torch.sin(aa), torch.full_like(rr, -h)], -1)
    side = torch.stack([r * (1 - rr) * torch.cos(aa), r * (1 - rr) * torch.sin(aa), -h + 2 * h * rr], -1)
    surface = torch.cat([base.reshape(-1, 3), side.reshape(-1, 3)])
    queries = torch.tensor(
        [[0.0, 0.0, 1.5], [1.2, 0.0, 0.0], [0.0, 0.0, -1.3], [0.3, 0.2, -0.2], [0.5, 0.5, 0.8]]
    )
    brute = torch.cdist(queries, surface).min(dim=1).values
    analytic = primitive_sdf("cone", queries)
    assert torch.allclose(analytic.abs(), brute, atol=0.02)


def test_scene_field_is_dense_inside_empty_outside_and_coloured_by_the_nearest_object():
    cfg = SceneConfig()
    field = scene_field("a red cube on top of a blue sphere", cfg)
    top, bottom = field.centres[1], field.centres[0]  # the cube rests on the sphere
    assert top[2] > bottom[2]
    density, rgb = field(torch.stack([top, bottom, torch.tensor([0.0, 0.0, 0.99])]))
    assert density[0] > 0.9 * cfg.density_scale and density[1] > 0.9 * cfg.density_scale
    assert density[2] < 1e-3 * cfg.density_scale
    assert rgb[0].argmax() == 0  # red channel dominates the cube
    assert rgb[1].argmax() == 2  # blue channel dominates the sphere


def test_beside_objects_rest_on_one_floor_and_fit_in_the_unit_box():
    field = scene_field("a green torus beside a yellow cone")
    points = torch.rand(20000, 3, generator=torch.Generator().manual_seed(0)) * 2.4 - 1.2
    occupied = points[field.sdf(points) < 0]
    assert occupied.abs().max() < 1.0
    assert field.centres[0, 1] < 0 < field.centres[1, 1]  # side by side along world y


# -- cameras and renders -------------------------------------------------------------------------------


def test_reference_cameras_cover_the_training_ranges_and_evaluation_views_are_held_out():
    cam_cfg = CameraConfig()
    reference = reference_cameras(32, cam_cfg)
    assert reference.elevation.min() >= cam_cfg.elevation_range[0]
    assert reference.elevation.max() <= cam_cfg.elevation_range[1]
    assert reference.azimuth.max() - reference.azimuth.min() > 270  # spread round the whole orbit
    evaluation = evaluation_cameras(8, cam_cfg)
    assert torch.allclose(evaluation.elevation, torch.full((8,), cam_cfg.eval_elevation))
    turntable_azimuths = torch.arange(8) * 45.0
    offsets = (evaluation.azimuth[:, None] - turntable_azimuths[None]).remainder(360)
    assert (offsets.clamp(max=360 - offsets) > 1).all()  # none is a validation/turntable frame


def test_renders_show_the_object_on_the_background_and_come_back_from_the_cache(tmp_path):
    cameras = evaluation_cameras(2)
    first = cached_scene_views("a red cube", cameras, 16, cache_dir=tmp_path)
    files = list(tmp_path.glob("*.npz"))
    assert len(files) == 1
    assert set(first) == {"rgb", "opacity", "depth"}
    assert first["rgb"].shape == (2, 16, 16, 3)
    centre, corner = first["opacity"][:, 8, 8, 0], first["opacity"][:, 0, 0, 0]
    assert (centre > 0.9).all() and (corner < 0.1).all()
    assert (first["rgb"][:, 0, 0] > 0.95).all()  # white background in the corners
    assert (first["rgb"][:, 8, 8, 0] > first["rgb"][:, 8, 8, 2]).all()  # a red object in the middle
    files[0].touch()
    mtime = files[0].stat().st_mtime_ns
    again = cached_scene_views("A red cube, front view", cameras, 16, cache_dir=tmp_path)
    assert files[0].stat().st_mtime_ns == mtime and len(list(tmp_path.glob("*.npz"))) == 1
    assert torch.equal(again["rgb"], first["rgb"])


def test_cache_key_changes_with_resolution_and_scene_settings(tmp_path):
    cameras = evaluation_cameras(1)
    cached_scene_views("a blue sphere", cameras, 8, cache_dir=tmp_path)
    cached_scene_views("a blue sphere", cameras, 12, cache_dir=tmp_path)
    cached_scene_views("a blue sphere", cameras, 8, SceneConfig(ambient=0.9), cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.npz"))) == 3


def test_scene_config_names_the_field_it_refuses():
    with pytest.raises(ValueError, match="ambient"):
        SceneConfig(ambient=1.5)
    with pytest.raises(ValueError, match="single_scale"):
        SceneConfig(single_scale=2.0)
