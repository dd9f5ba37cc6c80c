"""The exact reference prior: the MMSE denoiser of the procedural scenes' renders.

For a finite set of images {x_k} with prior weights π_k and x_t = √ᾱ_t·x + √(1−ᾱ_t)·ε, the posterior
over which image was noised is a softmax, so the optimal denoiser is known in closed form:

    w_k(x_t)   ∝ π_k · exp(−‖x_t − √ᾱ_t·x_k‖² / (2(1−ᾱ_t)))
    E[x | x_t] = Σ_k w_k x_k
    ε̂(x_t, t)  = (x_t − √ᾱ_t·E[x | x_t]) / √(1−ᾱ_t)

Conditional on a scene prompt the set is that prompt's renders (from the training camera
distribution); unconditional (the empty prompt) it is the renders of every prompt in the
unconditional panel, each prompt weighted equally. A view suffix (", front view") restricts the
conditional set to renders with that view label (what view-dependent prompting approximates for
Stable Diffusion), and optional camera labels (`class_labels`, flattened c2w) weight renders by how
close their camera is to the asked one. So SDS/CSD/VSD/ASD and CFG run on it unchanged, in pixel space.

The prior needs no lookup table of prompts: `encode_text` is the deterministic `SceneTextEncoder`,
and `predict_noise` decodes each embedding row back to its prompt.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DDPMScheduler

from trainers.cameras import view_direction_labels
from trainers.priors.base import DiffusionPrior, PriorConfig, default_cache_dir
from trainers.reference.config import ReferencePriorConfig
from trainers.reference.scenes import (
    COLOURS,
    RELATIONS,
    SHAPES,
    VIEW_LABELS,
    cached_scene_views,
    canonical_prompt,
    reference_cameras,
    scene_cache_dir,
    single_object_prompts,
    split_view_suffix,
)
from trainers.reference.text_encoder import SceneTextEncoder

DEFAULT_IMAGE_SIZE = 64


@dataclass
class RenderBank:
    """A set of images as flat rows, with where each was seen from and its prior log-weight."""

    images: torch.Tensor  # [K, 3*S*S] in [-1, 1]
    labels: list[str]  # view label per image
    directions: torch.Tensor  # [K, 3] unit vectors from the origin to the camera
    log_weights: torch.Tensor  # [K]


# The words of the scene grammar, for reading prompts back from embeddings.
VOCABULARY = ["a", "an", "on", "top", "of", "beside", "view", *COLOURS, *SHAPES, *VIEW_LABELS]
assert all(word in VOCABULARY for relation in RELATIONS for word in relation.split())


class ReferencePrior(DiffusionPrior):
    in_pixel_space = True
    unet = None

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
        # Stable Diffusion's noise schedule, so that t ranges and CFG scales mean what they mean there.
        scheduler = DDPMScheduler(
            num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"
        )
        self.num_train_timesteps = scheduler.config.num_train_timesteps
        self.alphas_cumprod = scheduler.alphas_cumprod.to(self.device, torch.float32)
        self.text_encoder = SceneTextEncoder(self.cfg.text_encoder)
        self._banks: dict[tuple[str, int], RenderBank] = {}  # (canonical prompt, n_views) -> renders
        self._seen: list[str] = []  # conditional prompts, in the order first asked for
        self._uncond: RenderBank | None = None

    @classmethod
    def from_config(
        cls, cfg: PriorConfig, device: torch.device | str, reference: ReferencePriorConfig | None = None
    ) -> ReferencePrior:
        return cls(
            cfg.image_size or DEFAULT_IMAGE_SIZE,
            scene_cache_dir(default_cache_dir(cfg)),
            device,
            reference if reference is not None else cfg.reference,
        )

    # -- renders -----------------------------------------------------------------------------------

    def bank(self, prompt: str, n_views: int | None = None) -> RenderBank:
        """A prompt's renders at `image_size` (rendered once, then read from the cache dir)."""
        key = (canonical_prompt(prompt), n_views or self.cfg.n_views)
        if key not in self._banks:
            cameras = reference_cameras(key[1], self.cfg.camera)
            views = cached_scene_views(key[0], cameras, self.image_size, self.cfg.scene, self.cache_dir)
            images = views["rgb"].permute(0, 3, 1, 2).reshape(len(cameras), -1) * 2 - 1
            position = cameras.c2w[:, :3, 3]
            self._banks[key] = RenderBank(
                images=images.to(self.device, torch.float32),
                labels=view_direction_labels(cameras.elevation, cameras.azimuth, self.cfg.camera),
                directions=torch.nn.functional.normalize(position, dim=-1).to(self.device),
                log_weights=torch.full((len(cameras),), -math.log(len(cameras)), device=self.device),
            )
        return self._banks[key]

    def uncond_bank(self) -> RenderBank:
        """Every panel prompt's renders, each prompt carrying total weight 1/#prompts."""
        if self._uncond is None:
            spec = self.cfg.uncond_prompts
            panel = (
                single_object_prompts() if spec == "singles" else [] if spec == "conditional" else list(spec)
            )
            panel = [canonical_prompt(p) for p in panel]
            prompts = list(dict.fromkeys(self._seen if spec == "conditional" else panel))
            if not prompts:
                raise RuntimeError(
                    "the reference prior has no prompts for its unconditional distribution yet"
                )
            banks = [
                self.bank(p, self.cfg.n_views if p in self._seen else self.cfg.uncond_views) for p in prompts
            ]
            self._uncond = RenderBank(
                images=torch.cat([b.images for b in banks]),
                labels=[label for b in banks for label in b.labels],
                directions=torch.cat([b.directions for b in banks]),
                log_weights=torch.cat([b.log_weights for b in banks]) - math.log(len(banks)),
            )
        return self._uncond

    def _see(self, prompt: str) -> None:
        canonical = canonical_prompt(prompt)
        if canonical not in self._seen:
            self._seen.append(canonical)
            if self.cfg.uncond_prompts == "conditional":
                self._uncond = None  # the unconditional distribution now includes this prompt too
        self.bank(canonical)

    # -- the DiffusionPrior interface ---------------------------------------------------------------

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """Scene prompts (optionally with a view suffix) or "" -> [N, L, D]; renders them now."""
        for prompt in prompts:
            if prompt.strip():
                self._see(prompt)  # raises, naming the grammar, for text that is no scene prompt
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
        x_t = x_t.float()
        eps = torch.empty_like(x_t)
        prompts = self.decode_prompts(text_embeddings)
        for prompt in dict.fromkeys(prompts):
            rows = torch.tensor([i for i, p in enumerate(prompts) if p == prompt], device=x_t.device)
            log_prior = self.log_prior(prompt, None if class_labels is None else class_labels[rows])
            bank = self.uncond_bank() if not prompt else self.bank(split_view_suffix(prompt)[0])
            eps[rows] = self.mmse_eps(x_t[rows], t[rows], bank.images, log_prior)
        return eps

    # -- the closed form ----------------------------------------------------------------------------

    def log_prior(self, prompt: str, cameras: torch.Tensor | None) -> torch.Tensor:
        """Log-weights over the bank's renders [b or 1, K] for rows asking for `prompt`."""
        if not prompt:
            return self.uncond_bank().log_weights[None]
        base, view = split_view_suffix(prompt)
        bank = self.bank(base)
        log_prior = bank.log_weights.clone()
        if view is not None and self.cfg.view_leak < 1:
            matches = torch.tensor([label == view for label in bank.labels], device=self.device)
            # A view label none of the renders carries (e.g. "overhead" under low elevations) falls
            # back to all views rather than to an empty distribution.
            if matches.any():
                leak = math.log(self.cfg.view_leak) if self.cfg.view_leak > 0 else -math.inf
                log_prior = torch.where(matches, log_prior, log_prior.new_tensor(leak) + log_prior)
        log_prior = log_prior[None]
        if cameras is not None and self.cfg.camera_sharpness > 0:
            asked = torch.nn.functional.normalize(cameras.reshape(-1, 4, 4)[:, :3, 3].float(), dim=-1)
            log_prior = log_prior + self.cfg.camera_sharpness * asked.to(self.device) @ bank.directions.T
        return log_prior

    def mmse_eps(
        self, x_t: torch.Tensor, t: torch.Tensor, images: torch.Tensor, log_prior: torch.Tensor
    ) -> torch.Tensor:
        """ε̂ = (x_t − √ᾱ·E[x | x_t]) / √(1−ᾱ) for the weighted image set `images` [K, D]."""
        shape = x_t.shape
        x = x_t.reshape(shape[0], -1)
        alpha = self.alphas_cumprod.to(x.device)[t.long()].view(-1, 1)
        # Direct differences, not the ‖a‖²−2ab+‖b‖² expansion: at small t the logits are divided by
        # 1−ᾱ ≈ 1e-3, and the expansion's cancellation error would reorder near neighbours.
        sq_dist = torch.stack(
            [
                torch.cdist(
                    x[i : i + 1], alpha[i].sqrt() * images, compute_mode="donot_use_mm_for_euclid_dist"
                )[0]
                for i in range(len(x))
            ]
        ).pow(2)
        logits = log_prior - sq_dist / (2 * (1 - alpha))
        weights = torch.softmax(logits, dim=-1)  # [b, K]
        mean = weights @ images
        eps = (x - alpha.sqrt() * mean) / (1 - alpha).sqrt()
        return eps.reshape(shape)
