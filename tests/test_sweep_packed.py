"""Packed sweeps (`pack: K`): workers that each train several trials at once behind one prior call,
every trial still its own Optuna trial, MLflow run and failure. On the reference benchmark (the
quickstart's prior, 16 px), through a local Ray on the 2 CPUs; checked through MLflow's client and
the Optuna study."""

from __future__ import annotations

from pathlib import Path

import mlflow
import optuna
import pytest
import ray

from orchestrator.run.sweep import submit
from orchestrator.run.workspace import Workspace
from orchestrator.spec.spec import SpecError, load_sweep_spec
from orchestrator.track import tracking
from orchestrator.track.report import best_config_yaml, compare, status

ROOT = Path(__file__).resolve().parent.parent
STEPS = 10
UNCOND = ["a red cube", "a green torus", "a blue sphere", "a yellow cone"]


def overrides(cache_dir) -> dict:
    return {
        "max_steps": STEPS,
        "resolution": 16,
        "prior.image_size": 16,
        "prior.cache_dir": str(cache_dir),
        "prior.reference.uncond_prompts": UNCOND,
        "renderer.num_samples_per_ray": 16,
        "logging.log_every": 1,
        "logging.checkpoint_every": 5,
        "logging.val_every": 5,
        "logging.val_views": 2,
        "logging.turntable_frames": 4,
    }


def spec(name: str, cache_dir, **extra) -> dict:
    return {
        "name": name,
        "kind": "search",
        "base": str(ROOT / "sweeps/configs/reference_cpu.yaml"),
        "overrides": overrides(cache_dir),
        "prompts": {"items": ["a red cube"]},
        "search": {
            "space": {
                "guidance.eta": {"type": "float", "low": 0.0, "high": 0.5},
                "guidance.cfg_scale": {"type": "float", "low": 1.0, "high": 10.0, "log": True},
            },
        },
        "objective": {"metric": "eval/psnr", "mode": "max"},
        "trials": 5,
        "pack": 2,
        "max_concurrent": 4,
        "resources": {"cpus": 1, "gpus": 0},
        **extra,
    }


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("reference-cache")


@pytest.fixture(scope="module")
def packed_sweep(local_ray, tmp_path_factory, cache_dir):
    ws = Workspace(tmp_path_factory.mktemp("ws-packed"))
    outcome = submit(spec("packed", cache_dir), workspace=ws)
    record = ws.record("packed")
    study = optuna.load_study(study_name="packed", storage=record.stores.optuna_url)
    client = mlflow.MlflowClient(record.stores.mlflow_uri)
    runs = tracking.trial_runs(client, record.experiment_id)
    return outcome, study, client, runs, ws


def test_every_trial_of_a_packed_sweep_completes_with_one_mlflow_run_of_its_own(packed_sweep):
    outcome, study, client, runs, _ = packed_sweep
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 5 and outcome.complete == 5
    assert sorted(int(r.data.tags[tracking.TAG_OPTUNA_TRIAL]) for r in runs) == [0, 1, 2, 3, 4]
    for run in runs:
        number = int(run.data.tags[tracking.TAG_OPTUNA_TRIAL])
        assert run.info.status == "FINISHED"
        assert run.data.metrics["objective"] == pytest.approx(study.trials[number].value)
        assert run.data.metrics["eval/psnr"] == pytest.approx(study.trials[number].value)
        # Metrics at the member's own steps, each step once.
        steps = tracking.metric_steps(client, run.info.run_id, ["train/loss"])["train/loss"]
        assert steps == list(range(1, STEPS + 1))
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "renders")}
        assert "renders/turntable.gif" in artifacts


def test_members_of_one_worker_train_at_overlapping_times_with_one_prior_call_per_worker_step(packed_sweep):
    outcome, _, _, runs, _ = packed_sweep
    by_pid: dict[str, list] = {}
    for run in runs:
        by_pid.setdefault(run.data.tags["dreamsweep.pid"], []).append(run)
    assert len(by_pid) == 2  # ⌈max_concurrent 4 / pack 2⌉ workers, each warm for the whole sweep
    for members in by_pid.values():
        spans = sorted((r.info.start_time, r.info.end_time) for r in members)
        assert any(later[0] < earlier[1] for earlier, later in zip(spans, spans[1:], strict=False))
    assert outcome.stats["workers"] == 2 and outcome.stats["max_members"] == 2
    assert outcome.stats["prior_calls"] == outcome.stats["worker_steps"] > 0


