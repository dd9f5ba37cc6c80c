"""The Tune function trainable: one trial = one config on one prompt (fan-out) or on a panel (search).

    tune.with_parameters(run_trial, context=SweepContext(...))

- The diffusion prior is the expensive object: it is loaded once per worker process and kept in a
  module-level cache that outlives the trial, so with `reuse_actors` a sweep of N trials on W workers
  loads it W times.
- The trainer's metrics go to the trial's MLflow run (with their steps) and, summarised, to Tune
  (`objective`, `step`) for the searcher and ASHA. The trainer's checkpoints are reported to Tune, which
  restores them after a failure or a `dreamsweep resume`.
- Tune reports are synchronous round trips with the driver, so a trial reports at most every
  `report_every_s` seconds and at every checkpoint, not at every logged step.

A search trial trains its prompts one after another; its Tune checkpoint is the current prompt's
trainer checkpoint plus `panel.json` (which prompt, the finished prompts' objectives), so a resumed
trial skips the prompts it finished and continues the current one at its step.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray
import yaml
from ray import tune

from orchestrator.run import worker_memory
from orchestrator.run.trial_context import (  # noqa: F401  (OBJECTIVE, STEP: imported from here too)
    OBJECTIVE,
    PRIOR_LOADS,
    STEP,
    SweepContext,
    aggregate,
    cached_client,
    cached_prior,
    import_function,
    match_torch_threads,
    trial_panel,
)
from orchestrator.spec.space import resolve_params
from orchestrator.track import tracking

OPTUNA_TRIAL_KEY = "_optuna_trial"  # injected into each trial's config by orchestrator.run.tuner.SweepSearch
PANEL_FILE = "dreamsweep_panel.json"
TAG_NODES = "dreamsweep.ray_nodes"


def run_trial(config: dict[str, Any], context: SweepContext) -> None:
    """The Tune function trainable."""
    from trainers.config import config_to_dict, load_train_config

    entered, entered_at = time.perf_counter(), time.time()
    torch_threads = match_torch_threads()
    params = {key: value for key, value in config.items() if key != OPTUNA_TRIAL_KEY}
    number = config.get(OPTUNA_TRIAL_KEY)
    tune_context = tune.get_context()
    trial_dir = Path(tune_context.get_trial_dir())
    panel, overrides = trial_panel(context, params)
    configs = [
        load_train_config(
            context.base,
            {**overrides, "prompt": context.prompts[i], "output_dir": str(trial_dir / f"prompt_{i:03d}")},
        )
        for i in panel
    ]
    steps_per_prompt = configs[0].max_steps

    # Resume state: the Tune checkpoint (after a retry or `dreamsweep resume`) says where we were.
    state = {"position": 0, "step": 0, "finals": [], "last_objective": None}
    restored = tune.get_checkpoint()
    resume_dir: Path | None = None
    if restored is not None:
        local = trial_dir / "restored_checkpoint"
        shutil.rmtree(local, ignore_errors=True)  # never mix files of two restores
        resume_dir = Path(restored.to_directory(str(local)))
        state = json.loads((resume_dir / PANEL_FILE).read_text())

    search_params = resolve_params(params) if context.kind == "search" else {}
    identity = trial_identity(
        context, tune_context, number, [context.prompts[i] for i in panel], search_params
    )
    client = cached_client(context.mlflow_uri)
    # Facts about the worker, reported with every result: the benchmark and tests count prior loads
    # per process and check that each trial held the GPUs it asked for.
    worker = {
        "worker/prior_loads": PRIOR_LOADS["count"],
        "worker/pid": os.getpid(),
        "worker/num_gpus": len(ray.get_gpu_ids()),
        "worker/torch_threads": torch_threads,
    }
    found = tracking.find_trial_run(client, context.experiment_id, identity.ray_trial_id)
    finished = tracking.finished_objective(found)
    if finished is not None:
        # The trial had finished, but the driver died before Tune's snapshot recorded it: its run
        # holds the result, so report it again instead of training again.
        tune.report({OBJECTIVE: finished, STEP: len(panel) * steps_per_prompt, **worker})
        return
    first = tracking.flatten_for_params(config_to_dict(configs[0]))
    if len(panel) > 1:
        first["prompt"] = json.dumps(identity.prompts)  # a panel trial: every prompt, not the first
    run = tracking.TrialRun.open(client, identity, first, found=found)
    # Where each attempt ran (a retry after a lost node runs elsewhere): node ids, in order.
    earlier = found.data.tags.get(TAG_NODES, "") if found is not None else ""
    run.set_tags(
        {TAG_NODES: ",".join([*filter(None, earlier.split(",")), ray.get_runtime_context().get_node_id()])}
    )
    train_fn = import_function(context.train_fn)
    prior = cached_prior(context, configs[0])
    worker["worker/prior_loads"] = PRIOR_LOADS["count"]
    if resume_dir is not None:
        run.set_tags(
            {"dreamsweep.resumed_from": f"prompt {panel[state['position']]} at step {state['step']}"}
        )

    # For the overhead benchmark: the trainer's own time (orchestration = the rest), and the time its
    # callbacks spent on MLflow and Tune reports (a report waits for the driver's round trip).
    compute_s = hooks_s = 0.0
    try:
        for position in range(state["position"], len(panel)):
            cfg = configs[position]
            resuming = resume_dir is not None and position == state["position"]
            hooks = PromptHooks(
                context,
                run,
                worker,
                state["finals"],
                position,
                panel[position],
                steps_per_prompt,
                len(panel) > 1,
            )
            if resuming:
                run.log_metrics(
                    hooks.offset + state["step"], {"trial/resumed_at_step": float(state["step"])}, force=True
                )
            started = time.perf_counter()
            result = train_fn(
                cfg,
                prior,
                on_metrics=hooks.on_metrics,
                on_checkpoint=hooks.on_checkpoint,
                on_artifact=hooks.on_artifact,
                resume_from=resume_dir if resuming else None,
                progress=False,
            )
            compute_s += time.perf_counter() - started - hooks.spent_s
            hooks_s += hooks.spent_s
            final = result.final_metrics.get(context.objective_metric)
            if final is None and resuming:
                final = state.get("last_objective")  # killed after the last checkpoint: nothing left to train
            if final is None:
                raise RuntimeError(
                    f"the trainer never reported the objective {context.objective_metric!r} for prompt {panel[position]}"
                )
            state = {
                "position": position + 1,
                "step": 0,
                "finals": [*state["finals"], float(final)],
                "last_objective": None,
            }
            if (Path(cfg.output_dir) / "config.yaml").exists():
                run.log_artifact(Path(cfg.output_dir) / "config.yaml", hooks.folder("config"))
            if result.last_checkpoint is not None:
                run.log_artifact(Path(result.last_checkpoint), hooks.folder("checkpoint"))

        value = aggregate(state["finals"], context.aggregate)
        memory = worker_memory.trial_end_metrics()  # GPU memory back at the worker's baseline?
        run.log_metrics(len(panel) * steps_per_prompt, {OBJECTIVE: value, **memory}, force=True)
        # Finished before the last report: once Tune sees the trial complete, its run is closed, and a
        # run the driver finds still RUNNING then can only be one that Tune stopped early.
        run.finish("FINISHED")
        tune.report(
            {
                OBJECTIVE: value,
                STEP: len(panel) * steps_per_prompt,
                "trial/compute_s": compute_s,
                "trial/hooks_s": hooks_s,
                "trial/wall_s": time.perf_counter() - entered,
                # Wall-clock bounds, for the overhead benchmark's timeline (gaps between trials).
                "trial/entered_at": entered_at,
                "trial/left_at": time.time(),
                **worker,
                **memory,
            }
        )
    except SystemExit:
        run.flush()  # Tune stopped the trial (ASHA, or the sweep ended): the driver closes its run
        raise
    except BaseException:
        run.set_tags({"dreamsweep.error": traceback.format_exc()[-4000:]})
        run.finish("FAILED")  # a retry reopens it
        raise


def timed_hook(hook: Callable) -> Callable:
    """A PromptHooks callback whose seconds add up in `spent_s`."""

    @functools.wraps(hook)
    def timed(self, *args, **kwargs):
        started = time.perf_counter()
        try:
            return hook(self, *args, **kwargs)
        finally:
            self.spent_s += time.perf_counter() - started

    return timed


class PromptHooks:
    """The trainer's callbacks for one prompt of a trial: metrics to MLflow (at the trial's global step),
    summaries and checkpoints to Tune."""

    def __init__(self, context, run, worker, finals, position, prompt_index, steps_per_prompt, in_panel):
        self.context, self.run, self.worker = context, run, worker
        self.finals, self.position = list(finals), position
        self.offset = position * steps_per_prompt
        self.prefix = f"prompt_{prompt_index:03d}/" if in_panel else ""
        self.current: dict[str, float] = {}
        self.last_report = time.monotonic()
        self.spent_s = 0.0  # inside these callbacks: orchestration, not training

    def folder(self, name: str) -> str:
        return f"{self.prefix}{name}"

    def objective_now(self) -> float | None:
        """The panel's objective so far: finished prompts' finals and this prompt's latest value."""
        values = list(self.finals)
        if self.context.objective_metric in self.current:
            values.append(self.current[self.context.objective_metric])
        return aggregate(values, self.context.aggregate) if values else None

    def report(self, step: int, checkpoint_dir: Path | None = None) -> None:
        value = self.objective_now()
        metrics = {STEP: self.offset + step, **self.worker}
        checkpoint = None
        if value is not None:
            metrics[OBJECTIVE] = value
            checkpoint = tune.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        # else: progress only (the step, for the driver's ETA); the searcher and ASHA skip it, and a
        # checkpoint goes with the first report that has an objective, as before.
        self.run.flush()  # MLflow never lags behind what Tune has seen
        tune.report(metrics, checkpoint=checkpoint)
        self.last_report = time.monotonic()

    @timed_hook
    def on_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self.current.update(metrics)
        self.run.log_metrics(self.offset + step, {self.prefix + k: v for k, v in metrics.items()})
        if time.monotonic() - self.last_report >= self.context.report_every_s:
            self.report(step)

    @timed_hook
    def on_checkpoint(self, step: int, path: Path) -> None:
        panel_state = {
            "position": self.position,
            "step": step,
            "finals": self.finals,
            "last_objective": self.current.get(self.context.objective_metric),
        }
        (Path(path) / PANEL_FILE).write_text(json.dumps(panel_state))
        self.report(step, Path(path))

    @timed_hook
    def on_artifact(self, step: int, path: Path) -> None:
        self.run.log_trainer_artifact(Path(path), self.prefix, self.offset + step)


