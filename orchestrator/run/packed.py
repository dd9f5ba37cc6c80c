"""Packed sweeps: workers that each train several trials at once behind one batched prior call.

    run_packed(spec, context, record, steps_per_trial, progress)     # from orchestrator.run.sweep

A spec with `pack: K` (or `replicates: R`) runs here instead of on Ray Tune's one-trial-per-actor
model (docs/packing.md says why). The pieces, top to bottom:

    driver (this function, on the head)            PackWorker actors: ⌈max_concurrent / (K / R)⌉ of them,
      Optuna study (RDB): the one record of          each owning its GPU or CPU share for the whole sweep
        every trial's state                          prior loaded once; a trainers.pack.Pack of ≤ K members
      loop:                                          members: (Optuna trial, replicate), each its own
        fill free slots: the study's RUNNING           TrainingRun, MLflow run, checkpoints and step
          trials no worker holds (after a kill),     advance(s): steps the pack for about s seconds and
          then study.ask()                             returns every trial's step and objective so far,
        workers advance in parallel ────────────▶      and the trials that finished or failed
        tell Optuna COMPLETE / FAIL / PRUNED
        the pruner (ASHA's semantics) stops one trial; a dead worker's trials resume elsewhere

- **State.** A trial's state lives in the Optuna study (RUNNING, COMPLETE, FAIL, PRUNED) and its files
  under `<storage.tune>/<sweep>/packed/trial_NNNN/` (checkpoints, `panel.json`: which prompt, the
  finished prompts' objectives). The driver holds nothing that a restart cannot rebuild from those two,
  so `dreamsweep resume` after a kill -9 simply continues the study's RUNNING trials from their files,
  and nothing needs reconciling.
- **MLflow.** Each trial's child run is found again by its tag (`dreamsweep.ray_trial_id` =
  `pack-NNNN`), so a resumed trial writes into the run it started, at its own steps.
- **Failures.** A member's NaN fails its trial alone. A worker that dies (its node lost) is replaced,
  and its trials continue from their checkpoints, each at most `retries` times.
"""

# ruff: noqa: E402  (MODULE_LOADING_AT is set before the other imports, to time them)
from __future__ import annotations

import time

# When a worker process began importing this module (a Ray actor's class is imported on its creation):
# the start of the worker's "imports" in the overhead benchmark's split of its first trial start.
MODULE_LOADING_AT = time.time()

import json
import math
import os
import statistics
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import ray
from optuna.trial import TrialState

from orchestrator.internals import optuna_trial_id, tell_outside_optimize
from orchestrator.run import worker_memory
from orchestrator.run.trial_context import (
    OBJECTIVE,
    PRIOR_LOADS,
    SweepContext,
    aggregate,
    cached_client,
    cached_prior,
    match_torch_threads,
    trial_panel,
)
from orchestrator.spec.space import PROMPT_INDEX, make_sampler, optuna_space, resolve_params
from orchestrator.spec.spec import SweepSpec
from orchestrator.track import tracking
from orchestrator.track.report_data import SEM

PANEL_FILE = "panel.json"
COMMITTED_FILE = "committed_checkpoint.json"  # a member's last checkpoint whose metrics are in MLflow
ATTEMPTS = "dreamsweep.worker_losses"  # Optuna user attribute: how often a trial's worker died under it
NAMESPACE = "dreamsweep-packed"  # the Ray namespace of every packed sweep's named workers
WAIT_FOR_WORKER_S = 60.0  # how long the driver blocks at once waiting for a worker to start


def member_run_id(number: int) -> str:
    """The id that finds a packed trial's MLflow run again (stored where Tune trials keep theirs)."""
    return f"pack-{number:04d}"


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)  # a kill never leaves half a file


def trial_dir(trials_root: str, number: int) -> Path:
    return Path(trials_root) / f"trial_{number:04d}"


# ---------------------------------------------------------------------------------------------------
# Worker side: one trial of a pack, its replicates training its panel of prompts in turn


