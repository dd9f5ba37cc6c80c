"""Score distillation: the per-step gradient a frozen 2D prior gives a 3D model's renders.

Two layers, as in gsplat: a pure functional core that anyone can check against the published
formulas, and one small class per method that samples t, ε (and t+Δt) and calls that core.

    distillation_grad("sds" | "csd" | "asd", eps_fn, alphas_cumprod, x0, t, noise, cfg_scale=, t_plus=)
    asd_timestep_shift(t, t_min, eta, num_train_timesteps)

With x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε and w(t) = 1 − ᾱ_t:
    SDS: w(t)·(ε̂_cfg(x_t, t) − ε)
    CSD: w(t)·s·(ε_cond(x_t, t) − ε_uncond(x_t, t))
    VSD: w(t)·(ε̂_cfg(x_t, t) − ε_lora(x_t, t, π))
    ASD: w(t)·(ε̂_cfg(x_t, t) − ε_cond(x_{t+Δt}, t+Δt)), the same ε at both timesteps
where ε̂_cfg = ε_uncond + s·(ε_cond − ε_uncond). A camera-conditioned prior (`prior.camera_conditioned`)
gets each render's camera in every one of these calls.

Beside them, `supervised` (trainers.reference.supervised) fits the renders to ground-truth renders at
the same cameras: the ceiling a distillation method is measured against on the reference benchmark.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field, field_validator, model_validator

from trainers.cameras import CameraBatch
from trainers.config_base import (
    ConfigBase,
    Schedule,
    check_schedule,
    schedule_breakpoints,
    schedule_range,
    schedule_value,
)
from trainers.priors.base import DiffusionPrior

# eps_fn(x_t [N,...], t [N] long, cond [N] bool) -> ε̂ [N,...]; True rows are text-conditional.
EpsFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

METHODS = ("sds", "csd", "asd", "vsd", "supervised")


# ---------------------------------------------------------------------------------------------------
# The functional core


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.view(-1, *([1] * (like.ndim - 1))).to(like.dtype)


def add_noise(alphas_cumprod: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor):
    """x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε (DDPMScheduler.add_noise, without needing a scheduler object)."""
    alpha = _per_sample(alphas_cumprod.to(x0.device)[t], x0)
    return alpha.sqrt() * x0 + (1 - alpha).sqrt() * noise


@dataclass
class PriorRows:
    """The rows one guidance step asks the prior for: ε̂(x_t, t, text[, camera]) per row.

    Rows of several guidance steps (a pack's members) can be concatenated into one prior call, since
    every prior predicts each row independently of the others."""

    x_t: torch.Tensor
    t: torch.Tensor
    embeddings: torch.Tensor
    class_labels: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.x_t.shape[0]


def distillation_inputs(
    method: str,
    alphas_cumprod: torch.Tensor,
    x0: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
    t_plus: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_t rows, t rows, cond mask) of SDS, CSD or ASD's one prior call: [uncond, cond] at t for SDS
    and CSD, [uncond, cond at t, cond at t+Δt] for ASD, the same ε in every row of a render."""
    method = method.lower()
    if method not in ("sds", "csd", "asd"):
        raise ValueError(f"distillation_grad: method must be 'sds', 'csd' or 'asd', got {method!r}")
    if method == "asd" and t_plus is None:
        raise ValueError("distillation_grad: method 'asd' needs t_plus (see asd_timestep_shift)")
    batch = x0.shape[0]
    x_t = add_noise(alphas_cumprod, x0, noise, t)
    uncond = torch.zeros(batch, dtype=torch.bool, device=x0.device)
    cond = torch.ones(batch, dtype=torch.bool, device=x0.device)
    if method == "asd":
        x_t_plus = add_noise(alphas_cumprod, x0, noise, t_plus)
        return torch.cat([x_t, x_t, x_t_plus]), torch.cat([t, t, t_plus]), torch.cat([uncond, cond, cond])
    return torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([uncond, cond])


def distillation_combine(
    method: str,
    eps: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    x0: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
    *,
    cfg_scale: float,
) -> torch.Tensor:
    """The method's gradient on x0 from the predictions of `distillation_inputs`' rows."""
    method = method.lower()
    batch = x0.shape[0]
    if method == "asd":
        eps_uncond, eps_cond, eps_cond_plus = eps.split(batch)
    else:
        eps_uncond, eps_cond = eps.split(batch)
    weight = 1 - _per_sample(alphas_cumprod.to(x0.device)[t], x0)
    if method == "csd":
        return weight * cfg_scale * (eps_cond - eps_uncond)
    eps_cfg = eps_uncond + cfg_scale * (eps_cond - eps_uncond)
    if method == "sds":
        return weight * (eps_cfg - noise)
    return weight * (eps_cfg - eps_cond_plus)


def distillation_grad(
    method: str,
    eps_fn: EpsFn,
    alphas_cumprod: torch.Tensor,
    x0: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
    *,
    cfg_scale: float,
    t_plus: torch.Tensor | None = None,
) -> torch.Tensor:
    """The distillation gradient on x0 for SDS, CSD or ASD, from exactly one call of `eps_fn`.

    All predictions of one step go through the prior in a single batched forward: [uncond, cond] for
    SDS and CSD, [uncond, cond, cond at t+Δt] for ASD.
    """
    rows = distillation_inputs(method, alphas_cumprod, x0, t, noise, t_plus)
    eps = eps_fn(*rows)
    return distillation_combine(method, eps, alphas_cumprod, x0, t, noise, cfg_scale=cfg_scale)


def asd_timestep_shift(
    t: torch.Tensor,
    t_min: int,
    eta: float,
    num_train_timesteps: int,
    generator: torch.Generator | None = None,
    random: bool = True,
) -> torch.Tensor:
    """t + Δt with Δt ~ U[0, η·(t − T_min)] (or Δt = η·(t − T_min) when `random` is False).

    As in the authors' implementation: the shift is capped so that t+Δt stays below T, truncated to an
    integer, and t+Δt is clamped to [1, T−1].
    """
    if eta < 0:
        raise ValueError(f"asd_timestep_shift: eta must be >= 0, got {eta}")
    max_shift = (eta * (t - t_min).to(torch.float32)).clamp(min=0)
    max_shift = torch.minimum(max_shift, (num_train_timesteps - 1 - t).to(torch.float32))
    if random:
        u = torch.rand(
            t.shape, generator=generator, device=t.device if generator is None else generator.device
        )
        max_shift = max_shift * u.to(t.device)
    return (t + max_shift.to(torch.long)).clamp(1, num_train_timesteps - 1)


# ---------------------------------------------------------------------------------------------------
# Config


class GuidanceConfig(ConfigBase):
    method: Literal["asd", "sds", "csd", "vsd", "supervised"] = "asd"
    cfg_scale: float = 7.5
    # The timestep range as fractions of the prior's T: a constant, [start, end] linear from the first
    # to the last step, or [start, end, start_step, end_step]. The default is ScaleDreamer's annealing:
    # [0.5, 0.98] at the first step to [0.02, 0.5] at the last (coarse shape first, then detail).
    t_min: Schedule = [0.5, 0.02]
    t_max: Schedule = [0.98, 0.5]
    # ASD's timestep shift ratio η and whether Δt is drawn uniformly (the paper) or fixed at its maximum.
    eta: float = 0.1
    eta_random: bool = True
    # Clamp |grad| elementwise (Debiasing Scores); None: no clamp.
    grad_clip: float | None = None
    # VSD: the LoRA (or, for priors without a UNet, a zero-initialised residual score network).
    lora_rank: int = Field(4, ge=1)
    lora_lr: float = 1e-3
    lora_camera_condition: bool = True

    @field_validator("t_min", "t_max")
    @classmethod
    def _schedule_shape(cls, value: Schedule, info) -> Schedule:
        return check_schedule(value, f"guidance.{info.field_name}")

    @field_validator("cfg_scale")
    @classmethod
    def _cfg_non_negative(cls, value: float) -> float:
        if value < 0:
            raise ValueError("guidance.cfg_scale must be >= 0 (7.5 for ASD/VSD, ~100 for SDS)")
        return value

    @field_validator("eta")
    @classmethod
    def _eta_non_negative(cls, value: float) -> float:
        if value < 0:
            raise ValueError("guidance.eta must be >= 0 (the paper uses 0.1)")
        return value

    @model_validator(mode="after")
    def _range_ordered(self) -> GuidanceConfig:
        lo_min, hi_min = schedule_range(self.t_min)
        lo_max, hi_max = schedule_range(self.t_max)
        for name, (lo, hi) in (("guidance.t_min", (lo_min, hi_min)), ("guidance.t_max", (lo_max, hi_max))):
            if lo < 0 or hi > 1:
                raise ValueError(f"{name} is a fraction of the prior's timesteps and must lie in [0, 1]")
        # Schedules over the whole run are checked at both ends here, and at every step once the run's
        # length is known (`check_timesteps`).
        ends = [
            [s[0], s[1], 0, 1] if isinstance(s, list) and len(s) == 2 else s for s in (self.t_min, self.t_max)
        ]
        check_timestep_order(*ends, max_steps=None)
        return self

    def check_timesteps(self, max_steps: int) -> None:
        """T_min < T_max at every step of a run of `max_steps` steps (ValueError naming the step)."""
        check_timestep_order(self.t_min, self.t_max, max_steps)


def check_timestep_order(t_min: Schedule, t_max: Schedule, max_steps: int | None) -> None:
    # Both schedules are piecewise linear, so their difference is extreme at a breakpoint of either.
    for step in schedule_breakpoints((t_min, t_max), max_steps):
        lo, hi = schedule_value(t_min, step, max_steps), schedule_value(t_max, step, max_steps)
        if lo >= hi:
            raise ValueError(
                f"guidance.t_min ({lo:g}) must be < guidance.t_max ({hi:g}) at step {step}; e.g. the "
                "annealed default guidance.t_min=[0.5,0.02] guidance.t_max=[0.98,0.5], or constants "
                "guidance.t_min=0.02 guidance.t_max=0.98"
            )


# ---------------------------------------------------------------------------------------------------
# The methods


@dataclass
class GuidanceOutput:
    loss: torch.Tensor  # reparameterised: d loss / d x0 = grad
    grad: torch.Tensor
    t: torch.Tensor
    t_plus: torch.Tensor | None = None
    extra_losses: dict[str, torch.Tensor] = field(default_factory=dict)  # e.g. VSD's LoRA loss

    def metrics(self) -> dict[str, float]:
        out = {
            "train/grad_norm": float(self.grad.norm()),
            "train/t": float(self.t.float().mean()),
        }
        if self.t_plus is not None:
            out["train/t_plus"] = float(self.t_plus.float().mean())
        for name, value in self.extra_losses.items():
            out[f"train/{name}"] = float(value.detach())
        return out


class Guidance(nn.Module):
    """Samples t and ε, runs the prior, returns a loss whose gradient on x0 is the method's gradient."""

    method: str = ""

    def __init__(self, cfg: GuidanceConfig, prior: DiffusionPrior, max_steps: int | None = None):
        super().__init__()
        self.cfg = cfg
        self.prior = prior
        self.max_steps = max_steps  # what schedules over the whole run are spread over
        self.num_train_timesteps = prior.num_train_timesteps
        if max_steps is not None:
            cfg.check_timesteps(max_steps)

    def timestep_range(self, step: int) -> tuple[int, int]:
        total = self.num_train_timesteps
        t_min = int(total * schedule_value(self.cfg.t_min, step, self.max_steps))
        t_max = int(total * schedule_value(self.cfg.t_max, step, self.max_steps))
        return max(t_min, 1), min(max(t_max, t_min + 1), total - 1)

    def to_prior_input(self, images: torch.Tensor) -> torch.Tensor:
        """Renders [B,3,H,W] in [0,1] -> x0, differentiable back to the renders.

        Renders are resized (bilinear, as the authors do) to the size the prior's encoder takes,
        `prior.input_size`. For a latent prior on the default path (prior.encoder=vae) that is image_size:
        a 64 px render is upsampled to 512 and VAE-encoded to 64² latents, and the gradient flows back
        through the encoder. With prior.encoder=linear it is the latent size (64), mapped to latents by a
        fixed linear map; pixel-space priors take image_size directly.
        """
        return self.prior.encode_images(self.resize_for_prior(images))

    def resize_for_prior(self, images: torch.Tensor) -> torch.Tensor:
        size = self.prior.input_size
        if images.shape[-1] != size or images.shape[-2] != size:
            images = F.interpolate(images, (size, size), mode="bilinear", align_corners=False)
        return images

    def eps_fn(
        self,
        cond_embeddings: torch.Tensor,
        uncond_embeddings: torch.Tensor,
        camera_vectors: torch.Tensor | None = None,
    ) -> EpsFn:
        """Row i of the batch is conditioned on its own (view-dependent) prompt or on the empty prompt,
        and, for a camera-conditioned prior, on its render's camera (in every call: cond, uncond, t+Δt)."""
        self._check_cameras(camera_vectors)

        def fn(x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
            rows = self.rows(x_t, t, cond, cond_embeddings, uncond_embeddings, camera_vectors)
            with torch.no_grad():
                return self.prior.predict_noise(
                    rows.x_t, rows.t, rows.embeddings, class_labels=rows.class_labels
                )

        return fn

    def _check_cameras(self, camera_vectors: torch.Tensor | None) -> None:
        if self.prior.camera_conditioned and camera_vectors is None:
            raise ValueError(
                f"{type(self.prior).__name__} is camera-conditioned: guidance needs each render's camera "
                "(camera_vectors=cameras.camera_vector())"
            )

    def rows(self, x_t, t, cond, cond_embeddings, uncond_embeddings, camera_vectors) -> PriorRows:
        """The prior's inputs for rows (x_t, t, cond mask): each row's text (its render's prompt, or the
        empty one) and, for a camera-conditioned prior, its render's camera."""
        repeats = x_t.shape[0] // cond_embeddings.shape[0]
        text = cond_embeddings.repeat(repeats, 1, 1)
        uncond = uncond_embeddings.expand_as(text)
        embeddings = torch.where(cond.view(-1, 1, 1), text, uncond)
        cameras = camera_vectors.repeat(repeats, 1) if self.prior.camera_conditioned else None
        return PriorRows(x_t, t, embeddings, cameras)

    def sample(self, batch: int, step: int, generator: torch.Generator) -> torch.Tensor:
        t_min, t_max = self.timestep_range(step)
        return torch.randint(t_min, t_max + 1, (batch,), generator=generator, device=generator.device)

    # -- the two ways a method computes its gradient -----------------------------------------------
    # A method with `plan` (SDS, CSD, ASD) states its prior rows up front and combines their predictions
    # afterwards, so that several members of a pack share one prior call (`trainers.step`). A method
    # without it (VSD: its LoRA; supervised: no prior) runs `compute_grad` with the prior inline.

    batchable: bool = False

    def plan(self, x0, t, noise, generator, step) -> tuple[tuple, Callable[[torch.Tensor], tuple]]:
        """((x_t rows, t rows, cond mask), combine(eps) -> (grad, extras)), drawing every random number
        the step needs now (before the prior call)."""
        raise NotImplementedError

    def compute_grad(self, x0, t, noise, eps_fn, cameras, generator, step) -> tuple[torch.Tensor, dict]:
        inputs, combine = self.plan(x0, t, noise, generator, step)
        return combine(eps_fn(*inputs))

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters the guidance itself learns (VSD's LoRA); trained by the same optimizer."""
        return []

    def close(self) -> None:
        """Undo anything done to a (possibly cached and shared) prior."""

    def forward(
        self,
        images: torch.Tensor,
        cond_embeddings: torch.Tensor,
        uncond_embeddings: torch.Tensor,
        *,
        step: int,
        generator: torch.Generator,
        camera_vectors: torch.Tensor | None = None,
        cameras: CameraBatch | None = None,
    ) -> GuidanceOutput:
        """`cameras` (or just their `camera_vectors`, `CameraBatch.camera_vector()`) are the renders' cameras."""
        request = self.prepare(
            images,
            cond_embeddings,
            uncond_embeddings,
            step=step,
            generator=generator,
            camera_vectors=camera_vectors,
            cameras=cameras,
        )
        return request.finish(predict_rows(self.prior, [request.rows])[0] if request.rows else None)

    def prepare(
        self,
        images: torch.Tensor,
        cond_embeddings: torch.Tensor,
        uncond_embeddings: torch.Tensor,
        *,
        step: int,
        generator: torch.Generator,
        camera_vectors: torch.Tensor | None = None,
        cameras: CameraBatch | None = None,
        x0: torch.Tensor | None = None,
    ) -> GuidanceRequest:
        """Everything of a step up to the prior call: the rows it needs, and how to finish from their ε̂.

        `x0`: the renders already through `to_prior_input` (a pack encodes every member's renders in
        one VAE call). The random draws happen here in the order `forward` always made them (t, ε,
        then the method's own, e.g. ASD's Δt), so a member of a pack draws what it draws alone."""
        if camera_vectors is None and cameras is not None:
            camera_vectors = cameras.camera_vector()
        if not self.batchable:
            out = self.unbatched(
                images, cond_embeddings, uncond_embeddings, step, generator, camera_vectors, cameras
            )
            return GuidanceRequest(None, lambda _eps: out)
        self._check_cameras(camera_vectors)
        x0 = self.to_prior_input(images) if x0 is None else x0
        t, noise = self.sample_noise(x0, step, generator)
        inputs, combine = self.plan(x0.detach(), t, noise, generator, step)
        rows = self.rows(*inputs, cond_embeddings, uncond_embeddings, camera_vectors)
        return GuidanceRequest(rows, lambda eps: self.output(x0, t, *combine(eps)))

    def sample_noise(self, x0, step, generator) -> tuple[torch.Tensor, torch.Tensor]:
        t = self.sample(x0.shape[0], step, generator).to(x0.device)
        noise = torch.randn(x0.shape, generator=generator, device=generator.device).to(x0.device)
        return t, noise

    def unbatched(
        self, images, cond_embeddings, uncond_embeddings, step, generator, camera_vectors, cameras
    ) -> GuidanceOutput:
        """A method that cannot share its prior call: the whole step at once, the prior called inline."""
        x0 = self.to_prior_input(images)
        t, noise = self.sample_noise(x0, step, generator)
        eps_fn = self.eps_fn(cond_embeddings, uncond_embeddings, camera_vectors)
        grad, extras = self.compute_grad(x0.detach(), t, noise, eps_fn, camera_vectors, generator, step)
        return self.output(x0, t, grad, extras)

    def output(self, x0: torch.Tensor, t: torch.Tensor, grad: torch.Tensor, extras: dict) -> GuidanceOutput:
        grad = torch.nan_to_num(grad)
        if self.cfg.grad_clip is not None:
            grad = grad.clamp(-self.cfg.grad_clip, self.cfg.grad_clip)
        # Reparameterisation: d/dx0 of 0.5·||x0 − (x0 − grad)||² is grad, so autograd carries it to θ.
        target = (x0 - grad).detach()
        loss = 0.5 * F.mse_loss(x0, target, reduction="sum") / x0.shape[0]
        return GuidanceOutput(loss=loss, grad=grad, t=t, **extras)


@dataclass
class GuidanceRequest:
    """A prepared guidance step: the prior rows it needs (None: already computed) and how to finish it."""

    rows: PriorRows | None
    finish: Callable[[torch.Tensor | None], GuidanceOutput]


def predict_rows(prior: DiffusionPrior, rows: list[PriorRows]) -> list[torch.Tensor]:
    """ε̂ for several requests' rows in one prior call, split back per request."""
    with torch.no_grad():
        labels = [r.class_labels for r in rows]
        eps = prior.predict_noise(
            torch.cat([r.x_t for r in rows]),
            torch.cat([r.t for r in rows]),
            torch.cat([r.embeddings for r in rows]),
            class_labels=None if labels[0] is None else torch.cat(labels),
        )
    return list(eps.split([len(r) for r in rows]))


class SDSGuidance(Guidance):
    method = "sds"
    batchable = True

    def plan(self, x0, t, noise, generator, step):
        alphas = self.prior.alphas_cumprod
        inputs = distillation_inputs("sds", alphas, x0, t, noise)
        return inputs, lambda eps: (
            distillation_combine("sds", eps, alphas, x0, t, noise, cfg_scale=self.cfg.cfg_scale),
            {},
        )


class CSDGuidance(Guidance):
    method = "csd"
    batchable = True

    def plan(self, x0, t, noise, generator, step):
        alphas = self.prior.alphas_cumprod
        inputs = distillation_inputs("csd", alphas, x0, t, noise)
        return inputs, lambda eps: (
            distillation_combine("csd", eps, alphas, x0, t, noise, cfg_scale=self.cfg.cfg_scale),
            {},
        )


class ASDGuidance(Guidance):
    method = "asd"
    batchable = True

    def plan(self, x0, t, noise, generator, step):
        t_min, _ = self.timestep_range(step)
        t_plus = asd_timestep_shift(
            t.to(generator.device),
            t_min,
            self.cfg.eta,
            self.num_train_timesteps,
            generator=generator,
            random=self.cfg.eta_random,
        ).to(t.device)
        alphas = self.prior.alphas_cumprod
        inputs = distillation_inputs("asd", alphas, x0, t, noise, t_plus)
        return inputs, lambda eps: (
            distillation_combine("asd", eps, alphas, x0, t, noise, cfg_scale=self.cfg.cfg_scale),
            {"t_plus": t_plus},
        )


def make_guidance(
    cfg: GuidanceConfig,
    prior: DiffusionPrior,
    max_steps: int | None = None,
    target_fn: Callable[[CameraBatch], torch.Tensor] | None = None,
) -> Guidance:
    """The method `cfg.method` names. `max_steps`: the run's length, for schedules over the whole run.
    `target_fn(cameras) -> images [B, 3, H, W]`: the ground truth `supervised` fits (nothing else uses it)."""
    if cfg.method == "vsd":
        from trainers.vsd import VSDGuidance  # the LoRA machinery is only imported when asked for

        return VSDGuidance(cfg, prior, max_steps)
    if cfg.method == "supervised":
        from trainers.reference.supervised import SupervisedGuidance

        if target_fn is None:
            raise ValueError(
                "guidance.method=supervised fits ground-truth renders: it needs a prompt with a ground "
                "truth (a reference scene prompt with prior.name=reference or reference-mv)"
            )
        return SupervisedGuidance(cfg, prior, max_steps, target_fn)
    return {"sds": SDSGuidance, "csd": CSDGuidance, "asd": ASDGuidance}[cfg.method](cfg, prior, max_steps)