def test_the_best_packed_trial_trained_again_alone_reaches_its_metric(packed_sweep, tmp_path):
    """`dreamsweep best` then `dreamsweep train`: a packed member computed what it computes alone."""
    from trainers.config import load_train_config
    from trainers.per_prompt import train

    _, study, _, _, ws = packed_sweep
    path = tmp_path / "best.yaml"
    path.write_text(best_config_yaml("packed", ws))
    config = load_train_config(str(path), {"output_dir": str(tmp_path / "best")})
    result = train(config, progress=False)
    assert result.final_metrics["eval/psnr"] == pytest.approx(study.best_value, abs=0.05)


def test_a_freed_slot_takes_the_next_trial_while_the_other_member_goes_on(local_ray, tmp_path, cache_dir):
    """Trials of different lengths on one worker of 2 slots: the third trial starts when the shorter of
    the first two ends, while the longer one is still training."""
    ws = Workspace(tmp_path / "ws")
    lengths = spec(
        "lengths",
        cache_dir,
        trials=3,
        max_concurrent=2,
        search={"space": {"max_steps": {"type": "categorical", "choices": [4, 12, 8]}}, "sampler": "grid"},
    )
    outcome = submit(lengths, workspace=ws)
    assert outcome.complete == 3 and outcome.stats["workers"] == 1
    record = ws.record("lengths")
    runs = tracking.trial_runs(mlflow.MlflowClient(record.stores.mlflow_uri), record.experiment_id)
    first, second, third = sorted(runs, key=lambda r: r.info.start_time)
    assert len({r.data.tags["dreamsweep.pid"] for r in runs}) == 1
    assert third.info.start_time >= min(first.info.end_time, second.info.end_time) - 1000
    assert third.info.start_time < max(first.info.end_time, second.info.end_time)


def test_a_member_whose_loss_goes_nan_fails_its_trial_alone(local_ray, tmp_path, cache_dir):
    ws = Workspace(tmp_path / "ws")
    nan = spec(
        "nan",
        cache_dir,
        trials=2,
        max_concurrent=2,
        workers=1,
        # A CFG of 1e38 makes the guidance loss overflow to inf at the first step.
        search={
            "space": {"guidance.cfg_scale": {"type": "categorical", "choices": [7.5, 1e38]}},
            "sampler": "grid",
        },
    )
    outcome = submit(nan, workspace=ws)
    record = ws.record("nan")
    study = optuna.load_study(study_name="nan", storage=record.stores.optuna_url)
    states = {t.params["guidance.cfg_scale"]: t.state.name for t in study.trials}
    assert states == {7.5: "COMPLETE", 1e38: "FAIL"}
    assert outcome.complete == 1 and outcome.failed == 1
    failed = next(t for t in study.trials if t.state.name == "FAIL")
    assert "is nan" in failed.user_attrs["error"] or "is inf" in failed.user_attrs["error"]
    client = mlflow.MlflowClient(record.stores.mlflow_uri)
    status = {
        r.data.tags[tracking.TAG_OPTUNA_TRIAL]: r.info.status
        for r in tracking.trial_runs(client, record.experiment_id)
    }
    assert sorted(status.values()) == ["FAILED", "FINISHED"]


@pytest.mark.parametrize(
    "extra, field",
    [
        ({"pack": 0}, "pack"),
        ({"pack": 2.5}, "pack"),
        ({"replicates": 0}, "replicates"),
        ({"pack": 2, "replicates": 3}, "replicates"),
    ],
)
def test_bad_pack_and_replicates_are_refused_naming_the_field(cache_dir, extra, field):
    with pytest.raises(SpecError, match=field):
        load_sweep_spec(spec("bad", cache_dir, **extra))


def test_packing_vsd_is_refused_naming_both_keys(cache_dir):
    bad = spec("vsd", cache_dir)
    bad["overrides"] = {**bad["overrides"], "guidance.method": "vsd"}
    with pytest.raises(SpecError, match=r"pack: 2 with guidance.method: vsd"):
        load_sweep_spec(bad)


def test_status_of_a_packed_sweep_reads_the_study(packed_sweep):
    _, study, _, _, ws = packed_sweep
    rows = status("packed", ws)
    assert [(r["trial"], r["state"]) for r in rows] == [(t.number, "COMPLETE") for t in study.trials]
    assert [r["objective"] for r in rows] == [t.value for t in study.trials]
    assert [r["ray_trial_id"] for r in rows] == [f"pack-{t.number:04d}" for t in study.trials]


