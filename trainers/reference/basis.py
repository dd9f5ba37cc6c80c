"""Every render of the prompt library as a few colour-free maps per layout.

A scene's render is linear in its objects' albedos: the volume renderer composites
Σ_i w_i·albedo(object at sample i)·shade_i + (1 − opacity)·background, and the weights, the shading and
the opacity depend on the shapes and their layout only. One render of a layout (shapes + relation) with
the first object's albedo set to (1, 0, 0) and the second's to (0, 1, 0), on black, therefore gives three
maps per view,

    A1 = the first object's shaded coverage,   A2 = the second's,   B = 1 − opacity,

and the render of any colouring of that layout is, per channel ch,

    image[ch] = albedo1[ch]·A1 + albedo2[ch]·A2 + background[ch]·B          (exact, in [0, 1])

The 4,560 prompts of the grammar share 78 layouts (6 single shapes, 36 ordered shape pairs × 2
relations), so the whole library's renders are 78 × views × 3 maps: what makes an unconditional
distribution over every prompt affordable (`trainers.reference.prior`).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from trainers.cameras import CameraBatch
from trainers.reference.scenes import (
    COLOURS,
    RELATIONS,
    SHAPES,
    SceneConfig,
    SceneObject,
    SceneSpec,
    layout,
    parse_prompt,
    render_field,
    scene_field,
)

# Bump when the basis maps' meaning or the scenes' image formation changes.
_BASIS_VERSION = 1
# Placeholder colours that tell the two objects of a layout apart while its basis is rendered.
_FIRST, _SECOND = "red", "blue"


@dataclass(frozen=True)
class Layout:
    """What a render depends on besides colour: the shapes in prompt order and their relation."""

    shapes: tuple[str, ...]
    relation: str | None = None

    @property
    def name(self) -> str:
        return f" {self.relation} ".join(self.shapes) if self.relation else self.shapes[0]

    def spec(self, colours: tuple[str, ...]) -> SceneSpec:
        objects = tuple(
            SceneObject(shape, colour) for shape, colour in zip(self.shapes, colours, strict=True)
        )
        return SceneSpec(objects, self.relation)

    def colourings(self) -> list[tuple[str, ...]]:
        """Every colouring the grammar allows: a pair's two objects differ in colour or shape."""
        if self.relation is None:
            return [(colour,) for colour in COLOURS]
        same_shape = self.shapes[0] == self.shapes[1]
        return [(a, b) for a in COLOURS for b in COLOURS if not (same_shape and a == b)]


def layout_of(prompt: str) -> tuple[Layout, tuple[str, ...]]:
    """A scene prompt -> (its layout, its colours in prompt order)."""
    spec = parse_prompt(prompt)
    shapes = tuple(obj.shape for obj in spec.objects)
    return Layout(shapes, spec.relation), tuple(obj.colour for obj in spec.objects)


def all_layouts() -> list[Layout]:
    singles = [Layout((shape,)) for shape in SHAPES]
    pairs = [Layout((a, b), relation) for relation in RELATIONS for a in SHAPES for b in SHAPES]
    return singles + pairs


# ---------------------------------------------------------------------------------------------------
# Rendering the maps


@torch.no_grad()
def render_basis(
    layout_: Layout, cameras: CameraBatch, resolution: int, scene_cfg: SceneConfig | None = None
) -> torch.Tensor:
    """The layout's maps [V, 3, H, W]: A1, A2 (zero for a single object) and B = 1 − opacity."""
    scene_cfg = scene_cfg or SceneConfig()
    colours = (_FIRST, _SECOND)[: len(layout_.shapes)]
    field = scene_field(layout_.spec(colours).prompt, scene_cfg)
    # The field stores its objects in layout order (a stack lists the lower object first); give each
    # slot the unit albedo of its object's position in the prompt.
    slots = [obj.colour for obj, _, _ in layout(field.spec, scene_cfg.single_scale)]
    field.albedo.copy_(torch.tensor([[1.0, 0.0, 0.0] if c == _FIRST else [0.0, 1.0, 0.0] for c in slots]))
    views = render_field(field, cameras, resolution, background_color=(0.0, 0.0, 0.0))
    rgb, opacity = views["rgb"], views["opacity"]
    return torch.stack([rgb[..., 0], rgb[..., 1], 1 - opacity[..., 0]], dim=1)


def compose(maps: torch.Tensor, colours: tuple[str, ...], background: tuple[float, float, float]):
    """Maps [V, 3, H, W] + a colouring -> renders [V, H, W, 3] in [0, 1] (the formula above)."""
    coefficients = colour_coefficients(colours, background).to(maps)  # [3 maps, 3 channels]
    return torch.einsum("vmhw,mc->vhwc", maps, coefficients)


def colour_coefficients(colours: tuple[str, ...], background: tuple[float, float, float]) -> torch.Tensor:
    """[3, 3]: row m is the RGB weight of map m (A1, A2, B) for this colouring."""
    first = COLOURS[colours[0]]
    second = COLOURS[colours[1]] if len(colours) > 1 else (0.0, 0.0, 0.0)
    return torch.tensor([first, second, background], dtype=torch.float64)


# ---------------------------------------------------------------------------------------------------
# The cache


def _basis_path(
    cache_dir: Path, layout_: Layout, cameras: CameraBatch, resolution: int, scene_cfg: SceneConfig
) -> Path:
    digest = hashlib.sha256()
    digest.update(json.dumps([layout_.name, resolution, scene_cfg.model_dump(mode="json")]).encode())
    digest.update(json.dumps([_BASIS_VERSION]).encode())
    digest.update(cameras.c2w.numpy().astype(np.float32).tobytes())
    digest.update(cameras.fovy.numpy().astype(np.float32).tobytes())
    slug = re.sub(r"[^a-z0-9]+", "_", layout_.name)
    return cache_dir / "basis" / f"{slug}-{resolution}px-{len(cameras)}v-{digest.hexdigest()[:16]}.npy"


def cached_basis(
    layouts: list[Layout],
    cameras: CameraBatch,
    resolution: int,
    scene_cfg: SceneConfig | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> dict[Layout, torch.Tensor]:
    """Each layout's maps [V, 3, H, W], rendered once and then read from `cache_dir` (None: no cache).

    Missing layouts are rendered in an order shuffled per process, and each is written as soon as it is
    done: workers that start together on a cold cache split the work instead of repeating it.
    """
    scene_cfg = scene_cfg or SceneConfig()
    if cache_dir is None:
        return {lay: render_basis(lay, cameras, resolution, scene_cfg) for lay in layouts}
    paths = {lay: _basis_path(Path(cache_dir), lay, cameras, resolution, scene_cfg) for lay in layouts}
    missing = [lay for lay in layouts if not paths[lay].exists()]
    random.Random(os.getpid()).shuffle(missing)
    bar = tqdm(
        missing,
        desc=f"rendering the reference library ({resolution} px, {len(cameras)} views)",
        disable=not progress or len(missing) < 2,
        dynamic_ncols=True,
    )
    for lay in bar:
        path = paths[lay]
        if path.exists():  # another worker rendered it meanwhile
            continue
        maps = render_basis(lay, cameras, resolution, scene_cfg)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Write then rename: a concurrent reader never sees a half-written file.
        tmp = path.with_suffix(f".{os.getpid()}.tmp.npy")
        np.save(tmp, maps.numpy().astype(np.float32))
        os.replace(tmp, path)
    bar.close()
    return {lay: torch.from_numpy(np.load(paths[lay])) for lay in layouts}
