"""A reused worker's GPU memory: the baseline after the prior load, and each trial's end against it.

No CUDA here: torch.cuda is replaced by a stand-in device whose memory the test sets; the real numbers
come from tests/benchmarks/gpu_check.sh (stage sweep_gpu)."""

from __future__ import annotations

import os
import types

import pytest
import torch

from orchestrator.run import worker_memory

MIB = 2**20


@pytest.fixture
def device(monkeypatch):
    """A stand-in CUDA device: `allocated` and `used` in MiB; records empty_cache calls."""
    state = types.SimpleNamespace(allocated=0.0, used=0.0, total=80_000.0, emptied=0)

    def empty_cache():
        state.emptied += 1

    fake = types.SimpleNamespace(
        is_available=lambda: True,
        is_initialized=lambda: True,
        empty_cache=empty_cache,
        mem_get_info=lambda: ((state.total - state.used) * MIB, state.total * MIB),
        memory_allocated=lambda: state.allocated * MIB,
    )
    monkeypatch.setattr(torch, "cuda", fake)
    monkeypatch.setattr(worker_memory, "BASELINE_MIB", {})
    return state


def test_without_cuda_a_trial_ends_with_no_memory_metrics(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    worker_memory.record_baseline()
    assert worker_memory.trial_end_metrics() == {}


def test_a_trial_end_is_reported_against_the_baseline_after_the_prior_load(device):
    device.allocated, device.used = 2480.0, 3100.0  # the prior's weights
    worker_memory.record_baseline()
    device.allocated, device.used = 2496.0, 3300.0  # after a trial
    assert worker_memory.trial_end_metrics() == {
        "worker/cuda_allocated_mib": 2496.0,
        "worker/cuda_baseline_mib": 2480.0,
        "worker/cuda_device_used_mib": 3300.0,
        "worker/cuda_device_baseline_mib": 3100.0,
        "worker/cuda_pid": float(os.getpid()),
    }


def test_memory_is_read_after_the_caching_allocator_hands_freed_blocks_back(device):
    worker_memory.record_baseline()
    worker_memory.trial_end_metrics()
    assert device.emptied == 2  # once for the baseline, once at the trial's end


def test_a_new_prior_load_replaces_the_baseline(device):
    device.allocated = 100.0
    worker_memory.record_baseline()
    device.allocated = 2600.0
    worker_memory.record_baseline()
    assert worker_memory.trial_end_metrics()["worker/cuda_baseline_mib"] == 2600.0