# ---------------------------------------------------------------------------------------------------
# Amortized trials: one Ray Train run of N workers per trial


def run_amortized_trial(config: dict[str, Any], context: SweepContext) -> None:
    """The Tune function trainable of an amortized sweep.

    The trial itself holds no resources: it starts a TorchTrainer whose N workers each hold theirs
    (the spec's `resources`, per worker). Rank 0's reports reach MLflow and Tune through
    `AmortizedTrialCallback` (ranks other than 0 log nothing). Ray Train keeps the checkpoints under
    the trial's directory on the sweep's storage with a fixed name, so a trial restarted by
    `dreamsweep resume` (or a retry) continues from the last one.
    """
    from trainers.amortized.config import load_amortized_config
    from trainers.amortized.data_parallel import build_trainer
    from trainers.config import config_to_dict

    params = {key: value for key, value in config.items() if key != OPTUNA_TRIAL_KEY}
    number = config.get(OPTUNA_TRIAL_KEY)
    tune_context = tune.get_context()
    trial_dir = Path(tune_context.get_trial_dir())
    overrides = {**context.overrides, **resolve_params(params), **context.extra_overrides}
    output_dir = trial_dir / "amortized"
    cfg = load_amortized_config(
        context.base, {**overrides, **context.trainer_keys, "output_dir": str(output_dir)}
    )
    identity = trial_identity(context, tune_context, number, context.prompts, resolve_params(params))
    client = cached_client(context.mlflow_uri)
    found = tracking.find_trial_run(client, context.experiment_id, identity.ray_trial_id)
    finished = tracking.finished_objective(found)
    if finished is not None:
        tune.report({OBJECTIVE: finished, STEP: cfg.max_steps})
        return
    params_logged = tracking.flatten_for_params(config_to_dict(cfg))
    params_logged["prompts.count"] = len(context.prompts)
    run = tracking.TrialRun.open(client, identity, params_logged, found=found)
    callback = AmortizedTrialCallback(context.mlflow_uri, run.run_id, context.objective_metric, output_dir)
    try:
        trainer = build_trainer(
            cfg,
            storage_path=amortized_storage(context, tune_context, trial_dir),
            name="amortized",
            callbacks=[callback],
            report_keys={OBJECTIVE: context.objective_metric},
        )
        result = trainer.fit()
        final = yaml.safe_load((output_dir / "metrics.yaml").read_text())
        if context.objective_metric not in final:
            raise RuntimeError(
                f"the amortized trainer never reported the objective {context.objective_metric!r}"
            )
        value = float(final[context.objective_metric])
        run.log_metrics(cfg.max_steps, {OBJECTIVE: value}, force=True)
        resumed_at = int(final.get("train/resumed_at_step", 0))
        if resumed_at:  # as a per-prompt trial does: where a restarted trial continued from
            run.log_metrics(resumed_at, {"trial/resumed_at_step": float(resumed_at)}, force=True)
        log_amortized_outputs(run, output_dir, cfg.logging.turntable_format)
        run.finish("FINISHED")
        held = {k: v for k, v in (result.metrics or {}).items() if k.startswith("worker/")}
        tune.report({OBJECTIVE: value, STEP: cfg.max_steps, "workers": cfg.data_parallel.num_workers, **held})
    except SystemExit:
        run.flush()
        raise
    except BaseException:
        run.set_tags({"dreamsweep.error": traceback.format_exc()[-4000:]})
        run.finish("FAILED")
        raise


