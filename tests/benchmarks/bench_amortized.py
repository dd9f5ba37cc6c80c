"""Amortized trainer benchmarks, each printed beside its baseline from the same run.

    python tests/benchmarks/bench_amortized.py                 # all three
    python tests/benchmarks/bench_amortized.py --only cache    # scaling | cache | generate

- scaling: samples/s of the same config on 1 and on 2 gloo workers (Ray Train), and the scaling
  efficiency samples/s(2) / (2 x samples/s(1)) (target >= 0.8). Measured over the last half of the
  steps, so start-up and the first (cache-filling) steps are left out. Beside it, what DDP adds to a
  step: the gradient it all-reduces (the model's parameters), timed alone between 2 gloo processes.
- cache: building and then reading the text-embedding cache of 100k prompts with tiny-sd's encoder
  (read target < 1 s: a fresh process-like cache object, memory-mapped file, 100k lookups).
- generate: one `generate` (text encoder + one generator forward, and the turntable render) against
  one per-prompt training step of the same prior and resolution.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

TINY = {
    "trainer": "amortized",
    "prompts": {"path": str(ROOT / "sweeps/prompts/magic3d_15.json"), "split": "train"},
    "prior": {"name": "tiny-sd"},
    "batch_size": 2,
    "resolution": 32,
    "generator": {
        "kind": "hyper_ingp",
        "encoding": {"n_levels": 8, "log2_hashmap_size": 14, "base_resolution": 8, "per_level_scale": 1.5},
        "hidden_dim": 32,
        "hyper_hidden_dim": 32,
    },
    "renderer": {"num_samples_per_ray": 32},
    "eval_prompts": {"n_train": 1},
    "logging": {"checkpoint_every": 0, "val_views": 1, "turntable_frames": 2},
}


def _allreduce_worker(rank: int, numel: int, repeats: int, port: int, out) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    grad = torch.ones(numel)
    dist.all_reduce(grad)  # warm-up: the connection
    times = []
    for _ in range(repeats):
        dist.barrier()
        started = time.perf_counter()
        dist.all_reduce(grad)
        times.append(time.perf_counter() - started)
    if rank == 0:
        out.put(statistics.median(times))
    dist.destroy_process_group()


def allreduce_seconds(numel: int, repeats: int = 20) -> float:
    """Median time of one all-reduce of `numel` float32 between 2 local gloo processes."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    context = mp.get_context("spawn")
    out = context.Queue()
    workers = [
        context.Process(target=_allreduce_worker, args=(rank, numel, repeats, port, out)) for rank in (0, 1)
    ]
    for worker in workers:
        worker.start()
    seconds = out.get(timeout=120)
    for worker in workers:
        worker.join()
    return seconds


def scaling(steps: int, batch_size: int) -> None:
    import ray

    from trainers.amortized.config import load_amortized_config
    from trainers.amortized.data_parallel import fit
    from trainers.amortized.loop import AmortizedModel
    from trainers.amortized.prompt_library import GeneratorTextEncoder
    from trainers.priors import load_prior

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    rates = {}
    with tempfile.TemporaryDirectory() as tmp:
        for workers in (1, 2):
            cfg = load_amortized_config(
                TINY,
                {
                    "max_steps": steps,
                    "batch_size": batch_size,
                    "logging.log_every": steps // 2,
                    "data_parallel.num_workers": workers,
                    "output_dir": f"{tmp}/w{workers}",
                    "text_cache.path": f"{tmp}/text.arrow",
                },
            )
            result = fit(cfg)
            rates[workers] = result.metrics["train/samples_per_s"]  # rank 0's last window, all ranks' samples
    ray.shutdown()
    efficiency = rates[2] / (2 * rates[1])
    print(f"batch {batch_size} prompts per worker per step, {cfg.resolution} px, {steps} steps:")
    print(f"samples/s, 1 gloo worker : {rates[1]:.3f}  ({batch_size / rates[1] * 1000:.0f} ms a step)")
    print(
        f"samples/s, 2 gloo workers: {rates[2]:.3f}  ({rates[2] / rates[1]:.2f}x, "
        f"{2 * batch_size / rates[2] * 1000:.0f} ms a step)"
    )
    print(f"scaling efficiency       : {efficiency:.2f}  (target >= 0.8)")
    # What DDP adds to each step: one all-reduce of the whole gradient (the model's parameters).
    prior = load_prior(cfg.prior, "cpu")
    numel = sum(p.numel() for p in AmortizedModel(cfg, GeneratorTextEncoder(prior).dim).parameters())
    reduce_s = allreduce_seconds(numel)
    print(
        f"all-reduce of the gradient ({numel:,} float32, {numel * 4 / 2**20:.1f} MiB), 2 gloo processes: "
        f"{reduce_s * 1000:.1f} ms = {reduce_s * rates[1] / batch_size:.2f} of a 1-worker step"
    )


