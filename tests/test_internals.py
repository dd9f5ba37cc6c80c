"""The private Ray/Optuna details dreamsweep relies on still exist in the installed versions.

If this fails after an upgrade, the failing name says which use in orchestrator/ to revisit
(orchestrator/internals.py lists where each one is used and why)."""

from orchestrator.internals import PRIVATE_DETAILS, check_all


def test_every_private_detail_still_holds():
    broken = check_all()
    assert broken == {}, "private Ray/Optuna details broken by an upgrade:\n" + "\n".join(
        f"- {name}: {error}" for name, error in broken.items()
    )


def test_the_checks_detect_a_missing_detail(monkeypatch):
    import optuna

    monkeypatch.delattr(optuna.Study, "ask")  # a check that cannot fail would be no check
    assert "optuna.Study._storage.get_trial_id_from_study_id_trial_number" in check_all()
    assert len(PRIVATE_DETAILS) >= 6