# What an amortized trial's MLflow run holds (the per-prompt layout, `prompt_NNN/...`, is unchanged):
#   config.yaml, metrics.yaml, evaluation_prompts.json ({"train": [...], "held_out": [...]})
#   renders/turntable.<fmt>                  the first training prompt (as `dreamsweep train` writes it)
#   renders/turntables/<group>_<NN>_<prompt>.<fmt> and prompts.json   one per evaluation prompt
#   validation/step_NNNNNNN.png and .txt     one row per evaluation prompt; the .txt names the rows;
#                                            also images over steps (key "validation")
#   checkpoint/step_NNNNNNN/                 the last checkpoint (`dreamsweep generate --sweep` reads it)


def log_new_grids(run: tracking.TrialRun, folder: Path, logged: set[str]) -> None:
    """Validation grids not yet in the run: each file with its row labels, and as an image at its step.
    A grid counts as written once its .txt exists (the trainer writes the PNG first)."""
    for png in sorted(folder.glob("step_*.png")) if folder.is_dir() else []:
        labels = png.with_suffix(".txt")
        if png.name in logged or not labels.is_file():
            continue
        run.log_artifact(png, "validation")
        run.log_artifact(labels, "validation")
        run.log_image(png, "validation", int(png.stem.removeprefix("step_")))
        logged.add(png.name)


