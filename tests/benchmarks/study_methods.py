"""The ground-truth study: ASD, SDS, CSD and VSD at equal steps on the reference benchmark, and how the
ground-truth metrics move with ASD's eta and with the CFG scale.

    python tests/benchmarks/study_methods.py --out docs/ [--steps 150 --seeds 2 --resolution 16]

With the defaults that is 78 runs of 150 steps: about 25 minutes on a shared 2-core CPU (docs/study.md).

Every run trains one scene prompt from `--config` (default `sweeps/configs/reference_cpu.yaml`) with
only the studied knobs changed, then scores the model at the held-out views (`eval/psnr`, `eval/ssim`,
`eval/iou`). Three groups of settings share runs where their settings coincide:

- methods: ASD, SDS, CSD, VSD at CFG 7.5, plus SDS and ASD at CFG 100 (the paper: ASD is stable at 7.5,
  SDS needs a much larger CFG);
- eta: ASD at CFG 7.5 over `--etas`;
- cfg: each of `--cfg-methods` over `--cfgs`, at the config's eta.

Writes into `--out`: `study_runs.jsonl` (one line per run; a rerun skips the runs already there, so an
interrupted study resumes), `study_results.md` (the tables, also printed), and the plots
`study_methods.png`, `study_eta.png`, `study_cfg.png`, `study_renders.png`. One process, one prior
(loaded once and shared), runs in sequence: the study is sized for a shared 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from trainers.config import load_train_config
from trainers.evaluation.ground_truth import ground_truth, on_background
from trainers.per_prompt import NonFiniteLossError, Trainer
from trainers.priors import default_cache_dir, load_prior
from trainers.priors.base import DiffusionPrior
from trainers.reference.scenes import SceneConfig, benchmark_panel, evaluation_cameras, scene_cache_dir

METRICS = ("eval/psnr", "eval/ssim", "eval/iou")
RENDER_VIEWS = (0, 3)  # indices into the held-out evaluation orbit shown in study_renders.png


@dataclass(frozen=True)
class Setting:
    method: str
    cfg_scale: float
    eta: float

    @property
    def label(self) -> str:
        eta = f", η {self.eta:g}" if self.method == "asd" else ""
        return f"{self.method.upper()} (CFG {self.cfg_scale:g}{eta})"


@dataclass
class Run:
    """One trained model's scores (NaN where the run diverged)."""

    method: str
    cfg_scale: float
    eta: float
    prompt: str
    seed: int
    steps: int
    resolution: int
    status: str  # "ok" or "diverged at step N"
    seconds: float
    scores: dict[str, float]
    # uint8 [views, H, W, 3] at RENDER_VIEWS, kept for the seed-0 method comparison only (the figure)
    renders: list | None = None

    @property
    def key(self) -> tuple:
        return (self.method, self.cfg_scale, self.eta, self.prompt, self.seed, self.steps, self.resolution)


# ---------------------------------------------------------------------------------------------------
# What to run


def study_groups(args: argparse.Namespace, eta: float) -> dict[str, list[Setting]]:
    methods = [Setting(m, 7.5, eta) for m in ("asd", "sds", "csd", "vsd")]
    methods += [Setting("sds", 100.0, eta), Setting("asd", 100.0, eta)]
    return {
        "methods": methods,
        "eta": [Setting("asd", 7.5, e) for e in args.etas],
        "cfg": [Setting(m, c, eta) for m in args.cfg_methods for c in args.cfgs],
    }


# ---------------------------------------------------------------------------------------------------
# Running