@dataclass
class Replicate:
    """One seed of a trial: which prompt of the panel it is on, and the finished prompts' objectives."""

    index: int
    position: int = 0
    finals: list[float] = field(default_factory=list)
    run: Any = None  # the TrainingRun of the current prompt
    resumed_objective: float | None = None  # the objective it had reached at its resume checkpoint

    def state_file(self, directory: Path) -> Path:
        return directory / f"replicate_{self.index}" / PANEL_FILE

    def save(self, directory: Path) -> None:
        path = self.state_file(directory)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, {"position": self.position, "finals": self.finals})

    def load(self, directory: Path) -> None:
        path = self.state_file(directory)
        if path.exists():
            state = json.loads(path.read_text())
            self.position, self.finals = int(state["position"]), [float(v) for v in state["finals"]]


@dataclass
class WorkerClock:
    """Where a worker's time went, reported with every advance (the overhead benchmark reads it).

    Wall-clock marks are `time.time()`; durations are `time.perf_counter()` differences."""

    pid: int = field(default_factory=os.getpid)
    prior_loads: int = 0
    # The split of a worker's start: its imports (from MODULE_LOADING_AT to `ready_at`, the end of
    # __init__), its prior load and its first members' set-up (configs, MLflow runs, 3D models).
    imports_from: float = MODULE_LOADING_AT
    ready_at: float | None = None
    prior_s: float = 0.0
    setup_s: float = 0.0  # every member's set-up, first and later ones (less the prior load)
    first_setup_s: float | None = None  # the set-up done before the worker's first step
    first_step_at: float | None = None  # when its first pack step began
    last_step_at: float | None = None  # when its latest pack step ended
    compute_s: float = 0.0  # inside pack steps, less the trainers' callbacks
    hooks_s: float = 0.0  # the trainers' callbacks: MLflow metrics and artifacts, checkpoint commits

    def timed(self, callback):
        def wrapper(*args, **kwargs):
            started = time.perf_counter()
            try:
                return callback(*args, **kwargs)
            finally:
                self.hooks_s += time.perf_counter() - started

        return wrapper

    def stepped(self, started: float, seconds: float, hooks_before: float) -> None:
        if self.first_step_at is None:
            self.first_step_at, self.first_setup_s = started, self.setup_s
        self.last_step_at = started + seconds
        self.compute_s += seconds - (self.hooks_s - hooks_before)


