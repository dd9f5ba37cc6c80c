import math

import pytest
import torch
from pydantic import ValidationError

from trainers.config_base import ConfigError, build_config
from trainers.geometry import HashGridConfig, HashGridEncoding, make_hash_grid
from trainers.geometry.hash_grid import tcnn_unavailable_reason

# Four levels of resolution 4, 8, 16, 32 and a 1024-row table: 5^3 and 9^3 vertices fit (dense),
# 17^3 and 33^3 do not (hashed).
SMALL = HashGridConfig(
    n_levels=4,
    n_features_per_level=2,
    log2_hashmap_size=10,
    base_resolution=4,
    per_level_scale=2.0,
    backend="torch",
)


def _instant_ngp_hash(vertex, table_size):
    """The spatial hash of the Instant-NGP paper, in Python integers."""
    i, j, k = vertex
    return ((i * 1) ^ (j * 2654435761) ^ (k * 805459861)) % table_size


def test_encoding_maps_points_to_level_major_float32_features():
    grid = make_hash_grid(SMALL)
    assert isinstance(grid, HashGridEncoding)
    points = torch.rand(100, 3, generator=torch.Generator().manual_seed(0))
    features = grid(points)
    assert features.shape == (100, SMALL.n_levels * SMALL.n_features_per_level) == (100, grid.output_dim)
    assert features.dtype == torch.float32
    assert torch.isfinite(features).all()


def test_level_resolutions_grow_geometrically_and_split_into_dense_then_hashed_levels():
    grid = HashGridEncoding(SMALL)
    assert grid.resolutions == [4, 8, 16, 32]
    assert grid.dense_levels == [True, True, False, False]
    assert grid.level_sizes == [5**3, 9**3, 1024, 1024]
    assert grid.tables.shape == (sum(grid.level_sizes), 2)


def test_tables_are_initialised_small_and_uniform():
    grid = HashGridEncoding(HashGridConfig(n_levels=2, log2_hashmap_size=12))
    assert grid.tables.abs().max() <= 1e-4
    assert grid.tables.std() > 1e-5  # not all zero


def test_dense_level_interpolation_reproduces_an_affine_function_stored_at_its_vertices():
    grid = HashGridEncoding(SMALL)
    coefficients, bias = torch.tensor([0.3, -1.2, 2.0]), 0.7
    with torch.no_grad():
        grid.tables.zero_()
        for level in (0, 1):
            n = grid.resolutions[level] + 1
            # Vertex (i, j, k) lives at row i + j n + k n^2 of a dense level's table.
            k, j, i = torch.meshgrid(torch.arange(n), torch.arange(n), torch.arange(n), indexing="ij")
            vertex_xyz = torch.stack([i, j, k], dim=-1).reshape(-1, 3).float() / grid.resolutions[level]
            grid.level_table(level)[:, 0] = vertex_xyz @ coefficients + bias
    points = torch.rand(200, 3, generator=torch.Generator().manual_seed(1))
    points[:4] = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [1.0, 0.0, 0.5], [0.25, 0.5, 0.75]])
    features = grid(points).reshape(200, SMALL.n_levels, SMALL.n_features_per_level)
    expected = points @ coefficients + bias
    for level in (0, 1):
        assert torch.allclose(features[:, level, 0], expected, atol=1e-5)


def test_hashed_level_at_a_vertex_reads_the_table_row_the_spatial_hash_names():
    grid = HashGridEncoding(SMALL)
    level = 3
    with torch.no_grad():
        grid.level_table(level).copy_(torch.randn(1024, 2, generator=torch.Generator().manual_seed(2)))
    resolution = grid.resolutions[level]
    vertices = [(0, 0, 0), (1, 2, 3), (31, 7, 19), (32, 32, 32), (5, 30, 0)]
    points = torch.tensor(vertices, dtype=torch.float32) / resolution
    features = grid(points).reshape(len(vertices), SMALL.n_levels, 2)[:, level]
    rows = [_instant_ngp_hash(v, 1024) for v in vertices]
    assert torch.allclose(features, grid.level_table(level)[rows], atol=1e-5)


def test_gradients_reach_the_tables_of_dense_and_hashed_levels_and_only_the_touched_rows():
    grid = HashGridEncoding(SMALL)
    point = torch.tensor([[0.31, 0.62, 0.93]])
    grid(point).sum().backward()
    grad = grid.tables.grad
    for level in range(SMALL.n_levels):
        level_grad = grad[int(grid._offsets[level]) :][: grid.level_sizes[level]]
        touched = (level_grad.abs().sum(dim=-1) > 0).sum().item()
        # A point inside a cell touches its 8 corners (fewer on a hashed level only by collision).
        assert 1 <= touched <= 8
    # The trilinear weights of one level sum to one: that is the gradient of the sum per feature.
    assert torch.allclose(grad.sum(dim=0), torch.full((2,), float(SMALL.n_levels)), atol=1e-5)


