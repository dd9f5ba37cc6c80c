"""Checkpoints are data: loading one never runs code, whoever wrote the file.

A checkpoint on a shared store (s3://, gs://, NFS) can be written by anyone with access to that store,
and a pickle can name any function to call when it is loaded. These tests plant a checkpoint whose
pickle would create a file, and check that every way of resuming refuses it, names the file, and that
the file is never created.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from orchestrator.cli import main
from trainers.checkpoint import (
    CheckpointError,
    load_checkpoint,
    restore_rng_state,
    rng_state,
    save_checkpoint,
)


class CreatesAFile:
    """Unpickled, this calls open(path, "w"): what an attacker's checkpoint would do, harmlessly."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def plant_malicious_checkpoint(directory, marker):
    """A step_* checkpoint whose state.pt holds a tensor beside the payload, as a real one would."""
    return save_checkpoint(
        directory, 5, {"step": 5, "renderer": {"w": torch.ones(2)}, "x": CreatesAFile(marker)}, "{}"
    )


def test_a_checkpoint_whose_pickle_runs_code_is_refused_naming_the_file(tmp_path):
    marker = tmp_path / "pwned"
    checkpoint = plant_malicious_checkpoint(tmp_path / "checkpoints", marker)
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(checkpoint)
    assert str(checkpoint / "state.pt") in str(caught.value)
    assert "open" in str(caught.value)  # the global the file names
    assert not marker.exists()


def test_the_rng_states_round_trip_as_plain_data_and_draw_the_same_numbers(tmp_path):
    generator = torch.Generator().manual_seed(3)
    random.seed(4)
    np.random.seed(5)
    np.random.standard_normal()  # leaves a cached Gaussian in NumPy's state, which must round-trip too
    path = save_checkpoint(tmp_path, 1, {"step": 1, "rng": rng_state(generator)}, "{}")
    expected = (
        torch.rand(3, generator=generator),
        torch.rand(3),
        random.random(),
        np.random.standard_normal(4),
    )

    restore_rng_state(generator, load_checkpoint(path)["rng"])  # weights_only: no pickle involved
    again = (torch.rand(3, generator=generator), torch.rand(3), random.random(), np.random.standard_normal(4))
    assert torch.equal(expected[0], again[0]) and torch.equal(expected[1], again[1])
    assert expected[2] == again[2]
    assert np.array_equal(expected[3], again[3])


def test_dreamsweep_train_resume_refuses_the_checkpoint_and_creates_no_file(tmp_path, tiny_sd_dir, capsys):
    marker = tmp_path / "pwned"
    output = tmp_path / "run"
    plant_malicious_checkpoint(output / "checkpoints", marker)
    config = tmp_path / "config.yaml"
    config.write_text(
        f"prior: {{name: {tiny_sd_dir}}}\nresolution: 32\nmax_steps: 10\noutput_dir: {output}\n"
    )

    assert main(["train", str(config), "--resume", "latest"]) == 2
    error = capsys.readouterr().err
    assert str(output / "checkpoints" / "step_0000005" / "state.pt") in error
    assert "could run code" in error
    assert not marker.exists()


def test_the_amortized_trainer_refuses_it_too(tmp_path, capsys):
    import yaml

    from tests.test_amortized import TINY

    marker = tmp_path / "pwned"
    run = tmp_path / "run"
    plant_malicious_checkpoint(run / "checkpoints", marker)
    config = tmp_path / "amortized.yaml"
    config.write_text(yaml.safe_dump(TINY))
    overrides = [f"output_dir={run}", f"text_cache.path={tmp_path / 'text.arrow'}"]

    assert main(["train", str(config), *overrides, "--resume", "latest"]) == 2
    assert str(run / "checkpoints" / "step_0000005" / "state.pt") in capsys.readouterr().err
    assert not marker.exists()
