"""Does an amortized sweep's objective tell settings apart? Its best and worst trials' configs, each
retrained with several seeds: the gap between their means against the seed noise of each.

    python tests/benchmarks/amortized_spread.py amortized-quickstart --workspace WS --seeds 3 --jobs 2

The sweep must have finished trials. Each run is the trial's full config (as `dreamsweep best` writes
it; `data_parallel.num_workers=1`, one process, no Ray) with only `seed` changed; seed 0 is the seed the
trial itself trained with. Runs go to `--out/runs.jsonl` as they finish (a rerun skips those there);
the table goes to stdout and `--out/spread.md`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def run_one(task: dict) -> dict:
    import torch

    from trainers.amortized.config import AmortizedConfig
    from trainers.amortized.loop import train

    torch.set_num_threads(task["threads"])
    config = AmortizedConfig.model_validate(task["config"]).model_copy(update={"seed": task["seed"]})
    started = time.perf_counter()
    result = train(config, progress=False)
    return {
        **{k: task[k] for k in ("role", "trial", "seed", "params")},
        "objective": float(result.final_metrics[task["metric"]]),
        "eval/psnr": float(result.final_metrics.get("eval/psnr", float("nan"))),
        "seconds": round(time.perf_counter() - started, 1),
    }


def main() -> None:
    from orchestrator.run.workspace import Workspace
    from orchestrator.track.report import compare, finished_rows, trial_config
    from trainers.config import config_to_dict

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("sweep")
    parser.add_argument("--workspace", default=None)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=1, help="runs at once, one process each")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--out", default="amortized_spread")
    parser.add_argument(
        "--untrained", action="store_true", help="also the best config stopped after 1 step: the floor"
    )
    args = parser.parse_args()

    workspace = Workspace(args.workspace)
    metric = workspace.spec(args.sweep).objective.metric
    rows = finished_rows(compare(args.sweep, workspace))
    if len(rows) < 2:
        raise SystemExit(
            f"{args.sweep}: {len(rows)} finished trial(s); the spread needs the best and the worst"
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    done_file = out / "runs.jsonl"
    done = [json.loads(line) for line in done_file.read_text().splitlines()] if done_file.exists() else []
    tasks = []
    roles = [("best", rows[0]), ("worst", rows[-1])] + [("1 step", rows[0])] * args.untrained
    for role, row in roles:
        for seed in range(args.seeds):
            if any(d["role"] == role and d["trial"] == row["trial"] and d["seed"] == seed for d in done):
                continue
            run_dir = out / "runs" / f"{role.replace(' ', '')}-trial{row['trial']}-seed{seed}"
            config = trial_config(args.sweep, workspace, row, output_dir=str(run_dir))
            config = config.model_copy(
                update={"data_parallel": config.data_parallel.model_copy(update={"num_workers": 1})}
            )
            if role == "1 step":  # the same config stopped after its first step: the untrained generator
                config = config.model_copy(update={"max_steps": 1})
            tasks.append(
                {
                    "role": role,
                    "trial": row["trial"],
                    "seed": seed,
                    "params": row["params"],
                    "config": config_to_dict(config),
                    "metric": metric,
                    "threads": args.threads,
                    "sweep_objective": row["objective"],
                }  # fmt: skip
            )
    with ProcessPoolExecutor(args.jobs) as pool:
        for result in pool.map(run_one, tasks):
            done.append(result)
            with done_file.open("a") as handle:
                handle.write(json.dumps(result) + "\n")
            print(
                f"{result['role']} trial {result['trial']} seed {result['seed']}: {result['objective']:.3f} ({result['seconds']} s)",
                flush=True,
            )

    lines = [f"{metric}, mean ± std over {args.seeds} seeds (seed 0: the trial's own)", "",
             "| trial | role | params | seeds | mean ± std | as the sweep scored it |", "|---|---|---|---|---|---|"]  # fmt: skip
    stats = {}
    for role, row in roles:
        values = [d["objective"] for d in done if d["role"] == role and d["trial"] == row["trial"]]
        mean, std = statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else float("nan")
        stats[role] = (mean, std)
        params = ", ".join(
            f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row["params"].items()
        )
        lines.append(f"| {row['trial']} | {role} | {params} | {', '.join(f'{v:.2f}' for v in values)} | "
                     f"{mean:.2f} ± {std:.2f} | {row['objective']:.2f} |")  # fmt: skip
    gap = abs(stats["best"][0] - stats["worst"][0])
    noise = max(stats["best"][1], stats["worst"][1])
    lines += [
        "",
        f"gap between the means: {gap:.2f} dB = {gap / noise:.1f} x the larger seed std ({noise:.2f})",
    ]
    text = "\n".join(lines)
    (out / "spread.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