def train_and_score(
    args: argparse.Namespace,
    prior: DiffusionPrior,
    setting: Setting,
    prompt: str,
    seed: int,
    keep_renders: bool,
) -> Run:
    overrides = {
        **base_overrides(args),
        "prompt": prompt,
        "seed": seed,
        "guidance.method": setting.method,
        "guidance.cfg_scale": setting.cfg_scale,
        "guidance.eta": setting.eta,
    }
    config = load_train_config(args.config, overrides)
    start = time.perf_counter()
    trainer = Trainer(config, prior)
    status, renders = "ok", None
    try:
        while trainer.step < args.steps:
            trainer.training_step()
        scores = trainer.evaluate()
        if keep_renders:
            renders = (rendered_views(trainer) * 255).round().to(torch.uint8).tolist()
    except NonFiniteLossError as error:
        # A diverged run is a result of the study (e.g. a CFG too large), not a failure of it.
        status, scores = f"diverged at step {error.step}", dict.fromkeys(METRICS, math.nan)
    finally:
        trainer.close()
    return Run(
        setting.method,
        setting.cfg_scale,
        setting.eta,
        prompt,
        seed,
        args.steps,
        args.resolution,
        status,
        time.perf_counter() - start,
        {name: scores[name] for name in METRICS},
        renders,
    )


def base_overrides(args: argparse.Namespace) -> dict:
    return {
        "device": "cpu",
        "max_steps": args.steps,
        "resolution": args.resolution,
        "prior.image_size": args.resolution,
        **dict(item.split("=", 1) for item in args.overrides),
    }


@torch.no_grad()
def rendered_views(trainer: Trainer) -> torch.Tensor:
    cameras = evaluation_cameras(trainer.config.logging.eval_views, trainer.config.camera)
    out = trainer.render_views(cameras)
    rgb = on_background({k: v.float().cpu() for k, v in out.items()}, SceneConfig().background_color)
    return rgb[list(RENDER_VIEWS)].clamp(0, 1)


def initial_scores(args, prior, prompt: str, seed: int) -> dict[str, float]:
    """The untrained model's scores: the floor every method should rise above."""
    overrides = {**base_overrides(args), "prompt": prompt, "seed": seed}
    trainer = Trainer(load_train_config(args.config, overrides), prior)
    try:
        return {name: trainer.evaluate()[name] for name in METRICS}
    finally:
        trainer.close()


def load_runs(path: Path) -> dict[tuple, Run]:
    if not path.exists():
        return {}
    runs = [Run(**json.loads(line)) for line in path.read_text().splitlines() if line.strip()]
    return {run.key: run for run in runs}


# ---------------------------------------------------------------------------------------------------
# Summaries


def panel_mean_per_seed(runs: list[Run], metric: str) -> list[float]:
    """For each seed, the metric averaged over the prompt panel (NaN if any run of that seed diverged)."""
    by_seed: dict[int, list[float]] = {}
    for run in runs:
        by_seed.setdefault(run.seed, []).append(run.scores[metric])
    return [statistics.fmean(values) for _, values in sorted(by_seed.items())]


def mean_std(values: list[float]) -> tuple[float, float]:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return math.nan, math.nan
    return statistics.fmean(finite), statistics.stdev(finite) if len(finite) > 1 else 0.0


def fmt(values: list[float], digits: int) -> str:
    mean, std = mean_std(values)
    if math.isnan(mean):
        return "—"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


DIGITS = {"eval/psnr": 2, "eval/ssim": 3, "eval/iou": 3}


def setting_row(name: str, runs: list[Run]) -> str:
    cells = [fmt(panel_mean_per_seed(runs, m), DIGITS[m]) for m in METRICS]
    diverged = sum(run.status != "ok" for run in runs)
    return f"| {name} | {' | '.join(cells)} | {diverged}/{len(runs)} |"


def tables(groups, runs_of, init_runs: list[Run], prompts: list[str], seeds: list[int]) -> str:
    header = "| setting | PSNR (dB) | SSIM | IoU | diverged |\n|---|---|---|---|---|"
    note = (
        f"Mean ± std over {len(seeds)} seeds (seeds {', '.join(map(str, seeds))}) of the panel average "
        f"over {len(prompts)} prompts; metrics at the held-out views."
    )
    out = ["### Methods at equal steps", "", note, "", header]
    out.append(setting_row("initialisation (no training)", init_runs))
    out += [setting_row(s.label, runs_of(s)) for s in groups["methods"]]

    out += ["", "Per prompt (PSNR dB / IoU, mean ± std over seeds):", ""]
    out.append("| setting | " + " | ".join(prompts) + " |")
    out.append("|---" * (len(prompts) + 1) + "|")
    for setting in groups["methods"]:
        cells = []
        for prompt in prompts:
            runs = [r for r in runs_of(setting) if r.prompt == prompt]
            psnrs = [r.scores["eval/psnr"] for r in runs]
            ious = [r.scores["eval/iou"] for r in runs]
            cells.append(f"{fmt(psnrs, 2)} / {fmt(ious, 3)}")
        out.append(f"| {setting.label} | " + " | ".join(cells) + " |")

    out += ["", "### ASD: eta sweep (CFG 7.5)", "", note, "", header]
    out += [setting_row(f"η = {s.eta:g}", runs_of(s)) for s in groups["eta"]]
    out += ["", "### CFG sweep", "", note, "", header]
    out += [setting_row(s.label, runs_of(s)) for s in groups["cfg"]]
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------------------
# Plots


