"""Build or restore the Ray Tune Tuner of a sweep: trainable, OptunaSearch, ASHA, failure handling.

Ray does the scheduling, retries and experiment checkpointing; this module only wires it:
- `SweepSearch` is Ray's OptunaSearch over the persistent study named after the sweep. It adds three
  things Ray's lacks: each trial's Optuna number goes into the trial's config (so the worker can tag
  its MLflow run), a fan-out hands every prompt out exactly once (an enqueued trial per prompt index
  not yet taken, so a prompt orphaned by a killed driver is handed out again), and on restore it fails
  the study's RUNNING trials that Tune never recorded (asked just before a `kill -9`), so the study ends
  with no stale RUNNING trials.
- `reuse_actors=True`: a worker process outlives its trial and keeps its cached prior.
- Tune's experiment state is snapshotted every `EXPERIMENT_SNAPSHOT_S` seconds (instead of Tune's
  10 s default) so that a killed driver resumes each trial from the checkpoint it last reported.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import optuna
from optuna.trial import TrialState
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

from orchestrator.space import PROMPT_INDEX, make_sampler, optuna_space
from orchestrator.spec import SweepSpec
from orchestrator.trainable import OBJECTIVE, OPTUNA_TRIAL_KEY, STEP, SweepContext, run_trial

EXPERIMENT_SNAPSHOT_S = "1"
QUIET_RAY = {
    "TUNE_GLOBAL_CHECKPOINT_S": EXPERIMENT_SNAPSHOT_S,
    # Frequent snapshots are deliberate (see above): no warning about them.
    "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0",
    # Ray's newer console engine prints its own header and table even at verbose=0.
    "RAY_AIR_NEW_OUTPUT": "0",
}


def _quiet_ray() -> None:
    for key, value in QUIET_RAY.items():
        os.environ.setdefault(key, value)
    logging.getLogger("ray.tune").setLevel(logging.WARNING)


def optuna_storage(url: str) -> optuna.storages.BaseStorage:
    # SQLite needs a busy timeout: the driver and `dreamsweep status` may touch it at once.
    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)


class SweepSearch(OptunaSearch):
    def __init__(self, *args, fanout_prompts: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._fanout_prompts = fanout_prompts

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        if self._fanout_prompts is not None and trial_id not in self._ot_trials:
            index = self._next_prompt()
            if index is None:
                return None
            self._ot_study.enqueue_trial({PROMPT_INDEX: index})
        config = super().suggest(trial_id)
        ot_trial = self._ot_trials[trial_id]
        ot_trial.set_user_attr("ray_trial_id", trial_id)
        return {**config, OPTUNA_TRIAL_KEY: ot_trial.number}

    def _next_prompt(self) -> int | None:
        taken = {
            t.params.get(PROMPT_INDEX)
            for t in self._ot_study.get_trials(deepcopy=False)
            if t.state in (TrialState.COMPLETE, TrialState.RUNNING, TrialState.PRUNED)
        }
        free = [i for i in range(self._fanout_prompts) if i not in taken]
        return free[0] if free else None

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        try:
            super().on_trial_result(trial_id, result)
        except RuntimeError as exc:
            # A trial told COMPLETE just before a kill, that Tune's last snapshot still had running,
            # reports its result again after the restore: the study already has it.
            if "already finished" not in str(exc):
                raise

    def restore(self, checkpoint_path: str) -> None:
        super().restore(checkpoint_path)
        self.fail_orphans()

    def fail_orphans(self, live_trial_ids: set[str] | None = None) -> list[int]:
        """FAIL the study's RUNNING trials no live Tune trial owns. Returns their numbers."""
        owned = {
            trial.number
            for trial_id, trial in self._ot_trials.items()
            if live_trial_ids is None or trial_id in live_trial_ids
        }
        orphans = [
            t.number
            for t in self._ot_study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            if t.number not in owned
        ]
        for number in orphans:
            # A fan-out hands the orphan's prompt out again by itself (see _next_prompt).
            self._ot_study.tell(number, state=TrialState.FAIL)
        return orphans


def build_searcher(spec: SweepSpec, num_prompts: int, optuna_url: str) -> SweepSearch:
    return SweepSearch(
        optuna_space(spec, num_prompts),
        metric=OBJECTIVE,
        mode=spec.objective.mode,
        sampler=make_sampler(spec, num_prompts),
        study_name=spec.name,
        storage=optuna_storage(optuna_url),
        fanout_prompts=num_prompts if spec.kind == "fanout" else None,
    )


def build_trainable(spec: SweepSpec, context: SweepContext):
    resources = {"cpu": spec.resources.cpus, "gpu": spec.resources.gpus}
    return tune.with_resources(tune.with_parameters(run_trial, context=context), resources)


def build_tuner(
    spec: SweepSpec,
    context: SweepContext,
    tune_path: str,
    optuna_url: str,
    callbacks: list[tune.Callback],
    steps_per_trial: int,
) -> tune.Tuner:
    num_prompts = len(context.prompts)
    trials = num_prompts if spec.kind == "fanout" else spec.trials
    scheduler = None
    if spec.early_stopping is not None:
        asha = spec.early_stopping
        scheduler = ASHAScheduler(
            time_attr=STEP,
            metric=OBJECTIVE,
            mode=spec.objective.mode,
            # One past the last step: ASHA stops any trial whose result reaches max_t, and the trial's
            # own last report (at its last step) must end it normally, not as an early stop.
            max_t=asha.max_t or steps_per_trial + 1,
            grace_period=asha.grace_period,
            reduction_factor=asha.reduction_factor,
        )
    _quiet_ray()
    return tune.Tuner(
        build_trainable(spec, context),
        tune_config=tune.TuneConfig(
            search_alg=build_searcher(spec, num_prompts, optuna_url),
            scheduler=scheduler,
            num_samples=trials,
            max_concurrent_trials=spec.max_concurrent,
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(
            name=spec.name,
            storage_path=tune_path,
            failure_config=tune.FailureConfig(max_failures=spec.retries),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            callbacks=callbacks,
            verbose=0,  # the console is orchestrator.progress's view, not Ray's status dump
        ),
    )


def experiment_path(tune_path: str, name: str) -> str:
    return f"{tune_path.rstrip('/')}/{name}"


def can_restore(tune_path: str, name: str) -> bool:
    return tune.Tuner.can_restore(experiment_path(tune_path, name))


def restore_tuner(spec: SweepSpec, context: SweepContext, tune_path: str) -> tune.Tuner:
    _quiet_ray()
    return tune.Tuner.restore(
        experiment_path(tune_path, spec.name),
        trainable=build_trainable(spec, context),
        resume_unfinished=True,
        resume_errored=True,  # a trial that failed (e.g. its node died) continues from its checkpoint
    )
