"""`dreamsweep status / compare / best / report`: reading sweeps back from their stores.

- status: Tune's view (its experiment state): every trial's state, params, step, objective, elapsed time,
  and while the sweep runs, the driver's live view (orchestrator.track.progress): it/s and ETAs.
  Before Tune has written any state it falls back to the Optuna study.
- compare: MLflow's view (the child runs), the one to share: trial number, run id, state, params, objective.
  Several sweeps: each one's best, quartiles and median of the objective, and a joint top-K.
- best: the best trial's full trainer config as YAML that `dreamsweep train` accepts as it is.
- report: what orchestrator.track.page draws: the trials, their renders and the study's plots.
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from orchestrator.errors import ReportError
from orchestrator.run.trainable import OBJECTIVE, OPTUNA_TRIAL_KEY, STEP
from orchestrator.run.tuner import can_restore, experiment_path, optuna_storage
from orchestrator.run.workspace import Workspace
from orchestrator.spec.secrets import usable_url
from orchestrator.spec.spec import base_config_dict
from orchestrator.track import tracking
from orchestrator.track.progress import trial_params
from orchestrator.track.report_data import (
    HELD_OUT,
    LIVE_FRESH_S,
    SEM,
    TRAIN,
    Media,
    SweepReport,
    TrialView,
)


def mlflow_client(uri: str):
    """A client for a sweep's recorded tracking URI (its `${NAME}` and `***` resolved here)."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(usable_url(uri, "storage.mlflow"))


def status(name: str, workspace: Workspace) -> list[dict[str, Any]]:
    record = workspace.record(name)
    if can_restore(record.stores.tune_path, name):
        from ray.tune import ExperimentAnalysis

        analysis = ExperimentAnalysis(experiment_path(record.stores.tune_path, name))
        rows = []
        for trial in analysis.trials:
            result = trial.last_result or {}
            rows.append(
                {
                    "trial": trial.config.get(OPTUNA_TRIAL_KEY),
                    "ray_trial_id": trial.trial_id,
                    "state": trial.status,
                    "params": trial_params(trial.config),
                    "step": result.get(STEP),
                    "objective": result.get(OBJECTIVE),
                    "elapsed_s": round(float(result.get("time_total_s", 0.0)), 1),
                }
            )
        return sorted(rows, key=lambda r: (r["trial"] is None, r["trial"]))
    return _status_from_study(name, record)


def live_progress(name: str, workspace: Workspace) -> dict[str, Any] | None:
    """The driver's live view of a running sweep (its progress file), with `age_s`; None if none."""
    from orchestrator.run.sweep import progress_file

    path = progress_file(workspace, name)
    try:
        view = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    view["age_s"] = max(0.0, time.time() - float(view.get("updated_at", 0)))
    return view


