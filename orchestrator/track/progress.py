"""The driver-side Tune callback: a live console view and the sweep's parent MLflow run.

Ray's own reporter prints a wide table of every trial at intervals; a sweep's user wants one line:
trials running / done / failed, the best objective so far and the best trial's params. On a terminal the
line is redrawn in place; in a log file it is printed when something changes.

The same callback keeps MLflow consistent with Tune's view: best-so-far metrics on the parent run after
every finished trial, and a terminal status for child runs whose worker could not set one (a trial
stopped by ASHA, a trial that failed for good).
"""

from __future__ import annotations

import math
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ray import tune

from orchestrator.run.trainable import OBJECTIVE, OPTUNA_TRIAL_KEY, STEP
from orchestrator.spec.space import PROMPT_INDEX, resolve_params
from orchestrator.track import tracking


def trial_params(config: dict[str, Any]) -> dict[str, Any]:
    params = {k: v for k, v in config.items() if k != OPTUNA_TRIAL_KEY}
    if PROMPT_INDEX in params:
        return {PROMPT_INDEX: params[PROMPT_INDEX]}
    return resolve_params(params)


def format_params(params: dict[str, Any], limit: int = 4) -> str:
    shown = []
    for key, value in list(params.items())[:limit]:
        shown.append(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}")
    more = f" (+{len(params) - limit})" if len(params) > limit else ""
    return ", ".join(shown) + more


