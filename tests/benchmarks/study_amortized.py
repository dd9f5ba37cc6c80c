"""The amortized study on the reference benchmark: one generator per (method, number of prompts).

    python tests/benchmarks/study_amortized.py --out docs/amortized_study            # the study
    python tests/benchmarks/study_amortized.py --out docs/amortized_study --report   # tables + plots only

Every run trains `--config` (default `sweeps/configs/amortized_reference_cpu.yaml`: Hyper-iNGP, the
reference prior, a seeded sample of the library's training split) with only the method and the
number of prompts changed, for the same number of steps (the annealed t range spans the run), and
scores the generator every `--eval-every` steps with ground truth: `eval/*` on the first training
prompts, `eval/held_out/*` on prompts of unseen colour-shape combinations. `supervised` (each render
fitted to its true scene) is the amortized ceiling.

Runs are appended to `--out/runs.jsonl` as they finish (a rerun skips those already there); the
report writes `--out/results.md`, `--out/curves.png` (the methods at the library size most runs
have), `--out/library_size.png` (ASD and VSD against the number of prompts) and
`--out/renders_n<prompts>.png` (each run's last validation grid beside the true scenes), and copies
each run's grid. Overrides (`key=value`) may stand anywhere, after a list option too.

`--jobs N` trains N runs at once, each in its own process with `--threads` torch threads (on a
2-core CPU: `--jobs 2 --threads 1`); every process loads its own prior.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

METRICS = ("psnr", "ssim", "iou")


def run_key(method: str, n_prompts: int, steps: int) -> str:
    return f"{method}-n{n_prompts}-s{steps}"


def run_one(args, method: str, n_prompts: int, prior) -> dict:
    from trainers.amortized.config import load_amortized_config
    from trainers.amortized.loop import train

    out = Path(args.out) / "runs" / run_key(method, n_prompts, args.steps)
    shutil.rmtree(out, ignore_errors=True)
    cfg = load_amortized_config(
        args.config,
        [
            f"guidance.method={method}",
            f"prompts.select={{sample: {n_prompts}, seed: 0}}",
            f"max_steps={args.steps}",
            f"logging.eval_every={args.eval_every}",
            "logging.checkpoint_every=0",
            f"eval_prompts.n_train={args.eval_prompts}",
            f"eval_prompts.n_reference_held_out={args.eval_prompts}",
            f"output_dir={out}",
            *args.overrides,
        ],
    )
    curve: dict[int, dict[str, float]] = {}
    losses: list[tuple[int, float]] = []

    def on_metrics(step: int, metrics: dict[str, float]) -> None:
        if any(k.startswith("eval/") for k in metrics):
            curve.setdefault(step, {}).update({k: v for k, v in metrics.items() if k.startswith("eval/")})
        if "train/loss" in metrics:
            losses.append((step, metrics["train/loss"]))

    started = time.perf_counter()
    result = train(cfg, prior, on_metrics=on_metrics, progress=True)
    return {
        "key": run_key(method, n_prompts, args.steps),
        "method": method,
        "n_prompts": n_prompts,
        "steps": args.steps,
        "seconds": time.perf_counter() - started,
        "final": {k: v for k, v in result.final_metrics.items() if k.startswith("eval/")},
        "curve": {str(step): values for step, values in sorted(curve.items())},
        "loss": losses,
        "validation": str(sorted((out / "validation").glob("*.png"))[-1]),
    }


def append_line(path: Path, line: str) -> None:
    """One write(2) on an O_APPEND file: lines of processes that finish together do not interleave."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def load_runs(out: Path) -> list[dict]:
    runs = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines() if line.strip()]
    return sorted(runs, key=lambda run: (run["n_prompts"], ORDER.index(run["method"])))


ORDER = ("asd", "csd", "vsd", "sds", "supervised")


COLOURS = {"asd": "C0", "csd": "C1", "vsd": "C3", "sds": "C2", "supervised": "k"}


def plot_curves(ax, runs: list[dict], key: str, label, style=lambda run: "-") -> None:
    for run in runs:
        steps = [int(s) for s in run["curve"]]
        values = [run["curve"][s].get(key, float("nan")) for s in run["curve"]]
        colour = COLOURS.get(run["method"])
        ax.plot(steps, values, style(run), color=colour, marker="o", markersize=3, label=label(run))
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)


