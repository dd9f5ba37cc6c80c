"""The exact reference priors: the MMSE denoisers of the procedural scenes' renders.

For a finite set of images {x_k} with prior weights π_k and x_t = √ᾱ_t·x + √(1−ᾱ_t)·ε, the posterior
over which image was noised is a softmax, so the optimal denoiser is known in closed form:

    w_k(x_t)   ∝ π_k · exp(−‖x_t − √ᾱ_t·x_k‖² / (2(1−ᾱ_t)))
    E[x | x_t] = Σ_k w_k x_k
    ε̂(x_t, t)  = (x_t − √ᾱ_t·E[x | x_t]) / √(1−ᾱ_t)

Conditional on a scene prompt the set is that prompt's renders from `n_views` cameras spread over the
training camera distribution. Unconditional (the empty prompt) it is the marginal: the renders of every
prompt of the unconditional set (by default the whole library of 4,560 prompts), each prompt weighted
equally, so it contains every conditional prompt's renders and ε_cond − ε_uncond vanishes on a
render of the prompt. Every prompt is rendered from the same cameras, and a render is linear in its
objects' colours (`trainers.reference.basis`), so the library is 78 layouts × views × 3 maps and the
posterior over all 4,560 × views renders costs a few matrix products, exactly.

Two priors, named by `prior.name`:
- `reference` (Stable-Diffusion-like): conditioned on text only. A view suffix (", front view")
  restricts the conditional set to renders with that view label, which is what view-dependent
  prompting approximates for Stable Diffusion.
- `reference-mv` (MVDream-like): also conditioned on the camera. Guidance passes each render's camera
  (`camera_vector()`, of which the pose, the flattened c2w, is read) as `class_labels` to every call,
  conditional and unconditional, and renders are weighted by exp(κ·cos∠(asked camera, render camera)).

`encode_text` is the deterministic `SceneTextEncoder`, and `predict_noise` decodes each embedding row
back to its prompt, so the prior needs no lookup table of prompts and its answers never depend on the
order in which prompts were asked.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from trainers.cameras import camera_position, view_direction_labels
from trainers.config_base import ConfigError
from trainers.priors.base import DiffusionPrior, PriorConfig, default_cache_dir
from trainers.reference.basis import Layout, all_layouts, cached_basis, colour_coefficients, layout_of
from trainers.reference.config import ReferencePriorConfig
from trainers.reference.scenes import (
    COLOURS,
    RELATIONS,
    SHAPES,
    VIEW_LABELS,
    canonical_prompt,
    reference_cameras,
    scene_cache_dir,
    single_object_prompts,
    split_view_suffix,
)
from trainers.reference.text_encoder import SceneTextEncoder

DEFAULT_IMAGE_SIZE = 64
REFERENCE_PRIORS = ("reference", "reference-mv")

# The words of the scene grammar, for reading prompts back from embeddings.
VOCABULARY = ["a", "an", "on", "top", "of", "beside", "view", *COLOURS, *SHAPES, *VIEW_LABELS]
assert all(word in VOCABULARY for relation in RELATIONS for word in relation.split())


def sd_noise_schedule(num_train_timesteps: int = 1000) -> torch.Tensor:
    """ᾱ_t of Stable Diffusion's "scaled_linear" betas (0.00085 → 0.012), so that t ranges and CFG
    scales mean what they mean there. Written out rather than taken from diffusers' DDPMScheduler so
    that a reference trial never imports diffusers."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, num_train_timesteps, dtype=torch.float32) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


@dataclass
class RenderBank:
    """A set of images as flat rows, with where each was seen from and its prior log-weight."""

    images: torch.Tensor  # [K, 3*S*S] in [-1, 1]
    labels: list[str]  # view label per image
    directions: torch.Tensor  # [K, 3] unit vectors from the origin to the camera
    log_weights: torch.Tensor  # [K]


