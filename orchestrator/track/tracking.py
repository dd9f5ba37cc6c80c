"""MLflow: one experiment per sweep, a parent run for the sweep, one nested child run per trial.

Ray's MLflowLoggerCallback keeps its trial -> run map in memory, so a restored experiment opens new
runs. Here the map is durable and lives in MLflow itself: every child run carries the tag
`dreamsweep.ray_trial_id` (Tune keeps trial ids across `Tuner.restore`), and a trial that starts looks
its run up by that tag before creating one. A resumed trial therefore writes into the run it started,
and metrics it replays from an older checkpoint are skipped (per metric, steps at or below the last
step already logged), so every metric continues at the right step with no duplicates.

Everything goes through `MlflowClient`, which works the same on the SQLite store and a tracking server.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from orchestrator import internals
from trainers.config_base import flatten

TAG_SWEEP = "dreamsweep.sweep"
TAG_ROLE = "dreamsweep.role"  # "sweep" (parent) or "trial" (child)
TAG_RAY_TRIAL = "dreamsweep.ray_trial_id"
TAG_OPTUNA_TRIAL = "dreamsweep.optuna_trial"
TAG_PROMPTS = "dreamsweep.prompts"  # JSON list: as many of the trial's prompts as fit in a tag
TAG_PROMPT_COUNT = "dreamsweep.prompt_count"  # how many prompts the trial trains (an amortized library)
TAG_PARAMS = "dreamsweep.search_params"  # JSON of the searched (resolved) params, for compare
TAG_GIT = "mlflow.source.git.commit"
TAG_HOST = "dreamsweep.host"
TAG_PARENT = "mlflow.parentRunId"
TAG_RUN_NAME = "mlflow.runName"
OBJECTIVE = "objective"

LOOKUP = object()  # TrialRun.open: no lookup made yet
MAX_TAG = 5000  # MLflow tag values are capped (8000 on recent stores); keep well under
MAX_PARAM = 6000


def git_commit(repo: Path | None = None) -> str:
    """The project's commit, or "unknown" outside a git checkout."""
    root = repo or Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def json_list_tag(items: list[str], limit: int = MAX_TAG) -> str:
    """A JSON list of the first items that fit in `limit` characters: always valid JSON (a cut string
    would not parse), so that a trial of 100k prompts keeps a readable tag; the count is its own tag."""
    kept: list[str] = []
    for item in items:
        if len(json.dumps([*kept, item])) > limit:
            break
        kept.append(item)
    return json.dumps(kept)


def ensure_experiment(client: MlflowClient, name: str, artifact_location: str | None) -> str:
    """The sweep's experiment, tagged as model training so that MLflow's UI opens it on its runs."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.lifecycle_stage == "deleted":
            client.restore_experiment(experiment.experiment_id)
        experiment_id = experiment.experiment_id
    else:
        location = f"{artifact_location.rstrip('/')}/{name}" if artifact_location else None
        experiment_id = client.create_experiment(name, artifact_location=location)
    client.set_experiment_tag(
        experiment_id, internals.MLFLOW_EXPERIMENT_KIND_TAG, internals.MLFLOW_TRAINING_EXPERIMENT
    )
    return experiment_id


def run_description(prompts: list[str], params: Mapping[str, Any]) -> str:
    """One line for MLflow's run description: the prompt(s), then the searched params."""
    shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())
    text = " | ".join(prompts)
    return f"{text} · {shown}" if shown else text


# ---------------------------------------------------------------------------------------------------
# The parent run (driver side)


def start_parent_run(
    client: MlflowClient,
    experiment_id: str,
    sweep: str,
    spec_dict: Mapping[str, Any],
    space: Mapping[str, Any],
    spec_path: Path | None = None,
) -> str:
    tags = {
        TAG_SWEEP: sweep,
        TAG_ROLE: "sweep",
        TAG_RUN_NAME: sweep,
        TAG_GIT: git_commit(),
        TAG_HOST: socket.gethostname(),
    }
    run = client.create_run(experiment_id, tags=tags)
    run_id = run.info.run_id
    params = {
        "kind": spec_dict.get("kind"),
        "trials": spec_dict.get("trials"),
        "max_concurrent": spec_dict.get("max_concurrent"),
        "objective.metric": spec_dict["objective"]["metric"],
        "objective.mode": spec_dict["objective"]["mode"],
        "search.sampler": spec_dict["search"]["sampler"],
    }
    params |= {f"space.{key}": str(dist) for key, dist in space.items()}
    log_params(client, run_id, params)
    client.log_text(run_id, json.dumps(spec_dict, indent=2, default=str), "spec.json")
    client.log_text(run_id, json.dumps({k: str(v) for k, v in space.items()}, indent=2), "search_space.json")
    if spec_path is not None and spec_path.is_file():
        client.log_artifact(run_id, str(spec_path))
    return run_id


