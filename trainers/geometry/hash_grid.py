"""Multi-resolution hash-grid encoding (Instant-NGP, Müller et al. 2022).

`make_hash_grid` returns tinycudann's fused CUDA encoding when it can, and otherwise `HashGridEncoding`,
a pure-PyTorch version that takes the same config keys. Both map points in [0, 1]^D, shape [N, D], to
float32 features [N, n_levels * n_features_per_level], level-major (level 0's features first), and
both expose `.output_dim`.

The PyTorch grid follows the paper's layout: level l has N_l = floor(base_resolution *
per_level_scale**l) cells per side, so (N_l + 1)^D vertices. A level whose vertices fit in the
2**log2_hashmap_size table is stored densely (vertex (i, j, k) at row i + j (N_l+1) + k (N_l+1)^2 of
that level's table); finer levels use the spatial hash  XOR_d(i_d * prime_d) mod table_size. The two
backends' parameters are laid out differently, so a checkpoint does not move between them.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from trainers.config_base import ConfigBase

# Instant-NGP's hash primes (the first is 1 so that the hash is coherent along x, cache-friendly).
_PRIMES = (1, 2654435761, 805459861, 3674653429, 2097192037, 1434869437, 2165219737)


class HashGridConfig(ConfigBase):
    n_levels: int = Field(16, ge=1)
    # tinycudann only implements these widths; the PyTorch grid keeps the same set so a config
    # that runs on the CPU also runs on a GPU.
    n_features_per_level: Literal[1, 2, 4, 8] = 2
    log2_hashmap_size: int = Field(19, ge=4, le=26)
    base_resolution: int = Field(16, ge=1)
    per_level_scale: float = Field(1.447269237440378, ge=1.0)  # 16 -> 4096 over 16 levels
    backend: Literal["auto", "torch", "tcnn"] = "auto"


class _InterpolateTables(torch.autograd.Function):
    """out[...] = sum_c weights[c, ...] * tables[index[c, ...]]  (corners c first).

    Written by hand rather than as F.embedding + a weighted sum: on the CPU the embedding backward
    sorts every index and is several times slower than the `index_add_` scatter used here, and only
    the indices and weights need to be kept for the backward (not the gathered features).
    """

    @staticmethod
    def forward(ctx, tables: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        flat_index = index.reshape(-1)
        features = tables.index_select(0, flat_index).view(*index.shape, tables.shape[1])
        ctx.save_for_backward(tables, flat_index, weights)
        ctx.index_shape = index.shape
        return (features * weights[..., None]).sum(dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        tables, flat_index, weights = ctx.saved_tensors
        grad = grad.unsqueeze(0)  # [1, ..., F] against the corners
        grad_tables = grad_weights = None
        if ctx.needs_input_grad[0]:
            per_corner = (weights[..., None] * grad).reshape(-1, tables.shape[1])
            grad_tables = torch.zeros_like(tables).index_add_(0, flat_index, per_corner)
        if ctx.needs_input_grad[2]:  # only when the points themselves need a gradient (e.g. normals)
            features = tables.index_select(0, flat_index).view(*ctx.index_shape, tables.shape[1])
            grad_weights = (features * grad).sum(dim=-1)
        return grad_tables, None, grad_weights


class HashGridEncoding(nn.Module):
    """Pure-PyTorch hash grid, vectorised over points, levels and cell corners."""

    def __init__(self, cfg: HashGridConfig, n_input_dims: int = 3):
        super().__init__()
        if not 1 <= n_input_dims <= len(_PRIMES):
            raise ValueError(f"n_input_dims must be in [1, {len(_PRIMES)}], got {n_input_dims}")
        self.n_input_dims = n_input_dims
        self.n_levels = cfg.n_levels
        self.n_features_per_level = cfg.n_features_per_level
        self.output_dim = cfg.n_levels * cfg.n_features_per_level
        self.hashmap_size = 2**cfg.log2_hashmap_size

        self.resolutions = [
            int(cfg.base_resolution * cfg.per_level_scale**level) for level in range(cfg.n_levels)
        ]
        # Resolutions grow with the level, so the dense levels are a prefix of the levels.
        self.dense_levels = [(res + 1) ** n_input_dims <= self.hashmap_size for res in self.resolutions]
        self.n_dense_levels = sum(self.dense_levels)
        self.level_sizes = [
            (res + 1) ** n_input_dims if dense else self.hashmap_size
            for res, dense in zip(self.resolutions, self.dense_levels, strict=True)
        ]
        # All levels share one parameter (one gather serves them all). The hashed levels come first
        # in it, so that their row offsets are multiples of the table size and can be OR-ed into the
        # hash (see forward); the dense levels follow.
        order = [*range(self.n_dense_levels, self.n_levels), *range(self.n_dense_levels)]
        offsets = [0] * self.n_levels
        total = 0
        for level in order:
            offsets[level] = total
            total += self.level_sizes[level]
        self.tables = nn.Parameter(torch.empty(total, cfg.n_features_per_level))
        nn.init.uniform_(self.tables, -1e-4, 1e-4)

        # Per level and axis, what a vertex coordinate is multiplied by: the dense row stride
        # (N_l + 1)^d, or the hash prime.
        resolution = torch.tensor(self.resolutions, dtype=torch.int64)
        strides = (resolution[:, None] + 1) ** torch.arange(n_input_dims)
        primes = torch.tensor(_PRIMES[:n_input_dims], dtype=torch.int64).expand(cfg.n_levels, -1)
        dense = torch.tensor(self.dense_levels)[:, None]
        self.register_buffer("_resolution", resolution, persistent=False)
        self.register_buffer("_multipliers", torch.where(dense, strides, primes), persistent=False)
        self.register_buffer("_offsets", torch.tensor(offsets, dtype=torch.int64), persistent=False)

    def level_table(self, level: int) -> torch.Tensor:
        """The rows of `tables` that belong to `level` (a view)."""
        start = int(self._offsets[level])
        return self.tables[start : start + self.level_sizes[level]]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 2 or x.shape[-1] != self.n_input_dims:
            raise ValueError(f"expected points of shape [N, {self.n_input_dims}], got {tuple(x.shape)}")
        n_points, k = x.shape[0], self.n_dense_levels
        # Points go last in every intermediate ([..., L, N]): the elementwise ops then run over long
        # contiguous rows, several times faster on the CPU than with the small corner axes last.
        x = x.float().clamp(0.0, 1.0).t()
        resolution = self._resolution[None, :, None]
        pos = x[:, None, :] * resolution.to(x.dtype)  # [D, L, N] in cell units
        # pos >= 0, so truncation is floor (and skips a floor op that is slow on small CPU tensors).
        # Clamping the lower corner keeps x == 1 inside the last cell (with frac == 1).
        lower = torch.minimum(pos.long(), resolution - 1)
        frac = pos - lower

        # Per axis, the two candidate vertex coordinates (lower, lower + 1) and their linear weights,
        # [2, D, L, N]. The 2^D cell corners are their outer combination, built below by broadcasting
        # one axis at a time, so no [2^D, D, L, N] coordinate tensor is ever made.
        axis_weights = torch.stack([1.0 - frac, frac])
        # The integer terms are written into preallocated halves (no autograd to keep here): they are
        # the largest tensors of the forward, and stack() would copy them once more.
        multipliers = self._multipliers.t()[:, :, None]
        terms = lower.new_empty((2, *lower.shape))
        torch.mul(lower, multipliers, out=terms[0])
        torch.add(terms[0], multipliers, out=terms[1])  # (c + 1) * m = c * m + m
        # The hash is XOR_d(c_d * prime_d) mod T; as T is a power of two, "mod T" is a mask that can
        # be applied to each axis' term before the XOR. The level offsets (multiples of T for the
        # hashed levels) go into axis 0's term: above the mask bits, adding is the same as OR-ing.
        terms[:, :, k:] &= self.hashmap_size - 1
        terms[:, 0] += self._offsets[None, :, None]

        dense_terms, hashed_terms = terms[:, :, :k], terms[:, :, k:]
        weights, index_dense, index_hashed = axis_weights[:, 0], dense_terms[:, 0], hashed_terms[:, 0]
        for d in range(1, self.n_input_dims):
            # [2]*d + [L, N] -> [2]*(d+1) + [L, N]: the new size-1 axis meets this axis' two corners.
            weights = weights.unsqueeze(-3) * axis_weights[:, d]
            index_dense = index_dense.unsqueeze(-3) + dense_terms[:, d]
            index_hashed = index_hashed.unsqueeze(-3) ^ hashed_terms[:, d]

        n_corners = 2**self.n_input_dims
        weights = weights.reshape(n_corners, self.n_levels, n_points)
        encoded = []  # per group of levels, [L_group, N, F]
        if k > 0:
            index = index_dense.reshape(n_corners, k, n_points)
            encoded.append(_InterpolateTables.apply(self.tables, index, weights[:, :k]))
        if k < self.n_levels:
            index = index_hashed.reshape(n_corners, self.n_levels - k, n_points)
            encoded.append(_InterpolateTables.apply(self.tables, index, weights[:, k:]))
        return torch.cat(encoded).transpose(0, 1).reshape(n_points, self.output_dim)


class TcnnHashGrid(nn.Module):
    """tinycudann's fused hash grid with the same config keys; outputs float32."""

    def __init__(self, cfg: HashGridConfig, n_input_dims: int = 3):
        super().__init__()
        import tinycudann as tcnn

        self.n_input_dims = n_input_dims
        self.output_dim = cfg.n_levels * cfg.n_features_per_level
        self.encoding = tcnn.Encoding(
            n_input_dims,
            {
                "otype": "HashGrid",
                "n_levels": cfg.n_levels,
                "n_features_per_level": cfg.n_features_per_level,
                "log2_hashmap_size": cfg.log2_hashmap_size,
                "base_resolution": cfg.base_resolution,
                "per_level_scale": cfg.per_level_scale,
            },
            dtype=torch.float32,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoding(x.clamp(0.0, 1.0)).float()


def tcnn_unavailable_reason() -> str | None:
    """None when tinycudann can be used here, else why not."""
    if not torch.cuda.is_available():
        return "CUDA is not available"
    try:
        import tinycudann  # noqa: F401
    except Exception as exc:  # an ImportError, or an OSError/RuntimeError from a broken CUDA build
        return f"tinycudann does not import ({type(exc).__name__}: {exc})"
    return None


def make_hash_grid(cfg: HashGridConfig, n_input_dims: int = 3) -> nn.Module:
    """The hash grid `cfg.backend` asks for: "auto" prefers tinycudann and falls back to PyTorch."""
    if cfg.backend == "torch":
        return HashGridEncoding(cfg, n_input_dims)
    reason = tcnn_unavailable_reason()
    if reason is None:
        return TcnnHashGrid(cfg, n_input_dims)
    if cfg.backend == "tcnn":
        raise RuntimeError(
            f"encoding.backend='tcnn' but {reason}; install tinycudann on a CUDA machine "
            "(pip install 'git+<tiny-cuda-nn repo>#subdirectory=bindings/torch') or set "
            "encoding.backend to 'auto' or 'torch'"
        )
    return HashGridEncoding(cfg, n_input_dims)
