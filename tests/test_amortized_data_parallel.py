"""The amortized trainer on Ray Train: 2 gloo workers, a worker killed mid-run, the run resumed.

One local Ray instance for the module (2 CPUs, no dashboard).
"""

import os
import signal
import threading
import time
from pathlib import Path

import pytest
import ray
import yaml

from trainers.amortized.config import load_amortized_config
from trainers.amortized.data_parallel import ClusterTooSmallError, build_trainer, fit
from trainers.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint

TINY = {
    "trainer": "amortized",
    "prompts": {"items": ["a red cube", "a blue ball", "a green cone", "a pink torus", "a gold ring"]},
    "prior": {"name": "tiny-sd"},
    "max_steps": 6,
    "batch_size": 1,
    "resolution": 16,
    "generator": {
        "kind": "hyper_ingp",
        "encoding": {"n_levels": 4, "log2_hashmap_size": 10, "base_resolution": 4},
        "hidden_dim": 16,
        "hyper_hidden_dim": 16,
    },
    "renderer": {"num_samples_per_ray": 8},
    "eval_prompts": {"n_train": 1},
    "logging": {"log_every": 1, "checkpoint_every": 2, "val_views": 1, "turntable_frames": 2},
    "data_parallel": {"num_workers": 2, "max_failures": 2},
}


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def config(tmp_path: Path, name: str, **overrides):
    return load_amortized_config(
        TINY,
        {"output_dir": str(tmp_path / name), "text_cache.path": str(tmp_path / "text.arrow"), **overrides},
    )


def persisted_steps(output_dir: Path) -> list[int]:
    """Steps of the checkpoints Ray Train has persisted (what a restarted worker group gets)."""
    return sorted(
        int(load_checkpoint(state.parent)["step"]) for state in (output_dir / "ray_train").rglob("state.pt")
    )


def kill_worker_after_checkpoint(output_dir: Path, rank: int, seen: dict) -> threading.Thread:
    """Kill -9 rank `rank`'s worker process once Ray Train holds two checkpoints of the run."""

    def watch():
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            pid_file = output_dir / f"worker_{rank}.pid"
            try:
                steps = persisted_steps(output_dir)
            except CheckpointError:  # a checkpoint being written right now (a partial file)
                steps = []
            # Two: the older one is surely registered with Ray Train by the time the newer is on disk.
            if len(steps) >= 2 and pid_file.exists():
                seen["steps"], seen["pid"] = steps, int(pid_file.read_text())
                os.kill(seen["pid"], signal.SIGKILL)
                return
            time.sleep(0.05)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_two_gloo_workers_train_and_a_killed_worker_resumes_at_the_checkpointed_step(local_ray, tmp_path):
    killed = config(tmp_path, "killed")
    seen: dict = {}
    watcher = kill_worker_after_checkpoint(Path(killed.output_dir), 1, seen)
    fit(killed)
    watcher.join(timeout=1)

    assert "pid" in seen, "the watcher never saw a checkpoint to kill after"
    metrics = yaml.safe_load((Path(killed.output_dir) / "metrics.yaml").read_text())
    # The restarted worker group continued from a checkpoint Ray Train held when the worker died.
    assert metrics["train/resumed_at_step"] in seen["steps"]
    final = load_checkpoint(latest_checkpoint(Path(killed.output_dir) / "checkpoints"))
    assert final["step"] == 6 and final["world_size"] == 2
    assert len(final["rng_by_rank"]) == 2  # each rank's random state, for an exact resume
    assert (Path(killed.output_dir) / "turntable.gif").stat().st_size > 0


def test_a_library_with_fewer_prompts_than_workers_is_refused_before_any_worker_starts(local_ray, tmp_path):
    from trainers.amortized.loop import PromptLibraryError

    cfg = config(tmp_path, "few", **{"prompts.items": ["a red cube", "a red cube"]})
    with pytest.raises(PromptLibraryError, match="fewer than data_parallel.num_workers=2"):
        build_trainer(cfg)


def test_a_world_larger_than_the_clusters_gpus_is_refused_naming_them(local_ray, tmp_path):
    cfg = config(tmp_path, "big", **{"data_parallel.num_workers": 3, "data_parallel.use_gpu": True})
    with pytest.raises(ClusterTooSmallError, match=r"needs 3 GPUs.*the Ray cluster has CPU=2, GPU=0"):
        build_trainer(cfg)
