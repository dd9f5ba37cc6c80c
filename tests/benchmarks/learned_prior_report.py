"""How good the learned reference prior is, measured against the exact prior (docs/learned_prior.md).

    python tests/benchmarks/learned_prior_report.py --out docs/learned_prior

Writes into --out:
- eps_error.png / .json: E‖ε_learned − ε_exact‖² per t, on true renders (in distribution) and on renders
  of a 3D model part-way through ASD training (what distillation sees), with the untrained network and
  the error against the true noise beside it;
- samples.png: DDIM samples (50 steps) at a few prompts and cameras, beside the true renders;
- cost.json: CPU time per prior call and per ASD guidance call at batch 3, learned vs exact;
- asd_premise.png / .json: over t and η, E‖ε_learned(x_{t+Δt}, t+Δt) − ε_exact(x_t, t)‖² against
  E‖ε − ε_exact(x_t, t)‖² (SDS's target), same noise ε, Δt = η·(t − t_min).

The exact prior is `reference-mv` with the study's sharp camera weighting (camera_sharpness 10,000) at
its 16 views, at the learned prior's 16 px, its library rendered at 32 px and resized as guidance resizes
a render; the renders compared are at those 16 views, where the exact prior is defined.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from trainers.config import load_train_config  # noqa: E402
from trainers.guidance import GuidanceConfig, add_noise, make_guidance  # noqa: E402
from trainers.per_prompt import Trainer  # noqa: E402
from trainers.priors.base import PriorConfig, default_cache_dir  # noqa: E402
from trainers.reference.basis import cached_basis  # noqa: E402
from trainers.reference.learned.prior import SHIPPED_WEIGHTS, LearnedReferencePrior  # noqa: E402
from trainers.reference.prior import CameraConditionedReferencePrior, ReferencePriorConfig  # noqa: E402
from trainers.reference.scenes import scene_cache_dir  # noqa: E402

T_GRID = [20, 50, 100, 200, 300, 400, 500, 600, 700, 800, 900, 980]
ETAS = [0.05, 0.1, 0.2, 0.5, 1.0]
T_MIN = 20  # the annealed range's floor (guidance.t_min 0.02)
PROMPTS = [
    "a red cube",
    "a green torus beside a purple cone",
    "a blue sphere on top of an orange cylinder",
    "a yellow cylinder on top of a pink cube",
]
DISTILL_STEPS = 100
STUDY_CONFIG = "sweeps/configs/reference_cpu.yaml"
LEARNED_OVERRIDES = {"prior.name": "reference-learned", "prior.image_size": None, "camera.fixed_views": 0}


class PooledExactPrior(CameraConditionedReferencePrior):
    """reference-mv whose renders are made at 2× size and resized as guidance resizes a render."""

    def _layout_maps(self, layouts):
        missing = [lay for lay in layouts if lay not in self._maps]
        if missing:
            maps = cached_basis(missing, self.cameras, 2 * self.image_size, self.cfg.scene, self.cache_dir)
            for lay, m in maps.items():
                self._maps[lay] = F.interpolate(
                    m, (self.image_size,) * 2, mode="bilinear", align_corners=False
                )
        return {lay: self._maps[lay] for lay in layouts}


def exact_prior(size: int, pooled: bool = True) -> CameraConditionedReferencePrior:
    cls = PooledExactPrior if pooled else CameraConditionedReferencePrior
    cfg = ReferencePriorConfig(camera_sharpness=10000.0)
    return cls(size, scene_cache_dir(default_cache_dir(PriorConfig())), "cpu", cfg)


def views_of(prior, prompt: str) -> torch.Tensor:
    """The exact prior's renders of `prompt` at its 16 views, [16, 3, S, S] in [-1, 1]."""
    s = prior.image_size
    return prior.bank(prompt).images.view(-1, 3, s, s)


