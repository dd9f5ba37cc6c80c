"""The `dreamsweep` command. Thin: it parses arguments and calls the modules that do the work.

dreamsweep train CONFIG [key=value ...] [--resume DIR]      per-prompt, or amortized (`trainer: amortized`)
dreamsweep generate RUN_DIR "a prompt" [--output FILE]     an amortized run's turntable for any prompt
dreamsweep generate --sweep NAME "a prompt"                the same with an amortized sweep's best trial
dreamsweep submit SPEC [--name NAME] [--workspace DIR] [--resume] [--address URL]
dreamsweep resume NAME [--address URL]
dreamsweep status NAME [--address URL]
dreamsweep logs NAME [--follow] --address URL
dreamsweep stop NAME --address URL
dreamsweep compare NAME [NAME ...] [--top K] [--format table|csv|json]
dreamsweep report NAME [NAME ...] [--top K] [--output DIR] [--force]
dreamsweep best NAME [--output FILE]
dreamsweep list [--address URL]
dreamsweep eval RUN_DIR... [--clip PATH] [--views 120] [--format table|json]

--address http://HEAD:8265 (or $DREAMSWEEP_ADDRESS, or an http $RAY_ADDRESS) runs the sweep on that
Ray cluster as a Ray Job (orchestrator.run.jobs); without one everything runs on this machine.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from orchestrator.errors import ClusterError, ReportError, SweepExistsError, UnknownSweepError
from trainers.config_base import ConfigError

STATUS_COLUMNS = ["trial", "state", "params", "step", "total", "it_s", "eta", "objective", "elapsed_s"]
JOB_COLUMNS = ["sweep", "job", "action", "status", "started", "ended", "message"]
COMPARE_COLUMNS = ["trial", "run_id", "state", "params", "objective", "prompts"]
SUMMARY_COLUMNS = ["sweep", "objective", "mode", "trials", "finished", "best", "q1", "median", "q3", "worst"]


def _workspace_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--workspace",
        default=None,
        help="where the stores live (default: $DREAMSWEEP_WORKSPACE, else ./dreamsweep-workspace)",
    )


def _address_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--address",
        default=None,
        metavar="URL",
        help="a Ray cluster's Jobs address, http://HEAD:8265 (default: $DREAMSWEEP_ADDRESS, "
        "else $RAY_ADDRESS if it is http(s); none: this machine)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dreamsweep", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "train",
        help="train one prompt (no Ray), or an amortized generator (`trainer: amortized`; on Ray Train "
        "when data_parallel.num_workers > 1): a trainer config YAML plus key=value overrides",
    )
    p.add_argument("config", help="a trainer config YAML (e.g. the output of `dreamsweep best`)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. guidance.eta=0.2")
    p.add_argument(
        "--resume", default=None, metavar="DIR", help="a checkpoint dir to continue from, or 'latest'"
    )

    p = sub.add_parser("generate", help="render an amortized run's generator for any prompt (one forward)")
    p.add_argument(
        "run_dir",
        nargs="?",
        help="an amortized run's output_dir (config.yaml, checkpoints/); not with --sweep",
    )
    p.add_argument("prompt", help="the text; prompts never trained on are fine")
    p.add_argument(
        "--sweep",
        default=None,
        metavar="NAME",
        help="an amortized sweep: its best finished trial's last checkpoint, from MLflow or the sweep's storage",
    )
    p.add_argument("--output", default=None, metavar="FILE", help="default: RUN_DIR/generated/<prompt>.gif")
    _workspace_arg(p)
    p.add_argument("--frames", type=int, default=None, help="turntable frames (default: the run's)")

    p = sub.add_parser("submit", help="validate a sweep spec and run it on Ray")
    p.add_argument("spec", help="a sweep spec YAML (start from sweeps/*.yaml)")
    p.add_argument("--name", default=None, help="the sweep's name (default: the spec's `name`)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the sweep if the name exists (with the spec it was submitted with)",
    )
    # SweepContext overrides as a JSON file (the integration tests' fake trainer on a cluster).
    p.add_argument("--runtime", default=None, help=argparse.SUPPRESS)
    _workspace_arg(p)
    _address_arg(p)

    p = sub.add_parser("resume", help="continue a sweep after a kill, a crash or Ctrl-C")
    p.add_argument("name")
    _workspace_arg(p)
    _address_arg(p)

    p = sub.add_parser("status", help="a table of a sweep's trials (Tune's view), or its jobs on a cluster")
    p.add_argument("name")
    p.add_argument("--format", choices=("table", "csv", "json"), default="table")
    _workspace_arg(p)
    _address_arg(p)

    p = sub.add_parser("logs", help="the driver log of a sweep's latest job on a cluster")
    p.add_argument("name")
    p.add_argument("--follow", action="store_true", help="keep printing until the job ends")
    _address_arg(p)

    p = sub.add_parser("stop", help="stop a sweep's running job on a cluster (resume continues it)")
    p.add_argument("name")
    _address_arg(p)

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

    p = sub.add_parser("list", help="the sweeps in the workspace, or those a cluster ran")
    p.add_argument("--format", choices=("table", "csv", "json"), default="table")
    _workspace_arg(p)
    _address_arg(p)

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


def _cluster(args) -> str | None:
    from orchestrator.run.jobs import resolve_address

    return resolve_address(getattr(args, "address", None))


def cmd_train(args) -> int:
    from trainers.amortized.config import is_amortized
    from trainers.config_base import load_yaml, parse_overrides

    if is_amortized({**load_yaml(args.config), **parse_overrides(args.overrides)}):
        return _train_amortized(args)
    from trainers.config import load_train_config
    from trainers.per_prompt import train

    config = load_train_config(args.config, args.overrides)
    result = train(config, resume_from=args.resume)
    shown = ", ".join(f"{k}={v:.4g}" for k, v in sorted(result.final_metrics.items()))
    print(f"done: {result.output_dir}  {shown}")
    return 0


def _train_amortized(args) -> int:
    import yaml

    from trainers.amortized.config import load_amortized_config
    from trainers.amortized.loop import PromptLibraryError

    config = load_amortized_config(args.config, args.overrides)
    try:
        if config.data_parallel.num_workers > 1:
            from trainers.amortized.data_parallel import fit

            fit(config, resume_from=args.resume)
        else:  # one process, no Ray
            from trainers.amortized.loop import train

            train(config, resume_from=args.resume)
    except PromptLibraryError as exc:
        raise ConfigError(str(exc)) from None
    metrics = yaml.safe_load((Path(config.output_dir) / "metrics.yaml").read_text())
    shown = ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()) if k.startswith("eval/"))
    print(f"done: {config.output_dir}  {shown}")
    print(f'next: dreamsweep generate {config.output_dir} "a prompt it never saw"')
    return 0


def cmd_generate(args) -> int:
    from trainers.amortized.generate import generate

    run_dir = args.run_dir
    if (run_dir is None) == (args.sweep is None):
        raise ConfigError(
            "generate takes either RUN_DIR or --sweep NAME before the prompt: dreamsweep generate "
            'outputs/amortized "a prompt", or dreamsweep generate --sweep NAME "a prompt"'
        )
    if args.sweep is not None:
        from orchestrator.run.workspace import Workspace
        from orchestrator.track.best_run import best_amortized_run

        run_dir, best = best_amortized_run(args.sweep, Workspace(args.workspace))
        print(
            f"sweep {args.sweep}: best trial {best['trial']} ({best['objective']:.6g}), MLflow run {best['run_id']}"
        )
    result = generate(run_dir, args.prompt, args.output, frames=args.frames)
    print(
        f"{result.path}: generator forward {result.forward_s * 1000:.1f} ms (text encoder included), "
        f"{len(result.frames)} frames rendered in {result.render_s:.2f} s"
    )
    return 0


def _runtime(args):
    import json

    return json.loads(Path(args.runtime).read_text()) if args.runtime else None


def cmd_submit(args) -> int:
    address = _cluster(args)
    if address is not None:
        from orchestrator.run.jobs import submit_job

        name, job = submit_job(
            args.spec,
            address,
            name=args.name,
            workspace=args.workspace,
            resume_existing=args.resume,
            runtime=_runtime(args),
        )
        return _print_job(job, name, address)
    from orchestrator.run.sweep import submit

    outcome = submit(
        args.spec,
        name=args.name,
        workspace=args.workspace,
        resume_existing=args.resume,
        runtime=_runtime(args),
    )
    return _print_outcome(outcome)


def _print_job(job: str, name: str, address: str) -> int:
    print(f"submitted sweep {name} to {address} as job {job}; it runs on the cluster (you may disconnect)")
    print(f"follow it: dreamsweep logs {name} --follow --address {address}")
    print(f"its jobs:  dreamsweep status {name} --address {address}   (stop: dreamsweep stop {name} ...)")
    return 0


def cmd_resume(args) -> int:
    address = _cluster(args)
    if address is not None:
        from orchestrator.run.jobs import resume_job

        return _print_job(resume_job(args.name, address), args.name, address)
    from orchestrator.run.sweep import resume

    return _print_outcome(resume(args.name, workspace=args.workspace))


def _print_outcome(outcome) -> int:
    if outcome.stopped:
        print(
            f"sweep {outcome.name}: stopped with trials left; `dreamsweep resume {outcome.name}` continues it"
        )
        return 130
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

    address = _cluster(args)
    if address is not None:
        from orchestrator.run.jobs import job_table
        from orchestrator.track.report import format_rows

        print(format_rows(job_table(args.name, address), JOB_COLUMNS, args.format))
        return 0

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
    from orchestrator.track.report import (
        compare,
        compare_sweeps,
        format_rows,
        held_out_columns,
        sweep_metric,
        validate_top,
    )

    workspace, top = Workspace(args.workspace), validate_top(args.top)
    if len(args.names) == 1:
        name = args.names[0]
        rows = compare(name, workspace, top=top)
        with_recall = any(row.get("clip_r_at_1") is not None for row in rows)
        columns = compare_columns(rows) + ["clip_r_at_1"] * with_recall + held_out_columns(rows)
        print(format_rows(rows, columns, args.format))
        recall = sweep_metric(name, workspace, "eval/clip_r_at_1") if args.format == "table" else None
        if recall is not None:
            print(f"CLIP R@1 over the sweep's finished prompts: {recall:.4f}")
        return 0
    result = compare_sweeps(args.names, workspace, top=top)
    if args.format == "json":
        print(json.dumps(result, indent=2, default=str))
        return 0
    # table and csv: the per-sweep summary, a blank line, then the joint top-K
    print(format_rows(result["sweeps"], SUMMARY_COLUMNS, args.format).rstrip("\n"))
    print()
    print(
        format_rows(
            result["top"],
            ["sweep", *compare_columns(result["top"])] + held_out_columns(result["top"]),
            args.format,
        )
    )
    return 0


def compare_columns(rows: list[dict]) -> list[str]:
    """The trial table's columns: an amortized trial's prompts are its library, so its count stands in."""
    columns = list(COMPARE_COLUMNS)
    if any(row.get("objective_sem") is not None for row in rows):  # replicated trials: mean ± s.e.
        columns.insert(columns.index("objective") + 1, "objective_sem")
    if any(row.get("trainer") == "amortized" for row in rows):
        return [c if c != "prompts" else "prompt_count" for c in columns]
    return columns


def cmd_report(args) -> int:
    from orchestrator.run.workspace import Workspace
    from orchestrator.track.report import write_report

    workspace = Workspace(args.workspace)
    page = write_report(args.names, workspace, top=args.top, output=args.output, force=args.force)
    print(f"wrote {page} (also logged to the parent MLflow run of {', '.join(args.names)})")
    # A plain `mlflow ui` opens every experiment on its GenAI traces until "Model training" is picked in
    # the browser; dreamsweep's app picks it for a fresh browser (orchestrator/track/mlflow_app.py). A
    # tracking server someone else runs may be a plain one: its links say so themselves.
    for name in args.names:
        record = workspace.record(name)
        uri, page = record.stores.mlflow_uri, f"#/experiments/{record.experiment_id}"
        if uri.startswith(("http://", "https://")):
            from orchestrator.spec.secrets import without_userinfo

            print(
                f"{name} in MLflow: {without_userinfo(uri).rstrip('/')}/{page}?workflowType=machine_learning"
            )
        else:
            print(f"{name} in MLflow: mlflow ui --backend-store-uri {uri} --app-name dreamsweep, then {page}")
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


def _needs_address(args) -> str:
    address = _cluster(args)
    if address is None:
        raise LookupError(
            f"{args.command} works on a sweep running on a cluster: give --address http://HEAD:8265 "
            "(or set $DREAMSWEEP_ADDRESS); a local sweep stops with Ctrl-C, continues with "
            "`dreamsweep resume NAME` and prints its log to the console"
        )
    return address


def cmd_logs(args) -> int:
    from orchestrator.run.jobs import job_logs

    job = job_logs(args.name, _needs_address(args), follow=args.follow)
    print(f"\n[job {job.submission_id}: {job.status}]" if not args.follow else "")
    return 0


def cmd_stop(args) -> int:
    from orchestrator.run.jobs import stop_job

    address = _needs_address(args)
    job = stop_job(args.name, address)
    if job is None:
        print(f"sweep {args.name} has no running job on {address}")
        return 1
    print(
        f"stopping job {job.submission_id}; continue it with: dreamsweep resume {args.name} --address {address}"
    )
    return 0


def cmd_list(args) -> int:
    address = _cluster(args)
    if address is not None:
        from orchestrator.run.jobs import list_table
        from orchestrator.track.report import format_rows

        rows = list_table(address)
        print(
            format_rows(rows, [*JOB_COLUMNS, "jobs"], args.format) if rows else f"no sweeps ran on {address}"
        )
        return 0
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
    "generate": cmd_generate,
    "submit": cmd_submit,
    "resume": cmd_resume,
    "status": cmd_status,
    "compare": cmd_compare,
    "report": cmd_report,
    "best": cmd_best,
    "list": cmd_list,
    "logs": cmd_logs,
    "stop": cmd_stop,
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

    try:
        return COMMANDS[args.command](args)
    except (
        ConfigError,
        UnknownSweepError,
        SweepExistsError,
        LookupError,
        FileNotFoundError,
        ClusterError,
        ReportError,
    ) as exc:
        print(f"dreamsweep {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
