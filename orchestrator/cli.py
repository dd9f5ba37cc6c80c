"""The `dreamsweep` command. Thin: it parses arguments and calls the modules that do the work.

dreamsweep train CONFIG [key=value ...] [--resume DIR]
dreamsweep submit SPEC [--name NAME] [--workspace DIR] [--resume]
dreamsweep resume NAME
dreamsweep status NAME
dreamsweep compare NAME [NAME ...] [--top K] [--format table|csv|json]
dreamsweep report NAME [NAME ...] [--top K] [--output DIR] [--force]
dreamsweep best NAME [--output FILE]
dreamsweep list
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from trainers.config_base import ConfigError

STATUS_COLUMNS = ["trial", "state", "params", "step", "total", "it_s", "eta", "objective", "elapsed_s"]
COMPARE_COLUMNS = ["trial", "run_id", "state", "params", "objective", "prompts"]
SUMMARY_COLUMNS = ["sweep", "objective", "mode", "trials", "finished", "best", "q1", "median", "q3", "worst"]
JOINT_COLUMNS = ["sweep", *COMPARE_COLUMNS]


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

    p = sub.add_parser(
        "compare",
        help="a sweep's trials from MLflow, best first; several sweeps: each one's quartiles and a joint top-K",
    )
    p.add_argument("names", nargs="+", metavar="NAME")
    p.add_argument("--top", type=int, default=None, metavar="K")
    p.add_argument("--format", choices=("table", "csv", "json"), default="table")
    _workspace_arg(p)

    p = sub.add_parser(
        "report",
        help="one self-contained HTML page: top-K trials' renders side by side, the study's plots "
        "(several names: compared); also logged to each sweep's parent MLflow run",
    )
    p.add_argument("names", nargs="+", metavar="NAME")
    p.add_argument("--top", type=int, default=3, metavar="K", help="trials side by side (default 3)")
    p.add_argument(
        "--output", default=None, metavar="DIR", help="default: <workspace>/sweeps/NAME/report, replaced"
    )
    p.add_argument("--force", action="store_true", help="replace --output DIR if it exists")
    _workspace_arg(p)

    p = sub.add_parser("best", help="the best trial's config as YAML for `dreamsweep train`")
    p.add_argument("name")
    p.add_argument("--output", default=None, metavar="FILE", help="write it here instead of stdout")
    _workspace_arg(p)

    p = sub.add_parser("list", help="the sweeps in the workspace")
    _workspace_arg(p)
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
    print(
        f"next: dreamsweep report {outcome.name}  |  dreamsweep compare {outcome.name}  |  "
        f"dreamsweep best {outcome.name} --output best.yaml"
    )
    return 0 if outcome.complete else 1


def cmd_status(args) -> int:
    import json

    from orchestrator.run.workspace import Workspace
    from orchestrator.track.progress import format_duration
    from orchestrator.track.report import LIVE_FRESH_S, format_rows, live_progress, merge_live, status

    workspace = Workspace(args.workspace)
    rows = status(args.name, workspace)
    live = live_progress(args.name, workspace)
    rows = merge_live(rows, live)
    for row in rows:
        row["eta"] = format_duration(row["eta_s"]) if row["eta_s"] is not None else None
    if args.format == "json":
        print(json.dumps({"live": live, "trials": rows}, indent=2, default=str))
        return 0
    if live is not None and not live.get("finished") and args.format == "table":
        if live["age_s"] <= LIVE_FRESH_S:
            print(
                f"sweep {args.name}: running {live['running']}, done {live['done']}/{live['total']}, "
                f"failed {live['failed']}, ETA {format_duration(live.get('eta_s'))} "
                f"(live, {live['age_s']:.0f} s ago)"
            )
        else:
            print(
                f"sweep {args.name}: its driver last reported {live['age_s']:.0f} s ago and may have "
                f"stopped (dreamsweep resume {args.name} continues it)"
            )
    print(format_rows(rows, STATUS_COLUMNS, args.format))
    return 0


def cmd_compare(args) -> int:
    import json

    from orchestrator.run.workspace import Workspace
    from orchestrator.track.report import compare, compare_sweeps, format_rows, validate_top

    workspace, top = Workspace(args.workspace), validate_top(args.top)
    if len(args.names) == 1:
        print(format_rows(compare(args.names[0], workspace, top=top), COMPARE_COLUMNS, args.format))
        return 0
    result = compare_sweeps(args.names, workspace, top=top)
    if args.format == "json":
        print(json.dumps(result, indent=2, default=str))
        return 0
    # table and csv: the per-sweep summary, a blank line, then the joint top-K
    print(format_rows(result["sweeps"], SUMMARY_COLUMNS, args.format).rstrip("\n"))
    print()
    print(format_rows(result["top"], JOINT_COLUMNS, args.format))
    return 0


def cmd_report(args) -> int:
    from orchestrator.run.workspace import Workspace
    from orchestrator.track.report import write_report

    workspace = Workspace(args.workspace)
    page = write_report(args.names, workspace, top=args.top, output=args.output, force=args.force)
    print(f"wrote {page} (also logged to the parent MLflow run of {', '.join(args.names)})")
    for name in args.names:
        # MLflow 3.17's UI opens an experiment as a GenAI one (traces) unless "Model training" is picked.
        experiment = workspace.record(name).experiment_id
        print(f"in `mlflow ui`: #/experiments/{experiment}?workflowType=machine_learning  ({name}'s runs)")
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


COMMANDS = {
    "train": cmd_train,
    "submit": cmd_submit,
    "resume": cmd_resume,
    "status": cmd_status,
    "compare": cmd_compare,
    "report": cmd_report,
    "best": cmd_best,
    "list": cmd_list,
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
    from orchestrator.track.report import ReportError

    try:
        return COMMANDS[args.command](args)
    except (ConfigError, UnknownSweepError, SweepExistsError, LookupError, ReportError) as exc:
        print(f"dreamsweep {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
