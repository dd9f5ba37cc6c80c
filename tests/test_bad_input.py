"""Bad input stays bad input: names, prompts and overrides that try to reach outside the run's folder
are refused or harmless, and inputs too big to read are refused before they are read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from orchestrator.cli import main
from trainers.amortized.prompt_library import MAX_PROMPT_CHARS

SPEC = {
    "name": "ok",
    "kind": "fanout",
    "base": {"max_steps": 2},
    "prompts": {"items": ["a red cube"]},
    "objective": {"metric": "train/loss", "mode": "min"},
}
REFUSING = "http://127.0.0.1:22951"  # nothing listens there (tests/test_clusters.py): never reached


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


def write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("name", ["../escaped", "/tmp/escaped", "a/../../escaped", ".hidden", "nul\x00name"])
@pytest.mark.parametrize("address", [None, REFUSING])
def test_a_sweep_name_that_would_leave_the_workspace_is_refused(tmp_path, capsys, name, address):
    spec = write(tmp_path / "spec.yaml", SPEC)
    argv = ["submit", str(spec), "--name", name, "--workspace", str(tmp_path / "ws")]
    assert main(argv + (["--address", address] if address else [])) == 2
    err = capsys.readouterr().err
    assert "name: " in err and ("must be non-empty letters, digits" in err or "holds a NUL byte" in err)
    assert files_under(tmp_path) == {spec}  # nothing written, inside the workspace or out of it


def test_a_spec_whose_overrides_write_outside_the_trial_is_refused(tmp_path, capsys):
    spec = {**SPEC, "overrides": {"output_dir": "/tmp/elsewhere"}}
    assert main(["submit", str(write(tmp_path / "a.yaml", spec)), "--address", REFUSING]) == 2
    assert "overrides.output_dir: set by the sweep itself" in capsys.readouterr().err
    spec = {**SPEC, "overrides": {"prior.cache_dir": "../../../cache"}}
    assert main(["submit", str(write(tmp_path / "b.yaml", spec)), "--workspace", str(tmp_path / "ws")]) == 2
    assert "overrides.prior.cache_dir: '../../../cache' climbs out of its folder" in capsys.readouterr().err
    assert not (tmp_path / "ws").exists()


def test_a_nul_byte_anywhere_in_a_spec_or_config_is_refused_naming_the_field(tmp_path, capsys):
    spec = {**SPEC, "prompts": {"items": ["a red\x00cube"]}}
    assert main(["submit", str(write(tmp_path / "s.yaml", spec)), "--workspace", str(tmp_path / "ws")]) == 2
    assert "prompts.items[0]: the value holds a NUL byte" in capsys.readouterr().err
    config = write(tmp_path / "c.yaml", {"output_dir": str(tmp_path / "run\x00/../../x"), "max_steps": 1})
    assert main(["train", str(config)]) == 2
    assert "output_dir: the value holds a NUL byte" in capsys.readouterr().err
    assert files_under(tmp_path) == {tmp_path / "s.yaml", tmp_path / "c.yaml"}


def test_a_prompt_is_never_a_path(tmp_path, tiny_sd_dir, capsys):
    """The prompt names no file: a run with a prompt that looks like a path writes only in its folder."""
    run = tmp_path / "run"
    config = write(
        tmp_path / "c.yaml",
        {"prior": {"name": str(tiny_sd_dir)}, "resolution": 16, "max_steps": 2, "output_dir": str(run)},
    )
    before = files_under(tmp_path)
    prompt = "../../../../escaped/../" + str(tmp_path / "escaped")
    assert main(["train", str(config), f"prompt={json.dumps(prompt)}", "logging.turntable_frames=2"]) == 0
    written = files_under(tmp_path) - before
    assert written and all(run in path.parents for path in written)
    assert not (tmp_path / "escaped").exists()


def test_a_spec_too_big_to_be_a_spec_is_refused_before_it_is_parsed(tmp_path, capsys):
    big = tmp_path / "big.yaml"
    big.write_text(yaml.safe_dump(SPEC) + ("# padding\n" * (10 * 2**20 // 10)))  # 10 MiB
    assert main(["submit", str(big), "--workspace", str(tmp_path / "ws")]) == 2
    err = capsys.readouterr().err
    assert f"config file {str(big)!r} is 10.0 MiB, over the 2 MiB" in err and "prompts.path" in err


def test_a_prompt_library_too_big_to_read_is_refused_before_it_is_read(tmp_path, capsys):
    # 100k prompts of 10 kB each: a 1 GB file (sparse here: its size is all that is looked at).
    library = tmp_path / "huge.json"
    with open(library, "wb") as handle:
        handle.truncate(100_000 * 10_000)
    spec = write(tmp_path / "s.yaml", {**SPEC, "prompts": {"path": str(library), "split": "train"}})
    assert main(["submit", str(spec), "--workspace", str(tmp_path / "ws")]) == 2
    err = capsys.readouterr().err
    assert f"prompts.path: {str(library)!r} is 954 MiB, over the 256 MiB" in err


def test_a_prompt_longer_than_any_text_encoder_reads_is_refused(tmp_path, capsys):
    library = tmp_path / "long.json"
    library.write_text(json.dumps({"train": ["a red cube", "x" * 10_000]}))
    spec = write(tmp_path / "s.yaml", {**SPEC, "prompts": {"path": str(library), "split": "train"}})
    assert main(["submit", str(spec), "--workspace", str(tmp_path / "ws")]) == 2
    err = capsys.readouterr().err
    assert "position(s) [1]" in err and f"longer than {MAX_PROMPT_CHARS:,} characters" in err
