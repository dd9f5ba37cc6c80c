"""Procedural 3D scenes with known ground truth, described by prompts.

    "a red cube"                              one primitive in a named colour
    "a red cube on top of a blue sphere"      two primitives stacked along world z (up)
    "a green torus beside a yellow cone"      two primitives side by side, resting on one floor

`parse_prompt` turns such a prompt (optionally with a view-dependent suffix such as ", front view")
into a `SceneSpec`; `SceneField` is its analytic signed distance + colour, exposed as a radiance field
(`forward(points [N,3]) -> (density [N], rgb [N,3])`) so the project's own `VolumeRenderer` renders
the ground truth exactly as it renders a trained model. `render_scene` / `cached_scene_views` produce
multi-view image sets (cached as .npz in the workspace), and `prompt_split` holds out whole
colour–shape combinations for generalisation tests.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from pydantic import Field, field_validator

from trainers.cameras import CameraBatch, CameraConfig, orbit_cameras, spread_cameras
from trainers.config_base import ConfigBase
from trainers.rendering import Background, BackgroundConfig, RendererConfig, VolumeRenderer

# ---------------------------------------------------------------------------------------------------
# The vocabulary

# Saturated, mutually distinct colours that all stand out from a white background.
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.85, 0.12, 0.12),
    "orange": (0.95, 0.50, 0.10),
    "yellow": (0.92, 0.82, 0.12),
    "green": (0.15, 0.65, 0.20),
    "cyan": (0.10, 0.70, 0.78),
    "blue": (0.15, 0.30, 0.85),
    "purple": (0.52, 0.20, 0.72),
    "pink": (0.95, 0.45, 0.68),
}
SHAPES: tuple[str, ...] = ("sphere", "cube", "cylinder", "cone", "torus", "capsule")
RELATIONS: tuple[str, ...] = ("on top of", "beside")
VIEW_LABELS: tuple[str, ...] = ("front", "side", "back", "overhead")

# Half-height (z extent) of each unit-size primitive below, used to stack and to rest objects on a floor.
_HALF_HEIGHT = {"sphere": 1.0, "cube": 0.8, "cylinder": 0.8, "cone": 0.9, "torus": 1.0, "capsule": 0.95}
# Objects of a pair are scaled by this; a single object by `SceneConfig.single_scale`.
_PAIR_SCALE = 0.32
# "beside" places the objects along world y, so that from the front (azimuth 0, looking along -x)
# they appear side by side.
_BESIDE_OFFSET = 0.4


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str

    @property
    def text(self) -> str:
        return f"{_article(self.colour)} {self.colour} {self.shape}"


@dataclass(frozen=True)
class SceneSpec:
    """What a prompt describes: one object, or two objects and their relation."""

    objects: tuple[SceneObject, ...]
    relation: str | None = None

    @property
    def prompt(self) -> str:
        """The canonical prompt (the one `all_prompts` lists)."""
        if self.relation is None:
            return self.objects[0].text
        return f"{self.objects[0].text} {self.relation} {self.objects[1].text}"


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


_VIEW_SUFFIX = re.compile(r",?\s*\b(\w+)\s+view\s*$")
_OBJECT = r"an?\s+(\w+)\s+(\w+)"
_PROMPT = re.compile(rf"^{_OBJECT}(?:\s+(on\s+top\s+of|beside)\s+{_OBJECT})?$")


def split_view_suffix(prompt: str) -> tuple[str, str | None]:
    """ "a red cube, front view" -> ("a red cube", "front"); no suffix -> (prompt, None).

    The comma is optional, so that a prompt decoded from its embedding (no punctuation) parses too.
    """
    prompt = prompt.strip().rstrip(".").strip()
    match = _VIEW_SUFFIX.search(prompt)
    if match is None or match.group(1).lower() not in VIEW_LABELS:
        return prompt, None
    return prompt[: match.start()].strip(), match.group(1).lower()


def parse_prompt(prompt: str) -> SceneSpec:
    """A scene prompt (any case, "a"/"an", optional trailing "." and view suffix) -> its SceneSpec."""
    base, _ = split_view_suffix(prompt)
    text = " ".join(base.lower().rstrip(".").split())
    match = _PROMPT.match(text)
    if match is None:
        raise ValueError(
            f"{prompt!r} is not a scene prompt: expected 'a <colour> <shape>', optionally followed by "
            f"'on top of' or 'beside' and a second 'a <colour> <shape>'"
        )
    colour1, shape1, relation, colour2, shape2 = match.groups()
    objects = [(colour1, shape1)] + ([(colour2, shape2)] if relation else [])
    for colour, shape in objects:
        if colour not in COLOURS:
            raise ValueError(f"{prompt!r}: unknown colour {colour!r}; colours are {', '.join(COLOURS)}")
        if shape not in SHAPES:
            raise ValueError(f"{prompt!r}: unknown shape {shape!r}; shapes are {', '.join(SHAPES)}")
    relation = " ".join(relation.split()) if relation else None
    return SceneSpec(tuple(SceneObject(shape, colour) for colour, shape in objects), relation)


def is_scene_prompt(prompt: str) -> bool:
    try:
        parse_prompt(prompt)
    except ValueError:
        return False
    return True


def canonical_prompt(prompt: str) -> str:
    """The library's spelling of a scene prompt, without a view suffix."""
    return parse_prompt(prompt).prompt


