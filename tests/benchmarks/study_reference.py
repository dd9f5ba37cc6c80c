"""The reference-benchmark study: ground-truth curves over training steps for the guidance methods.

    python tests/benchmarks/study_reference.py --group long --out docs/study
    python tests/benchmarks/study_reference.py --group quickstart --out docs/study
    python tests/benchmarks/study_reference.py --group methods --out docs/study
    python tests/benchmarks/study_reference.py --group asd-knobs --out docs/study
    python tests/benchmarks/study_reference.py --report --out docs/study      # tables + plots only
    python tests/benchmarks/study_reference.py --group long --lengths 150,600 \
        --config sweeps/configs/reference_learned_cpu.yaml --out docs/study_learned   # the learned prior

Each run trains one scene prompt with `--config` (default `sweeps/configs/reference_cpu.yaml`) and only
the studied knobs changed, for `max_steps` steps (the annealed t range spans the run), and scores the
model at the held-out views (`eval/psnr`, `eval/ssim`, `eval/iou`) at each of its milestones, step 0
(the untrained model) included. `supervised` is the ceiling: the same geometry, renderer and steps fit
to the true renders.

Groups (each a list of settings × prompts × seeds × run lengths; see GROUPS):
- long: ASD at the paper's setting on 3 prompts outside the quickstart panel, runs of 150, 600 and
  2,000 steps, 2 seeds: does it get worse with training?
- quickstart: the quickstart panel and config; the best setting, bad ones (CFG 1, η 1) and the ceiling,
  3 seeds: does the objective tell settings apart?
- methods: ASD, SDS, CSD, VSD at CFG 7.5, ASD and SDS at CFG 1, ASD at η 1, and the ceiling, on 2
  composite prompts, curves over 2,000 steps (scored at 150, 300, 600, 1,000, 2,000), 3 seeds.
- asd-knobs: the rest of ASD's η and CFG axes on the methods panel, as the methods group runs them:
  η 0 at CFG 7.5, and CFG 3 and 15 at η 0.1 (the methods group has η 0.1 and 1, and CFG 1 and 7.5).
  With it, the report adds a table and `asd_axes.png`: ASD's PSNR against η and against CFG, the two
  groups' ASD runs pooled.

Runs go to `--out/runs.jsonl` as they finish (a rerun skips the runs already there, so an interrupted
study resumes); `--workers` processes share the work, each with one prior loaded once.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from trainers.config import load_train_config
from trainers.per_prompt import NonFiniteLossError, Trainer
from trainers.priors import load_prior

METRICS = ("eval/psnr", "eval/ssim", "eval/iou")
GROUPS = ("long", "quickstart", "methods", "asd-knobs")
QUICKSTART_PANEL = ["a red cube", "a green torus"]
OUTSIDE_PANEL = [
    "a yellow cylinder on top of a pink cube",
    "a cyan capsule beside an orange sphere",
    "a blue cone",
]
METHODS_PANEL = [
    "a green torus beside a purple cone",
    "a blue sphere on top of an orange cylinder",
]


@dataclass(frozen=True)
class Setting:
    method: str
    cfg_scale: float = 7.5
    eta: float = 0.1

    @property
    def label(self) -> str:
        if self.method == "supervised":
            return "supervised (ceiling)"
        eta = f", η {self.eta:g}" if self.method == "asd" else ""
        return f"{self.method.upper()} (CFG {self.cfg_scale:g}{eta})"


@dataclass(frozen=True)
class Task:
    group: str
    setting: Setting
    prompt: str
    seed: int
    max_steps: int
    milestones: tuple[int, ...]
    overrides: tuple[tuple[str, str], ...] = ()

    @property
    def key(self) -> str:
        s = self.setting
        return f"{self.group}|{s.method}|{s.cfg_scale:g}|{s.eta:g}|{self.prompt}|{self.seed}|{self.max_steps}"


@dataclass
class Result:
    key: str
    group: str
    setting: dict
    prompt: str
    seed: int
    max_steps: int
    status: str
    seconds: float
    curve: dict[str, dict[str, float]] = field(default_factory=dict)  # step -> metric -> value
    renders: list | None = None  # uint8 [2 views, H, W, 3] of the final model


ASD = Setting("asd")
SUPERVISED = Setting("supervised")


def methods_protocol(group: str, settings: list[Setting], seeds: int | None) -> list[Task]:
    """The methods panel's protocol, shared by the groups whose runs the report pools: one 2,000-step
    run per setting, prompt and seed, scored along the way."""
    return [
        Task(group, s, prompt, seed, 2000, (150, 300, 600, 1000, 2000))
        for s in settings
        for prompt in METHODS_PANEL
        for seed in range(seeds or 3)
    ]


def group_tasks(group: str, seeds: int | None) -> list[Task]:
    if group == "long":
        return [
            Task(group, ASD, prompt, seed, steps, (150, 600, 1000, 2000) if steps == 2000 else (steps,))
            for prompt in OUTSIDE_PANEL
            for seed in range(seeds or 2)
            for steps in (150, 600, 2000)
        ]
    if group == "quickstart":
        settings = [ASD, Setting("asd", 1.0, 0.1), Setting("asd", 7.5, 1.0), SUPERVISED]
        return [
            Task(group, s, prompt, seed, 100, (50, 100))
            for s in settings
            for prompt in QUICKSTART_PANEL
            for seed in range(seeds or 3)
        ]
    if group == "methods":
        # The paper's CFG 7.5 for every method, plus CFG 1 (the best ASD setting on this benchmark) for
        # ASD and SDS, and η 1 for ASD. One 2,000-step run per cell, scored along the way.
        settings = [ASD, Setting("sds"), Setting("csd"), Setting("vsd"), SUPERVISED]
        settings += [Setting("asd", 1.0), Setting("sds", 1.0), Setting("asd", 7.5, 1.0)]
        return methods_protocol(group, settings, seeds)
    if group == "asd-knobs":
        settings = [Setting("asd", 7.5, 0.0), Setting("asd", 3.0), Setting("asd", 15.0)]
        return methods_protocol(group, settings, seeds)
    raise SystemExit(f"unknown group {group!r}: one of {', '.join(GROUPS)}")


# ---------------------------------------------------------------------------------------------------
# Running (one prior per worker process)

_PRIOR = None
_ARGS: argparse.Namespace | None = None


def _init_worker(args: argparse.Namespace) -> None:
    global _PRIOR, _ARGS
    torch.set_num_threads(1)
    _ARGS = args
    _PRIOR = load_prior(load_train_config(args.config, base_overrides(args)).prior, "cpu")


def base_overrides(args: argparse.Namespace) -> dict:
    return {"device": "cpu", **dict(item.split("=", 1) for item in args.overrides)}


def run_task(task: Task) -> Result:
    args = _ARGS
    s = task.setting
    overrides = {
        **base_overrides(args),
        "prompt": task.prompt,
        "seed": task.seed,
        "max_steps": task.max_steps,
        "guidance.method": s.method,
        "guidance.cfg_scale": s.cfg_scale,
        "guidance.eta": s.eta,
        **dict(task.overrides),
    }
    config = load_train_config(args.config, overrides)
    start = time.perf_counter()
    trainer = Trainer(config, _PRIOR)
    status, curve, renders = "ok", {}, None
    try:
        curve["0"] = pick(trainer.evaluate())
        for milestone in task.milestones:
            while trainer.step < milestone:
                trainer.training_step()
            curve[str(milestone)] = pick(trainer.evaluate())
        renders = final_renders(trainer)
    except NonFiniteLossError as error:
        status = f"diverged at step {error.step}"
    finally:
        trainer.close()
    return Result(
        task.key, task.group, asdict(s), task.prompt, task.seed, task.max_steps, status,
        time.perf_counter() - start, curve, renders,
    )  # fmt: skip


def pick(scores: dict[str, float]) -> dict[str, float]:
    return {name: float(scores[name]) for name in METRICS}


@torch.no_grad()
def final_renders(trainer: Trainer) -> list:
    from trainers.reference.scenes import evaluation_cameras

    cameras = evaluation_cameras(trainer.config.logging.eval_views, trainer.config.camera)
    out = trainer.render_views(cameras)
    rgb = (out["rgb_fg"] + (1 - out["opacity"])).clamp(0, 1)  # onto the scenes' white background
    return (rgb[[0, 3]].cpu() * 255).round().to(torch.uint8).tolist()


def load_results(path: Path) -> dict[str, Result]:
    if not path.exists():
        return {}
    rows = [Result(**json.loads(line)) for line in path.read_text().splitlines() if line.strip()]
    return {row.key: row for row in rows}


def run_group(args: argparse.Namespace, group: str) -> None:
    path = args.out / "runs.jsonl"
    done = load_results(path)
    todo = [task for task in group_tasks(group, args.seeds) if task.key not in done]
    if args.only_seed is not None:
        todo = [task for task in todo if task.seed == args.only_seed]
    if args.lengths:
        todo = [task for task in todo if task.max_steps in args.lengths]
    print(f"{group}: {len(todo)} runs to do ({len(done)} recorded in {path})", flush=True)
    if not todo:
        return
    # Longest first, so that the workers finish together; then seed by seed, so that a study stopped
    # early has every setting at the same seeds.
    todo.sort(key=lambda task: (-task.max_steps, task.seed))
    if args.reverse:
        todo.reverse()
    started = time.perf_counter()
    context = multiprocessing.get_context("spawn")
    with context.Pool(args.workers, initializer=_init_worker, initargs=(args,)) as pool:
        for index, result in enumerate(pool.imap_unordered(run_task, todo), start=1):
            with path.open("a") as file:
                file.write(json.dumps(asdict(result)) + "\n")
            elapsed = time.perf_counter() - started
            eta = elapsed / index * (len(todo) - index)
            final = result.curve.get(str(result.max_steps), {}).get("eval/psnr", math.nan)
            print(
                f"[{index}/{len(todo)}] {result.key}: {result.status}, PSNR {final:.2f} dB, "
                f"{result.seconds:.0f} s; elapsed {elapsed / 60:.1f} min, ETA {eta / 60:.1f} min",
                flush=True,
            )


# ---------------------------------------------------------------------------------------------------
# Reporting


def mean_std(values: list[float]) -> tuple[float, float]:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return math.nan, math.nan
    return statistics.fmean(finite), statistics.stdev(finite) if len(finite) > 1 else 0.0


def panel_means(rows: list[Result], step: str, metric: str = "eval/psnr") -> list[float]:
    """Per seed, the metric at `step` averaged over the prompts (NaN where a run diverged)."""
    by_seed: dict[int, list[float]] = {}
    for row in rows:
        by_seed.setdefault(row.seed, []).append(row.curve.get(step, {}).get(metric, math.nan))
    return [
        statistics.fmean(v) if all(map(math.isfinite, v)) else math.nan for _, v in sorted(by_seed.items())
    ]


def fmt(values: list[float]) -> str:
    mean, std = mean_std(values)
    return "—" if math.isnan(mean) else f"{mean:.2f} ± {std:.2f}"


def report(args: argparse.Namespace) -> str:
    results = list(load_results(args.out / "runs.jsonl").values())
    lines: list[str] = []
    for group in GROUPS:
        rows = [r for r in results if r.group == group]
        if rows:
            lines += report_group(group, rows)
    lines += report_asd_axes(results)
    text = "\n".join(lines)
    (args.out / "results.md").write_text(text + "\n")
    plot(args.out, results)
    plot_asd_axes(args.out, results)
    return text


def settings_of(rows: list[Result]) -> list[Setting]:
    return list(dict.fromkeys(Setting(**row.setting) for row in rows))


def report_group(group: str, rows: list[Result]) -> list[str]:
    lines = [f"### {group}", ""]
    by_length = sorted({row.max_steps for row in rows})
    for setting in settings_of(rows):
        for length in by_length:
            runs = [r for r in rows if Setting(**r.setting) == setting and r.max_steps == length]
            if not runs:
                continue
            steps = sorted({int(s) for r in runs for s in r.curve}, key=int)
            cells = [f"step {s}: {fmt(panel_means(runs, str(s)))}" for s in steps]
            diverged = sum(r.status != "ok" for r in runs)
            lines.append(
                f"- {setting.label}, {length}-step runs ({len(runs)} runs, {diverged} diverged): "
                + "; ".join(cells)
            )
    lines += [
        "",
        "PSNR (dB), mean ± std over seeds of the panel mean. Per prompt at the end of each run:",
        "",
    ]
    prompts = list(dict.fromkeys(r.prompt for r in rows))
    lines.append("| setting | steps | " + " | ".join(prompts) + " |")
    lines.append("|---|---|" + "---|" * len(prompts))
    for setting in settings_of(rows):
        for length in by_length:
            runs = [r for r in rows if Setting(**r.setting) == setting and r.max_steps == length]
            if runs:
                cells = [
                    fmt(
                        [
                            r.curve.get(str(length), {}).get("eval/psnr", math.nan)
                            for r in runs
                            if r.prompt == p
                        ]
                    )
                    for p in prompts
                ]
                lines.append(f"| {setting.label} | {length} | " + " | ".join(cells) + " |")
    return lines + [""]


# ASD's two knobs, η at CFG 7.5 and CFG at η 0.1, from the methods and asd-knobs groups together: the
# two run the same 2,000-step protocol on the same panel, so their ASD cells form one grid.
ETA_AXIS = [Setting("asd", 7.5, eta) for eta in (0.0, 0.1, 1.0)]
CFG_AXIS = [Setting("asd", cfg, 0.1) for cfg in (1.0, 3.0, 7.5, 15.0)]
AXIS_STEPS = ("150", "600", "2000")


def axis_runs(results: list[Result], setting: Setting) -> list[Result]:
    return [
        r for r in results
        if r.group in ("methods", "asd-knobs") and r.max_steps == 2000 and Setting(**r.setting) == setting
    ]  # fmt: skip


def report_asd_axes(results: list[Result]) -> list[str]:
    if not any(r.group == "asd-knobs" for r in results):
        return []
    lines = [
        "### ASD's η and CFG (methods and asd-knobs together)",
        "",
        "| setting | seeds | " + " | ".join(f"step {s}" for s in AXIS_STEPS) + " |",
        "|---|---|" + "---|" * len(AXIS_STEPS),
    ]
    for axis, settings in (("η", ETA_AXIS), ("CFG", CFG_AXIS)):  # CFG 7.5, η 0.1 is on both axes
        for setting in settings:
            runs = axis_runs(results, setting)
            if runs:
                seeds = len({r.seed for r in runs})
                cells = [fmt(panel_means(runs, step)) for step in AXIS_STEPS]
                lines.append(f"| {axis}: {setting.label} | {seeds} | " + " | ".join(cells) + " |")
    return lines + ["", "PSNR (dB), mean ± std over seeds of the panel mean.", ""]


def plot_asd_axes(out: Path, results: list[Result]) -> None:
    """`asd_axes.png`: panel-mean PSNR against η (CFG 7.5) and against CFG (η 0.1), one line per step,
    with SDS at the same CFGs as crosses."""
    if not any(r.group == "asd-knobs" for r in results):
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.2), sharey=True)
    # η 0, 0.1 and 1 evenly spaced (a log axis has no 0); CFG on a log axis.
    for axis, settings, ax, x_of in (
        ("η", ETA_AXIS, left, ETA_AXIS.index),
        ("CFG", CFG_AXIS, right, lambda s: s.cfg_scale),
    ):
        for step in AXIS_STEPS:
            points = [(x_of(s), mean_std(panel_means(axis_runs(results, s), step))) for s in settings]
            points = [(x, m, sd) for x, (m, sd) in points if math.isfinite(m)]
            if points:
                xs, means, stds = zip(*points, strict=True)
                ax.errorbar(xs, means, yerr=stds, marker="o", capsize=3, label=f"ASD, step {step}")
        sds = [Setting("sds", 7.5)] if axis == "η" else [Setting("sds", 1.0), Setting("sds", 7.5)]
        for s in sds:
            runs = [r for r in results if r.group == "methods" and Setting(**r.setting) == s]
            mean, _ = mean_std(panel_means(runs, "2000"))
            if math.isfinite(mean):
                if axis == "η":
                    ax.axhline(mean, color="black", linestyle="--", label="SDS CFG 7.5, step 2000")
                else:
                    label = "SDS, step 2000" if s.cfg_scale == 1.0 else None
                    ax.plot([s.cfg_scale], [mean], "kx", markersize=9, label=label)
        if axis == "η":
            ax.set_xticks(range(len(settings)), [f"{s.eta:g}" for s in settings])
            ax.set_xlabel("η (CFG 7.5)")
            ax.set_ylabel("PSNR at held-out views (dB)")
        else:
            ax.set_xscale("log")
            ax.set_xticks([s.cfg_scale for s in settings], [f"{s.cfg_scale:g}" for s in settings])
            ax.set_xlabel("CFG scale (η 0.1)")
        ax.legend(fontsize=7)
    fig.suptitle("ASD's knobs on the methods panel (mean ± std over seeds)")
    fig.tight_layout()
    fig.savefig(out / "asd_axes.png", dpi=110)
    plt.close(fig)


def plot(out: Path, results: list[Result]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for group in GROUPS:
        rows = [r for r in results if r.group == group]
        if not rows:
            continue
        fig, ax = plt.subplots(figsize=(7, 4.5))
        longest = max(r.max_steps for r in rows)
        for setting in settings_of(rows):
            runs = [r for r in rows if Setting(**r.setting) == setting and r.max_steps == longest]
            steps = sorted({int(s) for r in runs for s in r.curve})
            stats = [mean_std(panel_means(runs, str(s))) for s in steps]
            style = {"linestyle": "--", "color": "black"} if setting.method == "supervised" else {}
            ax.errorbar(steps, [m for m, _ in stats], yerr=[s for _, s in stats], label=setting.label,
                        capsize=3, marker="o", **style)  # fmt: skip
        if group == "long":  # the separate, shorter runs' end points
            for length in sorted({r.max_steps for r in rows} - {longest}):
                runs = [r for r in rows if r.max_steps == length]
                mean, std = mean_std(panel_means(runs, str(length)))
                ax.errorbar([length], [mean], yerr=[std], marker="s", color="tab:red", capsize=3,
                            label=f"ASD, separate {length}-step run")  # fmt: skip
        ax.axhline(
            mean_std(panel_means(rows, "0"))[0], color="grey", linestyle=":", label="untrained (step 0)"
        )
        ax.set_xlabel("training step")
        ax.set_ylabel("PSNR at held-out views (dB)")
        ax.set_title(f"reference benchmark: {group}")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / f"curves_{group}.png", dpi=110)
        plt.close(fig)
        render_grid(out / f"renders_{group}.png", rows, longest)


def render_grid(path: Path, rows: list[Result], length: int) -> None:
    """Seed 0's final renders (two held-out views) per setting (rows) and prompt (columns)."""
    prompts = list(dict.fromkeys(r.prompt for r in rows))
    settings = settings_of(rows)
    tiles = []
    for setting in settings:
        line = []
        for prompt in prompts:
            run = next(
                (r for r in rows if Setting(**r.setting) == setting and r.prompt == prompt and r.seed == 0
                 and r.max_steps == length and r.renders), None,
            )  # fmt: skip
            views = np.asarray(run.renders, dtype=np.uint8) if run else None
            line.append(np.concatenate(list(views), axis=1) if views is not None else None)
        tiles.append(line)
    shape = next(t.shape for line in tiles for t in line if t is not None)
    blank = np.full(shape, 255, dtype=np.uint8)
    image = np.concatenate(
        [np.concatenate([t if t is not None else blank for t in line], 1) for line in tiles], 0
    )
    scale = max(1, 256 // shape[0])
    image = image.repeat(scale, 0).repeat(scale, 1)
    import imageio.v3 as iio

    iio.imwrite(path, image)
    (path.with_suffix(".txt")).write_text(
        "rows: " + "; ".join(s.label for s in settings) + "\ncolumns: " + "; ".join(prompts) + "\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--group", action="append", choices=GROUPS, default=[])
    parser.add_argument("--config", default="sweeps/configs/reference_cpu.yaml")
    parser.add_argument("--out", type=Path, default=Path("docs/study"))
    parser.add_argument("--seeds", type=int, default=None, help="override the group's number of seeds")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--only-seed",
        type=int,
        default=None,
        help="run only this seed's runs (to split a study across processes)",
    )
    parser.add_argument(
        "--reverse",
        action="store_true",
        help="take the runs in reverse order (a second process on the same seed)",
    )
    parser.add_argument(
        "--lengths",
        type=lambda text: [int(v) for v in text.split(",")],
        default=None,
        help="run only the runs of these lengths, e.g. 150,600 (a reduced study)",
    )
    parser.add_argument("--report", action="store_true", help="only write the tables and plots")
    parser.add_argument("overrides", nargs="*", help="dotted key=value trainer overrides for every run")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.report:
        for group in args.group:
            run_group(args, group)
    print(report(args))


if __name__ == "__main__":
    main()