def reopen_run(client: MlflowClient, run_id: str) -> None:
    client.update_run(run_id, status="RUNNING")


def log_best_so_far(
    client: MlflowClient, parent_run_id: str, completed: int, best: Mapping[str, Any]
) -> None:
    """Best objective (step = number of completed trials) and the best trial's params as tags."""
    value = best.get("objective")
    if value is not None and math.isfinite(value):
        client.log_metric(parent_run_id, "best/objective", float(value), step=completed)
    client.set_tag(parent_run_id, "best.trial", str(best.get("trial")))
    client.set_tag(
        parent_run_id, "best.params", _truncate(json.dumps(best.get("params", {}), default=str), MAX_TAG)
    )


def import_plotting():
    """matplotlib (headless) and Optuna's matplotlib plots: about a second to import, so the sweep's
    driver imports them while trials run (orchestrator.track.progress) rather than when the sweep ends."""
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    return plt, ovm


def log_study_plots(client: MlflowClient, parent_run_id: str, study) -> list[str]:
    """Optuna's optimisation-history and parallel-coordinates plots (matplotlib), as parent artifacts."""
    plt, ovm = import_plotting()

    logged = []
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    if not complete:
        return logged
    plots = {"plots/optimization_history.png": ovm.plot_optimization_history}
    if len(complete) > 1 and set(complete[0].params) - {"prompt_index"}:  # a fan-out has no coordinates
        plots["plots/parallel_coordinate.png"] = ovm.plot_parallel_coordinate
    for name, plot in plots.items():
        try:
            axes = plot(study)
        except (ValueError, RuntimeError, TypeError):  # e.g. a single trial cannot draw coordinates
            continue
        figure = axes.figure if hasattr(axes, "figure") else axes.flat[0].figure
        client.log_figure(parent_run_id, figure, name)
        plt.close(figure)
        logged.append(name)
    return logged


def log_params(client: MlflowClient, run_id: str, params: Mapping[str, Any]) -> None:
    items = [Param(str(k)[:250], _truncate(str(v), MAX_PARAM)) for k, v in params.items()]
    for start in range(0, len(items), 100):  # MLflow takes at most 100 params a batch
        client.log_batch(run_id, params=items[start : start + 100], synchronous=True)


# ---------------------------------------------------------------------------------------------------
# Trial runs (worker side)


def find_trial_run(client: MlflowClient, experiment_id: str, ray_trial_id: str):
    runs = client.search_runs(
        [experiment_id], filter_string=f"tags.`{TAG_RAY_TRIAL}` = '{ray_trial_id}'", max_results=2
    )
    return runs[0] if runs else None


def finished_objective(run) -> float | None:
    """The objective of a trial whose run already FINISHED (None: the trial still has work to do)."""
    if run is None or run.info.status != "FINISHED":
        return None
    return run.data.metrics.get(OBJECTIVE)


def trial_runs(client: MlflowClient, experiment_id: str) -> list:
    runs, token = [], None
    while True:
        page = client.search_runs(
            [experiment_id], filter_string=f"tags.`{TAG_ROLE}` = 'trial'", max_results=1000, page_token=token
        )
        runs.extend(page)
        token = page.token
        if not token:
            return runs


@dataclass
class TrialIdentity:
    sweep: str
    experiment_id: str
    parent_run_id: str
    ray_trial_id: str
    optuna_trial: int | None
    prompts: list[str]
    search_params: dict[str, Any]
    git_commit: str