def truth_grid(run: dict) -> np.ndarray | None:
    """The true scenes of a run's validation grid: same prompts (rows) and cameras (columns)."""
    import torch

    from trainers.amortized.config import load_amortized_config
    from trainers.cameras import orbit_cameras
    from trainers.reference.supervised import ground_truth_target
    from trainers.visualize import image_grid

    grid = Path(run["validation"])
    names = grid.with_suffix(".txt")
    if not names.exists():
        return None
    cfg = load_amortized_config(grid.parent.parent / "config.yaml")
    cam, views = cfg.camera, cfg.logging.val_views
    azimuth = torch.linspace(-180.0, 180.0, views + 1)[:-1]
    cameras = orbit_cameras(cam.eval_elevation, azimuth, cam.eval_distance, cam.eval_fovy)
    rows = [
        ground_truth_target(prompt, cfg.resolution, cfg.prior.reference.scene)(cameras).permute(0, 2, 3, 1)
        for prompt in names.read_text().splitlines()
    ]
    return np.asarray(image_grid(rows))


def report(out: Path) -> None:
    import imageio.v3 as iio
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = load_runs(out)
    sizes = sorted({run["n_prompts"] for run in runs})
    main_size = max(sizes, key=lambda n: sum(run["n_prompts"] == n for run in runs))
    main = [run for run in runs if run["n_prompts"] == main_size]

    # Curves of every method at the main library size.
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    for ax, key, title in (
        (axes[0], "eval/psnr", "PSNR (dB), training prompts"),
        (axes[1], "eval/held_out/psnr", "PSNR (dB), held-out combinations"),
        (axes[2], "eval/iou", "IoU, training prompts"),
        (axes[3], "eval/held_out/iou", "IoU, held-out combinations"),
    ):
        plot_curves(ax, main, key, lambda run: run["method"])
        ax.set_title(title, fontsize=10)
    axes[3].legend(fontsize=8)
    fig.suptitle(f"Amortized, {main_size} training prompts, equal steps", fontsize=11)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=100)
    plt.close(fig)

    # ASD and VSD against the number of prompts.
    scaled = [run for run in runs if run["method"] in ("asd", "vsd")]
    sorted_sizes = sorted({run["n_prompts"] for run in scaled})  # dotted, dashed, solid
    if len({run["n_prompts"] for run in scaled}) > 1:
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
        for ax, key, title in (
            (axes[0], "eval/psnr", "PSNR (dB), training prompts"),
            (axes[1], "eval/held_out/psnr", "PSNR (dB), held-out combinations"),
        ):
            plot_curves(
                ax,
                scaled,
                key,
                lambda run: f"{run['method']}, {run['n_prompts']} prompts",
                lambda run: (":", "--", "-")[min(sorted_sizes.index(run["n_prompts"]), 2)],
            )
            ax.set_title(title, fontsize=10)
        axes[1].legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "library_size.png", dpi=100)
        plt.close(fig)

    lines = [
        "| method | prompts | steps | PSNR train | PSNR held-out | SSIM train | SSIM held-out | IoU train | IoU held-out | s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for run in runs:
        f = run["final"]

        def cell(key: str, final=f) -> str:
            return f"{final[key]:.3f}" if key in final else "–"

        cells = [cell(f"eval/{m}") + " | " + cell(f"eval/held_out/{m}") for m in METRICS]
        lines.append(
            f"| {run['method']} | {run['n_prompts']} | {run['steps']} | "
            + " | ".join(cells)
            + f" | {run['seconds']:.0f} |"
        )
        grid = Path(run["validation"])
        if grid.exists():
            shutil.copyfile(grid, out / f"grid_{run['key']}.png")
    # One evaluation is noisy (a few hundred steps in, the fields still move by ~1 dB between
    # evaluations): the mean of the last three evaluations beside it.
    lines += [
        "",
        "Mean of the last 3 evaluations (steps " + ", ".join(list(runs[0]["curve"])[-3:]) + "):",
        "",
        "| method | prompts | PSNR train | PSNR held-out | IoU train | IoU held-out |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for run in runs:
        last = list(run["curve"].values())[-3:]
        cells = [
            f"{np.mean([point[key] for point in last if key in point]):.3f}"
            for key in ("eval/psnr", "eval/held_out/psnr", "eval/iou", "eval/held_out/iou")
        ]
        lines.append(f"| {run['method']} | {run['n_prompts']} | " + " | ".join(cells) + " |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    # Per library size: every run's last validation grid (training prompts' rows, then held-out
    # ones) beside the true scenes of the same prompts and cameras.
    for size in sizes:
        group = [run for run in runs if run["n_prompts"] == size and Path(run["validation"]).exists()]
        if not group:
            continue
        panels = [(run["method"], iio.imread(run["validation"])) for run in group]
        truth = truth_grid(group[0])
        if truth is not None:
            panels.insert(0, ("true scenes", truth))
        fig, axes = plt.subplots(1, len(panels), figsize=(1.9 * len(panels), 5.2), squeeze=False)
        for ax, (title, image) in zip(axes[0], panels, strict=True):
            ax.imshow(image, interpolation="nearest")
            ax.set_title(title, fontsize=9)
            ax.axis("off")
        fig.suptitle(
            f"{size} training prompts: rows 1-{len(group) and run_rows(group[0])[0]} trained, "
            "the rest held-out combinations",
            fontsize=9,
        )
        fig.tight_layout()
        fig.savefig(out / f"renders_n{size}.png", dpi=110)
        plt.close(fig)


def run_rows(run: dict) -> tuple[int, int]:
    """(training rows, held-out rows) of a run's validation grid."""
    from trainers.reference.scenes import prompt_split

    names = Path(run["validation"]).with_suffix(".txt").read_text().splitlines()
    held_out = set(prompt_split().test)
    return sum(n not in held_out for n in names), sum(n in held_out for n in names)


def run_in_processes(args, plan: list[tuple[str, int]]) -> None:
    """Each run in a process of its own, `args.jobs` at a time; each appends its line to runs.jsonl."""
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    pending, running, failed = list(plan), [], []
    while pending or running:
        while pending and len(running) < args.jobs:
            method, n = pending.pop(0)
            command = [
                sys.executable,
                __file__,
                f"--config={args.config}",
                f"--out={args.out}",
                f"--steps={args.steps}",
                f"--eval-every={args.eval_every}",
                f"--eval-prompts={args.eval_prompts}",
                f"--threads={args.threads}",
                "--methods",
                method,
                "--prompts",
                str(n),
                "--vsd-prompts",
                "--no-report",
                *args.overrides,
            ]
            log = open(Path(args.out) / f"log_{run_key(method, n, args.steps)}.txt", "w")
            running.append(((method, n), subprocess.Popen(command, env=env, stdout=log, stderr=log)))
        time.sleep(1.0)
        for item in list(running):
            if item[1].poll() is not None:
                running.remove(item)
                if item[1].returncode:
                    failed.append(item[0])
    if failed:
        raise SystemExit(f"runs failed: {failed}; see {args.out}/log_*.txt")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(ROOT / "sweeps/configs/amortized_reference_cpu.yaml"))
    parser.add_argument("--out", default="docs/amortized_study")
    parser.add_argument("--methods", nargs="+", default=["asd", "csd", "sds", "vsd", "supervised"])
    parser.add_argument("--prompts", nargs="+", type=int, default=[200], help="library sizes")
    parser.add_argument(
        "--vsd-prompts", nargs="*", type=int, default=[20, 200], help="VSD and ASD also at these"
    )
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--eval-prompts", type=int, default=4, help="training and held-out prompts scored")
    parser.add_argument("--report", action="store_true", help="only the tables and plots")
    parser.add_argument("--no-report", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--jobs", type=int, default=1, help="runs trained at once, each in a process")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per process (0: torch's)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value for every run, e.g. resolution=16")
    # A `key=value` word is an override wherever it stands: the list options would otherwise take it.
    words = sys.argv[1:]
    overrides = [w for w in words if "=" in w and not w.startswith("-")]
    args = parser.parse_args([w for w in words if w not in overrides])
    args.overrides = overrides
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.report:
        from trainers.amortized.config import load_amortized_config
        from trainers.priors import load_prior

        plan = [(m, n) for n in args.prompts for m in args.methods]
        plan += [(m, n) for n in args.vsd_prompts for m in ("asd", "vsd") if (m, n) not in plan]
        done = set()
        if (out / "runs.jsonl").exists():
            done = {json.loads(line)["key"] for line in (out / "runs.jsonl").read_text().splitlines() if line}
        plan = [(m, n) for m, n in plan if run_key(m, n, args.steps) not in done]
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        if args.jobs > 1:
            run_in_processes(args, plan)
        elif plan:
            cfg = load_amortized_config(args.config, args.overrides)
            prior = load_prior(cfg.prior, cfg.device)  # one prior for every run (its render banks cached)
            for method, n in plan:
                print(f"== {method}, {n} prompts, {args.steps} steps", flush=True)
                record = run_one(args, method, n, prior)
                append_line(out / "runs.jsonl", json.dumps(record))
    if not args.no_report:
        report(out)


if __name__ == "__main__":
    main()