class PackedTrial:
    """A trial on a worker: its replicates (members of the worker's pack), its MLflow run, its hooks."""

    def __init__(
        self,
        context: SweepContext,
        number: int,
        params: dict,
        replicates: int,
        root: str,
        clock: WorkerClock | None = None,
    ):
        from trainers.config import config_to_dict, load_train_config

        self.context, self.number = context, number
        self.clock = clock or WorkerClock()
        self.directory = trial_dir(root, number)
        panel, overrides = trial_panel(context, params)
        self.panel = panel
        base = [load_train_config(context.base, {**overrides, "prompt": context.prompts[i]}) for i in panel]
        self.steps_per_prompt = base[0].max_steps
        self.configs = [  # [replicate][position]
            [
                load_train_config(
                    context.base,
                    {
                        **overrides,
                        "prompt": context.prompts[i],
                        "seed": cfg.seed + r,
                        "output_dir": str(self.directory / f"replicate_{r}" / f"prompt_{i:03d}"),
                    },
                )
                for i, cfg in zip(panel, base, strict=True)
            ]
            for r in range(replicates)
        ]
        self.replicates = [Replicate(r) for r in range(replicates)]
        for replicate in self.replicates:
            replicate.load(self.directory)
        search = resolve_params(params) if context.kind == "search" else {}
        identity = tracking.TrialIdentity(
            sweep=context.sweep,
            experiment_id=context.experiment_id,
            parent_run_id=context.parent_run_id,
            ray_trial_id=member_run_id(number),
            optuna_trial=number,
            prompts=[context.prompts[i] for i in panel],
            search_params=search,
            git_commit=context.git_commit,
        )
        logged = tracking.flatten_for_params(config_to_dict(base[0]))
        if len(panel) > 1:
            logged["prompt"] = json.dumps(identity.prompts)
        logged["replicates"] = replicates
        self.run = tracking.TrialRun.open(cached_client(context.mlflow_uri), identity, logged)
        self.run.set_tags({"dreamsweep.pid": str(os.getpid()), "dreamsweep.packed": "true"})
        self.current: dict[int, float] = {}  # replicate -> the objective of its current prompt so far

    @property
    def total_steps(self) -> int:
        return len(self.panel) * self.steps_per_prompt

    def prefix(self, replicate: int, position: int) -> str:
        parts = []
        if len(self.replicates) > 1:
            parts.append(f"replicate_{replicate}/")
        if len(self.panel) > 1:
            parts.append(f"prompt_{self.panel[position]:03d}/")
        return "".join(parts)

    def start_prompt(self, replicate: Replicate, prior) -> Any:
        """The TrainingRun of the replicate's current prompt, resumed from its last checkpoint."""
        from trainers.checkpoint import latest_checkpoint
        from trainers.per_prompt import TrainingRun

        config = self.configs[replicate.index][replicate.position]
        committed = Path(config.output_dir) / COMMITTED_FILE
        resume = None
        if committed.exists():
            state = json.loads(committed.read_text())
            resume = Path(config.output_dir) / "checkpoints" / state["checkpoint"]
            # Killed after its last checkpoint, a prompt has no step left to report its objective in.
            replicate.resumed_objective = state.get("objective")
            if not resume.is_dir():  # pruned after a newer one was written: the newest then
                resume = latest_checkpoint(Path(config.output_dir) / "checkpoints")
        offset = replicate.position * self.steps_per_prompt
        prefix = self.prefix(replicate.index, replicate.position)
        if resume is not None:
            self.run.log_metrics(
                offset, {prefix + "trial/resumed_at_step": float(resume.name.split("_")[-1])}, force=True
            )

        def on_metrics(step: int, metrics: dict[str, float]) -> None:
            if self.context.objective_metric in metrics:
                self.current[replicate.index] = metrics[self.context.objective_metric]
            self.run.log_metrics(offset + step, {prefix + k: v for k, v in metrics.items()})

        def on_artifact(step: int, path: Path) -> None:
            self.run.log_trainer_artifact(Path(path), prefix, offset + step)

        def on_checkpoint(step: int, path: Path) -> None:
            # A resume starts from the last *committed* checkpoint: one whose steps are all in MLflow.
            # (A checkpoint is on disk before this runs, so a kill in between must not resume from it:
            # the steps before it would never be logged.)
            self.run.flush()
            objective = self.current.get(replicate.index)
            write_json(committed, {"checkpoint": Path(path).name, "step": step, "objective": objective})

        replicate.run = TrainingRun(
            config,
            prior,
            on_metrics=self.clock.timed(on_metrics),
            on_checkpoint=self.clock.timed(on_checkpoint),
            on_artifact=self.clock.timed(on_artifact),
            resume_from=resume,
            progress=False,
        )
        return replicate.run

    def prompt_finished(self, replicate: Replicate, result) -> bool:
        """Record a replicate's finished prompt; True when the replicate has finished its panel."""
        final = result.final_metrics.get(self.context.objective_metric)
        if final is None:
            final = replicate.resumed_objective  # resumed at its last step: nothing left to train
        if final is None:
            raise RuntimeError(
                f"the trainer never reported the objective {self.context.objective_metric!r} "
                f"for prompt {self.panel[replicate.position]}"
            )
        if result.last_checkpoint is not None:
            folder = self.prefix(replicate.index, replicate.position) + "checkpoint"
            self.run.log_artifact(Path(result.last_checkpoint), folder)
        replicate.finals.append(float(final))
        replicate.position += 1
        replicate.run = None
        replicate.resumed_objective = None
        self.current.pop(replicate.index, None)
        replicate.save(self.directory)
        return replicate.position >= len(self.panel)

    def step(self) -> int:
        """The trial's step over its panel: its slowest replicate's."""
        return min(
            r.position * self.steps_per_prompt + (r.run.step if r.run is not None else 0)
            for r in self.replicates
        )

    def objective_now(self) -> float | None:
        """The mean over replicates of each one's panel objective so far (None before any)."""
        values = []
        for r in self.replicates:
            own = list(r.finals) + ([self.current[r.index]] if r.index in self.current else [])
            if own:
                values.append(aggregate(own, self.context.aggregate))
        return statistics.fmean(values) if values else None

    def final(self) -> tuple[float, float | None]:
        """(objective, its standard error over replicates; None for one replicate)."""
        values = [aggregate(r.finals, self.context.aggregate) for r in self.replicates]
        mean = statistics.fmean(values)
        sem = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else None
        return mean, sem


