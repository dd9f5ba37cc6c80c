"""A pack: several per-prompt runs on one worker, stepped together behind one batched prior call.

    pack = Pack()
    pack.add("trial-3", TrainingRun(config_a, prior, on_metrics=...))
    pack.add("trial-4", TrainingRun(config_b, prior, on_metrics=...))
    while pack:
        for key, event in pack.step().items():   # only members that finished or failed appear
            ...                                  # a freed slot can take a new run before the next step

A GPU that trains one trial of an SD-size prior is launch-bound: the UNet call of 2-3 rows takes about
as long as one of 24. A pack puts K trials' rows through one call (`trainers.step.training_step`) and
keeps everything else per member: its 3D model, optimizer, generator and seed, hyperparameters, step
count, checkpoints and callbacks. Members may be at different steps. One that finishes or fails
leaves, and the others go on; the owner (a sweep worker) refills the slot.

Knows nothing of Ray, Optuna or MLflow: the sweep's worker (`orchestrator.run.lane`) drives it.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

from trainers.per_prompt import TrainingRun, TrainResult
from trainers.step import training_step


@dataclass
class MemberEvent:
    """A member that left the pack at this step: finished (its result) or failed (its error)."""

    result: TrainResult | None = None
    error: BaseException | None = None

    @property
    def failed(self) -> bool:
        return self.error is not None


class Pack:
    def __init__(self) -> None:
        self.members: dict[Hashable, TrainingRun] = {}

    def __len__(self) -> int:
        return len(self.members)

    def __bool__(self) -> bool:
        return bool(self.members)

    def add(self, key: Hashable, run: TrainingRun) -> None:
        if key in self.members:
            raise ValueError(f"pack member {key!r} is already in the pack")
        others = [m.trainer.prior for m in self.members.values()]
        if others and run.trainer.prior is not others[0]:
            raise ValueError(
                f"pack member {key!r} has a prior of its own: a pack's members share the worker's prior "
                "(load it once and pass it to every TrainingRun)"
            )
        self.members[key] = run  # one resumed at its last step only has its final evaluation left

    def remove(self, key: Hashable) -> None:
        """Take a member out (early-stopped, or its worker is shutting down); its run is closed."""
        run = self.members.pop(key)
        run.close()

    def step(self) -> dict[Hashable, MemberEvent]:
        """One step of every member that has steps left; returns the members that left the pack."""
        events: dict[Hashable, MemberEvent] = {}
        stepping = [(key, run) for key, run in self.members.items() if not run.done]
        if stepping:
            results = training_step([run.trainer for _, run in stepping])
            for (key, run), result in zip(stepping, results, strict=True):
                try:
                    run.handle(result)
                except Exception as error:  # a NaN or a failing callback fails this member alone
                    events[key] = MemberEvent(error=error)
        for key, run in list(self.members.items()):
            if key in events or not run.done:
                continue
            try:
                events[key] = MemberEvent(result=run.finish())
            except Exception as error:
                events[key] = MemberEvent(error=error)
        for key in events:
            self.remove(key)
        return events


def train_packed(runs: Sequence[TrainingRun]) -> list[MemberEvent]:
    """Train `runs` together to the end, one shared prior call per step; one event per run, in order."""
    pack = Pack()
    for index, run in enumerate(runs):
        pack.add(index, run)
    events: dict[int, MemberEvent] = {}
    try:
        while pack:
            events |= pack.step()
    finally:
        for key in list(pack.members):
            pack.remove(key)
    return [events[i] for i in range(len(runs))]
