"""Why ASD at CFG 7.5 fails on the learned prior, without a 3D model (docs/learned_prior.md §5).

    python tests/benchmarks/learned_prior_cfg_probe.py --weights trainers/reference/learned/weights
    python tests/benchmarks/learned_prior_cfg_probe.py --exact            # the oracle's row
    python tests/benchmarks/learned_prior_cfg_probe.py --weights DIR --png distill2d.png

Prints one JSON line:
- `2d_<method>_cfg<s>`: PSNR (dB) against the true render of a free 16×16 image (sigmoid pixels, grey
  start, Adam lr 0.05) distilled for 400 steps at one fixed camera with guidance.method/cfg_scale (η 0.1,
  the annealed t range), averaged over 2 composite prompts. The camera is one of the exact prior's 16
  views, so the same run on `--exact` (reference-mv, camera_sharpness 10,000, 16 px) is the oracle.
  With no 3D model, no other view and no renderer in the loop, what this measures is the prior's own
  fixed point under each method.
- `cos_cfgdir_t<t>`: cosine, over the 16 views of the 2 prompts' true renders at t, between the learned
  prior's guidance direction ε_cond − ε_uncond and the exact prior's (the direction CFG scales by s − 1);
  `cos_cfgdir_pool4_t<t>` the same for both directions averaged over 4 × 4 pixel blocks.
- `size_t<t>`: does the prior's CFG direction restore an object drawn 1.25× too large (`bigger`) or
  0.8× too small (`smaller`) at t? 1: fully, 0: no say on size, < 0: it pushes the wrong way
  (`size_restoring`; `--size-only` prints just these, also for `--exact`).
- `order_t<t>`: does the learned prior read word order? For 3 two-object prompts, the mean squared
  distance to the true render of the learned prior's denoised estimate of it at t, conditioned on the
  prompt, on the prompt with its objects swapped ("a pink cube on top of a yellow cylinder"), and on
  the empty prompt (`--order-only` prints just these).
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from learned_prior_report import exact_prior, views_of

from trainers.cameras import CameraConfig, view_dependent_prompt, view_direction_labels
from trainers.guidance import GuidanceConfig, add_noise, make_guidance
from trainers.reference.learned import diagnostics
from trainers.reference.learned.prior import SHIPPED_WEIGHTS, LearnedReferencePrior

PROMPTS = ["a yellow cylinder on top of a pink cube", "a cyan capsule beside an orange sphere"]
VIEW = 2  # of the exact prior's 16: elevation 21°, azimuth 172°, distance 1.61, fovy 42°
SETTINGS = [("sds", 1.0), ("sds", 3.0), ("sds", 7.5), ("asd", 1.0), ("asd", 3.0), ("asd", 7.5)]
STEPS = 400
T_CHECKED = (300, 500, 700)


def distill_image(
    prior, exact, prompt: str, method: str, cfg_scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(distilled image, true render), [3, 16, 16] in [0, 1], at the exact prior's view VIEW."""
    camera = exact.cameras[torch.tensor([VIEW])]
    truth = (views_of(exact, prompt)[VIEW] + 1) / 2
    label = view_direction_labels(camera.elevation, camera.azimuth, CameraConfig())[0]
    guidance = make_guidance(GuidanceConfig(method=method, cfg_scale=cfg_scale, eta=0.1), prior, STEPS)
    logit = torch.zeros(1, 3, 16, 16, requires_grad=True)
    optimizer = torch.optim.Adam([logit], lr=0.05)
    generator = torch.Generator().manual_seed(0)
    cond = prior.encode_text([view_dependent_prompt(prompt, label)])
    uncond = prior.encode_text([""])
    for step in range(STEPS):
        out = guidance(
            torch.sigmoid(logit),
            cond,
            uncond,
            step=step,
            generator=generator,
            camera_vectors=camera.camera_vector(),
        )
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    guidance.close()
    return torch.sigmoid(logit).detach()[0], truth


def psnr(image: torch.Tensor, truth: torch.Tensor) -> float:
    return float(-10 * torch.log10((image - truth).pow(2).mean()))


def cfg_direction_cosine(learned, exact, t_value: int, pool: int = 1) -> float:
    """Mean over PROMPTS of the cosine between the two priors' ε_cond − ε_uncond on true renders at
    t; `pool` > 1 compares the directions averaged over pool × pool pixel blocks (their coarse layout)."""
    cameras = exact.cameras.camera_vector()
    cosines = []
    for prompt in PROMPTS:
        images = views_of(exact, prompt)
        n = images.shape[0]
        noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(0))
        t = torch.full((n,), t_value)
        x_t = add_noise(learned.alphas_cumprod, images, noise, t)
        directions = []
        for prior in (learned, exact):
            cond = prior.predict_noise(x_t, t, prior.encode_text([prompt] * n), cameras)
            uncond = prior.predict_noise(x_t, t, prior.encode_text([""] * n), cameras)
            directions.append(F.avg_pool2d(cond - uncond, pool).flatten())
        cosines.append(float(F.cosine_similarity(*directions, dim=0)))
    return statistics.fmean(cosines)


ORDER_PAIRS = [
    ("a yellow cylinder on top of a pink cube", "a pink cube on top of a yellow cylinder"),
    ("a cyan capsule beside an orange sphere", "an orange sphere beside a cyan capsule"),
    ("a green torus beside a purple cone", "a purple cone beside a green torus"),
]


