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
import yaml

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


@pytest.mark.slow
def test_dreamsweep_resume_refuses_a_planted_checkpoint_and_creates_no_file(tmp_path):
    """A sweep's driver is killed with trials in flight; every checkpoint Tune kept is replaced by one
    whose pickle would create a file; `dreamsweep resume` refuses them (the trial fails, naming the
    file) and the file is never created."""
    import glob
    import os
    import signal
    import subprocess

    from orchestrator.run.workspace import Workspace
    from tests.test_sweep_resume import SPEC, cli, wait_for_kill_point

    marker = tmp_path / "pwned"
    spec_path = tmp_path / "spec.yaml"
    # Two trials, both in flight at once: once either has a checkpoint the kill can come, and after the
    # resume no trial is left to run but the planted ones.
    spec_path.write_text(yaml.safe_dump({**SPEC, "retries": 0, "trials": 2}))
    ws = Workspace(tmp_path / "ws")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(tmp_path / "submit.log", "w") as log:
        driver = subprocess.Popen(
            cli("submit", str(spec_path), "--workspace", str(ws.root)), env=env, stdout=log, stderr=log
        )
        _, in_flight = wait_for_kill_point(ws, driver, need_done=False)
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait()
    planted = glob.glob(f"{ws.root}/ray_results/killed/*/checkpoint_*/state.pt")
    assert planted
    for path in planted:
        torch.save({"step": 2, "x": CreatesAFile(marker)}, path)

    resumed = subprocess.run(
        cli("resume", "killed", "--workspace", str(ws.root)),
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    errors = "".join(open(p).read() for p in glob.glob(f"{ws.root}/ray_results/killed/*/error.txt"))
    assert "CheckpointError" in errors and "could run code" in errors, (
        resumed.stdout[-2000:] + resumed.stderr[-2000:]
    )
    assert "restored_checkpoint/state.pt" in errors  # the trial's copy of the planted file, by name
    assert not marker.exists()