def all_prompts() -> list[str]:
    """Every prompt of the grammar, in a fixed order: the single objects first, then the pairs.

    Pairs are two different (colour, shape) objects in either relation: 48 singles + 4512 pairs.
    """
    singles = [SceneObject(shape, colour) for colour in COLOURS for shape in SHAPES]
    prompts = [SceneSpec((obj,)).prompt for obj in singles]
    for relation in RELATIONS:
        for first, second in itertools.permutations(singles, 2):
            prompts.append(SceneSpec((first, second), relation).prompt)
    return prompts


def single_object_prompts() -> list[str]:
    return [SceneSpec((SceneObject(shape, colour),)).prompt for colour in COLOURS for shape in SHAPES]


@dataclass(frozen=True)
class PromptSplit:
    train: list[str]
    test: list[str]
    held_out: tuple[tuple[str, str], ...]  # (colour, shape) pairs that never occur in `train`


def held_out_combinations() -> tuple[tuple[str, str], ...]:
    """One colour per shape, each colour used at most once: every colour and every shape still
    occurs in training, only these particular pairings do not."""
    colours = list(COLOURS)
    # 3 is coprime with the 8 colours, so shape j -> colour 3j+1 never repeats a colour.
    return tuple((colours[(3 * j + 1) % len(colours)], shape) for j, shape in enumerate(SHAPES))


def prompt_split(prompts: list[str] | None = None) -> PromptSplit:
    """Train/test split that holds out whole combinations: a prompt is in `test` iff one of its
    objects is a held-out (colour, shape) pair, so the test prompts are made of seen words only."""
    held_out = held_out_combinations()
    held = set(held_out)
    train, test = [], []
    for prompt in all_prompts() if prompts is None else prompts:
        spec = parse_prompt(prompt)
        (test if any((o.colour, o.shape) in held for o in spec.objects) else train).append(prompt)
    return PromptSplit(train, test, held_out)


def benchmark_panel() -> list[str]:
    """The small default panel of the quickstart sweep: one primitive, one of each relation."""
    return ["a red cube", "a green torus beside a purple cone", "a blue sphere on top of an orange cylinder"]


# ---------------------------------------------------------------------------------------------------
# Signed distances of the unit primitives (written by hand: neither torch nor any installed package
# ships SDFs). Solids of revolution about z use the 2D distance in the (radius, z) half-plane.


def _length(*parts: torch.Tensor) -> torch.Tensor:
    return torch.sqrt(sum(p * p for p in parts))


def _box_sdf(q: torch.Tensor, half: torch.Tensor) -> torch.Tensor:
    """Exact distance to an axis-aligned box of half-extents `half` (any dimension, last axis)."""
    d = q.abs() - half
    outside = d.clamp(min=0).norm(dim=-1)
    inside = d.max(dim=-1).values.clamp(max=0)
    return outside + inside


