"""GPU memory of a reused worker: its baseline after loading the prior, and where each trial ends.

A worker keeps its prior between trials, so every trial must hand back the rest: a trial whose tensors
outlive it (ray#32698, ray#30414) grows the worker's memory until one runs out. The trainable records
the baseline after each prior load and logs, at each trial's end, the `worker/cuda_*` metrics against
it (MiB; none without CUDA):

- worker/cuda_allocated_mib, worker/cuda_baseline_mib: torch's allocated memory (live tensors);
- worker/cuda_device_used_mib, worker/cuda_device_baseline_mib: the device's used memory, as
  nvidia-smi shows it (every process's, the caching allocator's reserve included).

The end is measured after a garbage collection and emptying the caching allocator, which is also
what hands an ended trial's memory back before the next trial starts.
"""

from __future__ import annotations

import gc
import os

BASELINE_MIB: dict[str, float] = {}


def cuda_memory_mib() -> dict[str, float]:
    """{"allocated", "device_used"} in MiB once collectable garbage and cached blocks are freed;
    {} where CUDA is unavailable or unused by this process."""
    import torch

    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return {}
    gc.collect()
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info()
    return {"allocated": torch.cuda.memory_allocated() / 2**20, "device_used": (total - free) / 2**20}


def record_baseline() -> None:
    """After a prior load: what every later trial's end is compared with."""
    BASELINE_MIB.clear()
    BASELINE_MIB.update(cuda_memory_mib())


def trial_end_metrics() -> dict[str, float]:
    """The `worker/cuda_*` metrics of a trial that just ended; {} without CUDA."""
    now = cuda_memory_mib()
    if not now:
        return {}
    nan = float("nan")
    return {
        "worker/cuda_allocated_mib": now["allocated"],
        "worker/cuda_baseline_mib": BASELINE_MIB.get("allocated", nan),
        "worker/cuda_device_used_mib": now["device_used"],
        "worker/cuda_device_baseline_mib": BASELINE_MIB.get("device_used", nan),
        "worker/cuda_pid": float(os.getpid()),  # which worker: growth is per worker, over its trials
    }
