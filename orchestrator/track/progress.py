"""The driver-side Tune callback: a live console view and the sweep's parent MLflow run.

Ray's own reporter prints a wide table of every trial at intervals; a sweep's user wants one line:
trials running / done / failed, the best objective so far and the best trial's params, and the sweep's
ETA, then one line per running trial: its step out of its total, it/s and ETA. On a terminal the block
is redrawn in place; in a log file it is printed when something changes, and at most every
`log_every_s` seconds for steps alone. The same view is written to `progress_file` (JSON), which
`dreamsweep status` reads while the sweep runs.

Steps reach the driver in the trials' ordinary Tune reports (orchestrator.run.trainable reports at most
every `report_every_s`, with or without an objective yet); speeds are measured here, between reports.

The same callback keeps MLflow consistent with Tune's view: best-so-far metrics on the parent run after
every finished trial, and a terminal status for child runs whose worker could not set one (a trial
stopped by ASHA, a trial that failed for good).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
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


def format_duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "-"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class StepRate:
    """A trial's speed in steps per second, measured between the reports the driver receives
    (smoothed: reports come every few seconds, and a panel trial pauses between its prompts)."""

    def __init__(self, smoothing: float = 0.5):
        self.smoothing = smoothing
        self.step: int | None = None
        self.at: float | None = None
        self.rate: float | None = None

    def update(self, step: int, now: float) -> None:
        if self.step is not None and self.at is not None and now > self.at and step > self.step:
            rate = (step - self.step) / (now - self.at)
            self.rate = (
                rate if self.rate is None else self.smoothing * rate + (1 - self.smoothing) * self.rate
            )
        if self.step is None or step != self.step:
            self.step, self.at = step, now


def sweep_eta(
    running: list[tuple[int, float | None]], queued: int, steps_per_trial: int | None
) -> float | None:
    """Seconds until the sweep ends, from the running trials' (steps left, steps/s) and the number of
    trials not started yet, which run at the running trials' mean speed, as many at once as run now.
    None until at least one running trial has a measured speed."""
    rates = [rate for _, rate in running if rate]
    if not rates or steps_per_trial is None:
        return None
    mean_rate = sum(rates) / len(rates)
    work = sum(left / (rate or mean_rate) for left, rate in running)  # trial-seconds still to run
    work += queued * steps_per_trial / mean_rate
    return work / max(1, len(running))


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
        steps_per_trial: int | None = None,
        progress_file: str | None = None,
        log_every_s: float = 15.0,
        clock=time.monotonic,
    ):
        self.sweep, self.total, self.mode = sweep, total, mode
        self.mlflow_uri, self.experiment_id, self.parent_run_id = mlflow_uri, experiment_id, parent_run_id
        self.refresh_s = refresh_s
        self.steps_per_trial, self.progress_file = steps_per_trial, progress_file
        self.log_every_s, self.clock = log_every_s, clock
        self._reset()

    def _reset(self) -> None:
        self._client = None
        self._executor: ThreadPoolExecutor | None = None
        self._start = self.clock()
        self._last_draw = 0.0
        self._last_line = ""
        self._best: dict[str, Any] | None = None
        self._plotting_loaded = False
        self._rates: dict[str, StepRate] = {}
        self._block_lines = 0  # lines of the live block on the terminal, redrawn in place
        self._last_logged = 0.0

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_client"] = None
        state["_executor"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Callbacks pickled by an older dreamsweep lack the newer fields.
        state = {
            "steps_per_trial": None,
            "progress_file": None,
            "log_every_s": 15.0,
            "clock": time.monotonic,
            **state,
        }
        self.__dict__.update(state)
        self._reset()

    # -- Tune hooks ------------------------------------------------------------------------------------

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if isinstance(result.get(STEP), int | float):
            self._rates.setdefault(trial.trial_id, StepRate()).update(int(result[STEP]), self.clock())
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
        self._draw(trials, force=True, finished=True)

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

    def view(self, trials, now: float, finished: bool = False) -> dict[str, Any]:
        """What the console shows and `progress_file` holds: counts, best, ETA, running trials."""
        counts = {"RUNNING": 0, "TERMINATED": 0, "ERROR": 0, "PENDING": 0}
        for t in trials:
            counts[t.status] = counts.get(t.status, 0) + 1
        running = []
        for t in trials:
            if t.status != "RUNNING":
                continue
            rate = self._rates.get(t.trial_id)
            step = (t.last_result or {}).get(STEP) or (rate.step if rate else None) or 0
            speed = rate.rate if rate else None
            total = self.steps_per_trial
            left = max(0, total - int(step)) if total else None
            running.append(
                {
                    "trial": t.config.get(OPTUNA_TRIAL_KEY),
                    "ray_trial_id": t.trial_id,
                    "step": int(step),
                    "total": total,
                    "it_s": round(speed, 3) if speed else None,
                    "eta_s": round(left / speed, 1) if speed and left is not None else None,
                }
            )
        ended = counts["TERMINATED"] + counts["ERROR"]
        queued = max(0, self.total - ended - counts["RUNNING"])
        eta = sweep_eta(
            [(r["total"] - r["step"] if r["total"] else 0, r["it_s"]) for r in running],
            queued,
            self.steps_per_trial,
        )
        return {
            "sweep": self.sweep,
            "updated_at": time.time(),
            "finished": finished,
            "elapsed_s": round(now - self._start, 1),
            "eta_s": 0.0 if finished else (round(eta, 1) if eta is not None else None),
            "total": self.total,
            "running": counts["RUNNING"],
            "done": counts["TERMINATED"],
            "failed": counts["ERROR"],
            "best": self._best,
            "trials": running,
        }

    def _draw(self, trials, force: bool = False, finished: bool = False) -> None:
        now = self.clock()
        if not force and now - self._last_draw < self.refresh_s:
            return
        if self._best is None:  # after a restore: trials finished before it still count
            for t in trials:
                if t.status == "TERMINATED":
                    self._consider(t, t.last_result or {}, finished=True)
        view = self.view(trials, now, finished)
        self._last_draw = now
        self._write_progress_file(view)
        head, rows = self.format_view(view)
        if sys.stdout.isatty():
            up = f"\033[{self._block_lines - 1}F" if self._block_lines > 1 else "\r"
            block = "\n".join("\033[K" + line for line in [head, *rows])
            sys.stdout.write(up + block + "\033[J" + ("\n" if finished else ""))
            sys.stdout.flush()
            self._block_lines = 0 if finished else 1 + len(rows)
        else:
            # A log file gets a line when counts or the best change, and steps at most every log_every_s.
            changed = self._counts_and_best(head) != self._counts_and_best(self._last_line)
            if changed or force or now - self._last_logged >= self.log_every_s:
                print("  |  ".join([head, *rows]) if rows else head, flush=True)
                self._last_logged = now
        self._last_line = head

    @staticmethod
    def _counts_and_best(head: str) -> str:
        """The head line without the clock and the ETA, which change at every draw."""
        parts = head.split("  ")[1:]
        return "  ".join(p for p in parts if not p.startswith("ETA "))

    def format_view(self, view: dict[str, Any]) -> tuple[str, list[str]]:
        best = "best -"
        if view["best"] is not None:
            b = view["best"]
            best = f"best {b['objective']:.5g} (trial {b['trial']}: {format_params(b['params'])})"
        elapsed = int(view["elapsed_s"])
        head = (
            f"[{self.sweep}] {elapsed // 60:d}:{elapsed % 60:02d}  running {view['running']}  "
            f"done {view['done']}/{view['total']}  failed {view['failed']}  "
            f"ETA {format_duration(view['eta_s'])}  {best}"
        )
        rows = []
        for r in view["trials"]:
            speed = f"{r['it_s']:.3g} it/s" if r["it_s"] else "- it/s"
            rows.append(
                f"  trial {r['trial']}: step {r['step']}/{r['total'] or '?'}  {speed}  "
                f"ETA {format_duration(r['eta_s'])}"
            )
        return head, rows

    def _write_progress_file(self, view: dict[str, Any]) -> None:
        if not self.progress_file:
            return
        path = Path(self.progress_file)
        try:
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(view, default=str))
            os.replace(tmp, path)  # a reader never sees half a file
        except OSError:
            pass  # the console view goes on; `dreamsweep status` then shows Tune's view alone

    def _print(self, text: str) -> None:
        prefix = ""
        if sys.stdout.isatty():  # over the live block, which the next draw puts back below
            prefix = (f"\033[{self._block_lines - 1}F" if self._block_lines > 1 else "\r") + "\033[J"
            self._block_lines = 0
        print(f"{prefix}[{self.sweep}] {text}", flush=True)

    def _mlflow(self):
        if self.mlflow_uri is None or self.parent_run_id is None:
            return None
        if self._client is None:
            from mlflow.tracking import MlflowClient

            from orchestrator.spec.secrets import usable_url

            self._client = MlflowClient(usable_url(self.mlflow_uri, "storage.mlflow"))
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


# ---------------------------------------------------------------------------------------------------
# Packed sweeps (orchestrator/run/packed.py) have no Tune trials: the same view, fed by the driver


@dataclass
class TrialView:
    """The part of a Tune trial that SweepProgress reads, for a trial of a packed sweep."""

    trial_id: str
    config: dict[str, Any]
    status: str = "RUNNING"
    last_result: dict[str, Any] = field(default_factory=dict)
    error_file: str | None = None


class PackedProgress:
    """Drives a SweepProgress (console, progress file, best so far in MLflow) from a packed sweep's
    reports. The study's trials that ended before this driver started count as they ended."""

    def __init__(self, progress: SweepProgress, study, run_id_of):
        from optuna.trial import TrialState

        self.progress, self.run_id_of = progress, run_id_of
        self.views: dict[int, TrialView] = {}
        for t in study.get_trials(deepcopy=False):
            if t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL):
                view = self._view(t.number, t.params)
                view.status = "ERROR" if t.state == TrialState.FAIL else "TERMINATED"
                if t.value is not None:
                    view.last_result = {OBJECTIVE: t.value, "done": True}
                    self.progress._consider(view, view.last_result, finished=True)

    def _view(self, number: int, params: dict[str, Any]) -> TrialView:
        view = TrialView(self.run_id_of(number), {**params, OPTUNA_TRIAL_KEY: number})
        self.views[number] = view
        return view

    @property
    def trials(self) -> list[TrialView]:
        return list(self.views.values())

    def started(self, number: int, params: dict[str, Any]) -> None:
        self.progress.on_trial_start(None, self.trials, self._view(number, params))

    def reported(self, report) -> None:
        view = self.views[report.number]
        view.last_result = {STEP: report.step}
        if report.objective is not None:
            view.last_result[OBJECTIVE] = report.objective
        self.progress.on_trial_result(None, self.trials, view, view.last_result)

    def completed(self, report, pruned: bool = False) -> None:
        view = self.views[report.number]
        view.status = "TERMINATED"
        value = report.final if report.final is not None else report.objective
        view.last_result = {STEP: report.step, **({OBJECTIVE: value} if value is not None else {})}
        if not pruned:
            view.last_result["done"] = True
        self.progress.on_trial_complete(None, self.trials, view)

    def failed(self, number: int, error: str) -> None:
        view = self.views.get(number) or self._view(number, {})
        view.status = "ERROR"
        view.error_file = error.strip().splitlines()[-1] if error.strip() else None
        self.progress.on_trial_error(None, self.trials, view)

    def finished(self) -> None:
        self.progress.on_experiment_end(self.trials)
