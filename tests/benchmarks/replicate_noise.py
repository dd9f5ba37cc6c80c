"""How many seeds a sweep's trials need: the best-vs-worst gap over the noise of a ranking, by replicates.

    dreamsweep submit sweeps/quickstart.yaml --name qs-r3 --workspace WS   # with replicates: 3, pack: 3
    python tests/benchmarks/replicate_noise.py qs-r3 --workspace WS

Reads each replicate's finished objectives from a packed sweep's files
(`<storage.tune>/<sweep>/packed/trial_NNNN/replicate_R/panel.json`) and prints, per trial, every seed's
objective (the panel mean) and their mean ± s.e.; then the seeds' means, the config × seed residual of a
two-way fit (what a ranking must beat: every trial trains replicate r with the same seed, so a seed's
shared effect cancels between trials), and, for the first R = 1, 2, ... replicates, the best-vs-worst
gap over the standard error of a difference between two trials, residual × √(2/R).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path


def replicate_objectives(trials_root: Path) -> dict[int, list[float]]:
    """trial number -> each replicate's objective (the mean over its panel), in replicate order."""
    found: dict[int, dict[int, float]] = {}
    for panel in trials_root.glob("trial_*/replicate_*/panel.json"):
        trial = int(panel.parent.parent.name.split("_")[1])
        replicate = int(panel.parent.name.split("_")[1])
        finals = json.loads(panel.read_text())["finals"]
        if finals:
            found.setdefault(trial, {})[replicate] = statistics.fmean(finals)
    width = max((len(r) for r in found.values()), default=0)
    return {t: [r[i] for i in sorted(r)] for t, r in sorted(found.items()) if len(r) == width}


def residual_std(table: dict[int, list[float]]) -> float:
    """The config × seed residual's standard deviation after removing each trial's and each seed's mean."""
    seeds = len(next(iter(table.values())))
    grand = statistics.fmean(v for row in table.values() for v in row)
    trial_mean = {t: statistics.fmean(row) for t, row in table.items()}
    seed_mean = [statistics.fmean(row[s] for row in table.values()) for s in range(seeds)]
    squares = sum(
        (row[s] - trial_mean[t] - seed_mean[s] + grand) ** 2 for t, row in table.items() for s in range(seeds)
    )
    return math.sqrt(squares / ((len(table) - 1) * (seeds - 1)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("sweep")
    parser.add_argument("--workspace", required=True)
    parser.add_argument("--mode", choices=("max", "min"), default="max")
    args = parser.parse_args()

    from orchestrator.run.sweep import packed_trials_root
    from orchestrator.run.workspace import Workspace

    record = Workspace(args.workspace).record(args.sweep)
    table = replicate_objectives(Path(packed_trials_root(record.stores.tune_path, args.sweep)))
    if len(table) < 2 or len(next(iter(table.values()))) < 2:
        raise SystemExit(f"sweep {args.sweep!r} needs 2 or more finished trials of 2 or more replicates")
    seeds = len(next(iter(table.values())))
    for trial, row in table.items():
        sem = statistics.stdev(row) / math.sqrt(seeds)
        values = "  ".join(f"{v:.3f}" for v in row)
        print(f"trial {trial}: {values}   mean {statistics.fmean(row):.3f} ± {sem:.3f}")
    seed_means = [statistics.fmean(row[s] for row in table.values()) for s in range(seeds)]
    print("seeds' means:", "  ".join(f"{m:.3f}" for m in seed_means))
    sigma = residual_std(table)
    print(f"config x seed residual: {sigma:.3f}")
    better = max if args.mode == "max" else min
    worse = min if args.mode == "max" else max
    for r in range(1, seeds + 1):
        means = {t: statistics.fmean(row[:r]) for t, row in table.items()}
        best, worst = better(means, key=means.get), worse(means, key=means.get)
        gap = abs(means[best] - means[worst])
        se = sigma * math.sqrt(2 / r)
        print(
            f"replicates {r}: best trial {best} vs worst {worst}: gap {gap:.3f}, "
            f"s.e. of a difference {se:.3f}, ratio {gap / se:.1f}"
        )


if __name__ == "__main__":
    main()
