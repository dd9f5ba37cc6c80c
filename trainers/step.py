"""One training step of any number of members: render each → one batched guidance call → per-member losses.

    results = training_step([trainer_a, trainer_b, ...])     # one StepResult per member, in order

A member is anything with the `Member` shape below: the per-prompt `Trainer` (one 3D model), the
`AmortizedTrainer` (one generator over a batch of prompts), or several per-prompt trainers of a pack
(several trials on one worker, sharing its frozen prior). The per-prompt and amortized loops step
through this function with one member; a pack steps K of them, so K = 1 and K = 8 are the same code.

What the members share is the prior's work: every member's renders go through one VAE encode, and
every member's rows (uncond, cond, and ASD's cond at t+Δt) through one prior call. Everything else is
each member's own: its renders, random draws (its own generator, drawn in the order a solo run draws
them), hyperparameters (η, CFG, t range, step), loss, optimizer and failure. A member whose loss is not
finite fails alone: its result carries the error, it takes no optimizer step, and the others go on.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from trainers.cameras import CameraBatch
from trainers.guidance import Guidance, GuidanceOutput, predict_rows
from trainers.priors.base import out_of_memory_hint


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN or inf: the run stops instead of silently training on garbage."""

    def __init__(self, step: int, term: str, value: float):
        self.step, self.term, self.value = step, term, value
        super().__init__(
            f"loss term {term!r} is {value} at step {step}; lower the learning rates or guidance.cfg_scale"
        )


@dataclass
class StepInputs:
    """What a member's render hands to guidance: renders [B,3,H,W] in [0,1] (differentiable to the
    member's parameters), their opacity, each render's text embedding, the unconditional one, the
    cameras, and the member's generator (guidance draws t, ε and Δt from it)."""

    images: torch.Tensor
    opacity: torch.Tensor
    cond: torch.Tensor
    uncond: torch.Tensor
    cameras: CameraBatch
    generator: torch.Generator


class Member(Protocol):
    config: object  # .loss: the loss weights
    guidance: Guidance
    optimizer: torch.optim.Optimizer
    step: int

    def render_step(self) -> StepInputs: ...

    def reduce_grads(self) -> None:
        """Between the backward and the optimizer step (the amortized trainer's cross-rank average)."""

    def step_extras(self) -> dict[str, float]:
        """Metrics of its own beside `step_metrics` (the amortized trainer's epoch)."""


@dataclass
class StepResult:
    metrics: dict[str, float] | None = None
    error: NonFiniteLossError | None = None


def loss_terms(guided, opacity: torch.Tensor, loss_cfg, step: int) -> dict[str, torch.Tensor]:
    """The step's loss terms: guidance (and its own, e.g. VSD's LoRA loss) plus the opacity regularisers;
    NonFiniteLossError names the first term that is not finite."""
    opacity = opacity.clamp(1e-5, 1 - 1e-5)
    terms = {"guidance": guided.loss, **guided.extra_losses}
    if loss_cfg.lambda_sparsity > 0:
        terms["sparsity"] = loss_cfg.lambda_sparsity * opacity.mean()
    if loss_cfg.lambda_opacity > 0:
        entropy = -(opacity * opacity.log() + (1 - opacity) * (1 - opacity).log()).mean()
        terms["opacity"] = loss_cfg.lambda_opacity * entropy
    for name, value in terms.items():
        if not torch.isfinite(value).all():
            raise NonFiniteLossError(step, name, float(value.detach()))
    return terms


def step_metrics(
    total: torch.Tensor,
    terms: dict[str, torch.Tensor],
    opacity: torch.Tensor,
    guided,
    timestep_range: tuple[float, float],
) -> dict[str, float]:
    """What a training step reports: the loss and its terms (VSD's LoRA fit left out: it is the LoRA's
    loss, not the 3D model's), the mean opacity, the guidance's diagnostics and the step's t range."""
    t_min, t_max = timestep_range
    metrics = {"train/loss": float(total.detach()), "train/opacity": float(opacity.detach().mean())}
    metrics |= {f"train/loss_{name}": float(v.detach()) for name, v in terms.items() if name != "loss_lora"}
    metrics |= guided.metrics()
    metrics |= {"train/t_min": float(t_min), "train/t_max": float(t_max)}
    return metrics