def test_replicates_train_one_config_with_several_seeds_and_report_their_mean_and_standard_error(
    local_ray, tmp_path, cache_dir
):
    ws = Workspace(tmp_path / "ws")
    outcome = submit(spec("seeds", cache_dir, trials=1, replicates=2, max_concurrent=1), workspace=ws)
    assert outcome.complete == 1 and outcome.stats["max_members"] == 2  # the two seeds, one pack
    record = ws.record("seeds")
    (trial,) = optuna.load_study(study_name="seeds", storage=record.stores.optuna_url).trials
    client = mlflow.MlflowClient(record.stores.mlflow_uri)
    (run,) = tracking.trial_runs(client, record.experiment_id)
    per_seed = [run.data.metrics[f"replicate_{r}/eval/psnr"] for r in (0, 1)]
    assert per_seed[0] != per_seed[1]  # two seeds, two models
    assert trial.value == pytest.approx(sum(per_seed) / 2)
    assert trial.user_attrs["objective_sem"] == pytest.approx(abs(per_seed[0] - per_seed[1]) / 2)
    assert run.data.metrics["objective_sem"] == pytest.approx(trial.user_attrs["objective_sem"])
    (row,) = compare("seeds", ws)
    assert row["objective"] == pytest.approx(trial.value)
    assert row["objective_sem"] == pytest.approx(trial.user_attrs["objective_sem"])


def test_the_pruner_stops_one_member_at_its_rung_and_leaves_the_others_running():
    """ASHA's semantics, per trial: at a rung, a trial below the top 1/reduction_factor of those that
    reached it is stopped; the trials above it are not, whatever pack they share."""
    from orchestrator.run.packed import make_pruner, pruned

    sweep = load_sweep_spec(
        {**spec("asha", "/tmp"), "early_stopping": {"grace_period": 4, "reduction_factor": 2}}, check=False
    )
    study = optuna.create_study(direction="maximize", pruner=make_pruner(sweep))
    good, bad, later = (study.ask().number for _ in range(3))
    assert not pruned(study, good, 12.0, 2, 10)  # before the first rung: nobody is judged
    assert not pruned(study, good, 12.0, 4, 10)  # first at rung 4: nothing to compare with
    assert pruned(study, bad, 9.0, 4, 10)  # below the better one at rung 4: stopped
    assert not pruned(study, later, 13.0, 5, 10)  # above it: goes on
    assert not pruned(study, good, 12.5, 6, 10)  # the first trial is still judged on its own
    assert not pruned(study, bad, 1.0, 10, 10)  # a trial at its last step is never stopped


def test_the_pruner_stops_a_poor_member_inside_a_running_sweep_and_the_others_finish(
    local_ray, tmp_path, cache_dir
):
    """ASHA's semantics in a packed sweep: a trial not in the top half of those at its rung is stopped
    alone (PRUNED in Optuna, its run FINISHED and tagged, its slot refilled) while its pack goes on."""
    ws = Workspace(tmp_path / "ws")
    steps = 40
    asha = spec(
        "asha",
        cache_dir,
        trials=4,
        max_concurrent=2,
        workers=1,
        # The guidance loss grows with the CFG scale, so high-CFG trials look poor at every rung.
        search={"space": {"guidance.cfg_scale": {"type": "float", "low": 1.0, "high": 100.0, "log": True}}},
        objective={"metric": "train/loss", "mode": "min"},
        early_stopping={"grace_period": 4, "reduction_factor": 2},
    )
    asha["overrides"] = {**asha["overrides"], "max_steps": steps}
    outcome = submit(asha, workspace=ws, runtime={"report_every_s": 0.3})  # several reports per trial
    record = ws.record("asha")
    study = optuna.load_study(study_name="asha", storage=record.stores.optuna_url)
    states = [t.state.name for t in study.trials]
    assert "PRUNED" in states and set(states) == {"PRUNED", "COMPLETE"} and len(states) == 4, states
    assert outcome.complete == states.count("COMPLETE")

    client = mlflow.MlflowClient(record.stores.mlflow_uri)
    runs = {
        int(r.data.tags[tracking.TAG_OPTUNA_TRIAL]): r
        for r in tracking.trial_runs(client, record.experiment_id)
    }
    assert sorted(runs) == [0, 1, 2, 3]
    for trial in study.trials:
        run = runs[trial.number]
        steps_logged = tracking.metric_steps(client, run.info.run_id, ["train/loss"])["train/loss"]
        assert run.info.status == "FINISHED"
        if trial.state.name == "COMPLETE":
            assert steps_logged == list(range(1, steps + 1))  # the others trained to the end
            continue
        # Stopped early, alone: fewer steps, each once, and tagged as Tune tags an ASHA-stopped trial.
        assert steps_logged == list(range(1, len(steps_logged) + 1)) and len(steps_logged) < steps
        assert run.data.tags["dreamsweep.stopped_early"] == "true"
        # When it was stopped, another trial had done better at a rung it had just reached. Successive
        # halving judges a trial's latest value at each rung its latest report passed, against the
        # others' values at the report with which each passed that rung (reports come every 0.3 s,
        # not at the rungs' steps, so that report may be past this trial's last step).
        reported = sorted(trial.intermediate_values)
        last_step, before = reported[-1], (reported[-2] if len(reported) > 1 else 0)
        own = trial.intermediate_values[last_step]
        rungs = [r for r in (4 * 2**k for k in range(8)) if before < r <= last_step]

        def at_rung(other, rung):
            passed = [s for s in sorted(other.intermediate_values) if s >= rung]
            return other.intermediate_values[passed[0]] if passed else None

        others = [
            value
            for other in study.trials
            if other.number != trial.number
            for rung in rungs
            if (value := at_rung(other, rung)) is not None
        ]
        assert rungs and others and min(others) < own, (rungs, own, others)