def distilled_renders(prompt: str, views, steps: int, seed: int = 0) -> torch.Tensor:
    """Renders [V, 3, 16, 16] in [-1, 1] of a 3D model after `steps` of ASD on the learned prior, at the
    exact prior's views: the off-distribution images distillation sees part-way through training."""
    overrides = {**LEARNED_OVERRIDES, "prompt": prompt, "seed": seed, "max_steps": 600, "device": "cpu"}
    trainer = Trainer(load_train_config(STUDY_CONFIG, overrides))
    for _ in range(steps):
        trainer.training_step()
    out = trainer.render_views(views)
    rgb = (out["rgb_fg"] + (1 - out["opacity"])).clamp(0, 1).permute(0, 3, 1, 2)
    trainer.close()
    return F.interpolate(rgb, (16, 16), mode="bilinear", align_corners=False) * 2 - 1


def mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).pow(2).mean())


def eps_errors(learned, untrained, exact, images, prompt, cameras, seeds: int) -> dict:
    """Per t: E‖ε_model − ε_exact‖² for the learned and the untrained net, and E‖ε_model − ε‖²."""
    n = images.shape[0]
    text = learned.encode_text([prompt] * n)
    exact_text = exact.encode_text([prompt] * n)
    out = {k: [] for k in ("learned_vs_exact", "untrained_vs_exact", "learned_vs_noise", "exact_vs_noise")}
    for t_value in T_GRID:
        rows = {k: [] for k in out}
        for seed in range(seeds):
            noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed))
            t = torch.full((n,), t_value, dtype=torch.long)
            x_t = add_noise(learned.alphas_cumprod, images, noise, t)
            e_exact = exact.predict_noise(x_t, t, exact_text, cameras)
            e_learned = learned.predict_noise(x_t, t, text, cameras)
            e_untrained = untrained.predict_noise(x_t, t, text, cameras)
            rows["learned_vs_exact"].append(mse(e_learned, e_exact))
            rows["untrained_vs_exact"].append(mse(e_untrained, e_exact))
            rows["learned_vs_noise"].append(mse(e_learned, noise))
            rows["exact_vs_noise"].append(mse(e_exact, noise))
        for k in out:
            out[k].append(statistics.fmean(rows[k]))
    return out


def asd_premise(learned, exact, images, prompt, cameras, seeds: int) -> dict:
    """Per t and η: E‖ε_learned(x_{t+Δt}, t+Δt) − ε_exact(x_t, t)‖², and SDS's E‖ε − ε_exact(x_t, t)‖²."""
    n = images.shape[0]
    text, exact_text = learned.encode_text([prompt] * n), exact.encode_text([prompt] * n)
    out = {"sds": [], **{f"eta={eta:g}": [] for eta in [0.0, *ETAS]}}
    for t_value in T_GRID:
        rows = {k: [] for k in out}
        for seed in range(seeds):
            noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed))
            t = torch.full((n,), t_value, dtype=torch.long)
            x_t = add_noise(learned.alphas_cumprod, images, noise, t)
            target = exact.predict_noise(x_t, t, exact_text, cameras)
            rows["sds"].append(mse(noise, target))
            for eta in [0.0, *ETAS]:
                shift = min(int(eta * max(t_value - T_MIN, 0)), 999 - t_value)
                t_plus = t + shift
                x_plus = add_noise(learned.alphas_cumprod, images, noise, t_plus)
                rows[f"eta={eta:g}"].append(mse(learned.predict_noise(x_plus, t_plus, text, cameras), target))
        for k in out:
            out[k].append(statistics.fmean(rows[k]))
    return out


