"""Checkpoints that survive a kill at any moment, and exact resume.

A checkpoint is a directory `step_0000100/` holding `state.pt` (modules, optimizer, RNG states, step)
and `config.yaml`. It is written under a temporary name and renamed into place, so a directory named
`step_*` is always complete: a crash mid-write leaves the previous checkpoint as the latest one.

A checkpoint is data, never code. Checkpoints live on stores that other people and machines can write
(s3://, gs://, an NFS mount), and unpickling runs whatever the pickle names, so `load_checkpoint`
reads with `torch.load(weights_only=True)`: tensors, numbers, strings, None, lists, tuples and dicts,
nothing else. Everything the trainers store fits that, NumPy's RNG state included (kept as plain
numbers, not NumPy's pickled array). A file holding anything else is refused with `CheckpointError`
before any of it runs.
"""

from __future__ import annotations

import os
import pickle
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainers.config_base import ConfigError

STATE_FILE = "state.pt"
CONFIG_FILE = "config.yaml"
PREFIX = "step_"


class CheckpointError(ConfigError):
    """A checkpoint that is not plain data (or not a checkpoint at all). The message names the file."""


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:07d}"


def save_checkpoint(
    directory: str | Path, step: int, state: dict[str, Any], config_yaml: str, keep: int = 2
) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / checkpoint_name(step)
    tmp = directory / f".tmp-{checkpoint_name(step)}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    with open(tmp / STATE_FILE, "wb") as handle:
        torch.save(state, handle)
        handle.flush()
        os.fsync(handle.fileno())
    (tmp / CONFIG_FILE).write_text(config_yaml)
    if final.exists():  # the same step written again after a resume: replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    prune_checkpoints(directory, keep)
    return final


def list_checkpoints(directory: str | Path) -> list[Path]:
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [
        p
        for p in directory.iterdir()
        if p.is_dir() and p.name.startswith(PREFIX) and (p / STATE_FILE).exists()
    ]
    return sorted(found, key=lambda p: int(p.name.removeprefix(PREFIX)))


def latest_checkpoint(directory: str | Path) -> Path | None:
    found = list_checkpoints(directory)
    return found[-1] if found else None


def prune_checkpoints(directory: Path, keep: int) -> None:
    for old in list_checkpoints(directory)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    state_file = path / STATE_FILE if path.is_dir() else path
    if not state_file.exists():
        raise FileNotFoundError(
            f"no checkpoint at {str(path)!r} (expected {STATE_FILE} inside a step_* directory)"
        )
    try:
        return torch.load(state_file, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's message says which global the file names (e.g. "Unsupported global: posix.system").
        reason = str(exc).split("\n\n")[0].strip()
        found = next((line.strip() for line in str(exc).splitlines() if "Unsupported global" in line), "")
        raise CheckpointError(
            f"checkpoint {str(state_file)!r} holds more than tensors, numbers, strings, lists and dicts "
            f"({found or reason}); it was not loaded, since unpickling it could run code. Resume from a "
            "checkpoint this version of dreamsweep wrote (older ones kept NumPy's RNG state as a pickle), "
            "and check who can write to the store it came from"
        ) from None
    except (RuntimeError, EOFError, OSError) as exc:
        raise CheckpointError(
            f"checkpoint {str(state_file)!r} cannot be read ({exc}); it is damaged"
        ) from None


def rng_state(generator: torch.Generator) -> dict[str, Any]:
    state = {
        "generator": generator.get_state(),
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": numpy_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(generator: torch.Generator, state: dict[str, Any]) -> None:
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    set_numpy_rng_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def numpy_rng_state() -> dict[str, Any]:
    """NumPy's global RNG state as plain numbers (its own form holds an ndarray, which needs a pickle)."""
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    return {
        "name": str(name),
        "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),  # uint32 values, exactly
        "pos": int(position),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached_gaussian),
    }


def set_numpy_rng_state(state: dict[str, Any]) -> None:
    keys = state["keys"].numpy().astype(np.uint32)
    np.random.set_state(
        (state["name"], keys, int(state["pos"]), int(state["has_gauss"]), float(state["cached_gaussian"]))
    )
