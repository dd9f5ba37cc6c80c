"""Start-up of workers with the compiled prior call, sharing Inductor's cache on local disk.

    python tests/benchmarks/compile_cache_check.py --cache-dir DIR [--together 2] [--after 1]
        [--rows 24] [--json FILE] [key=value ...]

Starts `--together` worker processes at once, then `--after` more once they are done, all with
`prior.compile_unet=true` (plus any key=value trainer overrides, e.g. prior.cuda_graph=true) and one
TORCHINDUCTOR_CACHE_DIR (FX-graph and AOT-autograd caches on). Each worker loads the prior and makes the
prior call three times at the packed shape (`--rows` rows: K members x 3 for ASD). It reports its
start-up: seconds from its launch to its first call done (imports, the prior load, the compilation or
the cache hit), and the first call alone. The first compiled call runs under a lock beside the cache
(one process per node at a time), so of workers that start together one compiles and the others wait,
then load its compilation; a later worker finds the cache warm (target: its first call <= 5 s).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIG = Path(__file__).with_name("gpu_sd21_asd.yaml")


def worker(args: argparse.Namespace) -> None:
    import torch

    from trainers.config import load_train_config
    from trainers.priors import load_prior, resolve_device

    config = load_train_config(CONFIG, ["prior.compile_unet=true", *args.overrides])
    device = resolve_device(config.device)
    loaded = time.perf_counter()
    prior = load_prior(config.prior, device)
    load_s = time.perf_counter() - loaded
    size = prior.image_size // getattr(prior, "vae_scale_factor", 1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.rows, prior.unet.config.in_channels, size, size, generator=g).to(device)
    t = torch.randint(20, 980, (args.rows,), generator=g).to(device)
    emb = prior.encode_text(["a ceramic teapot"] * args.rows)
    calls = []
    for _ in range(3):
        start = time.perf_counter()
        with torch.no_grad():
            prior.predict_noise(x, t, emb)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        calls.append(time.perf_counter() - start)
        if len(calls) == 1:
            first_done = time.time()
    from trainers.node_lock import WAITED_S

    waited = sum(WAITED_S.values())  # for another worker's compilation
    Path(args.result).write_text(
        json.dumps(
            {
                "load_s": load_s,
                "waited_s": waited,
                "first_call_s": calls[0] - waited,
                "steady_call_ms": 1e3 * min(calls[1:]),
                "startup_s": first_done - args.launched,
                "compile_unet": bool(prior.describe().get("compile_unet")),
                "cuda_graph": bool(prior.describe().get("cuda_graph")),
            }
        )
    )


def launch(n: int, args: argparse.Namespace, folder: Path, label: str, env: dict) -> list[dict]:
    procs = []
    for i in range(n):
        result = folder / f"{label}-{i}.json"
        command = [
            sys.executable,
            __file__,
            "--worker",
            "--launched",
            str(time.time()),
            "--result",
            str(result),
        ]
        command += ["--rows", str(args.rows), *args.overrides]
        log = open(folder / f"{label}-{i}.log", "w")  # noqa: SIM115 (closed below)
        procs.append((subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT), log, result))
    rows = []
    for i, (proc, log, result) in enumerate(procs):
        rc = proc.wait(timeout=args.timeout)
        log.close()
        if rc != 0:
            text = (folder / f"{label}-{i}.log").read_text(errors="replace").splitlines()[-15:]
            raise RuntimeError(f"worker {label}-{i} exited with {rc}:\n" + "\n".join(text))
        rows.append({"worker": f"{label}-{i}", **json.loads(result.read_text())})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", help="TORCHINDUCTOR_CACHE_DIR (empty at the start for a cold run)")
    parser.add_argument("--together", type=int, default=2)
    parser.add_argument("--after", type=int, default=1)
    parser.add_argument("--rows", type=int, default=24, help="rows of the prior call (8 members x 3, ASD)")
    parser.add_argument("--timeout", type=float, default=400.0)
    parser.add_argument("--json")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--launched", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    cache = Path(args.cache_dir or tempfile.mkdtemp(prefix="inductor-"))
    cache.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "TORCHINDUCTOR_CACHE_DIR": str(cache),
        "TORCHINDUCTOR_FX_GRAPH_CACHE": "1",
        "TORCHINDUCTOR_AUTOGRAD_CACHE": "1",
    }
    folder = Path(tempfile.mkdtemp(prefix="compile-cache-"))
    was_empty = not any(cache.iterdir())
    rows = launch(args.together, args, folder, "together", env)
    rows += launch(args.after, args, folder, "after", env)
    print(f"Inductor cache: {cache} ({'empty' if was_empty else 'NOT empty'} at the start)")
    print(
        f"{'worker':<12}{'start-up [s]':>14}{'prior load [s]':>16}{'waited [s]':>12}{'first call [s]':>16}"
        f"{'steady [ms]':>13}"
    )
    for row in rows:
        print(
            f"{row['worker']:<12}{row['startup_s']:>14.1f}{row['load_s']:>16.1f}{row['waited_s']:>12.1f}"
            f"{row['first_call_s']:>16.1f}{row['steady_call_ms']:>13.1f}"
        )
    print(
        "(start-up: launch to the first call done; waited: for another worker's compilation; first call: "
        "compiling, or loading the compilation from the cache, without the wait)"
    )
    reused = [row["first_call_s"] for row in rows[1:]]  # every worker but the one that compiled
    if reused:
        print(
            "the other workers' first call <= 5 s (the compilation reused): "
            f"{'yes' if max(reused) <= 5 else 'NO'} (at most {max(reused):.1f} s)"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
