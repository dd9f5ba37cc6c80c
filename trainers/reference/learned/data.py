"""The learned prior's training data: every prompt of the library at random cameras.

A render is linear in its objects' colours (`trainers.reference.basis`), so the bank holds, for each of
the 78 layouts, the three colour-free maps at `cameras_per_layout` cameras drawn from the training
camera distribution (each layout its own cameras, so the model sees 78 × cameras_per_layout distinct
cameras), and a training image is any colouring of any of them: 4,560 prompts × those cameras, made by a
3×3 matrix per image. The maps are rendered once at `render_size` (the trainer's render resolution) and
average-pooled to the model's size, which is what guidance's bilinear resize does to a render at exactly
half the size; the bank is cached on disk, so a resumed run does not render it again.

Prompts are drawn layout-uniformly (a layout, then one of its colourings): single objects are 6 of the
78 layouts but 48 of the 4,560 prompts, and uniform prompts would show a model a single object only once
in a hundred images. With probability `view_suffix_prob` the prompt carries its camera's view label
(", front view"), as view-dependent prompting sends it; with `uncond_prob` it is the empty prompt, for
classifier-free guidance. The camera is always given (MVDream keeps it in the unconditional branch too).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from tqdm.auto import tqdm

from trainers.cameras import CameraConfig, CameraSampler, view_dependent_prompt, view_direction_labels
from trainers.config_base import ConfigBase
from trainers.reference.basis import Layout, all_layouts, colour_coefficients, render_basis
from trainers.reference.scenes import SceneConfig

_BANK_VERSION = 1


class DataConfig(ConfigBase):
    cameras_per_layout: int = Field(128, ge=1)
    render_size: int = Field(32, ge=8)  # the basis maps' resolution, pooled to the model's image size
    # The share of empty prompts, which train the unconditional branch CFG subtracts. 0.2 since the
    # shipped weights' stage 2: at 0.1, ε_cond − ε_uncond was mostly error (docs/learned_prior.md §5).
    uncond_prob: float = Field(0.2, ge=0.0, le=1.0)
    view_suffix_prob: float = Field(0.5, ge=0.0, le=1.0)
    seed: int = 0  # the bank's cameras
    scene: SceneConfig = SceneConfig()
    camera: CameraConfig = CameraConfig()


@dataclass
class Batch:
    images: torch.Tensor  # [B, 3, S, S] in [-1, 1]
    prompts: list[str]  # "" for the unconditional rows
    cameras: torch.Tensor  # [B, 17] camera vectors (flattened c2w, then fovy)


class SceneBank:
    """Basis maps [G, C, 3, S, S] of every layout at its own C cameras, and the colourings to apply."""

    def __init__(self, maps: torch.Tensor, cameras: torch.Tensor, labels: list[list[str]], cfg: DataConfig):
        # cameras: [G, C, 17], each camera's `camera_vector()`, as guidance passes it
        self.maps, self.cameras, self.labels, self.cfg = maps, cameras, labels, cfg
        self.layouts = all_layouts()
        background = cfg.scene.background_color
        # Every prompt as (layout index, its 3×3 colour matrix), grouped by layout.
        self.prompts: list[list[str]] = []
        self.coefficients: list[torch.Tensor] = []
        for lay in self.layouts:
            colourings = lay.colourings()
            self.prompts.append([lay.spec(c).prompt for c in colourings])
            self.coefficients.append(
                torch.stack([colour_coefficients(c, background) for c in colourings]).float()
            )

    @property
    def image_size(self) -> int:
        return self.maps.shape[-1]

    def sample(self, batch_size: int, generator: torch.Generator) -> Batch:
        g = torch.randint(0, len(self.layouts), (batch_size,), generator=generator)
        c = torch.randint(0, self.maps.shape[1], (batch_size,), generator=generator)
        pick = torch.rand(batch_size, generator=generator)  # which colouring (scaled per layout)
        u_uncond = torch.rand(batch_size, generator=generator)
        u_suffix = torch.rand(batch_size, generator=generator)
        coefficients, prompts = [], []
        for i in range(batch_size):
            gi, ci = int(g[i]), int(c[i])
            k = min(int(pick[i] * len(self.prompts[gi])), len(self.prompts[gi]) - 1)
            coefficients.append(self.coefficients[gi][k])
            prompt = self.prompts[gi][k]
            if u_uncond[i] < self.cfg.uncond_prob:
                prompt = ""
            elif u_suffix[i] < self.cfg.view_suffix_prob:
                prompt = view_dependent_prompt(prompt, self.labels[gi][ci])
            prompts.append(prompt)
        maps = self.maps[g, c]  # [B, 3 maps, S, S]
        images = torch.einsum("bmhw,bmc->bchw", maps, torch.stack(coefficients))
        return Batch(images * 2 - 1, prompts, self.cameras[g, c])

    def image(self, layout: int, camera: int, colouring: int) -> torch.Tensor:
        """One render [3, S, S] in [0, 1]."""
        return torch.einsum("mhw,mc->chw", self.maps[layout, camera], self.coefficients[layout][colouring])


def bank_path(cache_dir: Path, cfg: DataConfig, image_size: int) -> Path:
    key = json.dumps([cfg.model_dump(mode="json", exclude={"uncond_prob", "view_suffix_prob"}), image_size])
    digest = hashlib.sha256(f"{key}:{_BANK_VERSION}".encode()).hexdigest()[:16]
    return cache_dir / "learned_bank" / f"bank-{image_size}px-{cfg.cameras_per_layout}c-{digest}.npz"


def layout_cameras(cfg: DataConfig, index: int):
    """Layout `index`'s cameras: uniform over the training ranges, from a generator of its own."""
    generator = torch.Generator().manual_seed(cfg.seed * 1000 + index)
    return CameraSampler(cfg.camera.model_copy(update={"fixed_views": 0})).sample(
        cfg.cameras_per_layout, generator
    )


def build_bank(
    cfg: DataConfig, image_size: int, cache_dir: str | Path | None, progress: bool = True
) -> SceneBank:
    """The bank at `image_size`, read from `cache_dir` when it was rendered before (None: no cache)."""
    path = bank_path(Path(cache_dir), cfg, image_size) if cache_dir is not None else None
    layouts = all_layouts()
    cameras = [layout_cameras(cfg, i) for i in range(len(layouts))]
    labels = [view_direction_labels(cam.elevation, cam.azimuth, cfg.camera) for cam in cameras]
    vectors = torch.stack([cam.camera_vector() for cam in cameras])  # [G, C, 17]
    if path is not None and path.exists():
        with np.load(path) as data:
            return SceneBank(torch.from_numpy(data["maps"]), vectors, labels, cfg)
    maps = []
    for lay, cam in zip(
        tqdm(layouts, desc="rendering the training bank", disable=not progress, dynamic_ncols=True),
        cameras,
        strict=True,
    ):
        maps.append(_pooled(render_basis(lay, cam, cfg.render_size, cfg.scene), image_size))
    stacked = torch.stack(maps)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
        np.savez(tmp, maps=stacked.numpy())
        os.replace(tmp, path)
    return SceneBank(stacked, vectors, labels, cfg)


def _pooled(maps: torch.Tensor, size: int) -> torch.Tensor:
    if maps.shape[-1] == size:
        return maps
    # Bilinear, align_corners=False: what guidance's resize of a render does (an exact 2×2 average at half size).
    return F.interpolate(maps, (size, size), mode="bilinear", align_corners=False, antialias=False)


__all__ = ["Batch", "DataConfig", "Layout", "SceneBank", "build_bank", "layout_cameras"]
