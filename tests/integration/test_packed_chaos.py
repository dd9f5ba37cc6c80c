"""Chaos for a packed sweep, in the spirit of Ray's node-failure release test: a sweep of 8 trials,
two per worker behind one prior call, submitted as a Ray Job to a multi-node cluster on this machine.
While it runs, the driver is killed with SIGKILL 3 times (and resumed after each) and a worker node's
processes are killed twice (a new node joins after each, as a cluster replaces a lost machine), at
moments drawn from a seeded RNG. Then the stores must agree: every trial COMPLETE and none RUNNING in
Optuna, one MLflow run per trial holding each step of its loss once, up to `max_steps`; after each
driver kill, a trial finished before it is not run again, and a trial in flight continues from the
checkpoint it had committed. (It is the packed sweep's kill -9 resume test as well as its chaos test.)

DREAMSWEEP_CHAOS_SEED picks the moments (default 0); a failure prints the seed and the kills it made.
"""

from __future__ import annotations

import json
import os
import random
import signal
import time
from pathlib import Path

import mlflow
import optuna
import psutil
import pytest
import yaml
from optuna.trial import TrialState
from ray.util.state import list_actors

from orchestrator.track import tracking
from tests.integration.conftest import own_cluster
from tests.integration.sweeps import run_cli, wait_for, wait_for_job

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
NAME, TRIALS, STEPS, CHECKPOINT_EVERY = "chaos", 8, 96, 4
SEED = int(os.environ.get("DREAMSWEEP_CHAOS_SEED", "0"))


def chaos_plan(seed: int) -> list[tuple[float, str]]:
    """(how much more of the sweep's steps must be committed since the previous kill, what to kill):
    3 driver and 2 node kills in a seeded order, each at a seeded distance from the one before. Measured
    from the previous kill, so that a resumed driver has trained before it is killed again."""
    rng = random.Random(seed)
    kinds = ["driver"] * 3 + ["node"] * 2
    rng.shuffle(kinds)
    return [(rng.uniform(0.05, 0.11), kind) for kind in kinds]


def write_chaos_spec(folder: Path, storage: dict, shared: Path) -> Path:
    base = yaml.safe_load((ROOT / "sweeps/configs/reference_cpu.yaml").read_text())
    spec = {
        "name": NAME,
        "kind": "search",
        "base": base,
        "overrides": {
            "max_steps": STEPS,
            "resolution": 16,
            "prior.image_size": 16,
            "prior.cache_dir": str(shared / "reference-cache"),
            "prior.reference.uncond_prompts": ["a red cube", "a green torus", "a blue sphere"],
            "renderer.num_samples_per_ray": 16,
            "logging.log_every": 1,
            "logging.checkpoint_every": CHECKPOINT_EVERY,
            "logging.val_every": 0,
            "logging.turntable_frames": 2,
        },
        "prompts": {"items": ["a red cube"]},
        "search": {"space": {"guidance.eta": {"type": "float", "low": 0.0, "high": 0.5}}, "seed": SEED},
        "objective": {"metric": "train/loss", "mode": "min"},
        "trials": TRIALS,
        "pack": 2,
        "max_concurrent": 4,  # 2 workers of 2 members, one per worker node's GPU
        "resources": {"cpus": 1, "gpus": 1},
        "retries": 3,
        "storage": storage,
        "cluster": {"shared_mounts": [str(shared)]},
    }
    path = folder / f"{NAME}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def committed_fraction(trials_root: Path) -> float:
    """How much of the sweep's training is safely behind it: finished trials' steps, and in-flight
    trials' last committed checkpoints (what a resume restarts from), over every trial's steps."""
    done = 0
    for trial in trials_root.glob("trial_*/replicate_0"):
        panel = trial / "panel.json"
        if panel.exists() and json.loads(panel.read_text())["position"] >= 1:
            done += STEPS
            continue
        committed = trial / "prompt_000" / "committed_checkpoint.json"
        if committed.exists():
            done += json.loads(committed.read_text())["step"]
    return done / (TRIALS * STEPS)


def committed_steps(trials_root: Path) -> dict[int, int | None]:
    """Each started trial's last committed checkpoint step (None: none yet), or STEPS once finished."""
    steps = {}
    for trial in trials_root.glob("trial_*/replicate_0"):
        number = int(trial.parent.name.split("_")[-1])
        panel = trial / "panel.json"
        committed = trial / "prompt_000" / "committed_checkpoint.json"
        if panel.exists() and json.loads(panel.read_text())["position"] >= 1:
            steps[number] = STEPS
        elif committed.exists():
            steps[number] = json.loads(committed.read_text())["step"]
        else:
            steps[number] = None
    return steps


def driver_processes(cluster_dir: Path) -> list[psutil.Process]:
    """The sweep's driver: the job's `python -m orchestrator.cli submit|resume` (not its /bin/sh),
    running in the job's working dir under the cluster's folder."""
    found = []
    for proc in psutil.process_iter(["cmdline", "cwd"]):
        cmdline = proc.info["cmdline"] or []
        if (
            cmdline
            and os.path.basename(cmdline[0]).startswith("python")
            and "orchestrator.cli" in cmdline
            and ("submit" in cmdline or "resume" in cmdline)
            and (proc.info["cwd"] or "").startswith(str(cluster_dir))
        ):
            found.append(proc)
    return found


@pytest.fixture
def chaos_cluster():
    with own_cluster(200) as cluster:  # its own cluster: nodes are killed and added
        yield cluster


