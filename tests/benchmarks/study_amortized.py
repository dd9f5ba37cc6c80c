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
report writes `--out/curves.png`, `--out/results.md` and copies each run's last validation grid.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

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


def report(out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines() if line.strip()]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, prefix, title in (
        (axes[0], "eval/psnr", "training prompts"),
        (axes[1], "eval/held_out/psnr", "held-out combinations"),
    ):
        for run in runs:
            steps = [int(s) for s in run["curve"]]
            values = [run["curve"][s].get(prefix) for s in run["curve"]]
            ax.plot(steps, values, marker="o", label=f"{run['method']} ({run['n_prompts']} prompts)")
        ax.set_title(f"PSNR, {title}")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("dB")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=100)
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
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


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
    parser.add_argument("overrides", nargs="*", help="dotted key=value for every run, e.g. resolution=16")
    args = parser.parse_args()
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
        cfg = load_amortized_config(args.config, args.overrides)
        prior = load_prior(cfg.prior, cfg.device)  # one prior for every run (its render banks cached)
        for method, n in plan:
            if run_key(method, n, args.steps) in done:
                continue
            print(f"== {method}, {n} prompts, {args.steps} steps", flush=True)
            record = run_one(args, method, n, prior)
            with open(out / "runs.jsonl", "a") as handle:
                handle.write(json.dumps(record) + "\n")
    report(out)


if __name__ == "__main__":
    main()
