"""Store URLs carry no secret into any record (orchestrator.spec.secrets).

Every record (the workspace's spec.yaml and sweep.json, MLflow's spec.json, a Ray Job's upload, Tune's
state) holds a store URL as the user wrote it, with a literal password shown as `***` and `${NAME}`
references unresolved; the URL a client connects with is made only where it is used.
"""

from __future__ import annotations

import json
import os

import pytest
import yaml

from orchestrator.run.cluster import ClusterConfig
from orchestrator.run.jobs import portable_spec
from orchestrator.run.stores import check_stores_for_cluster
from orchestrator.run.sweep import submit
from orchestrator.run.workspace import Workspace
from orchestrator.spec.secrets import (
    CredentialInURLWarning,
    literal_password,
    redact_url,
    register_credentials,
    usable_url,
    without_userinfo,
)
from orchestrator.spec.spec import SpecError, Storage, load_sweep_spec, save_spec, spec_to_dict

SPEC = {
    "name": "s",
    "kind": "fanout",
    "base": {"max_steps": 2},
    "prompts": {"items": ["a red cube"]},
    "objective": {"metric": "train/loss", "mode": "min"},
}


@pytest.mark.parametrize(
    "written, recorded",
    [
        ("postgresql://user:hunter2@db.internal/optuna", "postgresql://user:***@db.internal/optuna"),
        ("postgresql+psycopg2://u:p%40ss@h:5432/d", "postgresql+psycopg2://u:***@h:5432/d"),
        ("http://alice:hunter2@mlflow:5000", "http://alice:***@mlflow:5000"),
        (
            "postgresql://u@h/d?password=hunter2&sslmode=require",
            "postgresql://u@h/d?password=***&sslmode=require",
        ),
        # What needs no redaction is left exactly as written.
        ("postgresql://u:${OPTUNA_PW}@h/d", "postgresql://u:${OPTUNA_PW}@h/d"),
        ("postgresql://u@h/d", "postgresql://u@h/d"),
        ("http://${MLFLOW_HOST}:5000", "http://${MLFLOW_HOST}:5000"),
        ("sqlite:////tmp/optuna.db", "sqlite:////tmp/optuna.db"),
        ("s3://bucket/ray_results", "s3://bucket/ray_results"),
    ],
)
def test_a_recorded_url_shows_a_literal_password_as_stars_and_keeps_references(written, recorded):
    assert redact_url(written) == recorded
    assert literal_password(written) == (written != recorded)
    assert not literal_password(recorded)


def test_the_url_a_client_uses_is_made_where_it_is_used(monkeypatch):
    monkeypatch.setenv("OPTUNA_PW", "p@ss:w/rd")  # characters that would break a URL unencoded
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    assert usable_url("postgresql://u:${OPTUNA_PW}@h/d") == "postgresql+psycopg2://u:p%40ss%3Aw%2Frd@h/d"
    # A redacted password is dropped: libpq takes it from PGPASSWORD or ~/.pgpass.
    assert usable_url("postgresql://u:***@h/d") == "postgresql+psycopg2://u@h/d"
    assert (
        usable_url("postgresql://u@h/d?password=***&sslmode=require")
        == "postgresql+psycopg2://u@h/d?sslmode=require"
    )
    # An MLflow server's user and password go where MLflow's client reads them, not into its URL.
    assert usable_url("http://alice:s3cr%40t@mlflow:5000") == "http://mlflow:5000"
    assert os.environ["MLFLOW_TRACKING_USERNAME"] == "alice"
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == "s3cr@t"
    # A link for a browser carries no user at all (the browser asks for it).
    assert without_userinfo("http://alice:***@mlflow:5000/#/x") == "http://mlflow:5000/#/x"
    # Forms that already name a driver are kept.
    assert usable_url("postgresql+psycopg://u@h/d") == "postgresql+psycopg://u@h/d"
    assert usable_url("sqlite:////tmp/x.db") == "sqlite:////tmp/x.db"


def test_an_unset_reference_is_refused_naming_the_field_and_the_variable(tmp_path, monkeypatch):
    monkeypatch.delenv("NOT_SET_ANYWHERE", raising=False)
    spec = {**SPEC, "storage": {"optuna": "sqlite:///${NOT_SET_ANYWHERE}/optuna.db"}}
    with pytest.raises(
        SpecError, match=r"storage\.optuna: .*\$\{NOT_SET_ANYWHERE\}.*export NOT_SET_ANYWHERE="
    ):
        submit(spec, workspace=tmp_path / "ws")
    assert not (tmp_path / "ws" / "sweeps").exists()  # refused before anything was registered