@dataclass
class TrialReport:
    """What a worker tells the driver about one of its trials after advancing."""

    number: int
    step: int
    total: int
    objective: float | None = None
    final: float | None = None
    sem: float | None = None
    error: str | None = None
    pid: int = 0

    @property
    def ended(self) -> bool:
        return self.final is not None or self.error is not None


class PackWorker:
    """A Ray actor that owns its resources for the whole sweep: one prior, a pack of trials' members."""

    def __init__(self, context: SweepContext, trials_root: str):
        from trainers.pack import Pack

        self.threads = match_torch_threads()
        self.context, self.trials_root = context, trials_root
        self.pack = Pack()
        self.trials: dict[int, PackedTrial] = {}
        self.prior = None
        self.prior_calls = 0
        self.clock = WorkerClock()
        # Trials that ended in `add` (failed to start, or found finished): reported by the next advance.
        self.unstarted: dict[int, TrialReport] = {}
        self.clock.ready_at = time.time()

    def pid(self) -> int:
        return os.getpid()

    def add(self, number: int, params: dict, replicates: int) -> None:
        """Take trial `number` (new, or resumed from its files) into the pack. A trial that cannot start
        (its config refused, its checkpoint unreadable) is reported failed by the next `advance`."""
        started = time.perf_counter()
        try:
            self._add(number, params, replicates)
        finally:
            self.clock.setup_s += time.perf_counter() - started

    def _add(self, number: int, params: dict, replicates: int) -> None:
        try:
            trial = PackedTrial(self.context, number, params, replicates, self.trials_root, self.clock)
        except Exception as error:
            text = "".join(traceback.format_exception(error))[-4000:]
            self.unstarted[number] = TrialReport(number, 0, 0, error=text, pid=os.getpid())
            return
        self.trials[number] = trial
        try:
            if self.prior is None:
                loading = time.perf_counter()
                self.prior = cached_prior(self.context, trial.configs[0][0])
                self.clock.prior_loads = PRIOR_LOADS["count"]
                self.clock.prior_s = time.perf_counter() - loading
                self.clock.setup_s -= self.clock.prior_s
                self._count_prior_calls()
            for replicate in trial.replicates:
                if replicate.position < len(trial.panel):
                    self.pack.add((number, replicate.index), trial.start_prompt(replicate, self.prior))
            if not any(r.position < len(trial.panel) for r in trial.replicates):
                # Every prompt finished before a kill, but the study never heard: report it now.
                self.unstarted[number] = self._complete(trial)
        except Exception as error:
            self.unstarted[number] = self._fail(trial, error)

    def _count_prior_calls(self) -> None:
        # The tests check that a worker step makes one prior call whatever the pack's size.
        predict = self.prior.predict_noise

        def counted(*args, **kwargs):
            self.prior_calls += 1
            return predict(*args, **kwargs)

        self.prior.predict_noise = counted

    def drop(self, number: int) -> None:
        """Stop trial `number` early (the driver's pruner): its run ends FINISHED, tagged stopped early,
        as a trial that ASHA stops on the Tune path does."""
        trial = self.trials.pop(number, None)
        if trial is None:
            return
        for replicate in trial.replicates:
            if (number, replicate.index) in self.pack.members:
                self.pack.remove((number, replicate.index))
        trial.run.set_tags({"dreamsweep.stopped_early": "true"})
        trial.run.finish("FINISHED")

    def advance(self, seconds: float) -> dict[str, Any]:
        """Step the pack for about `seconds`, or until a trial ends; every trial's report."""
        ended, self.unstarted = dict(self.unstarted), {}
        started, steps, calls = time.monotonic(), 0, self.prior_calls
        most = len(self.pack)
        while self.pack and not ended and time.monotonic() - started < seconds:
            most = max(most, len(self.pack))
            step_started, clock_started, hooks_before = time.time(), time.perf_counter(), self.clock.hooks_s
            events = self.pack.step()
            self.clock.stepped(step_started, time.perf_counter() - clock_started, hooks_before)
            steps += 1
            for (number, index), event in events.items():
                trial = self.trials.get(number)
                if trial is None or number in ended:
                    continue
                ended_report = self._member_left(trial, trial.replicates[index], event)
                if ended_report is not None:
                    ended[number] = ended_report
        reports = [r for r in ended.values()]
        for number, trial in self.trials.items():
            if number not in ended:
                reports.append(
                    TrialReport(
                        number, trial.step(), trial.total_steps, trial.objective_now(), pid=os.getpid()
                    )
                )
        for number in ended:
            self.trials.pop(number, None)
        return {
            "reports": reports,
            "steps": steps,
            "prior_calls": self.prior_calls - calls,
            "members": most,  # the most members stepped together
            "clock": self.clock,
        }

    def _member_left(self, trial: PackedTrial, replicate: Replicate, event) -> TrialReport | None:
        """A member finished a prompt or failed: go on to its next prompt, or end the trial."""
        try:
            if event.failed:
                raise event.error
            if not trial.prompt_finished(replicate, event.result):
                self.pack.add((trial.number, replicate.index), trial.start_prompt(replicate, self.prior))
                return None
            if any(r.position < len(trial.panel) for r in trial.replicates):
                return None  # other replicates still training
            return self._complete(trial)
        except Exception as error:  # this trial alone fails: its replicates leave, the pack goes on
            return self._fail(trial, error)

    def _complete(self, trial: PackedTrial) -> TrialReport:
        value, sem = trial.final()
        metrics = {OBJECTIVE: value} | ({SEM: sem} if sem is not None else {})
        self.trials.pop(trial.number, None)
        # GPU memory back at the worker's baseline once the trial's members are gone ({} off CUDA).
        metrics |= worker_memory.trial_end_metrics()
        trial.run.log_metrics(trial.total_steps, metrics, force=True)
        trial.run.finish("FINISHED")
        total = trial.total_steps
        return TrialReport(trial.number, total, total, value, value, sem, pid=os.getpid())

    def _fail(self, trial: PackedTrial, error: BaseException) -> TrialReport:
        text = "".join(traceback.format_exception(error))[-4000:]
        for other in trial.replicates:
            if (trial.number, other.index) in self.pack.members:
                self.pack.remove((trial.number, other.index))
        self.trials.pop(trial.number, None)
        trial.run.set_tags({"dreamsweep.error": text})
        trial.run.finish("FAILED")
        return TrialReport(trial.number, trial.step(), trial.total_steps, error=text, pid=os.getpid())


