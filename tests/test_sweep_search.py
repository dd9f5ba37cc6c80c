"""SweepSearch (Ray's OptunaSearch on the sweep's persistent study) without Ray running: what a
restore after `kill -9` must give back."""

import optuna
import pytest

from orchestrator.spec import SweepSpec
from orchestrator.trainable import OPTUNA_TRIAL_KEY
from orchestrator.tuner import build_searcher

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

    # The driver was killed after "b" was asked but before Tune recorded it; a new driver restores.
    restored = build_searcher(make_spec(), 3, storage)
    restored.restore(str(tmp_path / "searcher.pkl"))
    study = optuna.load_study(study_name="s", storage=storage)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "FAIL"]  # the orphan is no longer RUNNING
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
    assert searcher.fail_orphans(live_trial_ids={"a"}) == [1]  # "b" was lost with the driver
    assert [searcher.suggest(t)["prompt_index"] for t in ("c", "d")] == [1, 2]
    assert searcher.suggest("e") is None  # every prompt is taken
