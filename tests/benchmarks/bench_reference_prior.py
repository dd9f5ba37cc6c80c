"""What the reference prior's unconditional marginal costs: one `predict_noise` call at batch 3, side by side.

    python tests/benchmarks/bench_reference_prior.py [--sizes 32 64] [--calls 20]

- before: the previous implementation (kept here as the baseline): an explicit bank of renders, the
  unconditional set the 48 single-object prompts × 8 views, the conditional set 32 views, squared
  distances by direct differences row by row;
- now: the basis form over the whole library (4,560 prompts × 16 views), both priors.
Each call is ASD's batch of 3 rows (uncond and cond at t, cond at t+Δt) on a noised render of the
prompt, at t spread over [20, 980] as training draws it (the cost depends on t: up to t ≈ 600 the
pruning bound leaves out most of the library), with a 1-thread torch. The three are timed interleaved,
call by call, so that load changes hit them alike. It also
prints the basis form's largest error against the explicit float64 closed form on the same renders.
The first run renders the library's basis maps into the cache (minutes at 64 px; not timed).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time

import torch

from trainers.priors import default_cache_dir
from trainers.reference.config import ReferencePriorConfig
from trainers.reference.prior import CameraConditionedReferencePrior, ReferencePrior, posterior_mean
from trainers.reference.scenes import (
    cached_scene_views,
    reference_cameras,
    scene_cache_dir,
    single_object_prompts,
)

PROMPT = "a green torus beside a purple cone"


class BeforePrior:
    """The previous reference prior's denoiser, reduced to what one call does."""

    def __init__(self, size: int, cache_dir, alphas_cumprod: torch.Tensor):
        def bank(prompt: str, views: int) -> torch.Tensor:
            rgb = cached_scene_views(prompt, reference_cameras(views), size, cache_dir=cache_dir)["rgb"]
            return rgb.permute(0, 3, 1, 2).reshape(views, -1) * 2 - 1

        self.uncond = torch.cat([bank(p, 8) for p in single_object_prompts()])
        self.cond = bank(PROMPT, 32)
        self.alphas_cumprod = alphas_cumprod

    def mmse_eps(self, x_t, t, images):
        x = x_t.reshape(x_t.shape[0], -1)
        alpha = self.alphas_cumprod[t].view(-1, 1)
        sq_dist = torch.stack(
            [
                torch.cdist(
                    x[i : i + 1], alpha[i].sqrt() * images, compute_mode="donot_use_mm_for_euclid_dist"
                )[0]
                for i in range(len(x))
            ]
        ).pow(2)
        logits = -math.log(len(images)) - sq_dist / (2 * (1 - alpha))
        mean = torch.softmax(logits, dim=-1) @ images
        return ((x - alpha.sqrt() * mean) / (1 - alpha).sqrt()).reshape(x_t.shape)

    def predict_noise(self, x_t, t):
        # rows: [uncond, cond, cond at t+Δt], as ASD asks for them
        return torch.cat(
            [self.mmse_eps(x_t[:1], t[:1], self.uncond), self.mmse_eps(x_t[1:], t[1:], self.cond)]
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--calls", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    cache_dir = scene_cache_dir(default_cache_dir())
    print(f"{'size':>5} {'prior':<14} {'ms / call':>10} {'× before':>9} {'max |Δε| vs explicit':>22}")
    for size in args.sizes:
        bench_size(size, args.calls, cache_dir)


def bench_size(size: int, calls: int, cache_dir) -> None:
    text_prior = ReferencePrior(size, cache_dir, "cpu", ReferencePriorConfig())
    mv_prior = CameraConditionedReferencePrior(size, cache_dir, "cpu", ReferencePriorConfig())
    cond, empty = text_prior.encode_text([PROMPT, ""])
    mv_prior.encode_text([PROMPT])
    text_prior.uncond_set(), mv_prior.uncond_set()
    rows = torch.stack([empty, cond, cond])
    generator = torch.Generator().manual_seed(0)
    x0 = text_prior.bank(PROMPT).images[3].view(1, 3, size, size)
    inputs = []
    for t in torch.linspace(20, 980, calls).long().tolist():
        steps = torch.tensor([t, t, min(t + 40, 999)])
        alpha = text_prior.alphas_cumprod[steps].view(-1, 1, 1, 1)
        noise = torch.randn(3, 3, size, size, generator=generator)
        inputs.append((alpha.sqrt() * x0 + (1 - alpha).sqrt() * noise, steps))
    cameras = reference_cameras(1).c2w.reshape(1, 16).repeat(3, 1)
    before = BeforePrior(size, cache_dir, text_prior.alphas_cumprod)
    calls_of = {
        "before": lambda x, t: before.predict_noise(x, t),
        "reference": lambda x, t: text_prior.predict_noise(x, t, rows),
        "reference-mv": lambda x, t: mv_prior.predict_noise(x, t, rows, class_labels=cameras),
    }
    # Interleaved: each input goes through the three in turn (the order rotating), so that a change in
    # the machine's load during the run hits all three alike.
    seconds = dict.fromkeys(calls_of, 0.0)
    for call in calls_of.values():  # warm-up
        call(*inputs[0])
    for index, (x, t) in enumerate(inputs):
        names = list(calls_of)
        for name in names[index % 3 :] + names[: index % 3]:
            start = time.perf_counter()
            calls_of[name](x, t)
            seconds[name] += time.perf_counter() - start
    base = seconds["before"] / calls * 1000
    print(f"{size:>5} {'before':<14} {base:>10.1f} {1.0:>9.2f} {'':>22}")
    for name, prior in (("reference", text_prior), ("reference-mv", mv_prior)):
        ms = seconds[name] / calls * 1000
        print(f"{size:>5} {name:<14} {ms:>10.1f} {ms / base:>9.2f} {accuracy(prior):>22.2e}")


def accuracy(prior: ReferencePrior) -> float:
    """Largest |ε̂ difference| between the basis form and the explicit float64 closed form, over t, near a
    library render (where the posterior is sharpest) and at random points. On a 1,000-prompt subset of
    the library's renders (all 4,560 × 16 at once would need gigabytes for the explicit form)."""
    scenes = prior.uncond_set()
    real = torch.isfinite(scenes.log_weights).view(-1).nonzero()[:, 0]  # not the padding of short layouts
    keep = torch.zeros_like(scenes.log_weights, dtype=torch.bool)
    keep.view(-1)[real[torch.randperm(len(real), generator=torch.Generator().manual_seed(0))[:1000]]] = True
    subset_log = torch.where(keep, scenes.log_weights, torch.full_like(scenes.log_weights, -math.inf))
    entries = keep.nonzero().tolist()  # (layout, view, colouring)
    images = torch.stack([scenes.images(g, k)[v].reshape(-1) for g, v, k in entries]) * 2 - 1
    subset = dataclasses.replace(scenes, log_weights=subset_log)
    worst = 0.0
    for t in (1, 20, 200, 500, 980):
        alpha = prior.alphas_cumprod[[t]].double()
        for x0 in (images[7], torch.zeros_like(images[7])):
            x_t = (alpha.sqrt() * x0 + (1 - alpha).sqrt() * torch.randn_like(x0)).view(1, 3, -1)
            mean = posterior_mean(subset, x_t.float(), alpha.float(), torch.zeros(1, scenes.maps.shape[1]))
            logits = -(x_t.reshape(1, -1).double() - alpha.sqrt() * images.double()).pow(2).sum(-1) / (
                2 * (1 - alpha)
            )
            exact = (torch.softmax(logits, -1) @ images.double() + 1) / 2
            worst = max(
                worst, float((mean.reshape(-1) - exact).abs().max() * 2 * alpha.sqrt() / (1 - alpha).sqrt())
            )
    return worst


if __name__ == "__main__":
    main()