# ---------------------------------------------------------------------------------------------------
# Driver side


def make_pruner(spec: SweepSpec) -> optuna.pruners.BasePruner:
    """ASHA as an Optuna pruner: asynchronous successive halving over the trials' reported steps."""
    if spec.early_stopping is None:
        return optuna.pruners.NopPruner()
    asha = spec.early_stopping
    return optuna.pruners.SuccessiveHalvingPruner(
        min_resource=asha.grace_period,
        reduction_factor=int(asha.reduction_factor),
        min_early_stopping_rate=0,
    )


def worker_names(sweep: str) -> list[str]:
    """The live workers of sweep `sweep` on the cluster, whichever driver started them."""
    return [
        entry["name"]
        for entry in ray.util.list_named_actors(all_namespaces=True)
        if entry["namespace"] == NAMESPACE and entry["name"].startswith(f"{sweep}/")
    ]


def fence_earlier_workers(sweep: str, timeout_s: float = 30.0) -> None:
    """Kill the workers an earlier driver of this sweep left behind, and wait until they are gone.

    A driver killed with SIGKILL leaves its workers running until Ray reaps its job (about a second,
    more on a busy head). Were the new driver to resume their trials meanwhile, two workers would train
    one trial, writing its checkpoints and MLflow steps twice."""
    deadline = time.monotonic() + timeout_s
    names = worker_names(sweep)
    for name in names:
        try:
            ray.kill(ray.get_actor(name, namespace=NAMESPACE))
        except ValueError:  # reaped meanwhile
            pass
    while names:
        if time.monotonic() > deadline:
            # Not fatal: the sweep goes on (a trial may then be trained twice for a moment, as before the
            # fence), and the names say which workers to look at.
            print(
                f"warning: workers of an earlier driver of sweep {sweep!r} still listed: {names}", flush=True
            )
            return
        time.sleep(0.2)
        names = worker_names(sweep)


