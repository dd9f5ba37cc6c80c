"""`dreamsweep status / compare / best`: reading a sweep back from its stores.

- status: Tune's view (its experiment state): every trial's state, params, step, objective, elapsed time.
  Before Tune has written any state it falls back to the Optuna study.
- compare: MLflow's view (the child runs), the one to share: trial number, run id, state, params, objective.
- best: the best trial's full trainer config as YAML that `dreamsweep train` accepts as it is.
"""

from __future__ import annotations

import csv
import io
import json
import math
from typing import Any

import yaml

from orchestrator.run.trainable import OBJECTIVE, OPTUNA_TRIAL_KEY, STEP
from orchestrator.run.tuner import can_restore, experiment_path, optuna_storage
from orchestrator.run.workspace import Workspace
from orchestrator.spec.spec import base_config_dict
from orchestrator.track import tracking
from orchestrator.track.progress import trial_params


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


def _status_from_study(name: str, record) -> list[dict[str, Any]]:
    import optuna

    study = optuna.load_study(study_name=name, storage=optuna_storage(record.stores.optuna_url))
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
    from mlflow.tracking import MlflowClient

    record = workspace.record(name)
    spec = workspace.spec(name)
    client = MlflowClient(record.stores.mlflow_uri)
    rows = []
    for run in tracking.trial_runs(client, record.experiment_id):
        tags = run.data.tags
        number = tags.get(tracking.TAG_OPTUNA_TRIAL)
        params = json.loads(tags.get(tracking.TAG_PARAMS) or "{}")
        prompts = json.loads(tags.get(tracking.TAG_PROMPTS) or "[]")
        objective = run.data.metrics.get(OBJECTIVE)
        rows.append(
            {
                "trial": int(number) if number not in (None, "None") else None,
                "run_id": run.info.run_id,
                "state": run.info.status,
                "params": params,
                "objective": objective,
                "prompts": prompts,
                "ray_trial_id": tags.get(tracking.TAG_RAY_TRIAL),
                # A fan-out's R@1 (its prompt's images among the finished prompts), logged at the sweep's end.
                "clip_r_at_1": run.data.metrics.get("eval/clip_r_at_1"),
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


def sweep_metric(name: str, workspace: Workspace, key: str) -> float | None:
    """A metric of the sweep's parent run (e.g. a fan-out's eval/clip_r_at_1), None if not logged."""
    from mlflow.tracking import MlflowClient

    record = workspace.record(name)
    return MlflowClient(record.stores.mlflow_uri).get_run(record.parent_run_id).data.metrics.get(key)


def best_config_yaml(name: str, workspace: Workspace) -> str:
    """The best trial's resolved trainer config (YAML). Raises LookupError if no trial has finished."""
    from trainers.config import config_to_dict, load_train_config

    spec = workspace.spec(name)
    finished = [
        row for row in compare(name, workspace) if row["objective"] is not None and row["state"] == "FINISHED"
    ]
    if not finished:
        raise LookupError(
            f"sweep {name!r} has no finished trial with an objective yet (dreamsweep status {name})"
        )
    best = finished[0]
    overrides = {
        **spec.overrides,
        **best["params"],
        "prompt": best["prompts"][0],
        "output_dir": f"outputs/{name}-best",
    }
    config = load_train_config(base_config_dict(spec), overrides)
    header = (
        f"# Best trial of sweep {name!r}: Optuna trial {best['trial']}, MLflow run {best['run_id']},\n"
        f"# {spec.objective.metric} ({spec.objective.aggregate} over {len(best['prompts'])} prompt(s)) = {best['objective']:.6g}.\n"
        f"# Train it: dreamsweep train THIS_FILE\n"
    )
    return header + yaml.safe_dump(config_to_dict(config), sort_keys=False)


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
