"""Measurements of what a learned prior's guidance does, against renders whose truth is known.

`size_restoring` is the measurement that found why ASD at CFG 7.5 grew objects past the view on the
weights without a fovy feature (docs/learned_prior.md §5, "Object size"). It is shared by the probe
(`tests/benchmarks/learned_prior_cfg_probe.py --size-only`, the docs' table) and the specification test
that holds the shipped weights to it, so both measure the same thing.
"""

from __future__ import annotations

import torch

from trainers.guidance import add_noise

# A pixel belongs to the object when its darkest channel is below this (images in [-1, 1]; the
# procedural scenes' background is white, 1 in every channel).
OBJECT_THRESHOLD = 0.6


def size_restoring(
    prior,
    prompt: str,
    true: torch.Tensor,
    drawn: torch.Tensor,
    camera_vectors: torch.Tensor,
    t_value: int,
    noise: torch.Tensor,
) -> float:
    """How far the prior's CFG direction points `drawn` back towards `true`.

    `true` and `drawn` ([N, 3, H, W] in [-1, 1]) are renders of `prompt` at one pose, `drawn` at the wrong
    size. `drawn` is noised to t with `noise` and asked at the true cameras (`camera_vectors`, [N, 17]).
    The CFG direction in x̂0 space, x̂0_cond − x̂0_uncond (what CFG scales by s − 1), is projected onto
    the way back to `true` in the ring of pixels where the two renders disagree on object or background,
    and normalised by that way's RMS length: 1 restores the true size in one step, 0 says nothing about
    size, below 0 pushes the object further from it.
    """
    n = true.shape[0]
    ring = (true.min(1).values < OBJECT_THRESHOLD) != (drawn.min(1).values < OBJECT_THRESHOLD)
    toward = true - drawn
    t = torch.full((2 * n,), t_value)
    x_t = add_noise(prior.alphas_cumprod, drawn, noise, t[:n])
    text = torch.cat([prior.encode_text([prompt] * n), prior.encode_text([""] * n)])
    eps = prior.predict_noise(torch.cat([x_t, x_t]), t, text, camera_vectors.repeat(2, 1))
    alpha = prior.alphas_cumprod[t_value]
    direction = -((1 - alpha) / alpha).sqrt() * (eps[:n] - eps[n:])  # x̂0_cond − x̂0_uncond
    along = (direction * toward).sum(1)[ring].mean()
    return float(along / toward.pow(2).sum(1)[ring].mean().sqrt())