def cache(n: int) -> None:
    from trainers.amortized.prompt_library import GeneratorTextEncoder, TextEmbeddingCache
    from trainers.priors import PriorConfig, load_prior

    prior = load_prior(PriorConfig(name="tiny-sd"), "cpu")
    encoder = GeneratorTextEncoder(prior)
    colours, shapes = ["red", "blue", "green", "gold"], ["cube", "ball", "cone"]
    prompts = [f"a {colours[i % 4]} {shapes[i % 3]} number {i}" for i in range(n)]
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        TextEmbeddingCache(Path(tmp) / "c.arrow", encoder, batch_size=1024).get(prompts, progress=False)
        build = time.perf_counter() - started
        reads = []
        for _ in range(3):
            started = time.perf_counter()
            rows = TextEmbeddingCache(Path(tmp) / "c.arrow", encoder).get(prompts, progress=False)
            reads.append(time.perf_counter() - started)
        size = (Path(tmp) / "c.arrow").stat().st_size / 2**20
    print(f"embedding cache, {n} prompts, dim {rows.shape[1]} ({size:.1f} MiB):")
    print(f"  build (encode + write): {build:.2f} s  ({n / build:.0f} prompts/s)")
    print(
        f"  read (memory-mapped, all rows looked up): median {statistics.median(reads):.3f} s  (target < 1 s)"
    )


def generate_vs_step(repeats: int) -> None:
    from trainers.amortized.config import load_amortized_config
    from trainers.amortized.generate import generate
    from trainers.amortized.loop import train
    from trainers.config import load_train_config
    from trainers.per_prompt import Trainer

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_amortized_config(
            TINY, {"max_steps": 2, "output_dir": f"{tmp}/run", "text_cache.path": f"{tmp}/text.arrow"}
        )
        train(cfg, progress=False)
        generate(f"{tmp}/run", "warm-up", f"{tmp}/w.gif", frames=1)
        forward, total = [], []
        for i in range(repeats):
            started = time.perf_counter()
            out = generate(f"{tmp}/run", f"an unseen prompt number {i}", f"{tmp}/g{i}.gif", frames=1)
            total.append(time.perf_counter() - started)
            forward.append(out.forward_s + out.render_s)
        per_prompt = load_train_config(
            str(ROOT / "sweeps/configs/tiny-cpu.yaml"), {"resolution": 32, "output_dir": f"{tmp}/pp"}
        )
        trainer = Trainer(per_prompt)
        trainer.training_step()  # warm-up
        steps = []
        for _ in range(repeats):
            started = time.perf_counter()
            trainer.training_step()
            steps.append(time.perf_counter() - started)
    g, s = statistics.median(forward), statistics.median(steps)
    print(f"generate (text + generator forward + one 32 px view): median {g * 1000:.1f} ms")
    print(f"  with loading the run and the prior: median {statistics.median(total):.2f} s")
    print(f"one per-prompt training step (tiny-sd, 32 px):          median {s * 1000:.1f} ms")
    print(f"generate / per-prompt step: {g / s:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", choices=("scaling", "cache", "generate"), default=None)
    parser.add_argument("--steps", type=int, default=40, help="scaling: steps per run")
    parser.add_argument("--batch-size", type=int, default=2, help="scaling: prompts per worker per step")
    parser.add_argument("--prompts", type=int, default=100_000, help="cache: prompts")
    parser.add_argument("--repeats", type=int, default=5, help="generate: repeats")
    args = parser.parse_args()
    if args.only in (None, "cache"):
        cache(args.prompts)
    if args.only in (None, "generate"):
        generate_vs_step(args.repeats)
    if args.only in (None, "scaling"):
        scaling(args.steps, args.batch_size)


if __name__ == "__main__":
    main()
