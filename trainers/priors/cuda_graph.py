"""The prior's UNet call replayed from CUDA graphs captured at fixed row counts (`prior.cuda_graph`).

At SD 2.1 size on an H100 one eager UNet forward is launch-bound: ~38 ms for work whose arithmetic
takes ~2 ms (docs/gpu_check_report.md). A CUDA graph records the forward's thousands of kernel launches
once and replays them with one launch. A graph fixes every shape, so:

- rows: a call of n rows runs the smallest captured graph of at least n rows, its inputs padded with
  copies of the call's first row and its output sliced back to n rows (the UNet treats rows
  independently: group norm, attention and convolutions are per row, so padding changes no real row
  beyond kernel-choice rounding). A call larger than every graph captures a new one at its own size,
  up to `max_graphs`; past that it runs eagerly. A pack of K members captures K × rows-per-member at
  its first full step, and a step with an empty slot pads to it;
- everything else (latent size, text length, dtypes, class labels or none) is part of the graph's key:
  a call with another key captures another graph (within `max_graphs`) or runs eagerly.

Inside the graph there is no host synchronisation (capture would fail on one) and no random draw: the
noise, timesteps and Δt are drawn by guidance before the call from each member's own generator, so no
generator needs registering with the graph. The graphs share one memory pool. A call with autograd on
(VSD's LoRA fit) or with LoRA adapters on the UNet runs eagerly: a replay has no backward, and switching
adapters changes the recorded kernels.

`GraphedCall(forward, capture=False)` runs the same padding and slicing eagerly; the CPU tests use it
to check that padding alone leaves ε̂ unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

# A key: everything about a call but its row count.
Key = tuple


def pad_rows(tensor: torch.Tensor | None, rows: int) -> torch.Tensor | None:
    """`tensor` with rows appended (copies of its first row) up to `rows` rows."""
    if tensor is None or len(tensor) == rows:
        return tensor
    if len(tensor) > rows:
        raise ValueError(f"cannot pad {len(tensor)} rows down to {rows}")
    filler = tensor[:1].expand(rows - len(tensor), *tensor.shape[1:])
    return torch.cat([tensor, filler])


def call_key(x: torch.Tensor, t: torch.Tensor, emb: torch.Tensor, labels: torch.Tensor | None) -> Key:
    def sig(tensor: torch.Tensor | None) -> tuple:
        return () if tensor is None else (tuple(tensor.shape[1:]), tensor.dtype, tensor.device)

    return (sig(x), sig(t), sig(emb), sig(labels))


def graph_rows(n: int, captured: list[int], room: bool) -> tuple[int | None, bool]:
    """Which graph serves a call of n rows: (rows of that graph, whether it must be captured first).

    The smallest captured size that holds n; else, if there is room for another graph, a new one of
    exactly n rows; else (None, False): run eagerly."""
    fitting = [size for size in captured if size >= n]
    if fitting:
        return min(fitting), False
    if room:
        return n, True
    return None, False


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph | None
    inputs: tuple[torch.Tensor | None, ...]  # static buffers the replay reads
    output: torch.Tensor | None  # static buffer the replay writes


class GraphedCall:
    """forward(x, t, emb, labels) -> ε̂ rows, replayed from CUDA graphs at fixed row counts.

    capture=False: the same padding to the chosen size and slicing back, run eagerly (CPU tests)."""

    def __init__(
        self,
        forward: Callable[..., torch.Tensor],
        *,
        capture: bool = True,
        max_graphs: int = 4,
        warmup: int = 3,
    ):
        self.forward = forward
        self.capture = capture
        self.max_graphs = max_graphs
        self.warmup = warmup
        self.graphs: dict[Key, dict[int, _Graph]] = {}
        self.pool = None
        self.stats = {"replays": 0, "captures": 0, "eager": 0, "padded_rows": 0}

    def __call__(
        self, x: torch.Tensor, t: torch.Tensor, emb: torch.Tensor, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        n = len(x)
        key = call_key(x, t, emb, labels)
        by_rows = self.graphs.setdefault(key, {})
        room = len(self.captured_sizes()) < self.max_graphs
        rows, new = graph_rows(n, list(by_rows), room)
        if rows is None:
            self.stats["eager"] += 1
            return self.forward(x, t, emb, labels)
        inputs = tuple(pad_rows(tensor, rows) for tensor in (x, t, emb, labels))
        self.stats["padded_rows"] += rows - n
        if new:
            by_rows[rows] = self._capture(inputs)
        entry = by_rows[rows]
        if entry.graph is None:  # capture=False: the padded call, eagerly
            return self.forward(*inputs)[:n]
        for static, value in zip(entry.inputs, inputs, strict=True):
            if static is not None:
                static.copy_(value)
        entry.graph.replay()
        self.stats["replays"] += 1
        return entry.output[:n].clone()  # the next replay overwrites the static output

    def _capture(self, inputs: tuple[torch.Tensor | None, ...]) -> _Graph:
        if not self.capture:
            return _Graph(None, inputs, None)
        static = tuple(None if tensor is None else tensor.clone() for tensor in inputs)
        # Warm up on a side stream first (cuBLAS/cuDNN handles, autotuning, a compiled UNet's own
        # compilation), as torch.cuda.graphs requires: none of that may happen during capture.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(self.warmup):
                self.forward(*static)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self.pool):
            output = self.forward(*static)
        self.stats["captures"] += 1
        return _Graph(graph, static, output)

    def captured_sizes(self) -> list[int]:
        return sorted(rows for by_rows in self.graphs.values() for rows in by_rows)
