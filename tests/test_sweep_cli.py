"""The `dreamsweep` command without Ray: unknown sweep names list the ones that exist, bad specs are
refused before anything starts, and `train` runs the trainer from a YAML plus overrides."""

import pytest
import yaml

from orchestrator.cli import main
from orchestrator.run.workspace import ENV_VAR, SweepRecord, Workspace
from orchestrator.spec.spec import load_sweep_spec

SPEC = {
    "name": "existing",
    "kind": "fanout",
    "prompts": {"items": ["a red cube"]},
    "objective": {"metric": "train/loss", "mode": "min"},
}


@pytest.fixture
def workspace(tmp_path):
    ws = Workspace(tmp_path / "ws")
    spec = load_sweep_spec(SPEC)
    ws.register(spec, SweepRecord(spec.name, ws.stores_for(spec)))
    return ws


@pytest.mark.parametrize("command", ["status", "resume", "compare", "best"])
def test_unknown_sweep_name_lists_the_sweeps_that_exist(workspace, command, capsys):
    assert main([command, "nope", "--workspace", str(workspace.root)]) == 2
    err = capsys.readouterr().err
    assert "no sweep named 'nope'" in err and "sweeps there: existing" in err


def test_workspace_comes_from_the_environment_when_not_given(workspace, monkeypatch, capsys):
    monkeypatch.setenv(ENV_VAR, str(workspace.root))
    assert main(["list"]) == 0
    assert capsys.readouterr().out.strip() == "existing"


def test_malformed_spec_is_refused_before_ray_starts(tmp_path, capsys, monkeypatch):
    import orchestrator.run.sweep

    def no_ray(cluster):
        raise AssertionError("Ray was started for a malformed spec")

    monkeypatch.setattr(orchestrator.run.sweep, "init_ray", no_ray)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**SPEC, "resources": {"gpus": -2}}))
    assert main(["submit", str(bad), "--workspace", str(tmp_path / "ws")]) == 2
    assert "resources.gpus: Input should be greater than or equal to 0 (got -2)" in capsys.readouterr().err
    assert not (tmp_path / "ws").exists()  # nothing registered, no store created


def test_submitting_an_existing_name_is_refused_without_resume(workspace, tmp_path, capsys):
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(SPEC))
    assert main(["submit", str(spec), "--workspace", str(workspace.root)]) == 2
    assert "dreamsweep resume existing" in capsys.readouterr().err


def test_stores_default_to_the_workspace_and_follow_the_spec_storage(tmp_path):
    ws = Workspace(tmp_path)
    local = ws.stores_for(load_sweep_spec(SPEC))
    assert local.optuna_url == f"sqlite:///{tmp_path / 'optuna.db'}"
    assert local.mlflow_uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert local.tune_path == str(tmp_path / "ray_results")
    remote = ws.stores_for(
        load_sweep_spec(
            {
                **SPEC,
                "storage": {"optuna": "postgresql://db/x", "mlflow": "http://m:5000", "tune": "s3://b/p"},
            }
        )
    )
    assert (remote.optuna_url, remote.mlflow_uri, remote.tune_path) == (
        "postgresql://db/x",
        "http://m:5000",
        "s3://b/p",
    )
    assert remote.mlflow_artifacts is None  # the tracking server decides where artifacts go


def test_train_subcommand_trains_from_a_yaml_with_overrides(tmp_path, capsys):
    config = tmp_path / "tiny.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "max_steps": 2,
                "resolution": 32,
                "output_dir": str(tmp_path / "run"),
                "geometry": {"encoding": {"n_levels": 2, "log2_hashmap_size": 10}},
                "renderer": {"num_samples_per_ray": 8},
                "logging": {"log_every": 1, "val_views": 1, "turntable_frames": 2},
            }
        )
    )
    assert main(["train", str(config), "guidance.eta=0.3", "seed=1"]) == 0
    assert "done:" in capsys.readouterr().out
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["guidance"]["eta"] == 0.3 and saved["seed"] == 1


def test_train_subcommand_names_an_unknown_override_key(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("max_steps: 2\n")
    assert main(["train", str(config), "guidance.etaa=0.3"]) == 2
    assert "did you mean 'guidance.eta'" in capsys.readouterr().err


def test_compare_rows_render_as_table_csv_and_json():
    import csv
    import io
    import json

    from orchestrator.track.report import format_rows

    rows = [
        {"trial": 1, "run_id": "r1", "state": "FINISHED", "params": {"guidance.eta": 0.25}, "objective": 0.5}
    ]
    columns = ["trial", "run_id", "state", "params", "objective"]
    assert json.loads(format_rows(rows, columns, "json")) == rows
    parsed = list(csv.DictReader(io.StringIO(format_rows(rows, columns, "csv"))))
    assert parsed[0]["run_id"] == "r1" and json.loads(parsed[0]["params"]) == {"guidance.eta": 0.25}
    header, line = format_rows(rows, columns, "table").splitlines()
    assert header.split() == columns and "guidance.eta=0.25" in line