def _segment_distance(p: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    ab = b - a
    h = ((p - a) @ ab / (ab @ ab)).clamp(0, 1)
    return (p - a - h.unsqueeze(-1) * ab).norm(dim=-1)


def _cone_sdf(p: torch.Tensor, radius: float = 0.9, half_height: float = 0.9) -> torch.Tensor:
    """Upright cone (apex up), as the 2D triangle (0,-h), (r,-h), (0,h) in the (radius, z) plane.

    Sign: inside the triangle iff below the slanted edge and above the base.
    """
    q = torch.stack([_length(p[:, 0], p[:, 1]), p[:, 2]], dim=-1)
    base_a = q.new_tensor([0.0, -half_height])
    corner = q.new_tensor([radius, -half_height])
    apex = q.new_tensor([0.0, half_height])
    distance = torch.minimum(_segment_distance(q, base_a, corner), _segment_distance(q, corner, apex))
    # Slanted edge's inward normal points towards the axis and down.
    normal = q.new_tensor([2 * half_height, radius])
    below_slant = (q - corner) @ normal <= 0
    inside = below_slant & (q[:, 1] >= -half_height)
    return torch.where(inside, -distance, distance)


def primitive_sdf(shape: str, p: torch.Tensor) -> torch.Tensor:
    """Signed distance [N] of a unit-size primitive centred at the origin (extent about [-1, 1])."""
    if shape == "sphere":
        return p.norm(dim=-1) - 1.0
    if shape == "cube":
        return _box_sdf(p, p.new_tensor([0.8, 0.8, 0.8]))
    if shape == "cylinder":
        q = torch.stack([_length(p[:, 0], p[:, 1]), p[:, 2]], dim=-1)
        return _box_sdf(q, q.new_tensor([0.8, 0.8]))
    if shape == "cone":
        return _cone_sdf(p)
    if shape == "torus":
        # Standing upright like a wheel (ring in the x-z plane): recognisable from the side views.
        ring = _length(p[:, 0], p[:, 2]) - 0.7
        return _length(ring, p[:, 1]) - 0.3
    if shape == "capsule":
        return _segment_distance(p, p.new_tensor([0.0, 0.0, -0.5]), p.new_tensor([0.0, 0.0, 0.5])) - 0.45
    raise ValueError(f"unknown shape {shape!r}; shapes are {', '.join(SHAPES)}")


def layout(
    spec: SceneSpec, single_scale: float
) -> list[tuple[SceneObject, tuple[float, float, float], float]]:
    """(object, centre, scale) per object, inside [-1, 1]^3."""
    if spec.relation is None:
        return [(spec.objects[0], (0.0, 0.0, 0.0), single_scale)]
    first, second = spec.objects
    s = _PAIR_SCALE
    h1, h2 = s * _HALF_HEIGHT[first.shape], s * _HALF_HEIGHT[second.shape]
    if spec.relation == "on top of":  # `first` rests on `second`; the stack is centred on z = 0
        bottom = -(h1 + h2)
        return [(second, (0.0, 0.0, bottom + h2), s), (first, (0.0, 0.0, bottom + 2 * h2 + h1), s)]
    floor = -max(h1, h2)  # "beside": both rest on one floor
    return [(first, (0.0, -_BESIDE_OFFSET, floor + h1), s), (second, (0.0, _BESIDE_OFFSET, floor + h2), s)]


# ---------------------------------------------------------------------------------------------------
# The scene as a radiance field


class SceneConfig(ConfigBase):
    # Density from the SDF as in VolSDF: σ = density_scale · Ψ_β(−sdf), Ψ_β the Laplace(0, β) CDF.
    # β (surface_width, in scene units) must stay above the renderer's sample spacing or surfaces alias.
    density_scale: float = Field(100.0, gt=0.0)
    surface_width: float = Field(0.02, gt=0.0)
    # Radius of a single object: at most 0.95 so that it fits in [-1, 1]^3 (pairs use a fixed smaller
    # scale so that both fit).
    single_scale: float = Field(0.5, gt=0.0, le=0.95)
    # Baked Lambertian shading under one fixed light: view-independent (so a NeRF can represent it
    # exactly) but it shows the 3D shape inside the silhouette. A fraction of the albedo.
    ambient: float = Field(0.45, ge=0.0, le=1.0)
    light_direction: tuple[float, float, float] = (0.5, 0.3, 1.0)
    background_color: tuple[float, float, float] = (1.0, 1.0, 1.0)

    @field_validator("background_color")
    @classmethod
    def _colour_range(cls, value: tuple[float, float, float]) -> tuple[float, float, float]:
        if not all(0 <= c <= 1 for c in value):
            raise ValueError("scene.background_color channels must lie in [0, 1]")
        return value


class SceneField(nn.Module):
    """A prompt's scene as `forward(points [N,3]) -> (density [N], rgb [N,3])`, like a trained field."""

    def __init__(self, spec: SceneSpec | str, cfg: SceneConfig | None = None):
        super().__init__()
        self.spec = parse_prompt(spec) if isinstance(spec, str) else spec
        self.cfg = cfg or SceneConfig()
        placed = layout(self.spec, self.cfg.single_scale)
        self.shapes = [obj.shape for obj, _, _ in placed]
        self.register_buffer("centres", torch.tensor([c for _, c, _ in placed], dtype=torch.float32))
        self.register_buffer("scales", torch.tensor([s for _, _, s in placed], dtype=torch.float32))
        self.register_buffer(
            "albedo", torch.tensor([COLOURS[o.colour] for o, _, _ in placed], dtype=torch.float32)
        )
        light = torch.tensor(self.cfg.light_direction, dtype=torch.float32)
        self.register_buffer("light", light / light.norm())

    def object_sdfs(self, points: torch.Tensor) -> torch.Tensor:
        """Signed distance to each object [N, K]."""
        columns = []
        for k, shape in enumerate(self.shapes):
            local = (points - self.centres[k]) / self.scales[k]
            columns.append(primitive_sdf(shape, local) * self.scales[k])
        return torch.stack(columns, dim=-1)

    def sdf(self, points: torch.Tensor) -> torch.Tensor:
        return self.object_sdfs(points).min(dim=-1).values

    def normals(self, points: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
        # Central differences rather than autograd: it also works under torch.no_grad() (rendering).
        offsets = torch.eye(3, device=points.device, dtype=points.dtype) * eps
        grads = [self.sdf(points + o) - self.sdf(points - o) for o in offsets]
        return torch.nn.functional.normalize(torch.stack(grads, dim=-1), dim=-1)

    def density_from_sdf(self, sdf: torch.Tensor) -> torch.Tensor:
        beta = self.cfg.surface_width
        # Laplace CDF of −sdf, written with the stable branch on each side of the surface.
        outside = 0.5 * torch.exp(-sdf.clamp(min=0) / beta)
        inside = 1 - 0.5 * torch.exp(sdf.clamp(max=0) / beta)
        return self.cfg.density_scale * torch.where(sdf > 0, outside, inside)

    def density(self, points: torch.Tensor) -> torch.Tensor:
        """Density alone (what an occupancy grid update asks for): no shading work."""
        return self.density_from_sdf(self.sdf(points.to(self.centres.dtype)))

    def forward(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        points = points.to(self.centres.dtype)
        sdf, nearest = self.object_sdfs(points).min(dim=-1)
        beta = self.cfg.surface_width
        density = self.density_from_sdf(sdf)
        # Shading only matters where rendering weights can be non-negligible, near the surface;
        # normals cost six SDF evaluations, so they are computed only in that band.
        near = sdf.abs() < 10 * beta
        lambert = torch.zeros_like(sdf)
        if near.any():
            lambert[near] = (self.normals(points[near]) @ self.light).clamp(min=0)
        shade = self.cfg.ambient + (1 - self.cfg.ambient) * lambert
        rgb = self.albedo[nearest] * shade.unsqueeze(-1)
        return density, rgb.clamp(0, 1)


def scene_field(prompt: str, cfg: SceneConfig | None = None) -> SceneField:
    return SceneField(parse_prompt(prompt), cfg)


# ---------------------------------------------------------------------------------------------------
# Multi-view image sets


def reference_cameras(n_views: int, camera_cfg: CameraConfig | None = None, seed: int = 0) -> CameraBatch:
    """The reference prior's `n_views` cameras, spread over the training camera ranges
    (`trainers.cameras.spread_cameras`): its renders are the empirical distribution of what the
    trainer's cameras see, exactly so with `camera.fixed_views` equal to `n_views`."""
    return spread_cameras(n_views, camera_cfg, seed)


def evaluation_cameras(n_views: int, camera_cfg: CameraConfig | None = None) -> CameraBatch:
    """Held-out views: the validation orbit (eval elevation, distance, fovy), with azimuths offset by
    half a step from the turntable's, so that they are neither validation frames nor training views."""
    cfg = camera_cfg or CameraConfig()
    step = 360.0 / n_views
    azimuth = torch.arange(n_views, dtype=torch.float32) * step + step / 2
    azimuth = torch.where(azimuth > 180.0, azimuth - 360.0, azimuth)
    return orbit_cameras(cfg.eval_elevation, azimuth, cfg.eval_distance, cfg.eval_fovy)


def ground_truth_renderer_config() -> RendererConfig:
    """The renderer settings for ground truth: the trainer's defaults (same image formation)."""
    return RendererConfig()


@torch.no_grad()
def render_scene(
    prompt: str,
    cameras: CameraBatch,
    resolution: int,
    scene_cfg: SceneConfig | None = None,
    chunk: int = 8,
) -> dict[str, torch.Tensor]:
    """Ground-truth renders {"rgb" [V,H,W,3], "opacity" [V,H,W,1], "depth" [V,H,W,1]} on the CPU,
    by the project's own VolumeRenderer, onto the scene's solid background."""
    scene_cfg = scene_cfg or SceneConfig()
    return render_field(
        scene_field(prompt, scene_cfg), cameras, resolution, scene_cfg.background_color, chunk
    )


@torch.no_grad()
def render_field(
    field: SceneField,
    cameras: CameraBatch,
    resolution: int,
    background_color: tuple[float, float, float],
    chunk: int = 8,
) -> dict[str, torch.Tensor]:
    """`render_scene` for an already built field (e.g. one whose albedos were replaced)."""
    background = Background(BackgroundConfig(kind="solid", color=background_color))
    renderer = VolumeRenderer(ground_truth_renderer_config(), field, background, 1.0)
    renderer.eval()
    parts: dict[str, list[torch.Tensor]] = {}
    for start in range(0, len(cameras), chunk):
        batch = _camera_slice(cameras, start, start + chunk)
        out = renderer.render(batch, resolution, resolution, train=False)
        for key in ("rgb", "opacity", "depth"):
            parts.setdefault(key, []).append(out[key].float().cpu())
    return {key: torch.cat(values) for key, values in parts.items()}


def _camera_slice(cameras: CameraBatch, start: int, stop: int) -> CameraBatch:
    return CameraBatch(
        c2w=cameras.c2w[start:stop],
        fovy=cameras.fovy[start:stop],
        elevation=cameras.elevation[start:stop],
        azimuth=cameras.azimuth[start:stop],
        distance=cameras.distance[start:stop],
    )


def _cache_key(prompt: str, cameras: CameraBatch, resolution: int, scene_cfg: SceneConfig) -> str:
    digest = hashlib.sha256()
    digest.update(
        json.dumps([prompt, resolution, scene_cfg.model_dump(mode="json"), _CACHE_VERSION]).encode()
    )
    digest.update(json.dumps(ground_truth_renderer_config().model_dump(mode="json"), sort_keys=True).encode())
    digest.update(cameras.c2w.numpy().astype(np.float32).tobytes())
    digest.update(cameras.fovy.numpy().astype(np.float32).tobytes())
    return digest.hexdigest()[:16]


# Bump when the scenes' geometry or shading changes, so that old caches are not reused.
_CACHE_VERSION = 1


def scene_cache_dir(root: str | Path) -> Path:
    """Where scene renders are cached under a cache root (e.g. `trainers.priors.default_cache_dir`)."""
    return Path(root).expanduser() / "reference"


def cached_scene_views(
    prompt: str,
    cameras: CameraBatch,
    resolution: int,
    scene_cfg: SceneConfig | None = None,
    cache_dir: str | Path | None = None,
) -> dict[str, torch.Tensor]:
    """`render_scene`, read from / written to `cache_dir` (one .npz per prompt, views, resolution and
    settings); `cache_dir` None renders without caching."""
    scene_cfg = scene_cfg or SceneConfig()
    prompt = canonical_prompt(prompt)
    if cache_dir is None:
        return render_scene(prompt, cameras, resolution, scene_cfg)
    slug = re.sub(r"[^a-z0-9]+", "_", prompt).strip("_")
    path = (
        Path(cache_dir)
        / f"{slug}-{resolution}px-{len(cameras)}v-{_cache_key(prompt, cameras, resolution, scene_cfg)}.npz"
    )
    if path.exists():
        with np.load(path) as data:
            return {key: torch.from_numpy(data[key]) for key in ("rgb", "opacity", "depth")}
    views = render_scene(prompt, cameras, resolution, scene_cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write then rename: concurrent trials that share the cache never read a half-written file.
    tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
    np.savez_compressed(tmp, **{key: value.numpy() for key, value in views.items()})
    os.replace(tmp, path)
    return views