def merge_live(rows: list[dict[str, Any]], live: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Each running trial's step out of its total, it/s and ETA from a fresh live view."""
    fresh = live is not None and not live.get("finished") and live["age_s"] <= LIVE_FRESH_S
    by_id = {t["ray_trial_id"]: t for t in live["trials"]} if fresh else {}
    for row in rows:
        now = by_id.get(row.get("ray_trial_id"))
        row.setdefault("total", None)
        row["it_s"] = now["it_s"] if now else None
        row["eta_s"] = now["eta_s"] if now else None
        if now:
            row["step"], row["total"] = now["step"], now["total"]
    return rows


def _status_from_study(name: str, record) -> list[dict[str, Any]]:
    import optuna

    try:
        study = optuna.load_study(study_name=name, storage=optuna_storage(record.stores.optuna_url))
    except KeyError:  # registered, but Ray never started: no trial yet
        return []
    rows = []
    for t in study.get_trials(deepcopy=False):
        elapsed = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete else None
        rows.append(
            {
                "trial": t.number,
                "ray_trial_id": t.user_attrs.get("ray_trial_id"),
                "state": t.state.name,
                "params": trial_params(dict(t.params)),
                "step": None,
                "objective": t.value,
                "elapsed_s": elapsed,
            }
        )
    return rows


def compare(name: str, workspace: Workspace, top: int | None = None) -> list[dict[str, Any]]:

    record = workspace.record(name)
    spec = workspace.spec(name)
    if record.experiment_id is None:  # registered, but never started
        return []
    client = mlflow_client(record.stores.mlflow_uri)
    rows = []
    for run in tracking.trial_runs(client, record.experiment_id):
        tags = run.data.tags
        number = tags.get(tracking.TAG_OPTUNA_TRIAL)
        params = json.loads(tags.get(tracking.TAG_PARAMS) or "{}")
        prompts = prompts_tag(tags.get(tracking.TAG_PROMPTS))
        objective = run.data.metrics.get(OBJECTIVE)
        rows.append(
            {
                "trial": int(number) if number not in (None, "None") else None,
                "run_id": run.info.run_id,
                "state": run.info.status,
                "params": params,
                "objective": objective,
                # A replicated trial's (replicates: R) standard error over its seeds; None otherwise.
                SEM: run.data.metrics.get(SEM),
                "prompts": prompts,
                # How many prompts the trial trains: the prompts tag keeps only those that fit in a tag.
                "prompt_count": int(
                    tags.get(tracking.TAG_PROMPT_COUNT)
                    or run.data.params.get("prompts.count")
                    or len(prompts)
                ),
                "trainer": spec.trainer,
                "ray_trial_id": tags.get(tracking.TAG_RAY_TRIAL),
                # A fan-out's R@1 (its prompt's images among the finished prompts), logged at the sweep's end.
                "clip_r_at_1": run.data.metrics.get("eval/clip_r_at_1"),
                # An amortized trial's ground truth (or CLIP) on prompts it never trained on.
                **{k: v for k, v in run.data.metrics.items() if k.startswith(HELD_OUT_PREFIX)},
            }
        )
    sign = 1 if spec.objective.mode == "min" else -1

    def order(row):
        value = row["objective"]
        missing = value is None or not math.isfinite(value)
        return (
            missing,
            sign * value if not missing else 0.0,
            row["trial"] if row["trial"] is not None else 1 << 30,
        )

    rows.sort(key=order)
    return rows[:top] if top else rows


HELD_OUT_PREFIX = "eval/held_out/"


def held_out_columns(rows: list[dict[str, Any]]) -> list[str]:
    """The `eval/held_out/*` metrics any of the rows holds (an amortized sweep's), sorted."""
    return sorted({k for row in rows for k in row if k.startswith(HELD_OUT_PREFIX)})


def prompts_tag(text: str | None) -> list[str]:
    """The prompts tag as a list. Runs written before it was kept valid JSON hold a list cut at the tag's
    length limit ('...' after a cut string): the prompts before the cut."""
    try:
        return json.loads(text or "[]")
    except ValueError:
        head = (text or "")[: (text or "").rfind('", "') + 1]
        try:
            return json.loads(head + "]") if head else []
        except ValueError:
            return []


def sweep_metric(name: str, workspace: Workspace, key: str) -> float | None:
    """A metric of the sweep's parent run (e.g. a fan-out's eval/clip_r_at_1), None if not logged."""

    record = workspace.record(name)
    return mlflow_client(record.stores.mlflow_uri).get_run(record.parent_run_id).data.metrics.get(key)


def best_config_yaml(name: str, workspace: Workspace) -> str:
    """The best trial's resolved trainer config (YAML). Raises LookupError if no trial has finished."""
    from trainers.config import config_to_dict

    spec = workspace.spec(name)
    finished = [
        row for row in compare(name, workspace) if row["objective"] is not None and row["state"] == "FINISHED"
    ]
    if not finished:
        raise LookupError(
            f"sweep {name!r} has no finished trial with an objective yet (dreamsweep status {name})"
        )
    best = finished[0]
    config = trial_config(name, workspace, best, output_dir=f"outputs/{name}-best")
    how = (
        f"one generator trained on {best['prompt_count']} prompts"
        if spec.trainer == "amortized"
        else f"{spec.objective.aggregate} over {len(best['prompts'])} prompt(s)"
    )
    header = (
        f"# Best trial of sweep {name!r}: Optuna trial {best['trial']}, MLflow run {best['run_id']},\n"
        f"# {spec.objective.metric} ({how}) = {best['objective']:.6g}.\n"
        f"# Train it: dreamsweep train THIS_FILE\n"
    )
    return header + yaml.safe_dump(config_to_dict(config), sort_keys=False)


def trial_config(name: str, workspace: Workspace, row: dict[str, Any], output_dir: str):
    """A trial's full trainer config (its sweep's base and overrides, its params), as `compare` gave the
    row: what `dreamsweep best` writes for the best trial, and what reruns a trial with another seed."""
    from orchestrator.spec.spec import sweep_keys, trainer_functions

    spec = workspace.spec(name)
    overrides = {
        **spec.overrides,
        **row["params"],
        **sweep_keys(spec, row["prompts"][0] if row["prompts"] else ""),
        "output_dir": output_dir,
    }
    _, load_config, _ = trainer_functions(spec.trainer)
    return load_config(base_config_dict(spec), overrides)


# ---------------------------------------------------------------------------------------------------
# Several sweeps side by side


def finished_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        r
        for r in rows
        if r["state"] == "FINISHED" and isinstance(r["objective"], float) and math.isfinite(r["objective"])
    ]


