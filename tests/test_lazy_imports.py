"""What a trial worker imports: only what its prior and guidance use.

Every Tune trial starts in a new worker process, so each import the trainer stack makes eagerly is paid
once per worker (tests/benchmarks/bench_sweep_overhead.py). A reference-prior trial (the CPU quickstart)
needs no diffusers, peft or transformers: those load inside the priors, VSD's LoRA and the CLIP
evaluation that use them. Checked in a fresh interpreter, since this test session has imported them.
(torch._dynamo is not checked: every torch.optim optimizer imports it when it is built.) A packed
worker (orchestrator.run.packed) imports neither Ray Tune nor Ray Train, which it never uses.

`dreamsweep train` needs no orchestration library either: the GPU check (tests/benchmarks/gpu_check.sh)
runs it on a machine that has PyTorch and the diffusion stack, but no Ray, MLflow or Optuna.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DIFFUSION_STACK = ("diffusers", "peft", "transformers", "accelerate")

# A worker's path for one trial step: the trainable's module, then the trainer built from the
# quickstart's config with its reference prior (small sizes), evaluation prepared, one step.
WORKER = """
import json, sys
import orchestrator.run.trainable
from trainers import evaluation
from trainers.config import load_train_config
from trainers.per_prompt import Trainer
config = load_train_config(sys.argv[1], {
    "max_steps": 2, "prior.image_size": 16, "resolution": 16, "prior.cache_dir": sys.argv[2],
    "prior.reference.n_views": 4, "camera.fixed_views": 4, "output_dir": sys.argv[2],
    "prior.reference.uncond_prompts": ["a blue sphere", "a green torus"],
})
trainer = Trainer(config)
evaluation.prepare(trainer)
trainer.training_step()
print(json.dumps({"prior": type(trainer.prior).__name__, "modules": sorted(sys.modules)}))
"""


# `dreamsweep train` on the quickstart's config at small sizes, through the CLI's own entry point.
TRAIN_COMMAND = """
import json, sys
from orchestrator.cli import main
code = main(["train", sys.argv[1], "max_steps=2", "prior.image_size=16", "resolution=16",
             f"prior.cache_dir={sys.argv[2]}", "prior.reference.n_views=4", "camera.fixed_views=4",
             f"output_dir={sys.argv[2]}/run", "logging.turntable_frames=2"])
print(json.dumps({"exit_code": code, "modules": sorted(sys.modules)}))
"""
ORCHESTRATION = ("ray", "mlflow", "optuna", "sqlalchemy")


def worker_modules(tmp_path: Path, config: str, script: str = WORKER) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", script, config, str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_reference_prior_trial_imports_no_diffusion_library(tmp_path: Path) -> None:
    seen = worker_modules(tmp_path, str(ROOT / "sweeps/configs/reference_cpu.yaml"))
    assert seen["prior"] == "CameraConditionedReferencePrior"  # the trial really built the quickstart's prior
    imported = {name.partition(".")[0] for name in seen["modules"]} & set(DIFFUSION_STACK)
    assert not imported, f"a reference-prior trial imported {sorted(imported)}"


def test_dreamsweep_train_imports_no_orchestration_library(tmp_path: Path) -> None:
    seen = worker_modules(tmp_path, str(ROOT / "sweeps/configs/reference_cpu.yaml"), TRAIN_COMMAND)
    assert seen["exit_code"] == 0
    assert (tmp_path / "run" / "metrics.yaml").exists()  # the run really trained and finished
    imported = {name.partition(".")[0] for name in seen["modules"]} & set(ORCHESTRATION)
    assert not imported, f"dreamsweep train imported {sorted(imported)}"


# A packed worker: its actor's module, then a trial trained as in WORKER.
PACKED_WORKER = WORKER.replace("import orchestrator.run.trainable", "import orchestrator.run.packed")


def test_a_packed_worker_imports_neither_ray_tune_nor_ray_train(tmp_path: Path) -> None:
    seen = worker_modules(tmp_path, str(ROOT / "sweeps/configs/reference_cpu.yaml"), PACKED_WORKER)
    assert "orchestrator.run.packed" in seen["modules"] and "ray" in seen["modules"]  # it is a Ray worker
    imported = {".".join(name.split(".")[:2]) for name in seen["modules"]} & {"ray.tune", "ray.train"}
    assert not imported, f"a packed worker imported {sorted(imported)} (about 0.5 s of its start)"