def logged_grids(run: tracking.TrialRun) -> set[str]:
    """The validation grids a run already holds (a restarted trial does not log them twice)."""
    files = run.client.list_artifacts(run.run_id, "validation")
    return {Path(f.path).name for f in files if f.path.endswith(".png")}


def log_amortized_outputs(run: tracking.TrialRun, output_dir: Path, turntable_format: str) -> None:
    """A finished amortized trial's files, in the layout above."""
    from trainers.amortized.loop import EVALUATION_PROMPTS_FILE, TURNTABLES_DIR
    from trainers.checkpoint import latest_checkpoint

    for name in ("config.yaml", "metrics.yaml", EVALUATION_PROMPTS_FILE):
        if (output_dir / name).exists():
            run.log_artifact(output_dir / name)
    if (output_dir / f"turntable.{turntable_format}").exists():
        run.log_artifact(output_dir / f"turntable.{turntable_format}", "renders")
    if (output_dir / TURNTABLES_DIR).is_dir():
        run.log_artifact(output_dir / TURNTABLES_DIR, "renders/turntables")
    log_new_grids(run, output_dir / "validation", logged_grids(run))
    checkpoint = latest_checkpoint(output_dir / "checkpoints")
    if checkpoint is not None:
        run.log_artifact(checkpoint, f"checkpoint/{checkpoint.name}")


