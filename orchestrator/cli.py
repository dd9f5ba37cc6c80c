"""The `dreamsweep` command. Thin: it parses arguments and calls the modules that do the work.

dreamsweep train CONFIG [key=value ...] [--resume DIR]
dreamsweep submit SPEC [--name NAME] [--workspace DIR] [--resume]
dreamsweep resume NAME
dreamsweep status NAME
dreamsweep compare NAME [--top K] [--format table|csv|json]
dreamsweep best NAME [--output FILE]
dreamsweep list
dreamsweep eval RUN_DIR... [--clip PATH] [--views 120] [--format table|json]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from trainers.config_base import ConfigError

STATUS_COLUMNS = ["trial", "state", "params", "step", "objective", "elapsed_s"]
COMPARE_COLUMNS = ["trial", "run_id", "state", "params", "objective", "prompts"]


def _workspace_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--workspace",
        default=None,
        help="where the stores live (default: $DREAMSWEEP_WORKSPACE, else ./dreamsweep-workspace)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dreamsweep", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "train", help="train one prompt (no Ray): a trainer config YAML plus key=value overrides"
    )
    p.add_argument("config", help="a trainer config YAML (e.g. the output of `dreamsweep best`)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. guidance.eta=0.2")
    p.add_argument(
        "--resume", default=None, metavar="DIR", help="a checkpoint dir to continue from, or 'latest'"
    )

    p = sub.add_parser("submit", help="validate a sweep spec and run it on Ray")
    p.add_argument("spec", help="a sweep spec YAML (start from sweeps/*.yaml)")
    p.add_argument("--name", default=None, help="the sweep's name (default: the spec's `name`)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the sweep if the name exists (with the spec it was submitted with)",
    )
    # `--address` (join a running Ray cluster) arrives with the clusters issue; SweepSpec.cluster and
    # orchestrator.run.cluster.ClusterConfig.address already take it.
    _workspace_arg(p)

    p = sub.add_parser("resume", help="continue a sweep after a kill, a crash or Ctrl-C")
    p.add_argument("name")
    _workspace_arg(p)

    p = sub.add_parser("status", help="a table of a sweep's trials (Tune's view)")
    p.add_argument("name")
    p.add_argument("--format", choices=("table", "csv", "json"), default="table")
    _workspace_arg(p)

    p = sub.add_parser("compare", help="a sweep's trials from MLflow, best first")
    p.add_argument("name")
    p.add_argument("--top", type=int, default=None, metavar="K")
    p.add_argument("--format", choices=("table", "csv", "json"), default="table")
    _workspace_arg(p)

    p = sub.add_parser("best", help="the best trial's config as YAML for `dreamsweep train`")
    p.add_argument("name")
    p.add_argument("--output", default=None, metavar="FILE", help="write it here instead of stdout")
    _workspace_arg(p)

    p = sub.add_parser("list", help="the sweeps in the workspace")
    _workspace_arg(p)

    p = sub.add_parser(
        "eval", help="CLIP similarity and R@1 of finished runs (the paper's protocol), with ground truth"
    )
    p.add_argument(
        "runs", nargs="+", metavar="RUN_DIR", help="trainers' output_dir (config.yaml, checkpoints/)"
    )
    p.add_argument(
        "--clip",
        default="openai/clip-vit-large-patch14",
        help="a CLIP hub id, a local copy of one, or tiny-clip (default: the paper's ViT-L/14)",
    )
    p.add_argument("--views", type=int, default=120, help="renders on the orbit per run (default 120)")
    p.add_argument(
        "--elevation", type=float, default=15.0, help="the orbit's elevation, degrees (default 15)"
    )
    p.add_argument("--resolution", type=int, default=None, help="render size (default: each run's own)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda:0, ...")
    p.add_argument("--format", choices=("table", "json"), default="table")
    return parser


def cmd_train(args) -> int:
    from trainers.config import load_train_config
    from trainers.per_prompt import train

    config = load_train_config(args.config, args.overrides)
    result = train(config, resume_from=args.resume)
    shown = ", ".join(f"{k}={v:.4g}" for k, v in sorted(result.final_metrics.items()))
    print(f"done: {result.output_dir}  {shown}")
    return 0


def cmd_submit(args) -> int:
    from orchestrator.run.sweep import submit

    outcome = submit(args.spec, name=args.name, workspace=args.workspace, resume_existing=args.resume)
    return _print_outcome(outcome)


def cmd_resume(args) -> int:
    from orchestrator.run.sweep import resume

    return _print_outcome(resume(args.name, workspace=args.workspace))


def _print_outcome(outcome) -> int:
    best = (
        f"best trial {outcome.best_trial}: {outcome.best_value:.6g}"
        if outcome.best_trial is not None
        else "no trial finished"
    )
    print(f"sweep {outcome.name}: {outcome.complete} complete, {outcome.failed} failed; {best}")
    print(f"next: dreamsweep compare {outcome.name}  |  dreamsweep best {outcome.name} --output best.yaml")
    return 0 if outcome.complete else 1


def cmd_status(args) -> int:
    from orchestrator.run.workspace import Workspace
    from orchestrator.track.report import format_rows, status

    print(format_rows(status(args.name, Workspace(args.workspace)), STATUS_COLUMNS, args.format))
    return 0


def cmd_compare(args) -> int:
    from orchestrator.run.workspace import Workspace
    from orchestrator.track.report import compare, format_rows, sweep_metric

    workspace = Workspace(args.workspace)
    rows = compare(args.name, workspace, top=args.top)
    with_recall = any(row.get("clip_r_at_1") is not None for row in rows)
    print(format_rows(rows, COMPARE_COLUMNS + ["clip_r_at_1"] * with_recall, args.format))
    recall = sweep_metric(args.name, workspace, "eval/clip_r_at_1") if args.format == "table" else None
    if recall is not None:
        print(f"CLIP R@1 over the sweep's finished prompts: {recall:.4f}")
    return 0


def cmd_best(args) -> int:
    from orchestrator.run.workspace import Workspace
    from orchestrator.track.report import best_config_yaml

    text = best_config_yaml(args.name, Workspace(args.workspace))
    if args.output:
        Path(args.output).write_text(text)
        print(f"wrote {args.output}; train it with: dreamsweep train {args.output}")
    else:
        sys.stdout.write(text)
    return 0


def cmd_list(args) -> int:
    from orchestrator.run.workspace import Workspace

    workspace = Workspace(args.workspace)
    names = workspace.sweeps()
    print("\n".join(names) if names else f"no sweeps in {workspace.root}")
    return 0


EVAL_COLUMNS = [
    "run",
    "prompt",
    "step",
    "clip_similarity",
    "clip_r_at_1",
    "eval/psnr",
    "eval/ssim",
    "eval/iou",
    "eval/depth_l1",
]


def cmd_eval(args) -> int:
    import json
    import time

    from orchestrator.track.report import format_rows
    from trainers.evaluation.runs import evaluate_runs

    started = time.monotonic()

    def progress(done: int, total: int, run) -> None:
        elapsed = time.monotonic() - started
        eta = elapsed / done * (total - done)
        print(
            f"eval: {done}/{total} scored ({run.path}), {elapsed:.0f} s, ETA {eta:.0f} s",
            file=sys.stderr,
            flush=True,
        )

    result = evaluate_runs(
        args.runs,
        clip=args.clip,
        views=args.views,
        elevation=args.elevation,
        resolution=args.resolution,
        device=args.device,
        on_progress=progress,
        on_note=lambda text: print(f"eval: note: {text}", file=sys.stderr, flush=True),
    )
    if args.format == "json":
        print(json.dumps(result, indent=2))
        return 0
    columns = [c for c in EVAL_COLUMNS if any(row.get(c) is not None for row in result["runs"])]
    print(format_rows(result["runs"], columns, "table"))
    print(
        f"CLIP similarity: {result['similarity']:.4f}  ({result['clip']}, {result['views']} views at "
        f"{result['elevation']:g} degrees, mean over {len(result['runs'])} run(s))"
    )
    if result["recall_at_1"] is None:
        print(f"CLIP R@1: undefined. {result['recall_at_1_undefined']}")
    else:
        print(f"CLIP R@1: {result['recall_at_1']:.4f}  (over {result['prompts']} prompts)")
    return 0


COMMANDS = {
    "train": cmd_train,
    "submit": cmd_submit,
    "resume": cmd_resume,
    "status": cmd_status,
    "compare": cmd_compare,
    "best": cmd_best,
    "list": cmd_list,
    "eval": cmd_eval,
}


def quiet_libraries() -> None:
    """The console is dreamsweep's: MLflow's table creation and Optuna's per-trial INFO lines are noise."""
    import logging

    for name in ("mlflow", "alembic", "optuna"):
        logging.getLogger(name).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_libraries()
    from orchestrator.run.sweep import SweepExistsError
    from orchestrator.run.workspace import UnknownSweepError

    try:
        return COMMANDS[args.command](args)
    except (ConfigError, UnknownSweepError, SweepExistsError, LookupError) as exc:
        print(f"dreamsweep {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
