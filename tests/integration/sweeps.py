"""Small sweeps for the clusters, and ways to watch them through the `dreamsweep` command."""

from __future__ import annotations

import json
import time
from pathlib import Path

import yaml

from orchestrator.cli import main

FAKE = {
    "train_fn": "orchestrator.run.fake_trainer:train",
    "load_prior_fn": "orchestrator.run.fake_trainer:load_prior",
}


def write_spec(
    folder: Path, name: str, *, trials: int, steps: int, storage: dict, shared: Path, **extra
) -> Path:
    spec = {
        "name": name,
        "kind": "search",
        "base": {
            "max_steps": steps,
            "logging": {"log_every": 5, "checkpoint_every": 10, "val_every": 0},
        },
        "prompts": {"items": ["a red cube"]},
        "search": {"space": {"guidance.eta": {"type": "float", "low": 0.0, "high": 1.0}}, "seed": 3},
        "objective": {"metric": "train/loss", "mode": "min"},
        "trials": trials,
        "max_concurrent": 2,
        "resources": {"cpus": 1, "gpus": 1},
        "retries": 2,
        "storage": storage,
        "cluster": {"shared_mounts": [str(shared)]},
        **extra,
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    (folder / "runtime.json").write_text(json.dumps(FAKE))
    return path


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def job_status(capsys, name: str, address: str) -> list[dict]:
    code, out, err = run_cli(capsys, "status", name, "--address", address, "--format", "json")
    assert code == 0, err
    return json.loads(out)


def wait_for(predicate, timeout_s: float, what: str, every_s: float = 2.0):
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(every_s)


def wait_for_job(capsys, name: str, address: str, states: tuple[str, ...], timeout_s: float) -> dict:
    def latest():
        jobs = job_status(capsys, name, address)
        return jobs[-1] if jobs and jobs[-1]["status"] in states else None

    return wait_for(latest, timeout_s, f"sweep {name}'s job to reach {states}")