class TrialRun:
    """The child run of one trial: opened (or found again), fed metrics with steps, artifacts, a status."""

    def __init__(self, client: MlflowClient, run_id: str, resumed: bool, flush_every_s: float = 5.0):
        self.client, self.run_id, self.resumed = client, run_id, resumed
        self.flush_every_s = flush_every_s
        self._buffer: list[Metric] = []
        self._last_flush = time.monotonic()
        self._high_water: dict[str, int] = {}  # per metric: the last step already in MLflow
        if resumed:
            run = client.get_run(run_id)
            for key in run.data.metrics:
                history = client.get_metric_history(run_id, key)
                self._high_water[key] = max(m.step for m in history) if history else -1

    @classmethod
    def open(
        cls, client: MlflowClient, identity: TrialIdentity, config: Mapping[str, Any], found=LOOKUP
    ) -> TrialRun:
        """The trial's run: found again by its Ray trial id, else created. `found`: a lookup already made."""
        if found is LOOKUP:
            found = find_trial_run(client, identity.experiment_id, identity.ray_trial_id)
        if found is not None:
            reopen_run(client, found.info.run_id)
            return cls(client, found.info.run_id, resumed=True)
        number = identity.optuna_trial
        tags = {
            TAG_PARENT: identity.parent_run_id,
            TAG_SWEEP: identity.sweep,
            TAG_ROLE: "trial",
            TAG_RUN_NAME: f"trial-{number:04d}" if number is not None else identity.ray_trial_id,
            TAG_RAY_TRIAL: identity.ray_trial_id,
            TAG_OPTUNA_TRIAL: str(number),
            TAG_PROMPTS: json_list_tag(identity.prompts),
            TAG_PROMPT_COUNT: str(len(identity.prompts)),
            TAG_PARAMS: _truncate(json.dumps(identity.search_params, default=str), MAX_TAG),
            TAG_GIT: identity.git_commit,
            TAG_HOST: socket.gethostname(),
            "dreamsweep.pid": str(os.getpid()),
            internals.MLFLOW_RUN_NOTE_TAG: _truncate(
                run_description(identity.prompts, identity.search_params), MAX_TAG
            ),
        }
        # The tags go in with create_run, in one write: a run can never exist without its trial id.
        run = client.create_run(identity.experiment_id, tags=tags, run_name=tags[TAG_RUN_NAME])
        log_params(client, run.info.run_id, config)
        return cls(client, run.info.run_id, resumed=False)

    def log_metrics(self, step: int, metrics: Mapping[str, float], force: bool = False) -> None:
        now_ms = int(time.time() * 1000)
        for key, value in metrics.items():
            if step <= self._high_water.get(key, -1):
                continue  # replayed after a resume from an older checkpoint: already logged
            value = float(value)
            if math.isnan(value):
                continue
            self._buffer.append(Metric(key, value, now_ms, step))
            self._high_water[key] = step
        if force or time.monotonic() - self._last_flush >= self.flush_every_s:
            self.flush()

    def flush(self) -> None:
        buffer, self._buffer = self._buffer, []
        for start in range(0, len(buffer), 1000):  # MLflow takes at most 1000 metrics a batch
            self.client.log_batch(self.run_id, metrics=buffer[start : start + 1000], synchronous=True)
        self._last_flush = time.monotonic()

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_trainer_artifact(self, path: Path, prefix: str, step: int) -> None:
        """A file a trainer wrote: validation grids under `<prefix>validation` (also as an image over
        steps, for MLflow's own image view), anything else under `<prefix>renders`."""
        kind = "validation" if Path(path).parent.name == "validation" else "renders"
        self.log_artifact(Path(path), prefix + kind)
        if kind == "validation":
            self.log_image(Path(path), prefix + "validation", step)

    def log_image(self, path: Path, key: str, step: int) -> None:
        """An image MLflow's UI shows over steps (its image slider), beside the file logged as is."""
        from PIL import Image

        with Image.open(path) as image:
            self.client.log_image(self.run_id, image.convert("RGB"), key=key, step=int(step))

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self.client.log_batch(
            self.run_id, tags=[RunTag(k, _truncate(str(v), MAX_TAG)) for k, v in tags.items()]
        )

    def finish(self, status: str = "FINISHED") -> None:
        self.flush()
        self.client.set_terminated(self.run_id, status=status)


def close_stale_runs(client: MlflowClient, experiment_id: str, final_status: Mapping[str, str]) -> int:
    """At the end of a sweep, child runs still RUNNING: set the status of their Tune trial, or KILLED
    (tagged orphaned) for a run whose trial Tune never recorded (started just before a kill -9)."""
    closed = 0
    for run in trial_runs(client, experiment_id):
        if run.info.status != "RUNNING":
            continue
        trial_id = run.data.tags.get(TAG_RAY_TRIAL)
        status = final_status.get(trial_id)
        if status is None:
            client.set_tag(run.info.run_id, "dreamsweep.orphaned", "true")
        client.set_terminated(run.info.run_id, status=status or "KILLED")
        closed += 1
    return closed


def flatten_for_params(data: Mapping[str, Any]) -> dict[str, Any]:
    """A nested config as MLflow params: dotted keys, lists and tuples as JSON."""
    return {key: json.dumps(v) if isinstance(v, list | tuple) else v for key, v in flatten(data).items()}


def metric_steps(client: MlflowClient, run_id: str, keys: Iterable[str]) -> dict[str, list[int]]:
    return {key: [m.step for m in client.get_metric_history(run_id, key)] for key in keys}
