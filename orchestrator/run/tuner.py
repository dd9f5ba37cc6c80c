"""Build or restore the Ray Tune Tuner of a sweep: trainable, OptunaSearch, ASHA, failure handling.

Ray does the scheduling, retries and experiment checkpointing; this module only wires it:
- `SweepSearch` is Ray's OptunaSearch over the persistent study named after the sweep. It adds three
  things Ray's lacks: each trial's Optuna number goes into the trial's config (so the worker can tag
  its MLflow run), a fan-out hands every prompt out exactly once (an enqueued trial per prompt index
  not yet taken, so a prompt orphaned by a killed driver is handed out again), and after a restore it
  takes Tune's trials as they are and fails the study's RUNNING trials that no live Tune trial owns
  (asked just before a `kill -9`), so the study ends with no stale RUNNING trials.
- `SweepSearchGenerator` (Tune's SearchGenerator around a ConcurrencyLimiter around SweepSearch, built
  here rather than by Tune so that it can be reconciled) makes the search state agree with the trials
  Tune restored, before the restored run asks for a trial. Tune snapshots the trial list and the
  search state as separate files, and uploads them from its staging folder in the background while
  the next snapshot may already be overwriting them, so after a `kill -9` the two can come from
  different moments: a trial count or concurrency slots ahead of the trial list (a trial never re-run
  and never replaced), or behind it (a resumed trial whose completion never reaches the study).
  Tune's restored trial list is what actually runs, so it is the one source of truth.
- Also on restore, a live trial whose recorded checkpoint Tune already deleted (`num_to_keep`: the
  deletion happens before the next snapshot reaches storage) continues from the checkpoint it wrote
  next (`continue_from_surviving_checkpoints`); Tune would fail it ("does not exist on storage
  anymore") and, counting it as a trial, never replace it.
- `reuse_actors=True`: a worker process outlives its trial and keeps its cached prior.
- Tune's experiment state is snapshotted every `EXPERIMENT_SNAPSHOT_S` seconds (instead of Tune's
  10 s default) so that a killed driver resumes each trial from the checkpoint it last reported.
"""

from __future__ import annotations

import logging
import os
import posixpath
import re
from typing import Any

import optuna
import pyarrow.fs
from optuna.trial import TrialState
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import ConcurrencyLimiter, SearchGenerator
from ray.tune.search.optuna import OptunaSearch

from orchestrator.internals import TrainingResult
from orchestrator.run.stores import engine_kwargs
from orchestrator.run.trainable import (
    OBJECTIVE,
    OPTUNA_TRIAL_KEY,
    STEP,
    SweepContext,
    run_amortized_trial,
    run_trial,
)
from orchestrator.spec.secrets import usable_url
from orchestrator.spec.space import PROMPT_INDEX, make_sampler, optuna_space
from orchestrator.spec.spec import SweepSpec

EXPERIMENT_SNAPSHOT_S = "1"
QUIET_RAY = {
    "TUNE_GLOBAL_CHECKPOINT_S": EXPERIMENT_SNAPSHOT_S,
    # Frequent snapshots are deliberate (see above): no warning about them.
    "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0",
    # Ray's newer console engine prints its own header and table even at verbose=0.
    "RAY_AIR_NEW_OUTPUT": "0",
    # A trial reports its step before it has an objective (an eval metric comes at the end of a
    # prompt), for the console's ETA; SweepSearch and ASHA skip such progress-only results.
    "TUNE_DISABLE_STRICT_METRIC_CHECKING": "1",
}


def _quiet_ray() -> None:
    for key, value in QUIET_RAY.items():
        os.environ.setdefault(key, value)
    logging.getLogger("ray.tune").setLevel(logging.WARNING)


class SweepStorage(optuna.storages.RDBStorage):
    """Optuna's RDBStorage, made from a sweep's recorded URL, that pickles (into Tune's tuner.pkl and
    search state, through OptunaSearch) with that recorded URL, never with the one it connects with,
    and connects again from it when unpickled (orchestrator.spec.secrets.usable_url)."""

    def __init__(self, recorded_url: str):
        self.recorded_url = recorded_url
        usable = usable_url(recorded_url, "storage.optuna")
        super().__init__(usable, engine_kwargs=engine_kwargs(usable))

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["url"] = None  # made again from recorded_url by __setstate__
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state["url"] = usable_url(state["recorded_url"], "storage.optuna")
        super().__setstate__(state)