def guide(members: Sequence[Member], inputs: Sequence[StepInputs]) -> list[GuidanceOutput]:
    """Every member's guidance with one encode and one prior call over all of them.

    Members whose method cannot share the prior call (VSD's LoRA, supervised) run theirs inline."""
    prior = members[0].guidance.prior
    if any(m.guidance.prior is not prior for m in members):
        raise ValueError("members stepped together must share one prior object (one load per worker)")
    shared = [i for i, m in enumerate(members) if m.guidance.batchable]
    x0: dict[int, torch.Tensor] = {}
    if shared:
        resized = [members[i].guidance.resize_for_prior(inputs[i].images) for i in shared]
        encoded = prior.encode_images(torch.cat(resized))
        x0 = dict(zip(shared, encoded.split([len(r) for r in resized]), strict=True))
    requests = [
        m.guidance.prepare(
            inp.images,
            inp.cond,
            inp.uncond,
            step=m.step,
            generator=inp.generator,
            cameras=inp.cameras,
            x0=x0.get(i),
        )
        for i, (m, inp) in enumerate(zip(members, inputs, strict=True))
    ]
    rows = [r.rows for r in requests if r.rows is not None]
    eps = iter(predict_rows(prior, rows) if rows else [])
    return [r.finish(next(eps) if r.rows is not None else None) for r in requests]


def backward_and_step(
    totals: Sequence[torch.Tensor],
    optimizers: Sequence[torch.optim.Optimizer],
    step: int,
    reduce_grads: Sequence[Callable[[], None]] = (),
) -> None:
    """One backward over the members' summed losses (their parameters are disjoint, so each gets the
    gradient of its own loss), then each member's optimizer step. Running out of memory in either
    raises the error that names the config keys reducing memory."""
    for optimizer in optimizers:
        optimizer.zero_grad(set_to_none=True)
    # The backward holds the forward's activations: the VAE encoder's at image_size and the renderer's.
    with out_of_memory_hint(f"the backward pass of step {step}"):
        torch.stack(list(totals)).sum().backward()
    for reduce in reduce_grads:
        reduce()
    with out_of_memory_hint(f"the optimizer step of step {step}"):
        for optimizer in optimizers:
            optimizer.step()


def training_step(members: Sequence[Member]) -> list[StepResult]:
    """Step every member once (each at its own step count); one StepResult per member, in order."""
    inputs = [m.render_step() for m in members]
    step = members[0].step
    with out_of_memory_hint(f"the guidance of step {step} (the prior's encoder and UNet)"):
        guided = guide(members, inputs)
    results = [StepResult() for _ in members]
    alive: list[int] = []
    terms: dict[int, dict[str, torch.Tensor]] = {}
    for i, (m, inp, g) in enumerate(zip(members, inputs, guided, strict=True)):
        try:
            terms[i] = loss_terms(g, inp.opacity, m.config.loss, m.step)
            alive.append(i)
        except NonFiniteLossError as error:
            results[i].error = error
    if not alive:
        return results
    totals = {i: sum(terms[i].values()) for i in alive}
    backward_and_step(
        [totals[i] for i in alive],
        [members[i].optimizer for i in alive],
        step,
        [members[i].reduce_grads for i in alive],
    )
    for i in alive:
        m = members[i]
        m.step += 1
        metrics = step_metrics(
            totals[i], terms[i], inputs[i].opacity, guided[i], m.guidance.timestep_range(m.step - 1)
        )
        results[i].metrics = metrics | m.step_extras()
    return results


def step_alone(member: Member) -> dict[str, float]:
    """One step of a single member; its NonFiniteLossError is raised."""
    (result,) = training_step([member])
    if result.error is not None:
        raise result.error
    return result.metrics
