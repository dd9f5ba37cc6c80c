"""SweepSearch (Ray's OptunaSearch on the sweep's persistent study) without Ray running: what a
restore after `kill -9` must give back, whatever moments Tune's trial list and search state come from."""

from dataclasses import dataclass
from types import SimpleNamespace

import optuna
import pytest
from ray import tune
from ray.train._internal.checkpoint_manager import _CheckpointManager
from ray.train._internal.session import _TrainingResult

from orchestrator.run.trainable import OPTUNA_TRIAL_KEY
from orchestrator.run.tuner import (
    FinishingASHA,
    SweepSearchGenerator,
    build_searcher,
    continue_from_surviving_checkpoints,
)
from orchestrator.spec.spec import SweepSpec

optuna.logging.set_verbosity(optuna.logging.WARNING)


def make_spec(kind="search"):
    data = {
        "name": "s",
        "kind": kind,
        "prompts": {"items": ["a", "b", "c"]},
        "objective": {"metric": "train/loss"},
    }
    if kind == "search":
        data |= {
            "trials": 8,
            "search": {"space": {"guidance.eta": {"type": "float", "low": 0.0, "high": 1.0}}, "seed": 0},
        }
    return SweepSpec.model_validate(data)


@pytest.fixture
def storage(tmp_path):
    return f"sqlite:///{tmp_path / 'optuna.db'}"


def finish(searcher, trial_id, value):
    searcher.on_trial_complete(trial_id, {"objective": value, "training_iteration": 1})


@dataclass
class TuneTrial:
    """What the reconciliation reads of a restored `ray.tune.experiment.Trial`."""

    trial_id: str
    number: int
    finished: bool = False

    @property
    def config(self):
        return {OPTUNA_TRIAL_KEY: self.number}

    def is_finished(self):
        return self.finished


def generator_for(storage, trials=3):
    generator = SweepSearchGenerator(build_searcher(make_spec(), 3, storage), max_concurrent=2)
    generator._total_samples = trials  # what Tune's add_configurations sets from num_samples
    return generator


def ask(generator, trial_id):
    """What Tune's SearchGenerator.next_trial does, without an experiment spec: suggest and count."""
    config = generator.searcher.suggest(trial_id)
    generator._counter += 1
    return config


def states(storage):
    return [t.state.name for t in optuna.load_study(study_name="s", storage=storage).trials]


def test_each_suggestion_carries_its_optuna_trial_number(storage):
    searcher = build_searcher(make_spec(), 3, storage)
    assert [searcher.suggest(t)[OPTUNA_TRIAL_KEY] for t in ("a", "b")] == [0, 1]
    study = optuna.load_study(study_name="s", storage=storage)
    assert [t.user_attrs["ray_trial_id"] for t in study.trials] == ["a", "b"]


def test_restored_searcher_continues_the_samplers_sequence_instead_of_restarting_it(storage, tmp_path):
    searcher = build_searcher(make_spec(), 3, storage)
    first = searcher.suggest("a")
    finish(searcher, "a", 1.0)
    searcher.save(str(tmp_path / "searcher.pkl"))
    expected = searcher.suggest("b")  # what the uninterrupted sweep would sample next

    # The driver was killed after "b" was asked but before Tune recorded it; a new driver restores
    # and Tune's trial list has only "a", finished.
    restored = build_searcher(make_spec(), 3, storage)
    restored.restore(str(tmp_path / "searcher.pkl"))
    assert restored.adopt_live_trials({}) == [1]
    assert states(storage) == ["COMPLETE", "FAIL"]  # the orphan is no longer RUNNING
    # The sampler's state came back with the searcher: it continues its sequence from the snapshot
    # (drawing the orphan's point again), where a fresh sampler would start over with its first draw.
    following = restored.suggest("b2")["guidance.eta"]
    assert following == expected["guidance.eta"] and following != first["guidance.eta"]


def test_results_for_a_trial_the_study_already_finished_are_ignored(storage):
    searcher = build_searcher(make_spec(), 3, storage)
    searcher.suggest("a")
    finish(searcher, "a", 1.0)
    searcher._completed_trials.clear()  # as after restoring a snapshot older than the completion
    searcher.on_trial_result("a", {"objective": 1.0, "training_iteration": 2})  # must not raise


def test_fanout_hands_every_prompt_out_once_and_an_orphans_prompt_again(storage):
    searcher = build_searcher(make_spec("fanout"), 3, storage)
    assert [searcher.suggest(t)["prompt_index"] for t in ("a", "b")] == [0, 1]
    assert searcher.adopt_live_trials({"a": 0}) == [1]  # "b" was lost with the driver
    assert [searcher.suggest(t)["prompt_index"] for t in ("c", "d")] == [1, 2]
    assert searcher.suggest("e") is None  # every prompt is taken