def trial_identity(
    context: SweepContext, tune_context, number: int | None, prompts: list[str], search_params: dict
) -> tracking.TrialIdentity:
    """What finds a trial's MLflow run again: the sweep's parent, the Tune and Optuna trial ids."""
    return tracking.TrialIdentity(
        sweep=context.sweep,
        experiment_id=context.experiment_id,
        parent_run_id=context.parent_run_id,
        ray_trial_id=tune_context.get_trial_id(),
        optuna_trial=number,
        prompts=prompts,
        search_params=search_params,
        git_commit=context.git_commit,
    )


def amortized_storage(context: SweepContext, tune_context, trial_dir: Path) -> str:
    """Where an amortized trial's Ray Train run keeps its checkpoints: the trial's directory on the
    sweep's storage. (`get_trial_dir()` is the trial's working copy in this Ray session's temporary
    directory, which a driver restarted after kill -9 runs in a new session and never sees again.)"""
    if not context.tune_path:
        return str(trial_dir / "ray_train")
    from orchestrator.spec.secrets import usable_url

    tune_path = usable_url(context.tune_path, "storage.tune")
    experiment = f"{tune_path.rstrip('/')}/{tune_context.get_experiment_name()}"
    return f"{experiment}/{trial_dir.name}/ray_train"


def amortized_trial_callback_class():
    """Built lazily: importing Ray Train's Tune integration is only needed by amortized sweeps."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class _Callback(TuneReportCallback):
        """Runs in the Ray Train controller: rank 0's reports -> the trial's MLflow run, and -> Tune
        once they carry the objective (the searcher and ASHA need it in every result)."""

        def __init__(self, mlflow_uri: str, run_id: str, objective_metric: str, output_dir: Path):
            super().__init__()
            self.mlflow_uri, self.run_id, self.objective_metric = mlflow_uri, run_id, objective_metric
            self.output_dir = Path(output_dir)
            self._run = None
            self._grids: set[str] | None = None

        def after_report(self, run_context, metrics, checkpoint):
            rank0 = dict(metrics[0])
            step = int(rank0.get(STEP, 0))
            if self._run is None:  # resumed=True: steps already in MLflow (before a restart) are skipped
                self._run = tracking.TrialRun(cached_client(self.mlflow_uri), self.run_id, resumed=True)
            logged = {k: v for k, v in rank0.items() if k.startswith(("train/", "eval/")) and _is_number(v)}
            self._run.log_metrics(step, logged, force=True)
            # Rank 0's validation grids so far, so that a running trial shows them (on this node's disk:
            # the trial's output_dir; a rank 0 on another node leaves them to the end of the trial).
            if self._grids is None:
                self._grids = logged_grids(self._run)
            log_new_grids(self._run, self.output_dir / "validation", self._grids)
            if OBJECTIVE in rank0:
                super().after_report(run_context, [rank0], checkpoint)

    return _Callback


def AmortizedTrialCallback(mlflow_uri: str, run_id: str, objective_metric: str, output_dir: Path):  # noqa: N802 (a factory)
    return amortized_trial_callback_class()(mlflow_uri, run_id, objective_metric, output_dir)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