class SweepProgress(tune.Callback):
    """Picklable (Tune stores it with the experiment): clients are created lazily in the driver."""

    def __init__(
        self,
        sweep: str,
        total: int,
        mode: str,
        mlflow_uri: str | None = None,
        experiment_id: str | None = None,
        parent_run_id: str | None = None,
        refresh_s: float = 1.0,
    ):
        self.sweep, self.total, self.mode = sweep, total, mode
        self.mlflow_uri, self.experiment_id, self.parent_run_id = mlflow_uri, experiment_id, parent_run_id
        self.refresh_s = refresh_s
        self._reset()

    def _reset(self) -> None:
        self._client = None
        self._executor: ThreadPoolExecutor | None = None
        self._start = time.monotonic()
        self._last_draw = 0.0
        self._last_line = ""
        self._best: dict[str, Any] | None = None
        self._plotting_loaded = False

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_client"] = None
        state["_executor"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset()

    # -- Tune hooks ------------------------------------------------------------------------------------

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._consider(trial, result)
        self._draw(trials)

    def on_trial_start(self, iteration, trials, trial, **info):
        self._draw(trials, force=True)

    def on_trial_complete(self, iteration, trials, trial, **info):
        result = trial.last_result or {}
        self._consider(trial, result, finished=True)
        number = trial.config.get(OPTUNA_TRIAL_KEY)
        value = result.get(OBJECTIVE)
        shown = f"{value:.5g}" if isinstance(value, float) else "-"
        self._print(f"trial {number} done: objective {shown} at step {result.get(STEP, '-')}")
        if self._mlflow() is not None:
            if not self._plotting_loaded:
                # The driver idles while trials run: import the plotting stack now, not at the end.
                self._plotting_loaded = True
                self._in_background(tracking.import_plotting)
            completed = sum(1 for t in trials if t.status == "TERMINATED")
            best = dict(self._best) if self._best is not None else None
            self._in_background(self._after_complete, trial.trial_id, dict(result), completed, best)
        self._draw(trials, force=True)

    def _after_complete(self, trial_id: str, result: dict[str, Any], completed: int, best) -> None:
        client = self._mlflow()
        if best is not None:
            tracking.log_best_so_far(client, self.parent_run_id, completed, best)
        # The worker closes its run before its last report; one still RUNNING was stopped early.
        self._close_run(client, trial_id, result, "FINISHED", stopped_early=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._print(
            f"trial {trial.config.get(OPTUNA_TRIAL_KEY)} failed: {trial.error_file or 'see the Ray logs'}"
        )
        if self._mlflow() is not None:
            self._in_background(self._close_run, self._mlflow(), trial.trial_id, {}, "FAILED")
        self._draw(trials, force=True)

    def on_trial_recover(self, iteration, trials, trial, **info):
        self._print(f"trial {trial.config.get(OPTUNA_TRIAL_KEY)} failed; retrying from its last checkpoint")

    def on_experiment_end(self, trials, **info):
        if self._executor is not None:
            self._executor.shutdown(wait=True)  # every MLflow update lands before finalize reads them
            self._executor = None
        self._draw(trials, force=True)
        if sys.stdout.isatty():
            sys.stdout.write("\n")
            sys.stdout.flush()

    # -- helpers ---------------------------------------------------------------------------------------

    def _consider(self, trial, result: dict[str, Any], finished: bool = False) -> None:
        value = result.get(OBJECTIVE)
        if not isinstance(value, int | float) or not math.isfinite(value):
            return
        if not (finished or result.get("done")):
            return  # only finished trials compete: a running trial's objective is still moving
        better = (
            self._best is None
            or (self.mode == "min" and value < self._best["objective"])
            or (self.mode == "max" and value > self._best["objective"])
        )
        if better:
            self._best = {
                "objective": float(value),
                "trial": trial.config.get(OPTUNA_TRIAL_KEY),
                "params": trial_params(trial.config),
            }

    def _draw(self, trials, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_draw < self.refresh_s:
            return
        if self._best is None:  # after a restore: trials finished before it still count
            for t in trials:
                if t.status == "TERMINATED":
                    self._consider(t, t.last_result or {}, finished=True)
        counts = {"RUNNING": 0, "TERMINATED": 0, "ERROR": 0, "PENDING": 0}
        for t in trials:
            counts[t.status] = counts.get(t.status, 0) + 1
        best = "best -"
        if self._best is not None:
            best = f"best {self._best['objective']:.5g} (trial {self._best['trial']}: {format_params(self._best['params'])})"
        elapsed = int(now - self._start)
        line = (
            f"[{self.sweep}] {elapsed // 60:d}:{elapsed % 60:02d}  running {counts['RUNNING']}  "
            f"done {counts['TERMINATED']}/{self.total}  failed {counts['ERROR']}  {best}"
        )
        self._last_draw = now
        if sys.stdout.isatty():
            sys.stdout.write("\r\033[K" + line)
            sys.stdout.flush()
        elif line.split("  ", 1)[1] != self._last_line.split("  ", 1)[-1] or force:
            print(line, flush=True)
        self._last_line = line

    def _print(self, text: str) -> None:
        prefix = "\r\033[K" if sys.stdout.isatty() else ""
        print(f"{prefix}[{self.sweep}] {text}", flush=True)

    def _mlflow(self):
        if self.mlflow_uri is None or self.parent_run_id is None:
            return None
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(self.mlflow_uri)
        return self._client

    def _in_background(self, fn, *args) -> None:
        """MLflow writes off Tune's event loop: the loop starts the next trial meanwhile."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dreamsweep-mlflow")
        self._executor.submit(fn, *args)

    def _close_run(
        self, client, trial_id: str, result: dict[str, Any], status: str, stopped_early: bool = False
    ):
        run = tracking.find_trial_run(client, self.experiment_id, trial_id)
        if run is None or run.info.status != "RUNNING":
            return
        if stopped_early:
            # The worker was stopped inside a report: the objective it reported is the trial's result.
            if isinstance(result.get(OBJECTIVE), int | float):
                client.log_metric(
                    run.info.run_id, OBJECTIVE, float(result[OBJECTIVE]), step=int(result.get(STEP, 0))
                )
            client.set_tag(run.info.run_id, "dreamsweep.stopped_early", "true")
        client.set_terminated(run.info.run_id, status=status)