def pruned(study: optuna.Study, number: int, value: float, step: int, total: int) -> bool:
    """Report trial `number`'s objective so far at `step` and ask the study's pruner whether to stop
    it. Each trial is judged alone against the others at its rung; a trial at its last step never is
    (stopping it then saves nothing and would cut off its final evaluation)."""
    trial = optuna.Trial(study, optuna_trial_id(study, number))
    trial.report(value, step)
    return step < total and trial.should_prune()


@dataclass
class Slot:
    """A worker as the driver sees it: its actor, whether it has started, and the trials it holds.

    A worker gets trials only once it has started: a replacement for a lost node's worker may wait for
    a node with a free GPU for a long time, and the trials it would hold go on elsewhere meanwhile."""

    actor: Any
    trials: set[int] = field(default_factory=set)
    started: Any = None  # the actor's first answer (an ObjectRef), then True

    @classmethod
    def launch(cls, actor_class, options: dict, *args) -> Slot:
        actor = actor_class.options(**options).remote(*args)
        return cls(actor, started=actor.pid.remote())

    def ready(self, wait_s: float = 0.0) -> bool:
        """Whether the actor has started; raises RayActorError if it died before it did."""
        if self.started is not True:
            done, _ = ray.wait([self.started], timeout=wait_s)
            if not done:
                return False
            ray.get(done[0])
            self.started = True
        return True