def test_a_new_driver_kills_the_workers_an_earlier_driver_left_before_it_resumes_their_trials(local_ray):
    """After a driver's kill -9 its workers live on until Ray reaps its job; the next driver of the
    sweep fences them off first, so that no trial is ever trained by two workers at once."""
    from orchestrator.run.packed import NAMESPACE, fence_earlier_workers, worker_names

    @ray.remote(num_cpus=0)
    class Leftover:
        def ping(self) -> int:
            return 1

    zombie = Leftover.options(name="fenced/worker-1-123", namespace=NAMESPACE, lifetime="detached").remote()
    other = Leftover.options(name="fenced-too/worker-1-123", namespace=NAMESPACE).remote()
    ray.get([zombie.ping.remote(), other.ping.remote()])
    assert worker_names("fenced") == ["fenced/worker-1-123"]

    fence_earlier_workers("fenced")
    assert worker_names("fenced") == []
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(zombie.ping.remote())
    assert ray.get(other.ping.remote()) == 1  # another sweep's workers are left alone
    ray.kill(other)


def test_a_lost_worker_is_replaced_and_its_trials_continue_from_their_checkpoints(
    local_ray, tmp_path, cache_dir
):
    """A worker's process killed mid-sweep (as when its node is lost): a new worker takes its place and
    its trials continue from their last checkpoints, into the runs they started."""
    import os
    import signal
    import threading
    import time

    ws = Workspace(tmp_path / "ws")
    lost = spec("lost", cache_dir, trials=2, max_concurrent=2, retries=1)
    lost["overrides"] = {**lost["overrides"], "max_steps": 30, "logging.checkpoint_every": 3}
    killed: dict[str, int] = {}

    def kill_the_worker_after_its_first_checkpoint():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not killed:
            time.sleep(0.2)
            # Both trials past a committed checkpoint (a pack step writes its members' checkpoints one
            # after the other: killing between the two would restart one trial from scratch).
            committed = list(
                (ws.root / "ray_results/lost/packed").glob("trial_*/replicate_0/*/committed_checkpoint.json")
            )
            if len(committed) < 2 or not (ws.root / "mlflow.db").exists():
                continue
            record = ws.record("lost")
            runs = tracking.trial_runs(mlflow.MlflowClient(record.stores.mlflow_uri), record.experiment_id)
            if runs:
                killed["pid"] = int(runs[0].data.tags["dreamsweep.pid"])
                os.kill(killed["pid"], signal.SIGKILL)

    killer = threading.Thread(target=kill_the_worker_after_its_first_checkpoint, daemon=True)
    killer.start()
    outcome = submit(lost, workspace=ws)
    killer.join(timeout=5)
    assert killed, "the worker was never killed"

    record = ws.record("lost")
    study = optuna.load_study(study_name="lost", storage=record.stores.optuna_url)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"] and outcome.complete == 2
    client = mlflow.MlflowClient(record.stores.mlflow_uri)
    runs = tracking.trial_runs(client, record.experiment_id)
    assert len(runs) == 2  # the resumed trials wrote into the runs they started
    for run in runs:
        assert int(run.data.tags["dreamsweep.pid"]) != killed["pid"]  # finished on the new worker
        steps = tracking.metric_steps(client, run.info.run_id, ["train/loss"])["train/loss"]
        assert steps == list(range(1, 31))  # every step once, although steps after the checkpoint ran twice
        resumed = client.get_metric_history(run.info.run_id, "trial/resumed_at_step")
        assert resumed and int(resumed[0].value) % 3 == 0 and int(resumed[0].value) > 0
    assert all(t.user_attrs["dreamsweep.worker_losses"] == 1 for t in study.trials)