def test_a_packed_sweep_survives_3_driver_kills_and_2_node_losses_with_consistent_stores(
    chaos_cluster, postgres, mlflow_server, tmp_path, capsys
):
    address = chaos_cluster.dashboard_url
    shared = tmp_path / "shared"
    storage = {
        "optuna": postgres.create_database("optuna_chaos"),
        "mlflow": mlflow_server.url,
        "tune": str(shared / "ray_results"),
    }
    spec = write_chaos_spec(tmp_path, storage, shared)
    trials_root = shared / "ray_results" / NAME / "packed"
    code, _, err = run_cli(capsys, "submit", str(spec), "--address", address)
    assert code == 0, err

    def reached(at: float) -> bool:
        done = committed_fraction(trials_root)
        assert done < 1.0, f"the sweep ended before kill {len(kills) + 1} of {len(plan)}: {kills}"
        return done >= at

    plan, kills, last = chaos_plan(SEED), [], 0.05
    driver_kills = []  # (time in ms, each trial's committed step just before the kill)
    for distance, kind in plan:
        at = last + distance
        wait_for(lambda at=at: reached(at), 300, f"{at:.0%} of the sweep committed", every_s=0.25)
        if kind == "driver":
            (driver,) = wait_for(
                lambda: driver_processes(chaos_cluster.temp_dir), 60, "the sweep's driver process"
            )
            before = committed_steps(trials_root)
            driver.send_signal(signal.SIGKILL)
            driver_kills.append((time.time() * 1000, before))
            wait_for_job(capsys, NAME, address, ("FAILED",), timeout_s=60)
            code, _, err = run_cli(capsys, "resume", NAME, "--address", address)
            assert code == 0, err
            wait_for_job(capsys, NAME, address, ("RUNNING",), timeout_s=60)
        else:
            # A node whose worker holds trials now (after a resume, once the new driver's workers are
            # up); then a new node joins in its place.
            def hosting_nodes():
                actors = list_actors(
                    address=address, filters=[("class_name", "=", "PackWorker"), ("state", "=", "ALIVE")]
                )
                nodes = chaos_cluster.worker_node_ids()
                return sorted({a.node_id for a in actors} & set(nodes))

            try:
                victims = wait_for(hosting_nodes, 120, "a worker node holding a live PackWorker", every_s=0.5)
            except AssertionError:
                jobs = run_cli(capsys, "status", NAME, "--address", address, "--format", "json")[1]
                log = run_cli(capsys, "logs", NAME, "--address", address)[1]
                raise AssertionError(
                    f"no live worker; kills so far {kills}; jobs {jobs}\n{log[-4000:]}"
                ) from None
            nodes = chaos_cluster.worker_node_ids()
            victim = random.Random(SEED + len(kills)).choice(victims)
            assert nodes[victim].kill() > 0
        last = committed_fraction(trials_root)  # at the kill (a node takes seconds to join)
        kills.append((kind, round(last, 3)))
        if kind == "node":
            chaos_cluster.add_worker()
    context = f"seed {SEED}, kills (kind, fraction committed after): {kills}"

    job = wait_for_job(capsys, NAME, address, ("SUCCEEDED", "FAILED", "STOPPED"), timeout_s=600)
    log = run_cli(capsys, "logs", NAME, "--address", address)[1]
    assert job["status"] == "SUCCEEDED", context + "\n" + log[-3000:]
    assert f"sweep {NAME}: {TRIALS} complete, 0 failed" in log, context

    study = optuna.load_study(study_name=NAME, storage=storage["optuna"])
    trials = study.get_trials(deepcopy=False)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * TRIALS, context  # none RUNNING

    client = mlflow.MlflowClient(mlflow_server.url)
    runs = tracking.trial_runs(client, client.get_experiment_by_name(NAME).experiment_id)
    by_trial = {int(r.data.tags[tracking.TAG_OPTUNA_TRIAL]): r for r in runs}
    assert len(runs) == TRIALS and sorted(by_trial) == list(range(TRIALS)), context  # one run per trial
    resumed = 0
    for number, run in by_trial.items():
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/loss"))
        # Each step once (a replayed step is never logged twice), and every member reached max_steps.
        assert steps == list(range(1, STEPS + 1)), (context, number, steps)
        assert run.info.status == "FINISHED", (context, number)
        assert run.data.metrics["objective"] == pytest.approx(trials[number].value), (context, number)
        resumed += bool(client.get_metric_history(run.info.run_id, "trial/resumed_at_step"))
    assert resumed >= 1, context  # the kills landed on trials in flight, which continued from checkpoints

    # After each driver kill, a trial finished before it was not run again, and a trial in flight
    # continued from the checkpoint it had committed (or a newer one its orphaned worker committed
    # before the new driver fenced it off), never from an older one or from scratch.
    for kill_ms, before in driver_kills:
        for number, step in before.items():
            run_id = by_trial[number].info.run_id
            later = [
                m for m in client.get_metric_history(run_id, "trial/resumed_at_step") if m.timestamp > kill_ms
            ]
            if step == STEPS:
                assert not later, (context, number, "finished before a driver kill, run again")
            elif step is not None and later:
                first = min(later, key=lambda m: m.timestamp)
                assert step <= first.value < STEPS and first.value % CHECKPOINT_EVERY == 0, (
                    context, number, step, first.value,
                )  # fmt: skip
            elif step is not None:
                # Not resumed: its orphaned worker finished it before the new driver's fence, and the
                # new driver found it finished on disk. Its last step was logged within the fence's time.
                last_step = max(client.get_metric_history(run_id, "train/loss"), key=lambda m: m.step)
                assert last_step.step == STEPS and last_step.timestamp < kill_ms + 90_000, (context, number)