def test_every_record_of_the_spec_holds_the_url_redacted_and_references_unresolved(tmp_path, monkeypatch):
    monkeypatch.setenv("OPTUNA_PW", "resolved-value")
    spec = load_sweep_spec(
        {
            **SPEC,
            "storage": {
                "optuna": "postgresql://u:${OPTUNA_PW}@h/d",
                "mlflow": "http://alice:hunter2@mlflow:5000",
            },
        }
    )
    save_spec(spec, tmp_path / "spec.yaml")
    stores = Workspace(tmp_path / "ws").stores_for(spec)
    records = [
        json.dumps(spec_to_dict(spec)),  # MLflow's spec.json
        (tmp_path / "spec.yaml").read_text(),  # the workspace's spec.yaml
        json.dumps(stores.__dict__),  # the workspace's sweep.json
    ]
    for text in records:
        assert "hunter2" not in text and "resolved-value" not in text
        assert "alice:***@mlflow" in text and "${OPTUNA_PW}" in text
    # The saved spec loads again, as `resume` reads it.
    assert (
        load_sweep_spec(tmp_path / "spec.yaml", check=False).storage.mlflow == "http://alice:***@mlflow:5000"
    )


def test_a_literal_password_works_here_with_one_warning_saying_how_to_move_it_out(monkeypatch):
    monkeypatch.delenv("PGPASSWORD", raising=False)
    storage = Storage(optuna="postgresql://u:hunter2@h/d", mlflow="postgresql://m:other@h/mlflow")
    with pytest.warns(CredentialInURLWarning) as caught:
        register_credentials(storage)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 2 and not any("hunter2" in m or "other" in m.split(":***")[0] for m in messages)
    assert "storage.optuna: postgresql://u:***@h/d embeds a password" in messages[0]
    assert "~/.pgpass" in messages[0] and "PGPASSWORD" in messages[0]
    # This process still connects with it; the MLflow URL's goes where the local workers find it.
    assert usable_url("postgresql://u:***@h/d") == "postgresql+psycopg2://u:hunter2@h/d"
    assert os.environ.pop("PGPASSWORD") == "other"


def test_a_cluster_submit_refuses_a_literal_password_before_anything_is_uploaded():
    storage = Storage(
        optuna="postgresql://dreamsweep:hunter2@db/optuna", mlflow="http://mlflow:5000", tune="s3://b/r"
    )
    with pytest.raises(SpecError) as caught:
        check_stores_for_cluster(storage, ClusterConfig(), "http://head:8265")
    message = str(caught.value)
    assert "hunter2" not in message
    assert message.startswith("storage.optuna: postgresql://dreamsweep:***@db/optuna embeds a password")
    assert "~/.pgpass" in message and "${NAME}" in message
    # With a reference instead, the job's spec carries the reference, resolved on the head.
    check_stores_for_cluster(
        storage.model_copy(update={"optuna": "postgresql://dreamsweep:${PGPW}@db/optuna"}),
        ClusterConfig(),
        "http://head:8265",
    )


def test_the_jobs_uploaded_spec_keeps_references_unresolved(monkeypatch):
    monkeypatch.setenv("PGPW", "resolved-value")
    spec = load_sweep_spec({**SPEC, "storage": {"optuna": "postgresql://d:${PGPW}@db/optuna"}})
    uploaded = yaml.safe_dump(portable_spec(spec))
    assert "${PGPW}" in uploaded and "resolved-value" not in uploaded


def test_credentials_in_the_tune_storage_url_are_refused():
    with pytest.raises(
        SpecError, match=r"storage\.tune: s3://AKIA:\*\*\*@bucket/r embeds a password.*credential"
    ):
        load_sweep_spec({**SPEC, "storage": {"tune": "s3://AKIA:hunter2@bucket/r"}})


def test_the_study_storage_pickles_into_tunes_state_with_its_recorded_url(tmp_path, monkeypatch):
    """OptunaSearch (and with it the study's storage) is pickled into Tune's tuner.pkl and search state:
    the storage goes there with the URL as recorded, and connects again from it when unpickled."""
    import pickle

    from orchestrator.run.tuner import optuna_storage

    monkeypatch.setenv("STUDY_DIR", str(tmp_path / "resolved-value"))
    (tmp_path / "resolved-value").mkdir()
    storage = optuna_storage("sqlite:///${STUDY_DIR}/optuna.db")
    pickled = pickle.dumps(storage)
    assert b"${STUDY_DIR}" in pickled and b"resolved-value" not in pickled
    again = pickle.loads(pickled)
    assert again.url == f"sqlite:///{tmp_path}/resolved-value/optuna.db"
    assert again.get_all_studies() == []  # connected