@torch.no_grad()
def ddim_samples(prior: LearnedReferencePrior, prompts, cameras, cfg_scale: float, steps: int = 50, seed=0):
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(prior.scheduler.config, clip_sample=False, set_alpha_to_one=True)
    scheduler.set_timesteps(steps)
    n = len(prompts)
    x = torch.randn(n, 3, prior.image_size, prior.image_size, generator=torch.Generator().manual_seed(seed))
    cond, uncond = prior.encode_text(prompts), prior.encode_text([""] * n)
    labels = cameras.camera_vector()
    for t in scheduler.timesteps:
        tt = torch.full((n,), int(t), dtype=torch.long)
        e = prior.predict_noise(
            torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([uncond, cond]), labels.repeat(2, 1)
        )
        e_u, e_c = e.chunk(2)
        x = scheduler.step(e_u + cfg_scale * (e_c - e_u), t, x).prev_sample
    return prior.decode(x)


def timing(fn, repeats: int) -> float:
    fn()  # warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def cost(learned, exact16, exact32, repeats: int) -> dict:
    from trainers.cameras import orbit_cameras

    cameras = orbit_cameras(10.0, torch.tensor([0.0, 90.0, 180.0]), 1.75, 50.0)
    out = {}
    for name, prior in (
        ("learned (16 px)", learned),
        ("exact reference-mv (16 px)", exact16),
        ("exact reference-mv (32 px)", exact32),
    ):
        s = prior.image_size
        text = prior.encode_text(["a green torus beside a purple cone"] * 3)
        uncond = prior.encode_text([""])
        x = torch.randn(3, 3, s, s)
        t = torch.tensor([200, 500, 800])
        call = timing(
            lambda p=prior, x=x, t=t, text=text: p.predict_noise(x, t, text, cameras.camera_vector()), repeats
        )
        guidance = make_guidance(GuidanceConfig(method="asd", cfg_scale=7.5), prior, max_steps=100)
        images = torch.rand(3, 3, 32, 32, requires_grad=True)

        def asd_call(g=guidance, text=text, uncond=uncond, images=images):
            out = g(
                images,
                text,
                uncond,
                step=50,
                generator=torch.Generator().manual_seed(0),
                camera_vectors=cameras.camera_vector(),
            )
            out.loss.backward()

        out[name] = {
            "predict_noise_ms_batch3": round(call, 2),
            "asd_guidance_call_ms_batch3": round(timing(asd_call, repeats), 2),
        }
        guidance.close()
    return out