def plot_all(out: Path, groups, runs_of, init_runs: list[Run], renders: dict, prompts: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: the study also runs on headless machines
    import matplotlib.pyplot as plt

    def stats(settings, metric):
        pairs = [mean_std(panel_mean_per_seed(runs_of(s), metric)) for s in settings]
        return [p[0] for p in pairs], [p[1] for p in pairs]

    init = {m: mean_std(panel_mean_per_seed(init_runs, m))[0] for m in METRICS}
    titles = {"eval/psnr": "PSNR (dB)", "eval/ssim": "SSIM", "eval/iou": "silhouette IoU"}

    # Methods: one bar per setting.
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    settings = groups["methods"]
    labels = [s.label.replace(" (", "\n(") for s in settings]
    for ax, metric in zip(axes, METRICS, strict=True):
        means, stds = stats(settings, metric)
        ax.bar(range(len(settings)), means, yerr=stds, capsize=3, color="tab:blue")
        ax.axhline(init[metric], color="grey", linestyle="--", label="initialisation")
        ax.set_xticks(range(len(settings)), labels, fontsize=7)
        ax.set_title(titles[metric])
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "study_methods.png", dpi=110)
    plt.close(fig)

    # Eta and CFG: one line per method over the swept value.
    for name, xkey, xlabel, log in (("eta", "eta", "ASD η", False), ("cfg", "cfg_scale", "CFG scale", True)):
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
        by_method: dict[str, list[Setting]] = {}
        for setting in groups[name]:
            by_method.setdefault(setting.method, []).append(setting)
        for ax, metric in zip(axes, METRICS, strict=True):
            for method, settings in by_method.items():
                xs = [getattr(s, xkey) for s in settings]
                means, stds = stats(settings, metric)
                ax.errorbar(xs, means, yerr=stds, marker="o", capsize=3, label=method.upper())
            ax.axhline(init[metric], color="grey", linestyle="--", label="initialisation")
            if log:
                ax.set_xscale("log")
            ax.set_xlabel(xlabel)
            ax.set_title(titles[metric])
        axes[0].legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / f"study_{name}.png", dpi=110)
        plt.close(fig)

    # What the numbers look like: seed-0 renders of each method beside the ground truth.
    if renders:
        rows = [("ground truth", None), *[(s.label, s) for s in groups["methods"]]]
        cols = len(prompts) * len(RENDER_VIEWS)
        fig, axes = plt.subplots(
            len(rows), cols, figsize=(1.6 + 1.0 * cols, 0.3 + 1.0 * len(rows)), squeeze=False
        )
        for r, (label, setting) in enumerate(rows):
            for p, prompt in enumerate(prompts):
                views = renders.get((setting, prompt))
                for v in range(len(RENDER_VIEWS)):
                    ax = axes[r][p * len(RENDER_VIEWS) + v]
                    ax.set_xticks([])
                    ax.set_yticks([])
                    if views is not None:
                        ax.imshow(views[v])
                    if r == 0 and v == 0:
                        ax.set_title(prompt, fontsize=6, loc="left")
                    if p == 0 and v == 0:
                        ax.set_ylabel(label, fontsize=6, rotation=0, ha="right", va="center")
        fig.subplots_adjust(
            left=1.5 / (1.6 + cols), right=0.99, top=0.95, bottom=0.01, wspace=0.04, hspace=0.06
        )
        fig.savefig(out / "study_renders.png", dpi=110)
        plt.close(fig)


