"""Submit and resume sweeps: the path from a spec file to a finished, consistent sweep.

    submit("sweeps/quickstart.yaml", workspace="ws")     # validate, register, run on Ray
    resume("quickstart", workspace="ws")                  # after a kill -9, a crash, a Ctrl-C

At the end (of a submit or a resume) the three stores are made to agree with Tune's view: no Optuna
trial left RUNNING, every child run in a terminal state, the parent run with its plots and FINISHED.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any

from mlflow.tracking import MlflowClient

from orchestrator.errors import SweepExistsError
from orchestrator.run.cluster import ClusterConfig, check_ray_fits, init_ray, load_cluster
from orchestrator.run.trial_context import SweepContext
from orchestrator.run.tuner import build_tuner, can_restore, experiment_path, optuna_storage, restore_tuner
from orchestrator.run.workspace import SweepRecord, Workspace
from orchestrator.spec.prompts import load_prompts
from orchestrator.spec.secrets import register_credentials, usable_url
from orchestrator.spec.space import optuna_space
from orchestrator.spec.spec import (
    SweepSpec,
    base_config_dict,
    load_sweep_spec,
    spec_to_dict,
    sweep_keys,
    trainer_functions,
)
from orchestrator.track import clip_recall, tracking
from orchestrator.track.progress import SweepProgress


@dataclass
class SweepOutcome:
    name: str
    complete: int
    failed: int
    best_trial: int | None
    best_value: float | None
    # Seconds per phase of this call, driver side: "setup" (spec to Tuner), "fit" (Tune), "finalize".
    timings: dict[str, float] = dataclasses.field(default_factory=dict)
    # Tune returned with trials left to run: SIGINT (Ctrl-C, `dreamsweep stop`). `resume` continues it.
    stopped: bool = False
    # A packed sweep's driver counters: worker steps, prior calls, workers, the most members at once.
    stats: dict[str, int] = dataclasses.field(default_factory=dict)


def submit(
    spec_source: Any,
    *,
    name: str | None = None,
    workspace: str | Workspace | None = None,
    resume_existing: bool = False,
    address: str | None = None,
    runtime: dict[str, Any] | None = None,
) -> SweepOutcome:
    """Validate `spec_source` (a path or a mapping) before Ray starts, register the sweep, run it.

    `runtime` overrides SweepContext fields for this sweep and its resumes (the tests' fake trainer)."""
    started = time.perf_counter()
    ws = workspace if isinstance(workspace, Workspace) else Workspace(workspace)
    spec = load_sweep_spec(spec_source, name=name)
    register_credentials(spec.storage)  # a literal password: one warning; every record shows ***
    check_references(spec)
    stores = ws.stores_for(spec)
    if ws.exists(spec.name) or can_restore(stores.tune_path, spec.name):
        if resume_existing:
            return resume(spec.name, workspace=ws, address=address)
        raise SweepExistsError(
            f"a sweep named {spec.name!r} already exists in {ws.root}: `dreamsweep resume {spec.name}` "
            "continues it, `--name NEW` starts another (submitting again would overwrite its Ray state)"
        )
    client = MlflowClient(usable_url(stores.mlflow_uri, "storage.mlflow"))
    experiment_id = tracking.ensure_experiment(client, spec.name, stores.mlflow_artifacts)
    prompts = load_prompts(spec.prompts)
    space = optuna_space(spec, prompts.num_rows)
    parent = tracking.start_parent_run(client, experiment_id, spec.name, spec_to_dict(spec), space)
    record = SweepRecord(
        spec.name, stores, experiment_id=experiment_id, parent_run_id=parent, extra=dict(runtime or {})
    )
    ws.register(spec, record)
    return _run(spec, record, restore=False, address=address, started=started, workspace=ws)


def resume(
    name: str, *, workspace: str | Workspace | None = None, address: str | None = None
) -> SweepOutcome:
    started = time.perf_counter()
    ws = workspace if isinstance(workspace, Workspace) else Workspace(workspace)
    record = ws.record(name)  # UnknownSweepError lists the sweeps that exist
    spec = ws.spec(name)
    restore = can_restore(record.stores.tune_path, name)
    return _run(spec, record, restore=restore, address=address, started=started, workspace=ws)


def check_references(spec: SweepSpec) -> None:
    """Every `${NAME}` in the spec's store URLs is set here (this machine runs the sweep): a missing one
    fails now, naming the field and the variable, not when the first trial connects."""
    for field, url in spec.storage.model_dump().items():
        if url is not None:
            usable_url(url, f"storage.{field}")


def make_context(spec: SweepSpec, record: SweepRecord, prompts: list[str]) -> SweepContext:
    context = SweepContext(
        sweep=spec.name,
        kind=spec.kind,
        prompts=prompts,
        base=base_config_dict(spec),
        overrides=dict(spec.overrides),
        objective_metric=spec.objective.metric,
        objective_mode=spec.objective.mode,
        aggregate=spec.objective.aggregate,
        mlflow_uri=record.stores.mlflow_uri,
        experiment_id=record.experiment_id,
        parent_run_id=record.parent_run_id,
        git_commit=tracking.git_commit(),
        trainer=spec.trainer,
        trainer_keys=sweep_keys(spec, prompts[0]) if spec.trainer == "amortized" else {},
        tune_path=record.stores.tune_path,
    )
    return dataclasses.replace(context, **record.extra)


def connect(spec: SweepSpec, address: str | None) -> ClusterConfig:
    """Start or join the sweep's Ray cluster (`address` overrides the spec's cluster), and refuse a
    trial that none of its nodes can hold (Tune would leave it pending forever)."""
    cluster = load_cluster(spec.cluster)
    if address is not None:
        cluster = cluster.model_copy(update={"address": address})
    init_ray(cluster)
    check_ray_fits(spec.resources.cpus, spec.resources.gpus, cluster)
    return cluster


def _run(
    spec: SweepSpec,
    record: SweepRecord,
    *,
    restore: bool,
    address: str | None,
    started: float,
    workspace: Workspace | None = None,
) -> SweepOutcome:
    prompts = [str(p) for p in load_prompts(spec.prompts).column("prompt").to_pylist()]
    context = make_context(spec, record, prompts)
    # An amortized trial trains all prompts at once: its steps are the generator's.
    panel = 1 if spec.kind == "fanout" or spec.trainer == "amortized" else len(prompts)
    _, load_config, _ = trainer_functions(spec.trainer)
    overrides = {**context.overrides, **context.extra_overrides, **context.trainer_keys}
    steps_per_trial = panel * load_config(context.base, overrides).max_steps

    connect(spec, address)
    client = MlflowClient(usable_url(record.stores.mlflow_uri, "storage.mlflow"))
    tracking.reopen_run(client, record.parent_run_id)
    if spec.packed:
        return _run_packed(spec, record, context, steps_per_trial, started, workspace)
    if restore:
        tuner = restore_tuner(spec, context, record.stores.tune_path)
    else:
        progress = sweep_progress(spec, record, steps_per_trial, workspace)
        tuner = build_tuner(
            spec, context, record.stores.tune_path, record.stores.optuna_url, [progress], steps_per_trial
        )
    outcome, _ = timed(started, tuner.fit, lambda: finalize(spec, record))
    return outcome


def timed(started: float, fit, finish) -> tuple[SweepOutcome, Any]:
    """Run a sweep's `fit()`, then `finish()` (the stores made to agree); the outcome carries how long
    set-up (since `started`), fit and finalisation took, which the overhead benchmark reads.
    Returns (the outcome, what `fit()` returned)."""
    fit_started = time.perf_counter()
    result = fit()
    fit_ended = time.perf_counter()
    outcome = finish()
    outcome.timings = {
        "setup": fit_started - started,
        "fit": fit_ended - fit_started,
        "finalize": time.perf_counter() - fit_ended,
    }
    return outcome, result


def sweep_progress(spec: SweepSpec, record: SweepRecord, steps_per_trial: int, workspace) -> SweepProgress:
    total = load_prompts(spec.prompts).num_rows if spec.kind == "fanout" else spec.trials
    return SweepProgress(
        spec.name,
        total,
        spec.objective.mode,
        mlflow_uri=record.stores.mlflow_uri,
        experiment_id=record.experiment_id,
        parent_run_id=record.parent_run_id,
        steps_per_trial=steps_per_trial,
        progress_file=str(progress_file(workspace, spec.name)) if workspace else None,
    )


def packed_trials_root(tune_path: str, name: str) -> str:
    """Where a packed sweep's trials keep their checkpoints and panel state (one folder per trial)."""
    return f"{experiment_path(tune_path.removeprefix('file://'), name)}/packed"


def _run_packed(spec, record, context, steps_per_trial, started, workspace) -> SweepOutcome:
    """A packed sweep (orchestrator/run/packed.py): submit and resume are the same call, since the
    study's RUNNING trials are the ones to continue."""
    from orchestrator.run.packed import member_run_id, run_packed
    from orchestrator.track.progress import PackedProgress

    progress = sweep_progress(spec, record, steps_per_trial, workspace)

    def fit() -> dict:
        return run_packed(
            spec,
            context,
            record.stores.optuna_url,
            packed_trials_root(record.stores.tune_path, spec.name),
            lambda study: PackedProgress(progress, study, member_run_id),
        )

    outcome, stats = timed(started, fit, lambda: finalize_packed(spec, record))
    outcome.stats = stats
    return outcome


def finalize_packed(spec: SweepSpec, record: SweepRecord) -> SweepOutcome:
    """Make MLflow agree with the study, the one record of a packed sweep's trials."""
    import optuna
    from optuna.trial import TrialState

    from orchestrator.run.packed import member_run_id

    study = optuna.load_study(study_name=spec.name, storage=optuna_storage(record.stores.optuna_url))
    trials = study.get_trials(deepcopy=False)
    expected = spec.trials if spec.kind == "search" else load_prompts(spec.prompts).num_rows
    if len(trials) < expected or any(t.state == TrialState.RUNNING for t in trials):
        done = sum(1 for t in trials if t.state == TrialState.COMPLETE)
        return SweepOutcome(spec.name, done, 0, None, None, stopped=True)
    status = {TrialState.COMPLETE: "FINISHED", TrialState.PRUNED: "FINISHED", TrialState.FAIL: "FAILED"}
    final_status = {member_run_id(t.number): status.get(t.state, "KILLED") for t in trials}
    return conclude(spec, record, study, final_status)


def progress_file(workspace: Workspace, name: str):
    """The live view the driver writes while the sweep runs (orchestrator.track.progress), for status."""
    return workspace.sweep_dir(name) / "progress.json"


def finalize(spec: SweepSpec, record: SweepRecord) -> SweepOutcome:
    """Make Optuna and MLflow agree with Tune's final view of the trials."""
    import optuna
    from optuna.trial import TrialState
    from ray.tune import ExperimentAnalysis

    analysis = ExperimentAnalysis(experiment_path(record.stores.tune_path, spec.name))
    expected = spec.trials if spec.kind == "search" else load_prompts(spec.prompts).num_rows
    unfinished = [t for t in analysis.trials if t.status not in ("TERMINATED", "ERROR")]
    if unfinished or len(analysis.trials) < expected:
        # Interrupted (Tune saved its state and returned): the stores stay as they are, with the
        # running trials still RUNNING, so that `resume` continues them into the same Optuna trials
        # and MLflow runs. Finalising now would FAIL trials that the resumed sweep then completes.
        done = sum(1 for t in analysis.trials if t.status == "TERMINATED")
        return SweepOutcome(spec.name, done, 0, None, None, stopped=True)
    final_status = {
        t.trial_id: (
            "FINISHED" if t.status == "TERMINATED" else "FAILED" if t.status == "ERROR" else "KILLED"
        )
        for t in analysis.trials
    }
    study = optuna.load_study(study_name=spec.name, storage=optuna_storage(record.stores.optuna_url))
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study.tell(trial.number, state=TrialState.FAIL)  # the sweep has ended: nothing can still run
    return conclude(spec, record, study, final_status)


def conclude(spec: SweepSpec, record: SweepRecord, study, final_status: dict[str, str]) -> SweepOutcome:
    """The end of a sweep: child runs closed, the study's plots and the best trial on the parent run."""
    from optuna.trial import TrialState

    client = MlflowClient(usable_url(record.stores.mlflow_uri, "storage.mlflow"))
    tracking.close_stale_runs(client, record.experiment_id, final_status)
    tracking.log_study_plots(client, record.parent_run_id, study)
    complete = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    failed = sum(1 for status in final_status.values() if status == "FAILED")
    best_trial = best_value = None
    if complete:
        best = (
            min(complete, key=lambda t: t.value)
            if spec.objective.mode == "min"
            else max(complete, key=lambda t: t.value)
        )
        best_trial, best_value = best.number, best.value
        client.log_metric(record.parent_run_id, "best/objective_final", float(best.value))
    clip_recall.finalize_fanout(spec, record, client)  # eval/clip_r_at_1 over the finished prompts
    client.set_terminated(record.parent_run_id, status="FINISHED" if complete else "FAILED")
    return SweepOutcome(spec.name, len(complete), failed, best_trial, best_value)