def objective_of(name: str, workspace: Workspace) -> dict[str, str]:
    objective = workspace.spec(name).objective
    return {"metric": objective.metric, "mode": objective.mode, "aggregate": objective.aggregate}


def summarize(name: str, workspace: Workspace, rows: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """A sweep's objective over its finished trials: best, quartiles, median, worst (None when none), and
    the best trial's standard error over its seeds (`best_sem`, None unless the sweep has replicates)."""
    objective = objective_of(name, workspace)
    rows = compare(name, workspace) if rows is None else rows
    values = [r["objective"] for r in finished_rows(rows)]
    summary: dict[str, Any] = {
        "sweep": name,
        "objective": objective["metric"],
        "mode": objective["mode"],
        "trials": len(rows),
        "finished": len(values),
    }
    if not values:
        return summary | dict.fromkeys(["best", "best_sem", "q1", "median", "q3", "worst"])
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else values * 3
    best, worst = (min(values), max(values)) if objective["mode"] == "min" else (max(values), min(values))
    best_sem = next(r.get(SEM) for r in finished_rows(rows) if r["objective"] == best)
    return summary | {
        "best": best,
        "best_sem": best_sem,
        "q1": q1,
        "median": median,
        "q3": q3,
        "worst": worst,
    }


def check_same_objective(names: list[str], workspace: Workspace) -> dict[str, str]:
    """The sweeps' common objective; refuses sweeps whose objectives differ, naming both."""
    first = objective_of(names[0], workspace)
    for name in names[1:]:
        other = objective_of(name, workspace)
        if other != first:
            shown = " ".join(f"{k}={v}" for k, v in first.items())
            theirs = " ".join(f"{k}={v}" for k, v in other.items())
            raise ReportError(
                f"sweeps {names[0]!r} and {name!r} have different objectives ({shown} vs {theirs}): "
                "their numbers cannot be ranked together; compare sweeps of the same objective"
            )
    return first


def compare_sweeps(names: list[str], workspace: Workspace, top: int | None = None) -> dict[str, Any]:
    """Each sweep's summary, and the joint top-K of their finished trials (best first)."""
    if len(set(names)) != len(names):
        raise ReportError(f"a sweep is named twice in {names}: name each sweep once")
    for name in names:
        workspace.require(name)
    objective = check_same_objective(names, workspace)
    summaries, joint = [], []
    for name in names:
        rows = compare(name, workspace)
        summaries.append(summarize(name, workspace, rows))
        joint += [{"sweep": name, **r} for r in finished_rows(rows)]
    sign = 1 if objective["mode"] == "min" else -1
    joint.sort(key=lambda r: (sign * r["objective"], names.index(r["sweep"]), r["trial"] or 0))
    return {"objective": objective, "sweeps": summaries, "top": joint[:top] if top else joint}


def validate_top(top: int | None) -> int | None:
    if top is not None and top < 1:
        raise ReportError(f"--top must be a positive number of trials (got {top}); e.g. --top 3")
    return top


# ---------------------------------------------------------------------------------------------------
# The report's data (orchestrator.track.page draws it)


SHOWN_METRICS = ("eval/", "clip")  # ground-truth and CLIP metrics: what a trial's renders are judged by
IMAGE_MIME = {".gif": "image/gif", ".png": "image/png", ".jpg": "image/jpeg", ".webp": "image/webp"}


def _final_metrics(run, prompts: list[str]) -> dict[str, float]:
    """The run's last ground-truth/CLIP values, a panel's `prompt_NNN/` prefixes named by their prompt."""
    shown = {}
    for key, value in sorted(run.data.metrics.items()):
        if not any(marker in key for marker in SHOWN_METRICS):
            continue
        head, _, rest = key.partition("/")
        if head.startswith("prompt_") and head[7:].isdigit() and int(head[7:]) < len(prompts):
            key = f"{rest} · {prompts[int(head[7:])]}"
        shown[key] = value
    return dict(sorted(shown.items()))


def _artifact_files(client, run_id: str, folder: str) -> list[str]:
    try:
        return sorted(a.path for a in client.list_artifacts(run_id, folder) if not a.is_dir)
    except Exception:  # noqa: BLE001  a run with no such folder (yet): nothing to show
        return []


def _read_artifact(client, run, path: str, caption: str = "") -> Media | None:
    mime = IMAGE_MIME.get(Path(path).suffix.lower())
    if mime is None:
        return None
    data = _read_bytes(client, run, path)
    return Media(mime, data, caption) if data is not None else None


def _read_bytes(client, run, path: str) -> bytes | None:
    """An artifact's bytes; None when it is not there (yet) or not readable (a partial upload)."""
    try:
        root = run.info.artifact_uri
        if root.startswith("file:"):  # the workspace's own store: read in place, no copy
            from urllib.parse import unquote, urlparse

            return (Path(unquote(urlparse(root).path)) / path).read_bytes()
        with tempfile.TemporaryDirectory() as tmp:
            return Path(client.download_artifacts(run.info.run_id, path, tmp)).read_bytes()
    except Exception:  # noqa: BLE001  leave it out
        return None


def trial_view(client, row: dict[str, Any], role: str, kind: str) -> TrialView:
    """A trial's renders from its run's artifacts: per prompt, the turntable and validation grids."""
    if row.get("trainer") == "amortized":
        return amortized_view(client, row, role)
    run = client.get_run(row["run_id"])
    view = TrialView(row=row, role=role, metrics=_final_metrics(run, row["prompts"]))
    prefixes = [""] if kind == "fanout" or len(row["prompts"]) <= 1 else None
    if prefixes is None:
        prefixes = [f"prompt_{i:03d}/" for i in range(len(row["prompts"]))]
    for prefix in prefixes:
        turntable = next(
            (p for p in _artifact_files(client, row["run_id"], prefix + "renders") if "turntable" in p), None
        )
        view.turntables.append(_read_artifact(client, run, turntable) if turntable else None)
        grids = []
        for path in _artifact_files(client, row["run_id"], prefix + "validation"):
            media = _read_artifact(client, run, path, caption=f"step {_step_of(path)}")
            if media is not None:
                grids.append(media)
        view.validation.append(grids)
    return view


def _step_of(path: str) -> str:
    return Path(path).stem.replace("step_", "").lstrip("0") or "0"


def amortized_view(client, row: dict[str, Any], role: str) -> TrialView:
    """An amortized trial: one generator, shown on its evaluation prompts (the first training prompts and
    the held-out ones), never on every prompt it trained on, so that a sweep over 100k prompts gives a
    page the size of one over 20. Per prompt: its turntable, and its row of every validation grid over
    steps (the grids hold one row per evaluation prompt; their .txt names the rows)."""
    run = client.get_run(row["run_id"])
    run_id = row["run_id"]
    entries = _read_json(client, run, "renders/turntables/prompts.json") or []
    if not entries:  # a trial still running: its evaluation prompts, without turntables yet
        groups = _read_json(client, run, "evaluation_prompts.json") or {}
        entries = [{"prompt": p, "group": g} for g in (TRAIN, HELD_OUT) for p in groups.get(g, [])]
    grids = []  # (step, rows by prompt) of every grid with its row labels
    files = _artifact_files(client, run_id, "validation")
    for path in (p for p in files if p.endswith(".png")):
        labels = _read_text(client, run, path[: -len(".png")] + ".txt")
        media = _read_artifact(client, run, path)
        if media is not None and labels:
            grids.append(
                (
                    _step_of(path),
                    dict(zip(labels.splitlines(), grid_rows(media.data, labels.splitlines()), strict=False)),
                )
            )
    if not entries and grids:  # nor the prompts file: the latest grid's rows, groups unknown
        entries = [{"prompt": p} for p in grids[-1][1]]
    view = TrialView(
        row=row,
        role=role,
        metrics=_final_metrics(run, []),
        prompts=[e["prompt"] for e in entries],
        groups=[e.get("group") for e in entries],
    )
    for entry in entries:
        turntable = entry.get("file")
        path = f"renders/turntables/{turntable}" if turntable else None
        caption = f"{entry['prompt']} ({'held-out' if entry.get('group') == HELD_OUT else 'trained on'})"
        view.turntables.append(_read_artifact(client, run, path, caption) if path else None)
        view.validation.append(
            [
                Media("image/png", rows[entry["prompt"]], f"step {step}")
                for step, rows in grids
                if entry["prompt"] in rows
            ]
        )
    return view


def grid_rows(png: bytes, labels: list[str], pad: int = 2) -> list[bytes]:
    """A validation grid cut into its rows (trainers.visualize.image_grid: rows of equal height with
    `pad` white pixels around each), one PNG per label; [] when the grid does not have that many rows."""
    from PIL import Image

    with Image.open(io.BytesIO(png)) as image:
        image = image.convert("RGB")
        n = len(labels)
        height = (image.height - pad) // max(n, 1) - pad
        if n == 0 or height < 1 or n * (height + pad) + pad != image.height:
            return []
        rows = []
        for r in range(n):
            top = pad + r * (height + pad)
            buffer = io.BytesIO()
            image.crop((0, top, image.width, top + height)).save(buffer, format="PNG")
            rows.append(buffer.getvalue())
        return rows


def _read_text(client, run, path: str) -> str | None:
    media = _read_bytes(client, run, path)
    return media.decode("utf-8") if media is not None else None


def _read_json(client, run, path: str) -> Any:
    text = _read_text(client, run, path)
    try:
        return json.loads(text) if text is not None else None
    except ValueError:  # a partial upload: as if absent
        return None


def load_study(name: str, workspace: Workspace):
    import optuna

    record = workspace.record(name)
    try:
        return optuna.load_study(study_name=name, storage=optuna_storage(record.stores.optuna_url))
    except KeyError:  # registered, but Ray never started: no study yet
        return None


def sweep_report(name: str, workspace: Workspace, top: int = 3) -> SweepReport:
    """Everything the page shows of one sweep; works on a sweep that is still running."""

    record, spec = workspace.record(name), workspace.spec(name)
    client = mlflow_client(record.stores.mlflow_uri)
    rows = compare(name, workspace)
    finished = finished_rows(rows)
    notes = []
    live = live_progress(name, workspace)
    running = [r for r in rows if r["state"] == "RUNNING"]
    if not finished:
        notes.append(
            f"No trial of {name!r} has finished yet ({len(rows)} started): the page shows what exists; "
            f"run `dreamsweep report {name}` again later."
        )
    elif running:
        notes.append(f"{len(running)} trial(s) still running: shown here are the {len(finished)} finished.")
    shown = [
        trial_view(client, row, "best" if i == 0 else f"#{i + 1}", spec.kind)
        for i, row in enumerate(finished[:top])
    ]
    if len(finished) > top:
        shown.append(trial_view(client, finished[-1], "worst", spec.kind))
    if not finished:  # nothing to rank yet: what the running trials have rendered so far
        shown = [trial_view(client, row, "running", spec.kind) for row in running[:top]]
    if spec.trainer == "amortized":
        notes.append(amortized_note(shown, rows))
    fanout = []
    if spec.kind == "fanout":  # every prompt's turntable, in the order the prompts were handed out
        by_prompt = sorted(finished, key=lambda r: r["trial"] if r["trial"] is not None else 1 << 30)
        fanout = [trial_view(client, row, row["prompts"][0], spec.kind) for row in by_prompt]
    return SweepReport(
        name=name,
        kind=spec.kind,
        trainer=spec.trainer,
        objective=objective_of(name, workspace),
        rows=rows,
        summary=summarize(name, workspace, rows),
        shown=shown,
        fanout=fanout,
        study=load_study(name, workspace),
        notes=notes,
        parent_run_id=record.parent_run_id,
        mlflow_uri=record.stores.mlflow_uri,
        live=live,
        replicates=spec.replicates,
    )


def amortized_note(shown: list[TrialView], rows: list[dict[str, Any]]) -> str:
    """What an amortized sweep's side-by-side shows (and what it leaves out)."""
    count = max((r.get("prompt_count") or 0 for r in rows), default=0)
    groups = (shown[0].groups or []) if shown else []
    trained, held_out = groups.count(TRAIN), groups.count(HELD_OUT)
    return (
        f"Amortized sweep: each trial trains one generator on {count} prompts. Shown for each trial are "
        f"its evaluation prompts only, {trained} it trained on (the first of its library) and {held_out} "
        "held-out prompt(s) it never saw (marked held-out), each with its turntable and its row of the "
        "validation grids over steps; not every training prompt. eval/* metrics are on the training "
        "prompts, eval/held_out/* on the held-out ones."
    )


def write_report(
    names: list[str],
    workspace: Workspace,
    *,
    top: int = 3,
    output: str | Path | None = None,
    force: bool = False,
    log_to_mlflow: bool = True,
) -> Path:
    """Write the report page of one sweep (or a comparison of several) and log it to each sweep's
    parent run. Returns the page's path. `output`: a directory, refused if it exists unless `force`;
    by default the first sweep's folder in the workspace (sweeps/NAME/report/, replaced each time)."""
    from orchestrator.track import page

    validate_top(top)
    for name in names:
        workspace.require(name)
    if len(names) > 1:
        comparison = compare_sweeps(names, workspace, top=top)
    else:
        comparison = None
    if output is not None:
        out = Path(output)
        if out.exists() and not force:
            raise ReportError(f"{out} already exists: choose another --output, or pass --force to replace it")
    else:
        out = workspace.sweep_dir(names[0]) / (
            "report" if len(names) == 1 else "compare-" + "-".join(names[1:])
        )
    reports = [sweep_report(name, workspace, top=top) for name in names]
    joint = []
    if comparison is not None:
        by_name = {r.name: r for r in reports}
        for i, row in enumerate(comparison["top"]):  # the joint top-K's renders, side by side
            sweep = by_name[row["sweep"]]
            joint.append(trial_view(mlflow_client(sweep.mlflow_uri), row, f"#{i + 1}", sweep.kind))
    html = page.render(reports, top=top, comparison=comparison, joint=joint)
    out.mkdir(parents=True, exist_ok=True)
    index = out / "index.html"
    index.write_text(html, encoding="utf-8")
    if log_to_mlflow:
        artifact = "report" if comparison is None else "report/compare"
        for report in reports:
            if report.parent_run_id:
                mlflow_client(report.mlflow_uri).log_artifact(report.parent_run_id, str(index), artifact)
    return index


# ---------------------------------------------------------------------------------------------------
# Formatting


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.5g}"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_cell(v)}" for k, v in value.items())
    if isinstance(value, list):
        return "; ".join(str(v) for v in value)
    return str(value)


def format_rows(rows: list[dict[str, Any]], columns: list[str], fmt: str = "table") -> str:
    if fmt == "json":
        return json.dumps([{c: row.get(c) for c in columns} for row in rows], indent=2, default=str)
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(columns)
        for row in rows:
            writer.writerow(
                [
                    json.dumps(row.get(c)) if isinstance(row.get(c), dict | list) else row.get(c)
                    for c in columns
                ]
            )
        return out.getvalue()
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(line.rstrip() for line in lines)