class PackedSweep:
    """The driver's loop over the workers; every decision is written to the study as it is made."""

    def __init__(
        self, spec: SweepSpec, context: SweepContext, optuna_url: str, trials_root: str, progress=None
    ):
        from orchestrator.run.tuner import optuna_storage

        self.spec, self.context, self.trials_root = spec, context, trials_root
        num_prompts = len(context.prompts)
        self.total = num_prompts if spec.kind == "fanout" else spec.trials
        self.distributions = optuna_space(spec, num_prompts)
        self.study = optuna.create_study(
            study_name=spec.name,
            storage=optuna_storage(optuna_url),
            sampler=make_sampler(spec, num_prompts),
            pruner=make_pruner(spec),
            direction="minimize" if spec.objective.mode == "min" else "maximize",
            load_if_exists=True,
        )
        self.progress = progress(self.study) if progress is not None else None
        self.per_worker = spec.trials_per_worker
        n_workers = spec.workers or math.ceil(min(spec.max_concurrent, self.total) / self.per_worker)
        self.actor_class = ray.remote(PackWorker)
        fence_earlier_workers(spec.name)
        self.launched = 0  # workers started by this driver, which names them
        self.slots = [self.launch() for _ in range(n_workers)]
        # Trials the study has RUNNING when this driver starts: their driver died (kill -9, a lost
        # head). They continue from their files first, without counting against `retries`.
        self.orphans = [t.number for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))]
        self.pending_drops: list = []
        self.stats = {"worker_steps": 0, "prior_calls": 0, "max_members": 0, "worker_clocks": {}}

    def launch(self) -> Slot:
        self.launched += 1
        options = {
            "name": f"{self.spec.name}/worker-{self.launched}-{os.getpid()}",
            "namespace": NAMESPACE,
            "num_cpus": self.spec.resources.cpus,
            "num_gpus": self.spec.resources.gpus,
            "max_restarts": 0,  # a lost worker is replaced by the driver, its trials resumed from files
        }
        return Slot.launch(self.actor_class, options, self.context, self.trials_root)

    # -- which trial next -----------------------------------------------------------------------

    def next_trial(self) -> tuple[int, dict] | None:
        """An orphaned RUNNING trial first, else a new one from the sampler while the budget lasts."""
        if self.orphans:
            number = self.orphans.pop(0)
            return number, dict(self.study.trials[number].params)
        trials = self.study.get_trials(deepcopy=False)
        if len(trials) >= self.total:
            return None
        if self.spec.kind == "fanout":
            taken = {t.params.get(PROMPT_INDEX) for t in trials}
            free = [i for i in range(self.total) if i not in taken]
            if not free:
                return None
            self.study.enqueue_trial({PROMPT_INDEX: free[0]})
        trial = self.study.ask(self.distributions)
        # What `dreamsweep status` matches the live progress view and the MLflow run by.
        trial.set_user_attr("ray_trial_id", member_run_id(trial.number))
        return trial.number, dict(trial.params)

    # -- the loop ---------------------------------------------------------------------------------

    def more_to_start(self) -> bool:
        """Whether a trial is waiting for a slot: an orphan, or the search's budget is not spent."""
        if self.orphans:
            return True
        trials = self.study.get_trials(deepcopy=False)
        if self.spec.kind == "fanout":
            return len({t.params.get(PROMPT_INDEX) for t in trials}) < self.total
        return len(trials) < self.total

    def started_slots(self, wait_s: float = 0.0) -> list[Slot]:
        """The workers that have started; waits up to `wait_s` for one when none has. A worker that
        died before it started is replaced."""
        deadline = time.monotonic() + wait_s
        while True:
            started = []
            for slot in self.slots:
                try:
                    if slot.ready():
                        started.append(slot)
                except ray.exceptions.RayActorError:
                    self._replace(slot)
            if started or time.monotonic() >= deadline:
                return started
            pending = [slot.started for slot in self.slots if slot.started is not True]
            ray.wait(pending, timeout=max(0.0, min(5.0, deadline - time.monotonic())))

    def fill(self) -> None:
        for slot in self.started_slots():
            while len(slot.trials) < self.per_worker:
                chosen = self.next_trial()
                if chosen is None:
                    return
                number, params = chosen
                slot.actor.add.remote(number, params, self.spec.replicates)
                slot.trials.add(number)
                if self.progress is not None:
                    self.progress.started(number, params)

    def run(self) -> None:
        # Every worker starts at once (imports, then its prior on its first trial): give them a moment
        # to, so that the first trials spread over all of them instead of the quickest one.
        ray.wait(
            [slot.started for slot in self.slots], num_returns=len(self.slots), timeout=WAIT_FOR_WORKER_S
        )
        advancing: dict[Any, Slot] = {}  # each busy worker's advance in flight, by its ObjectRef
        while True:
            self.fill()
            for slot in self.slots:
                if slot.trials and slot not in advancing.values():
                    advancing[slot.actor.advance.remote(self.context.report_every_s)] = slot
            if not advancing:
                if not self.more_to_start():
                    break
                # Trials wait and no worker has started (the sweep's start, or every node was lost):
                # wait for one, as long as it takes a node to join.
                self.started_slots(wait_s=WAIT_FOR_WORKER_S)
                continue
            # Whichever worker answers first is handled and sent on at once: a worker whose trial ended
            # early never waits for the others' advances to end.
            (future,), _ = ray.wait(list(advancing), num_returns=1)
            slot = advancing.pop(future)
            try:
                answer = ray.get(future)
            except ray.exceptions.RayActorError:
                self._replace(slot)
                continue
            except ray.exceptions.RayTaskError as error:  # the worker's own code failed: its trials too
                for number in slot.trials:
                    self._fail(number, str(error))
                slot.trials.clear()
                continue
            self.stats["worker_steps"] += answer["steps"]
            self.stats["prior_calls"] += answer["prior_calls"]
            self.stats["max_members"] = max(self.stats["max_members"], answer["members"])
            self.stats["worker_clocks"][answer["clock"].pid] = answer["clock"]
            for report in answer["reports"]:
                self._handle(slot, report)
        if self.progress is not None:
            self.progress.finished()

    def _handle(self, slot: Slot, report: TrialReport) -> None:
        if report.error is not None:
            self._fail(report.number, report.error)
            slot.trials.discard(report.number)
            return
        if report.final is not None:
            if report.sem is not None:
                self._set_attr(report.number, SEM, report.sem)
            self._tell(report.number, report.final)
            slot.trials.discard(report.number)
            if self.progress is not None:
                self.progress.completed(report)
            return
        if self.progress is not None:
            self.progress.reported(report)
        if report.objective is not None and self.spec.early_stopping is not None:
            if pruned(self.study, report.number, report.objective, report.step, report.total):
                # The worker drops it before its next advance (an actor runs its calls in order).
                self.pending_drops.append(slot.actor.drop.remote(report.number))
                self._tell(report.number, state=TrialState.PRUNED)
                slot.trials.discard(report.number)
                if self.progress is not None:
                    self.progress.completed(report, pruned=True)

    def _tell(self, number: int, value: float | None = None, state: TrialState | None = None) -> None:
        tell_outside_optimize(self.study, number, value, state)

    def _set_attr(self, number: int, key: str, value) -> None:
        optuna.Trial(self.study, optuna_trial_id(self.study, number)).set_user_attr(key, value)

    def _fail(self, number: int, error: str) -> None:
        self._set_attr(number, "error", error[-2000:])
        self._tell(number, state=TrialState.FAIL)
        if self.progress is not None:
            self.progress.failed(number, error)

    def _replace(self, slot: Slot) -> None:
        """A worker died (its node was lost): a new one takes its place; its trials continue from their
        files, on whichever worker has a slot first, each at most `retries` times."""
        fresh = self.launch()
        slot.actor, slot.started = fresh.actor, fresh.started
        for number in sorted(slot.trials):
            attempts = int(self.study.trials[number].user_attrs.get(ATTEMPTS, 0)) + 1
            self._set_attr(number, ATTEMPTS, attempts)
            if attempts > self.spec.retries:
                self._fail(number, f"its worker died {attempts} times (retries: {self.spec.retries})")
            else:
                self.orphans.append(number)
        slot.trials = set()

    def shutdown(self) -> None:
        try:
            ray.get(self.pending_drops, timeout=60)  # pruned trials' runs get their status first
        except Exception:  # a dead worker's drop has nothing left to do
            pass
        for slot in self.slots:
            ray.kill(slot.actor)


def run_packed(
    spec: SweepSpec, context: SweepContext, optuna_url: str, trials_root: str, progress=None
) -> dict:
    """Run (or continue) a packed sweep to its end; returns the driver's counters."""
    sweep = PackedSweep(spec, context, optuna_url, trials_root, progress)
    try:
        sweep.run()
    finally:
        sweep.shutdown()
    return sweep.stats | {"workers": len(sweep.slots)}