def plot_eps(path: Path, results: dict) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, (where, r) in zip(axes, results.items(), strict=True):
        ax.plot(T_GRID, r["learned_vs_exact"], "o-", label="learned vs exact ε̂")
        ax.plot(T_GRID, r["untrained_vs_exact"], "s--", label="untrained net vs exact ε̂")
        ax.plot(T_GRID, r["learned_vs_noise"], "^:", label="learned vs sampled ε")
        ax.plot(T_GRID, r["exact_vs_noise"], "x:", label="exact ε̂ vs sampled ε")
        ax.set_yscale("log")
        ax.set_xlabel("t")
        ax.set_title(where)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("mean squared difference per pixel")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_premise(path: Path, results: dict) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, where in zip(axes, results, strict=True):
        r = results[where]
        ax.plot(T_GRID, r["sds"], "k--", lw=2, label="sampled ε (SDS)")
        for key in [k for k in r if k.startswith("eta")]:
            ax.plot(T_GRID, r[key], "o-", ms=3, label=f"ε_learned(x_t+Δt), {key.replace('eta', 'η')}")
        ax.set_yscale("log")
        ax.set_xlabel("t")
        ax.set_title(where, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("E‖target − ε_exact(x_t, t)‖² per pixel")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save_samples(path: Path, rows: list[tuple[str, torch.Tensor]]) -> None:
    """rows: (label, images [N, 3, S, S] in [0, 1]) -> a grid, upsampled 4× (nearest) for viewing."""
    fig, axes = plt.subplots(
        len(rows), rows[0][1].shape[0], figsize=(1.6 * rows[0][1].shape[0], 1.8 * len(rows))
    )
    for r, (label, images) in enumerate(rows):
        for c in range(images.shape[0]):
            ax = axes[r, c]
            ax.imshow(images[c].permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(label, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--weights", type=Path, default=SHIPPED_WEIGHTS)
    parser.add_argument("--out", type=Path, default=Path("docs/learned_prior"))
    parser.add_argument("--seeds", type=int, default=3, help="noise draws per t")
    parser.add_argument("--distill-steps", type=int, default=DISTILL_STEPS)
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per cost figure")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip", action="append", default=[], choices=["eps", "samples", "cost", "premise"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    learned = LearnedReferencePrior.from_pretrained(args.weights)
    untrained = learned.untrained()
    exact = exact_prior(learned.image_size)
    views = exact.cameras
    labels = views.camera_vector()
    summary = {"weights": str(args.weights), "trained_steps": learned.info.get("trained_steps")}

    if "samples" not in args.skip:
        from trainers.cameras import orbit_cameras

        sample_prompts = [p for p in PROMPTS for _ in range(2)]
        cams = orbit_cameras(15.0, torch.tensor([0.0, 90.0] * len(PROMPTS)), 1.75, 50.0)
        truth = []
        for i, p in enumerate(sample_prompts):
            from trainers.reference.scenes import render_scene

            rgb = render_scene(p, cams[torch.tensor([i])], 32)["rgb"].permute(0, 3, 1, 2)
            truth.append(F.interpolate(rgb, (16, 16), mode="bilinear", align_corners=False))
        rows = [("true render", torch.cat(truth))]
        for scale in (1.0, 3.0, 7.5):
            rows.append((f"DDIM, CFG {scale:g}", ddim_samples(learned, sample_prompts, cams, scale)))
        rows.append(("DDIM, CFG 3, seed 1", ddim_samples(learned, sample_prompts, cams, 3.0, seed=1)))
        save_samples(args.out / "samples.png", rows)
        print("samples written", flush=True)

    renders = {}
    if "eps" not in args.skip or "premise" not in args.skip:
        for prompt in PROMPTS[1:3]:
            renders[("true renders", prompt)] = views_of(exact, prompt)
            renders[(f"renders of a 3D model after {args.distill_steps} ASD steps", prompt)] = (
                distilled_renders(prompt, views, args.distill_steps)
            )
            print(f"renders of {prompt!r} ready", flush=True)
        grid = [(f"{w[:24]}: {p[:18]}", (im[:8] + 1) / 2) for (w, p), im in renders.items()]
        save_samples(args.out / "compared_renders.png", grid)

    def over_prompts(fn, *extra):
        merged: dict[str, dict] = {}
        for (where, prompt), images in renders.items():
            r = fn(*extra, images, prompt, labels, args.seeds)
            bucket = merged.setdefault(where, {k: [] for k in r})
            for k, v in r.items():
                bucket[k].append(v)
        return {w: {k: np.mean(v, axis=0).tolist() for k, v in r.items()} for w, r in merged.items()}

    if "eps" not in args.skip:
        results = over_prompts(eps_errors, learned, untrained, exact)
        plot_eps(args.out / "eps_error.png", results)
        (args.out / "eps_error.json").write_text(json.dumps({"t": T_GRID, **results}, indent=1))
        print("ε errors written", flush=True)
    if "premise" not in args.skip:
        results = over_prompts(asd_premise, learned, exact)
        plot_premise(args.out / "asd_premise.png", results)
        (args.out / "asd_premise.json").write_text(
            json.dumps({"t": T_GRID, "t_min": T_MIN, **results}, indent=1)
        )
        print("ASD premise written", flush=True)
    if "cost" not in args.skip:
        exact32 = exact_prior(32, pooled=False)
        exact16_full = exact_prior(learned.image_size)
        summary["cost"] = cost(learned, exact16_full, exact32, args.repeats)
        (args.out / "cost.json").write_text(json.dumps(summary["cost"], indent=1))
        print(json.dumps(summary["cost"], indent=1), flush=True)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