# ---------------------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs"))
    parser.add_argument("--config", default="sweeps/configs/reference_cpu.yaml")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--resolution", type=int, default=16)
    parser.add_argument("--prompts", nargs="+", default=benchmark_panel())
    parser.add_argument("--etas", type=float, nargs="+", default=[0.0, 0.1, 0.2, 0.5])
    parser.add_argument("--cfgs", type=float, nargs="+", default=[1.0, 7.5, 20.0, 100.0])
    parser.add_argument("--cfg-methods", nargs="+", default=["asd", "sds"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("overrides", nargs="*", help="extra dotted key=value trainer overrides")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    seeds, prompts = list(range(args.seeds)), list(args.prompts)
    base_config = load_train_config(args.config, base_overrides(args))
    groups = study_groups(args, base_config.guidance.eta)

    prior = load_prior(base_config.prior, "cpu")
    # The reference prior's unconditional distribution grows with every prompt it is asked about; seeing
    # the whole panel first gives every run the same one, whatever order the runs come in.
    prior.encode_text(prompts)

    def key(setting: Setting, prompt: str, seed: int) -> tuple:
        return (setting.method, setting.cfg_scale, setting.eta, prompt, seed, args.steps, args.resolution)

    log_path = args.out / "study_runs.jsonl"
    done = load_runs(log_path)
    settings = list(dict.fromkeys(s for group in groups.values() for s in group))
    total = len(settings) * len(prompts) * len(seeds)
    count, started = 0, time.perf_counter()
    for setting in settings:
        for seed in seeds:
            for prompt in prompts:
                count += 1
                if key(setting, prompt, seed) in done:
                    continue
                # Renders for the figure: seed 0 of the method comparison.
                keep_renders = seed == seeds[0] and setting in groups["methods"]
                run = train_and_score(args, prior, setting, prompt, seed, keep_renders)
                done[run.key] = run
                with log_path.open("a") as log:
                    log.write(json.dumps(asdict(run)) + "\n")
                scores = " ".join(f"{k.removeprefix('eval/')}={v:.3f}" for k, v in run.scores.items())
                print(
                    f"[{count}/{total} {time.perf_counter() - started:6.0f}s] {setting.label:<24} seed {seed} "
                    f"{prompt!r}: {scores} ({run.status}, {run.seconds:.0f}s)",
                    flush=True,
                )

    def runs_of(setting: Setting) -> list[Run]:
        return [done[key(setting, p, s)] for p in prompts for s in seeds]

    init_runs = [
        Run(
            "init",
            0,
            0,
            prompt,
            seed,
            0,
            args.resolution,
            "ok",
            0.0,
            initial_scores(args, prior, prompt, seed),
        )
        for seed in seeds
        for prompt in prompts
    ]
    renders = truth_renders(base_config, prompts, args.resolution)
    for setting in groups["methods"]:
        for prompt in prompts:
            views = done[key(setting, prompt, seeds[0])].renders
            if views is not None:
                renders[(setting, prompt)] = np.asarray(views, dtype=np.uint8)

    overrides = f" with {' '.join(args.overrides)}" if args.overrides else ""
    header = (
        f"Reference benchmark, {args.steps} steps at {args.resolution} px, config {args.config}{overrides}; "
        f"prompts: {', '.join(prompts)}.\n\n"
    )
    text = header + tables(groups, runs_of, init_runs, prompts, seeds)
    (args.out / "study_results.md").write_text(text)
    print(text)
    plot_all(args.out, groups, runs_of, init_runs, renders, prompts)


def truth_renders(config, prompts: list[str], resolution: int) -> dict:
    """{(None, prompt): uint8 ground-truth views at RENDER_VIEWS} for the renders figure."""
    out = {}
    for prompt in prompts:
        _, truth = ground_truth(
            prompt,
            resolution,
            config.logging.eval_views,
            config.camera,
            cache_dir=scene_cache_dir(default_cache_dir(config.prior)),
        )
        out[(None, prompt)] = (truth["rgb"][list(RENDER_VIEWS)] * 255).round().to(torch.uint8).numpy()
    return out


if __name__ == "__main__":
    main()