def optuna_storage(url: str) -> optuna.storages.BaseStorage:
    """The study's storage from its recorded URL (`${NAME}` resolved, a `***` password taken from
    PGPASSWORD or ~/.pgpass, postgresql:// given the installed driver: orchestrator.spec.secrets)."""
    import sqlalchemy.exc

    from orchestrator.spec.secrets import redact_url
    from orchestrator.spec.spec import SpecError

    try:
        return SweepStorage(url)
    except sqlalchemy.exc.OperationalError as exc:
        reason = str(exc.orig).strip().splitlines()[-1] if exc.orig is not None else str(exc)
        hint = ""
        if "password" in reason:
            hint = "; give the database's password in PGPASSWORD or ~/.pgpass (README: Clusters)"
        raise SpecError(f"storage.optuna: cannot connect to {redact_url(url)}: {reason}{hint}") from None


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
        if OBJECTIVE not in result:
            return  # progress only (step and speed, for the ETA): nothing for the study yet
        try:
            super().on_trial_result(trial_id, result)
        except RuntimeError as exc:
            # A trial told COMPLETE just before a kill, that Tune's last snapshot still had running,
            # reports its result again after the restore: the study already has it.
            if "already finished" not in str(exc):
                raise

    def adopt_live_trials(self, live: dict[str, int]) -> list[int]:
        """Own exactly Tune's live trials (Ray trial id -> Optuna trial number) and FAIL the study's
        RUNNING trials that none of them owns. Returns the FAILed numbers.

        After a restore the pickled `_ot_trials` can be older or newer than Tune's trial list (see the
        module docstring), so each live trial's Optuna trial is found again by the number in its config."""
        storage = self._ot_study._storage
        study_id = storage.get_study_id_from_name(self._ot_study.study_name)
        owned = {}
        for trial_id, number in live.items():
            known = self._ot_trials.get(trial_id)
            if known is None or known.number != number:
                known = optuna.Trial(
                    self._ot_study, storage.get_trial_id_from_study_id_trial_number(study_id, number)
                )
            owned[trial_id] = known
        self._ot_trials = owned
        numbers = set(live.values())
        orphans = [
            t.number
            for t in self._ot_study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            if t.number not in numbers
        ]
        for number in orphans:
            # A fan-out hands the orphan's prompt out again by itself (see _next_prompt).
            self._ot_study.tell(number, state=TrialState.FAIL)
        return orphans


class SweepSearchGenerator(SearchGenerator):
    """Tune's SearchGenerator over ConcurrencyLimiter(SweepSearch), reconciled with Tune's restored trials.

    After `restore_from_dir` it creates no trial and does not report itself finished until
    `reconcile` (called by `ReconcileOnRestore` at the first step, when Tune has re-queued its trials)
    has set the trial count, the concurrency slots and the searcher's trials from Tune's trial list."""

    def __init__(self, searcher: SweepSearch, max_concurrent: int):
        super().__init__(ConcurrencyLimiter(searcher, max_concurrent=max_concurrent))
        self._awaiting_trials = False

    @property
    def awaiting_trials(self) -> bool:
        return self._awaiting_trials

    @property
    def sweep_search(self) -> SweepSearch:
        return self.searcher.searcher

    def restore_from_dir(self, dirpath: str) -> None:
        super().restore_from_dir(dirpath)
        self._awaiting_trials = True

    def is_finished(self) -> bool:
        # Until reconciled the trial count may be ahead of the trials Tune has: not finished yet.
        return not self._awaiting_trials and super().is_finished()

    def next_trial(self):
        return None if self._awaiting_trials else super().next_trial()

    def reconcile(self, trials: list) -> list[int]:
        """Once after a restore: agree with Tune's `trials`. Returns the Optuna trials FAILed as orphans."""
        if not self._awaiting_trials:
            return []
        live = {t.trial_id: int(t.config[OPTUNA_TRIAL_KEY]) for t in trials if not t.is_finished()}
        self._counter = len(trials)  # a trial asked but never recorded by Tune is replaced
        self.searcher.live_trials = set(live)
        self.searcher.num_unfinished_live_trials = len(live)
        orphans = self.sweep_search.adopt_live_trials(live)
        self._awaiting_trials = False
        return orphans


_CHECKPOINT_DIR = re.compile(r"checkpoint_(\d+)$")