def word_order_errors(learned, exact, t_value: int) -> dict[str, float]:
    """Mean over ORDER_PAIRS of ‖x̂0 − x0‖² on the true renders at the exact prior's 16 views, with the
    prompt, with its objects swapped, and with the empty prompt."""
    cameras = exact.cameras.camera_vector()
    alpha = learned.alphas_cumprod[t_value]
    errors = {"prompt": [], "swapped": [], "empty": []}
    for right, swapped in ORDER_PAIRS:
        images = views_of(exact, right)
        n = images.shape[0]
        noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(0))
        t = torch.full((n,), t_value)
        x_t = add_noise(learned.alphas_cumprod, images, noise, t)
        for key, prompt in (("prompt", right), ("swapped", swapped), ("empty", "")):
            eps = learned.predict_noise(x_t, t, learned.encode_text([prompt] * n), cameras)
            x0 = (x_t - (1 - alpha).sqrt() * eps) / alpha.sqrt()
            errors[key].append(float((x0 - images).pow(2).mean()))
    return {key: round(statistics.fmean(values), 4) for key, values in errors.items()}


SIZE_PROMPTS = ["a red cube", "a blue cone", "a green torus"]
SIZE_FOVY_FACTOR = {"bigger": 0.8, "smaller": 1.25}  # tan(fovy/2) scaled: the object drawn 1.25× / 0.8×


def size_restoring(prior, exact, t_value: int, seeds: int = 3) -> dict[str, float]:
    """Does the prior's CFG direction restore an object drawn at the wrong size? For each of SIZE_PROMPTS
    at the exact prior's 16 views, the true render is redrawn at the same pose with tan(fovy/2) scaled
    by SIZE_FOVY_FACTOR (the object appears 1.25× larger, or 0.8× smaller) and measured with
    `diagnostics.size_restoring` over `seeds` noise draws: 1 restores the true size in one step, 0 says
    nothing about size, below 0 pushes the object further from it. Both are asked at the true camera."""
    from trainers.reference.scenes import render_scene

    cameras = exact.cameras
    out = {}
    for case, factor in SIZE_FOVY_FACTOR.items():
        moved_cameras = replace(cameras, fovy=2 * torch.atan(torch.tan(cameras.fovy / 2) * factor))
        values = []
        for prompt in SIZE_PROMPTS:
            true = views_of(exact, prompt)
            rgb = render_scene(prompt, moved_cameras, 32)["rgb"].permute(0, 3, 1, 2)
            moved = F.interpolate(rgb, (16, 16), mode="bilinear", align_corners=False) * 2 - 1
            generator = torch.Generator().manual_seed(0)
            for _ in range(seeds):
                noise = torch.randn(moved.shape, generator=generator)
                values.append(
                    diagnostics.size_restoring(
                        prior, prompt, true, moved, cameras.camera_vector(), t_value, noise
                    )
                )
        out[case] = round(statistics.fmean(values), 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--weights", type=Path, default=SHIPPED_WEIGHTS)
    parser.add_argument("--exact", action="store_true", help="distil with the exact prior (the oracle's row)")
    parser.add_argument("--png", type=Path, default=None, help="the distilled images, one row per prompt")
    parser.add_argument("--order-only", action="store_true", help="only the word-order check (seconds)")
    parser.add_argument("--size-only", action="store_true", help="only the size check (seconds)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    exact = exact_prior(16)
    learned = None if args.exact else LearnedReferencePrior.from_pretrained(args.weights)
    prior = exact if args.exact else learned
    out: dict[str, object] = {"prior": "exact" if args.exact else str(args.weights)}
    if learned is not None:
        out["trained_steps"] = learned.info.get("trained_steps")
    for t_value in T_CHECKED:
        out[f"size_t{t_value}"] = size_restoring(prior, exact, t_value)
    if args.size_only:
        print(json.dumps(out), flush=True)
        return
    if learned is not None:
        for t_value in (500, 800):
            out[f"order_t{t_value}"] = word_order_errors(learned, exact, t_value)
        if args.order_only:
            print(json.dumps(out), flush=True)
            return
    rows = {prompt: [] for prompt in PROMPTS}
    for method, cfg_scale in SETTINGS:
        scores = []
        for prompt in PROMPTS:
            image, truth = distill_image(prior, exact, prompt, method, cfg_scale)
            if not rows[prompt]:
                rows[prompt].append(truth)
            rows[prompt].append(image)
            scores.append(psnr(image, truth))
        out[f"2d_{method}_cfg{cfg_scale:g}"] = round(statistics.fmean(scores), 2)
    if learned is not None:
        for t_value in T_CHECKED:
            out[f"cos_cfgdir_t{t_value}"] = round(cfg_direction_cosine(learned, exact, t_value), 3)
        for t_value in T_CHECKED:
            out[f"cos_cfgdir_pool4_t{t_value}"] = round(cfg_direction_cosine(learned, exact, t_value, 4), 3)
    print(json.dumps(out), flush=True)
    if args.png:
        save_grid(args.png, [torch.cat(row, dim=2) for row in rows.values()])


def save_grid(path: Path, rows: list[torch.Tensor]) -> None:
    """Rows [3, 16, W] stacked, upscaled 8× (nearest): true render, then SETTINGS in order."""
    import numpy as np
    from PIL import Image

    grid = torch.cat(rows, dim=1).clamp(0, 1)
    pixels = (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    image = Image.fromarray(pixels)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.resize((image.width * 8, image.height * 8), Image.NEAREST).save(path)


if __name__ == "__main__":
    main()