def test_gradient_with_respect_to_the_points_matches_finite_differences():
    grid = HashGridEncoding(SMALL)
    with torch.no_grad():
        grid.tables.copy_(torch.randn(grid.tables.shape, generator=torch.Generator().manual_seed(3)))
    point = torch.tensor([[0.37, 0.52, 0.11]], requires_grad=True)
    grid(point).sum().backward()
    eps = 1e-3
    for axis in range(3):
        step = torch.zeros(1, 3)
        step[0, axis] = eps
        with torch.no_grad():
            numeric = (grid(point + step).sum() - grid(point - step).sum()) / (2 * eps)
        assert point.grad[0, axis].item() == pytest.approx(numeric.item(), rel=1e-2, abs=1e-3)


def _fit_signal_along_a_line(signal, n_levels_used: int, steps: int = 100) -> float:
    """Fit `signal(x)` on the line (x, 0.5, 0.5) with the sum of the first `n_levels_used` levels'
    features, training only the tables; return the relative residual."""
    cfg = HashGridConfig(
        n_levels=6, n_features_per_level=1, log2_hashmap_size=12, base_resolution=4, per_level_scale=2.0
    )
    torch.manual_seed(0)
    grid = HashGridEncoding(cfg)  # resolutions 4, 8, ..., 128
    x = torch.linspace(0.0, 1.0, 400)
    points = torch.stack([x, torch.full_like(x, 0.5), torch.full_like(x, 0.5)], dim=-1)
    target = signal(x)
    optimizer = torch.optim.Adam(grid.parameters(), lr=0.05)
    # Tiny tensors: one thread avoids thread-pool wake-ups that dominate on a shared 2-core CPU.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(steps):
            optimizer.zero_grad()
            loss = (grid(points)[:, :n_levels_used].sum(-1) - target).pow(2).mean()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    return (loss / target.pow(2).mean()).item()


def test_coarse_levels_fit_a_low_frequency_but_only_fine_levels_fit_a_high_frequency():
    def low(x):
        return torch.sin(2 * math.pi * x)

    def high(x):
        return torch.sin(2 * math.pi * 20 * x)  # 20 periods: far above the resolution-8 Nyquist limit

    coarse_low = _fit_signal_along_a_line(low, n_levels_used=2)
    coarse_high = _fit_signal_along_a_line(high, n_levels_used=2)
    all_high = _fit_signal_along_a_line(high, n_levels_used=6)
    assert coarse_low < 0.05
    assert coarse_high > 0.5
    assert all_high < 0.05


def test_fine_levels_vary_over_a_distance_where_coarse_levels_are_nearly_constant():
    cfg = HashGridConfig(
        n_levels=6, n_features_per_level=8, log2_hashmap_size=14, base_resolution=4, per_level_scale=2.0
    )
    grid = HashGridEncoding(cfg)  # resolutions 4 ... 128
    with torch.no_grad():
        grid.tables.copy_(torch.randn(grid.tables.shape, generator=torch.Generator().manual_seed(4)))
    x = torch.linspace(0.3, 0.3 + 1.0 / 16, 200)  # a quarter of a coarsest cell, 8 finest cells
    points = torch.stack([x, torch.full_like(x, 0.41), torch.full_like(x, 0.77)], dim=-1)
    features = grid(points).reshape(200, 6, 8)
    total_variation = (features[1:] - features[:-1]).abs().sum(dim=0).mean(dim=-1)  # per level
    assert total_variation[0] < 0.25 * total_variation[-1]
    assert total_variation[:3].mean() < total_variation[3:].mean()


def test_points_on_and_beyond_the_unit_cube_boundary_are_finite():
    grid = HashGridEncoding(SMALL)
    points = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [1.2, -0.3, 0.5]])
    assert torch.isfinite(grid(points)).all()
    assert torch.allclose(grid(points[2:]), grid(points[2:].clamp(0, 1)))


@pytest.mark.skipif(tcnn_unavailable_reason() is None, reason="tinycudann is usable here")
def test_asking_for_tcnn_without_it_is_a_clear_error_and_auto_falls_back_to_torch():
    with pytest.raises(RuntimeError, match="backend"):
        make_hash_grid(HashGridConfig(backend="tcnn", n_levels=2, log2_hashmap_size=8))
    assert isinstance(make_hash_grid(HashGridConfig(backend="auto", n_levels=2)), HashGridEncoding)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"n_levels": 0}, "n_levels"),
        ({"n_features_per_level": 3}, "n_features_per_level"),
        ({"log2_hashmap_size": 40}, "log2_hashmap_size"),
        ({"base_resolution": 0}, "base_resolution"),
        ({"per_level_scale": 0.5}, "per_level_scale"),
        ({"backend": "cuda"}, "backend"),
    ],
)
def test_invalid_hash_grid_config_names_the_field(overrides, field):
    with pytest.raises(ConfigError, match=field):
        build_config(HashGridConfig, overrides)
    with pytest.raises(ValidationError, match=field):
        HashGridConfig(**overrides)