def _exists(fs: pyarrow.fs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound


def continue_from_surviving_checkpoints(trials: list) -> dict[str, str]:
    """Point each live trial whose latest recorded checkpoint is gone at the oldest checkpoint it
    wrote after that one. Returns {trial id: checkpoint path} for the trials changed.

    Tune deletes a trial's checkpoint N when it registers N + num_to_keep, and uploads the snapshot
    that no longer refers to N only afterwards, in the background: a `kill -9` in between leaves a
    snapshot whose latest checkpoint is deleted. The oldest later checkpoint is then always complete
    (Tune registered it, i.e. the worker had finished writing it, before it registered the one whose
    registration deleted N), where the newest one may have been cut short by the kill.
    Tune's trial bookkeeping has no public setter for this, hence `run_metadata.checkpoint_manager`."""
    changed = {}
    for trial in trials:
        latest = trial.latest_checkpoint_result
        if trial.is_finished() or latest is None:
            continue
        fs, path = latest.checkpoint.filesystem, latest.checkpoint.path
        lost = _CHECKPOINT_DIR.search(posixpath.basename(path))
        if lost is None or _exists(fs, path):
            continue
        later = [
            (int(match.group(1)), info.path)
            for info in fs.get_file_info(pyarrow.fs.FileSelector(posixpath.dirname(path)))
            if info.type == pyarrow.fs.FileType.Directory
            and (match := _CHECKPOINT_DIR.search(info.base_name))
            and int(match.group(1)) > int(lost.group(1))
        ]
        if not later:
            continue  # nothing to continue from: Tune reports the trial's error as it is
        surviving = min(later)[1]
        manager = trial.run_metadata.checkpoint_manager
        # Drop the lost checkpoints first: registering must not try to delete them again.
        manager._checkpoint_results = [
            r for r in manager._checkpoint_results if _exists(r.checkpoint.filesystem, r.checkpoint.path)
        ]
        manager.register_checkpoint(
            TrainingResult(checkpoint=tune.Checkpoint(surviving, filesystem=fs), metrics=latest.metrics)
        )
        changed[trial.trial_id] = surviving
    return changed


class ReconcileOnRestore(tune.Callback):
    """At the first step after a restore (when Tune has re-queued its trials and started none), makes
    the trials' checkpoints and the search state agree with Tune's trial list. Tune pickles it with the
    generator in the tuner's state, so a restored Tuner gets both back, still linked."""

    def __init__(self, generator: SweepSearchGenerator):
        self.generator = generator

    def on_step_begin(self, iteration: int, trials: list, **info) -> None:
        if self.generator.awaiting_trials:
            continue_from_surviving_checkpoints(trials)
            self.generator.reconcile(trials)


class FinishingASHA(ASHAScheduler):
    """Ray's ASHA, except that a trial's results at its last step are never judged.

    The trainer reports its last checkpoint at the last step, before its final evaluation and
    artifacts. ASHA's top rung can fall on that very step (grace 10, factor 2, 40 steps: rungs at 10,
    20 and 40), and stopping a trial there saves no compute: it only cuts off the final evaluation and
    leaves a trial that trained every step marked as stopped early."""

    def __init__(self, *, last_step: int, **kwargs):
        super().__init__(**kwargs)
        self._last_step = last_step

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        if result.get(self._time_attr, 0) >= self._last_step:
            return self.CONTINUE
        return super().on_trial_result(tune_controller, trial, result)


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
    if spec.trainer == "amortized":
        # The trial only drives a Ray Train run; its workers hold the spec's resources, each. Tune
        # refuses an all-zero request, so the trial asks for one byte of memory and no CPU (with a
        # CPU of its own, 2 one-CPU workers would never fit on 2 cores).
        driver = {"cpu": 0, "memory": 1}
        return tune.with_resources(tune.with_parameters(run_amortized_trial, context=context), driver)
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
        scheduler = FinishingASHA(
            last_step=steps_per_trial,
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
    generator = SweepSearchGenerator(build_searcher(spec, num_prompts, optuna_url), spec.max_concurrent)
    return tune.Tuner(
        build_trainable(spec, context),
        tune_config=tune.TuneConfig(
            search_alg=generator,  # concurrency limited inside: Tune limits only a bare Searcher
            scheduler=scheduler,
            num_samples=trials,
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(
            name=spec.name,
            storage_path=usable_url(tune_path, "storage.tune"),
            failure_config=tune.FailureConfig(max_failures=spec.retries),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            callbacks=[*callbacks, ReconcileOnRestore(generator)],
            verbose=0,  # the console is orchestrator.track.progress's view, not Ray's status dump
        ),
    )


def experiment_path(tune_path: str, name: str) -> str:
    """The sweep's Tune experiment, from its recorded storage (a `${NAME}` in it resolved here)."""
    return f"{usable_url(tune_path, 'storage.tune').rstrip('/')}/{name}"


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