def test_restore_with_a_search_state_newer_than_tunes_trials_replaces_the_trial_tune_lost(storage, tmp_path):
    generator = generator_for(storage)
    ask(generator, "a"), ask(generator, "b")
    finish(generator, "a", 1.0)
    generator.save_to_dir(str(tmp_path), "s")  # the search state counts "b"; Tune's trial list did not

    restored = generator_for(storage)
    restored.restore_from_dir(str(tmp_path))
    assert not restored.is_finished() and restored.next_trial() is None  # waits for Tune's trials
    assert restored.reconcile([TuneTrial("a", 0, finished=True)]) == [1]
    assert states(storage) == ["COMPLETE", "FAIL"]
    # Two trials left to create, both concurrency slots free: the lost trial is replaced.
    assert restored.get_state()["counter"] == 1 and not restored.is_finished()
    assert [ask(restored, t)[OPTUNA_TRIAL_KEY] for t in ("c", "d")] == [2, 3]
    assert restored.is_finished()


def test_restore_with_a_search_state_older_than_tunes_trials_still_records_the_newer_trials(
    storage, tmp_path
):
    generator = generator_for(storage)
    ask(generator, "a")
    generator.save_to_dir(str(tmp_path), "s")  # the search state before "b"; Tune's trial list has it
    ask(generator, "b")

    restored = generator_for(storage)
    restored.restore_from_dir(str(tmp_path))
    assert restored.reconcile([TuneTrial("a", 0), TuneTrial("b", 1)]) == []
    assert states(storage) == ["RUNNING", "RUNNING"]  # both continue: neither is an orphan
    finish(restored, "b", 2.0)  # a completion the concurrency limiter would otherwise drop as unknown
    finish(restored, "a", 1.0)
    assert states(storage) == ["COMPLETE", "COMPLETE"]
    assert restored.get_state()["counter"] == 2


def test_a_trial_whose_recorded_checkpoint_tune_deleted_continues_from_the_next_one(tmp_path):
    trial_dir = tmp_path / "trial"
    for index in (2, 3):  # Tune kept the two newest; its snapshot still names checkpoint 1
        (trial_dir / f"checkpoint_{index:06d}").mkdir(parents=True)
    manager = _CheckpointManager(tune.CheckpointConfig(num_to_keep=2))
    lost = tune.Checkpoint(str(trial_dir / "checkpoint_000001"))
    manager._checkpoint_results = [_TrainingResult(lost, {"training_iteration": 4})]
    manager._latest_checkpoint_result = manager._checkpoint_results[0]
    trial = SimpleNamespace(
        trial_id="t",
        run_metadata=SimpleNamespace(checkpoint_manager=manager),
        latest_checkpoint_result=manager.latest_checkpoint_result,
        is_finished=lambda: False,
    )
    # Checkpoint 2 and not 3: the newest may have been cut short by the kill.
    assert continue_from_surviving_checkpoints([trial]) == {"t": str(trial_dir / "checkpoint_000002")}
    assert manager.latest_checkpoint_result.checkpoint.path == str(trial_dir / "checkpoint_000002")
    assert (trial_dir / "checkpoint_000003").is_dir()


def test_early_stopping_never_stops_a_trial_at_its_last_step_but_still_prunes_before_it():
    # 40 steps, grace 10, factor 2: ASHA's rungs are at 10, 20 and 40, the last one on the last step.
    asha = FinishingASHA(
        last_step=40, time_attr="step", metric="objective", mode="min", max_t=41, grace_period=10
    )
    good, late_worse, bad = (SimpleNamespace(trial_id=name) for name in ("good", "late", "bad"))
    for trial in (good, late_worse, bad):
        asha.on_trial_add(None, trial)

    def report(trial, step, value):
        return asha.on_trial_result(None, trial, {"step": step, "objective": value})

    for step in (10, 20):
        assert report(good, step, 1.0) == asha.CONTINUE
        assert report(late_worse, step, 0.5) == asha.CONTINUE
    assert report(bad, 10, 9.0) == asha.STOP  # pruned at a rung before the last step
    assert report(good, 40, 0.0) == asha.CONTINUE
    # Worse than the rung's cutoff, but at its last step: it finishes (final evaluation, artifacts).
    assert report(late_worse, 40, 5.0) == asha.CONTINUE