@dataclass
class SceneSet:
    """Weighted renders in basis form: layout g, view v and colouring k give the image
    Σ_m coefficients[g, k, m, :] ⊗ maps[g, v, m] (in [0, 1]), with prior log-weight log_weights[g, v, k]."""

    maps: torch.Tensor  # [G, V, 3, P] float32: A1, A2, 1 − opacity per layout and view (P pixels)
    # The same maps pixel-major, [P, G·V·3]: projecting a few rows onto every map is a [rows, P] @ [P, N]
    # product, which BLAS runs near memory speed from this layout and 3× slower from [N, P].
    pixel_major: torch.Tensor
    coefficients: torch.Tensor  # [G, K, 3, 3] float64: RGB weight of each map per colouring
    log_weights: torch.Tensor  # [G, V, K]; −inf pads layouts with fewer colourings
    norms: torch.Tensor  # [G, V, K]: ‖image‖² of every render
    prompts: list[list[str]]  # [G][K] the canonical prompt of each colouring ("" for padding)
    # For the pruning bound (`candidate_blocks`): the maps' orthonormal COARSE_SIDE² block averages, and
    # each render's squared norm inside (‖P·image‖²) and norm outside (‖(I−P)·image‖) that projection.
    coarse_maps: torch.Tensor | None = None  # [COARSE_SIDE², G·V·3] float32, pixel-major
    coarse_norms: torch.Tensor | None = None  # [G, V, K]
    rest_norms: torch.Tensor | None = None  # [G, V, K]

    @staticmethod
    def build(
        maps: dict[Layout, torch.Tensor],
        colourings: dict[Layout, list[tuple[str, ...]]],
        background: tuple[float, float, float],
        device: torch.device,
    ) -> SceneSet:
        layouts = list(colourings)
        n_colourings = max(len(c) for c in colourings.values())
        n_prompts = sum(len(c) for c in colourings.values())
        stacked = torch.stack([maps[lay].flatten(2) for lay in layouts]).to(torch.float64)  # [G,V,3,P]
        n_views = stacked.shape[1]
        coefficients = torch.zeros(len(layouts), n_colourings, 3, 3, dtype=torch.float64)
        log_weights = torch.full((len(layouts), n_views, n_colourings), -math.inf, dtype=torch.float64)
        prompts = []
        for g, lay in enumerate(layouts):
            for k, colours in enumerate(colourings[lay]):
                coefficients[g, k] = colour_coefficients(colours, background)
            # Each prompt weighs 1/#prompts, spread evenly over its views.
            log_weights[g, :, : len(colourings[lay])] = -math.log(n_prompts) - math.log(n_views)
            names = [lay.spec(colours).prompt for colours in colourings[lay]]
            prompts.append(names + [""] * (n_colourings - len(names)))
        gram = torch.einsum("gvmp,gvnp->gvmn", stacked, stacked)
        # ‖Σ_m c_m ⊗ A_m‖² = Σ_ch Σ_mn c_m[ch]·c_n[ch]·⟨A_m, A_n⟩
        norms = torch.einsum("gkmc,gknc,gvmn->gvk", coefficients, coefficients, gram)
        side = int(math.isqrt(stacked.shape[-1]))
        factor = max(side // COARSE_SIDE, 1)
        coarse = block_sum(stacked, side, factor) / factor
        coarse_norms = torch.einsum(
            "gkmc,gknc,gvmn->gvk", coefficients, coefficients, torch.einsum("gvmp,gvnp->gvmn", coarse, coarse)
        )
        rest_norms = (norms - coarse_norms).clamp(min=0).sqrt()
        maps32 = stacked.to(device, torch.float32)
        return SceneSet(
            maps32,
            maps32.reshape(-1, maps32.shape[-1]).T.contiguous(),
            coefficients.to(device),
            log_weights.to(device),
            norms.to(device),
            prompts,
            coarse.to(device, torch.float32).reshape(-1, coarse.shape[-1]).T.contiguous(),
            coarse_norms.to(device),
            rest_norms.to(device),
        )

    def images(self, g: int, k: int) -> torch.Tensor:
        """The renders [V, 3, P] in [0, 1] of layout g coloured by colouring k."""
        return torch.einsum("vmp,mc->vcp", self.maps[g].double(), self.coefficients[g, k])

    def find(self, prompt: str) -> tuple[int, int]:
        canonical = canonical_prompt(prompt)
        for g, names in enumerate(self.prompts):
            if canonical in names:
                return g, names.index(canonical)
        raise KeyError(f"{canonical!r} is not in this set")


# A render whose logit is bounded this far below the best one is left out of a call: its weight is
# below e^-40 of the best's, so all of them together move the mean by less than 1e-13 of an image.
PRUNE_NATS = 40.0
# Near a library render the posterior stays sharp up to t ≈ 600: at 32 px the renders within 40 nats of
# the best lie in 0.1 % of the (layout, view) blocks at t = 200–300, 0.3 % at 500, 6 % at 700, all of them
# from t = 900. The 16×16 bound keeps 1 % of the blocks at t = 300 and 22 % at 500, and nothing can be
# pruned above t ≈ 600, so above that (ᾱ < 0.15) the bound's own pass is not paid. Exactness does not
# depend on this: without pruning every render is summed.
PRUNE_MIN_ALPHA = 0.15
COARSE_SIDE = 16  # the bound's images are 16×16 block averages
MIN_PRUNED_BLOCKS = 64  # a set smaller than this (one prompt's views) is summed whole: the bound costs more


# A row's ε̂ must not depend on the other rows of the call: a pack (trainers.pack) puts several
# trials' rows through one call, and each trial must compute what it computes alone. BLAS picks another
# kernel, with another summation order, for a float32 product of fewer than 4 rows (or, as the right-hand
# factor, 12 columns) on this project's CPUs; the exact prior's sharp posterior turns those last-bit
# differences into 1e-4 of a loss. Padding the small side to those sizes keeps every call on one kernel
# (tests/test_pack.py: without it a packed member's loss was 4e-4 off its solo run's at one step).
MIN_GEMM_ROWS, MIN_GEMM_COLUMNS = 4, 12


def padded(x: torch.Tensor, size: int, dim: int) -> torch.Tensor:
    """`x` with zeros appended along `dim` up to `size` (unchanged if it is already that long)."""
    missing = size - x.shape[dim]
    if missing <= 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([x, x.new_zeros(shape)], dim=dim)


def per_row_pruning(
    scenes: SceneSet, x_t: torch.Tensor, alpha: torch.Tensor, view_log_prior: torch.Tensor
) -> torch.Tensor:
    """`posterior_mean` with the renders pruned for each row alone, the rows that allow no pruning
    together. The set of renders kept (`candidate_blocks`) is a union over the rows of a call, so
    pruning a call's rows together would make a row's ε̂ depend on the other rows (see MIN_GEMM_ROWS)."""
    b = x_t.shape[0]

    def log_prior(rows):
        return view_log_prior if view_log_prior.shape[0] == 1 else view_log_prior[rows]

    prunable = (alpha.view(b) >= PRUNE_MIN_ALPHA).tolist()
    out: list[torch.Tensor | None] = [None] * b
    for i in (i for i in range(b) if prunable[i]):
        out[i] = posterior_mean(scenes, x_t[i : i + 1], alpha[i : i + 1], log_prior(slice(i, i + 1)))[0]
    dense = [i for i in range(b) if not prunable[i]]
    if dense:
        rows = torch.tensor(dense, device=x_t.device)
        for i, mean in zip(
            dense, posterior_mean(scenes, x_t[rows], alpha[rows], log_prior(rows)), strict=True
        ):
            out[i] = mean
    return torch.stack(out)


def posterior_mean(
    scenes: SceneSet, x_t: torch.Tensor, alpha: torch.Tensor, view_log_prior: torch.Tensor
) -> torch.Tensor:
    """E[x | x_t] in [0, 1] units for rows x_t [b, 3, P] at ᾱ [b], over every render of `scenes`.

    `view_log_prior` [b or 1, V] adds a per-view log-weight (view labels, camera weighting). The
    squared distances are expanded (‖y‖² − 2s⟨y, x⟩ + s²‖x‖²) so that each costs a few numbers per
    layout and view instead of a pass over the image. The passes over the maps (the projections and
    the mean) run in float32, which is what bounds their cost; everything between them, where the
    expansion cancels, in float64. Renders whose weight is provably negligible (`candidate_blocks`)
    are skipped. Against the explicit float64 closed form, |Δε̂| stays below 1e-5
    (tests/benchmarks/bench_reference_prior.py prints it).
    """
    b = x_t.shape[0]
    g, v, m, p = scenes.maps.shape
    if b > 1 and g * v >= MIN_PRUNED_BLOCKS and bool((alpha >= PRUNE_MIN_ALPHA).any()):
        return per_row_pruning(scenes, x_t, alpha, view_log_prior)
    alpha = alpha.to(torch.float64).view(b, 1, 1)
    # x_t − √ᾱ·(2·image − 1) = y − s·image with y = x_t + √ᾱ and s = 2√ᾱ.
    y = x_t.to(torch.float64) + alpha.sqrt()
    s = 2 * alpha.sqrt().view(b, 1, 1)
    sigma2 = (1 - alpha).view(b, 1, 1)
    prior = scenes.log_weights[None] + view_log_prior.to(torch.float64).view(-1, 1, v, 1)
    prior = prior.flatten(1, 2).expand(b, -1, -1)  # [b, G·V, K]
    # Logits up to a per-row constant (‖y‖², which the softmax ignores): prior + a·⟨y, x⟩ − c·‖x‖².
    a, c = (s / sigma2).view(b, 1, 1), (s.pow(2) / (2 * sigma2)).view(b, 1, 1)
    blocks = None
    if float(alpha.min()) >= PRUNE_MIN_ALPHA and g * v >= MIN_PRUNED_BLOCKS:
        blocks = candidate_blocks(scenes, y, s, sigma2, prior)
    if blocks is None:  # every render: two passes over the maps, the colourings contracted per layout
        rows = padded(y.to(torch.float32).reshape(b * 3, p), MIN_GEMM_ROWS, dim=0)
        projections = (rows @ scenes.pixel_major)[: b * 3]  # [b·3, G·V·m]
        cross = torch.einsum(
            "bcgvm,gkmc->bgvk", projections.double().view(b, 3, g, v, m), scenes.coefficients
        )
        logits = (prior - c * scenes.norms.flatten(0, 1)[None]).add_(a * cross.flatten(1, 2))
        weights = torch.softmax(logits.reshape(b, -1), dim=-1)
        per_map = torch.einsum("bgvk,gkmc->bcgvm", weights.view(b, g, v, -1), scenes.coefficients)
        return weighted_sum(per_map.reshape(b * 3, -1), scenes.maps.view(-1, p)).view(b, 3, p)
    # A few blocks (low t): gather them; a gather costs a pass over what it keeps.
    n = len(blocks)
    maps = scenes.maps.view(g * v, m, p)[blocks]
    coefficients = scenes.coefficients[blocks // v]  # [n, K, m, 3]: block g·V + v is layout g
    columns = padded(y.to(maps.dtype).permute(2, 0, 1).reshape(p, b * 3), MIN_GEMM_COLUMNS, dim=1)
    projections = (maps.reshape(-1, p) @ columns)[:, : b * 3].double()
    cross = torch.einsum("nmbc,nkmc->bnk", projections.view(n, m, b, 3), coefficients)
    logits = (prior[:, blocks] - c * scenes.norms.flatten(0, 1)[blocks][None]).add_(a * cross)
    weights = torch.softmax(logits.reshape(b, -1), dim=-1)
    per_map = torch.einsum("bnk,nkmc->bcnm", weights.view(b, n, -1), coefficients)
    return weighted_sum(per_map.reshape(b * 3, -1), maps.reshape(-1, p)).view(b, 3, p)


def weighted_sum(weights: torch.Tensor, maps: torch.Tensor, chunk: int = 512) -> torch.Tensor:
    """weights [R, N] (float64) @ maps [N, P] (float32) -> [R, P] float64, in float32 over chunks of
    `chunk` maps: a chunk stays in cache while its rows are read, about 20 % faster than one product."""
    out = torch.zeros(weights.shape[0], maps.shape[1], dtype=torch.float32, device=maps.device)
    w = weights.to(torch.float32)
    for start in range(0, maps.shape[0], chunk):
        out.addmm_(w[:, start : start + chunk], maps[start : start + chunk])
    return out.double()


def candidate_blocks(
    scenes: SceneSet, y: torch.Tensor, s: torch.Tensor, sigma2: torch.Tensor, prior: torch.Tensor
) -> torch.Tensor | None:
    """The (layout, view) blocks [n] whose renders can weigh more than e^-PRUNE_NATS of the best, or
    None where that is more than 40 % of them (then a full pass is cheaper than a gather).

    A lower bound on each squared distance comes from the renders' COARSE_SIDE² block averages, an orthogonal
    projection P: ‖y − s·x‖² ≥ ‖P(y − s·x)‖² + (‖(I−P)y‖ − s‖(I−P)x‖)². The bound's best block is
    then scored exactly, and every block whose bound cannot come within PRUNE_NATS of that is dropped.
    At large t nothing can be dropped.
    """
    g, v, m, p = scenes.maps.shape
    side = int(math.isqrt(p))
    factor = side // COARSE_SIDE
    if factor < 2:
        return None
    b = y.shape[0]
    coarse_y = block_sum(y, side, factor) / factor  # orthonormal coordinates of P·y
    projections = coarse_y.float().reshape(b * 3, -1) @ scenes.coarse_maps  # [b·3, G·V·m]
    cross = torch.einsum("bcgvm,gkmc->bgvk", projections.double().view(b, 3, g, v, m), scenes.coefficients)
    coarse_norm_y = coarse_y.pow(2).sum(dim=(1, 2)).view(b, 1, 1, 1)
    rest_y = (y.pow(2).sum(dim=(1, 2)).view(b, 1, 1, 1) - coarse_norm_y).clamp(min=0).sqrt()
    s4, sigma4 = s.view(b, 1, 1, 1), sigma2.view(b, 1, 1, 1)
    bound = coarse_norm_y - 2 * s4 * cross + s4.pow(2) * scenes.coarse_norms[None]
    bound = bound + (rest_y - s4 * scenes.rest_norms[None]).pow(2)
    upper = (
        (prior.view(-1, g, v, prior.shape[-1]) - bound / (2 * sigma4)).flatten(1, 2).amax(dim=-1)
    )  # [b, G·V]
    best = upper.argmax(dim=1)
    exact_best = exact_block_logits(scenes, y, s, sigma2, prior, best)  # [b]
    keep = (upper >= exact_best[:, None] - PRUNE_NATS).any(dim=0)
    return keep.nonzero()[:, 0] if keep.sum() < 0.4 * len(keep) else None


def exact_block_logits(scenes, y, s, sigma2, prior, blocks) -> torch.Tensor:
    """The best exact logit of block blocks[i] for row i."""
    g, v, m, p = scenes.maps.shape
    maps = scenes.maps.view(g * v, m, p)[blocks].double()  # [b, m, P]
    projections = torch.einsum("bmp,bcp->bmc", maps, y)
    coefficients = scenes.coefficients[blocks // v]  # [b, K, m, 3]: block g·V + v is layout g
    cross = torch.einsum("bmc,bkmc->bk", projections, coefficients)
    norms = scenes.norms.flatten(0, 1)[blocks]
    sq_dist = y.pow(2).sum(dim=(1, 2))[:, None] - 2 * s.view(-1, 1) * cross + s.view(-1, 1).pow(2) * norms
    rows = torch.arange(len(blocks), device=y.device)
    return (prior[rows, blocks] - sq_dist / (2 * sigma2.view(-1, 1))).amax(dim=-1)


def block_sum(images: torch.Tensor, side: int, factor: int) -> torch.Tensor:
    """[..., side²] -> [..., (side/factor)²]: sums over factor×factor pixel blocks."""
    lead = images.shape[:-1]
    grid = images.reshape(*lead, side // factor, factor, side // factor, factor)
    return grid.sum(dim=(-3, -1)).reshape(*lead, -1)


class ReferencePrior(DiffusionPrior):
    """`prior.name: reference` — conditioned on text (and view suffixes) only."""

    in_pixel_space = True
    unet = None
    camera_conditioned = False

    def __init__(
        self,
        image_size: int = DEFAULT_IMAGE_SIZE,
        cache_dir: str | Path | None = None,
        device: torch.device | str = "cpu",
        cfg: ReferencePriorConfig | None = None,
    ):
        self.cfg = cfg or ReferencePriorConfig()
        self.image_size = image_size
        self.device = torch.device(device)
        self.dtype = torch.float32
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.num_train_timesteps = 1000
        self.alphas_cumprod = sd_noise_schedule(self.num_train_timesteps).to(self.device)
        self.text_encoder = SceneTextEncoder(self.cfg.text_encoder)
        self.cameras = reference_cameras(self.cfg.n_views, self.cfg.camera)
        self.labels = view_direction_labels(self.cameras.elevation, self.cameras.azimuth, self.cfg.camera)
        position = self.cameras.c2w[:, :3, 3]
        self.directions = torch.nn.functional.normalize(position, dim=-1).to(self.device)
        self._maps: dict[Layout, torch.Tensor] = {}
        self._conditional: dict[str, SceneSet] = {}
        self._uncond: SceneSet | None = None

    @classmethod
    def from_config(
        cls, cfg: PriorConfig, device: torch.device | str, reference: ReferencePriorConfig | None = None
    ) -> ReferencePrior:
        if cfg.name not in REFERENCE_PRIORS:
            raise ConfigError(
                f"prior.name={cfg.name!r} is not a reference prior; the reference priors are "
                f"{', '.join(REFERENCE_PRIORS)} (text only, and camera-conditioned)"
            )
        prior_class = CameraConditionedReferencePrior if cfg.name == "reference-mv" else ReferencePrior
        return prior_class(
            cfg.image_size or DEFAULT_IMAGE_SIZE,
            scene_cache_dir(default_cache_dir(cfg)),
            device,
            reference if reference is not None else cfg.reference,
        )

    # -- renders -----------------------------------------------------------------------------------

    def _layout_maps(self, layouts: list[Layout]) -> dict[Layout, torch.Tensor]:
        missing = [lay for lay in layouts if lay not in self._maps]
        if missing:
            self._maps |= cached_basis(missing, self.cameras, self.image_size, self.cfg.scene, self.cache_dir)
        return {lay: self._maps[lay] for lay in layouts}

    def _scene_set(self, prompts: list[str]) -> SceneSet:
        colourings: dict[Layout, list[tuple[str, ...]]] = {}
        for prompt in dict.fromkeys(canonical_prompt(p) for p in prompts):
            lay, colours = layout_of(prompt)
            colourings.setdefault(lay, []).append(colours)
        maps = self._layout_maps(list(colourings))
        return SceneSet.build(maps, colourings, self.cfg.scene.background_color, self.device)

    def conditional_set(self, prompt: str) -> SceneSet:
        """A prompt's renders, from the `n_views` cameras."""
        canonical = canonical_prompt(prompt)
        if canonical not in self._conditional:
            self._conditional[canonical] = self._scene_set([canonical])
        return self._conditional[canonical]

    def uncond_set(self) -> SceneSet:
        """The unconditional distribution: every prompt of `uncond_prompts`, each weighted equally."""
        if self._uncond is None:
            spec = self.cfg.uncond_prompts
            if spec == "library":
                layouts = all_layouts()
                maps = self._layout_maps(layouts)
                colourings = {lay: lay.colourings() for lay in layouts}
                self._uncond = SceneSet.build(maps, colourings, self.cfg.scene.background_color, self.device)
            else:
                self._uncond = self._scene_set(single_object_prompts() if spec == "singles" else list(spec))
        return self._uncond

    def bank(self, prompt: str) -> RenderBank:
        """A prompt's renders as flat rows in [-1, 1], with their view labels and directions."""
        scenes = self.conditional_set(prompt)
        images = scenes.images(0, 0).to(torch.float32).reshape(self.cfg.n_views, -1) * 2 - 1
        return RenderBank(
            images=images,
            labels=list(self.labels),
            directions=self.directions,
            log_weights=scenes.log_weights[0, :, 0].to(torch.float32),
        )

    # -- the DiffusionPrior interface ---------------------------------------------------------------

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """Scene prompts (optionally with a view suffix) or "" -> [N, L, D]; renders them now."""
        for prompt in prompts:
            if prompt.strip():
                self.conditional_set(prompt)  # raises, naming the grammar, for text that is no scene prompt
        return self.text_encoder.encode(prompts).to(self.device)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return images.float() * 2 - 1

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        return ((x0.float() + 1) / 2).clamp(0, 1)

    def decode_prompts(self, text_embeddings: torch.Tensor) -> list[str]:
        return self.text_encoder.decode(text_embeddings.detach().float().cpu(), VOCABULARY)

    @torch.no_grad()
    def predict_noise(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        text_embeddings: torch.Tensor,
        class_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        self._check_cameras(class_labels)
        x_t = x_t.float()
        eps = torch.empty_like(x_t)
        prompts = self.decode_prompts(text_embeddings)
        for prompt in dict.fromkeys(prompts):
            rows = torch.tensor([i for i, p in enumerate(prompts) if p == prompt], device=x_t.device)
            cameras = None if class_labels is None else class_labels[rows]
            scenes = self.uncond_set() if not prompt else self.conditional_set(split_view_suffix(prompt)[0])
            view_prior = self.view_log_prior(prompt, cameras)
            alpha = self.alphas_cumprod.to(x_t.device)[t[rows].long()]
            mean = posterior_mean(scenes, x_t[rows].flatten(2), alpha, view_prior).view_as(x_t[rows])
            alpha = alpha.view(-1, 1, 1, 1)
            eps[rows] = ((x_t[rows] - alpha.sqrt() * (2 * mean - 1)) / (1 - alpha).sqrt()).float()
        return eps

    def _check_cameras(self, class_labels: torch.Tensor | None) -> None:
        if class_labels is not None:
            raise ValueError(
                "prior.name='reference' is conditioned on text only and takes no cameras (class_labels); "
                "use prior.name=reference-mv for the camera-conditioned reference prior"
            )

    # -- the closed form ----------------------------------------------------------------------------

    def view_log_prior(self, prompt: str, cameras: torch.Tensor | None) -> torch.Tensor:
        """Log-weights [b or 1, V] over the views for rows asking for `prompt` (before each view's
        share of its prompt's weight): the view suffix's label match, and the camera weighting."""
        log_prior = torch.zeros(1, self.cfg.n_views, device=self.device)
        view = split_view_suffix(prompt)[1] if prompt else None
        if view is not None and self.cfg.view_leak < 1:
            matches = torch.tensor([label == view for label in self.labels], device=self.device)
            # A view label none of the renders carries (e.g. "overhead" under low elevations) falls
            # back to all views rather than to an empty distribution.
            if matches.any():
                leak = math.log(self.cfg.view_leak) if self.cfg.view_leak > 0 else -math.inf
                log_prior = torch.where(matches, log_prior, log_prior.new_tensor(leak))
        if cameras is not None:
            asked = torch.nn.functional.normalize(camera_position(cameras), dim=-1)
            log_prior = log_prior + self.cfg.camera_sharpness * asked.to(self.device) @ self.directions.T
        return log_prior

    def mmse_eps(
        self, x_t: torch.Tensor, t: torch.Tensor, images: torch.Tensor, log_prior: torch.Tensor
    ) -> torch.Tensor:
        """ε̂ = (x_t − √ᾱ·E[x | x_t]) / √(1−ᾱ) for an explicit weighted image set `images` [K, D] in
        [-1, 1]: the closed form written plainly, against which the basis form is checked."""
        shape = x_t.shape
        x = x_t.reshape(shape[0], -1).double()
        alpha = self.alphas_cumprod.to(x.device)[t.long()].view(-1, 1).double()
        sq_dist = (x[:, None, :] - alpha.sqrt()[:, :, None] * images.double()[None]).pow(2).sum(-1)
        logits = log_prior.double() - sq_dist / (2 * (1 - alpha))
        mean = torch.softmax(logits, dim=-1) @ images.double()
        return ((x - alpha.sqrt() * mean) / (1 - alpha).sqrt()).reshape(shape).float()


class CameraConditionedReferencePrior(ReferencePrior):
    """`prior.name: reference-mv` — conditioned on text and on the camera of every render (MVDream-like)."""

    camera_conditioned = True

    def _check_cameras(self, class_labels: torch.Tensor | None) -> None:
        if class_labels is None:
            raise ValueError(
                "prior.name='reference-mv' is camera-conditioned: pass each render's camera "
                "(cameras.camera_vector()) as class_labels; guidance does so for priors with camera_conditioned=True"
            )
