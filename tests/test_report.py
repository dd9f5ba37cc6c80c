"""Comparing experiments, on sweeps of the fast fake trainer (orchestrator.run.fake_trainer): the
cross-sweep comparison checked against MLflow's own client, the report's refusals and its page for a
sweep with nothing finished, the live ETA of the console and `dreamsweep status`, and what MLflow's own
views get (experiment kind, run descriptions, images over steps)."""

import json
import re
import statistics
import time

import imageio.v3 as iio
import mlflow
import numpy as np
import pytest
import ray

from orchestrator import internals
from orchestrator.cli import main
from orchestrator.run.sweep import progress_file, submit
from orchestrator.run.workspace import SweepRecord, Workspace
from orchestrator.spec.spec import load_sweep_spec, spec_to_dict
from orchestrator.track import tracking
from orchestrator.track.progress import StepRate, SweepProgress, format_duration, sweep_eta

FAKE = {
    "train_fn": "orchestrator.run.fake_trainer:train",
    "load_prior_fn": "orchestrator.run.fake_trainer:load_prior",
}
STEPS = 20
TRIALS = {"asd": 3, "sds": 2}  # asd: the top 2 and the worst; two sweeps of one objective to compare


def search_spec(name: str, method: str, **extra) -> dict:
    return {
        "name": name,
        "kind": "search",
        "base": {"max_steps": STEPS, "logging": {"log_every": 5, "checkpoint_every": 10}},
        "overrides": {"guidance.method": method},
        "prompts": {"items": ["a red cube", "a blue ball"]},
        "search": {"space": {"guidance.eta": {"type": "float", "low": 0.0, "high": 1.0}}, "seed": 1},
        "objective": {"metric": "train/loss", "mode": "min"},
        "trials": 3,
        "max_concurrent": 2,
        "resources": {"cpus": 1},
        **extra,
    }


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Two finished sweeps of the same objective (asd, sds), one registered with another objective
    (psnr) that never ran, and one whose only trial is still running (below)."""
    ws = Workspace(tmp_path_factory.mktemp("ws-report"))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        for method, trials in TRIALS.items():
            spec = search_spec(method, method, trials=trials)
            assert submit(spec, workspace=ws, runtime=FAKE).complete == trials
    finally:
        ray.shutdown()
    other = load_sweep_spec(
        {**search_spec("psnr", "asd"), "objective": {"metric": "eval/psnr", "mode": "max"}}
    )
    ws.register(other, SweepRecord(other.name, ws.stores_for(other)))
    start_running_sweep(ws, tmp_path_factory.mktemp("grids"))
    return ws


def register_sweep(ws: Workspace, spec):
    """What a driver records before its trials start: the stores, the experiment and its parent run.
    Returns (stores, MLflow client, experiment id, parent run id)."""
    stores = ws.stores_for(spec)
    client = mlflow.MlflowClient(stores.mlflow_uri)
    experiment = tracking.ensure_experiment(client, spec.name, stores.mlflow_artifacts)
    parent = tracking.start_parent_run(client, experiment, spec.name, spec_to_dict(spec), {})
    ws.register(spec, SweepRecord(spec.name, stores, experiment_id=experiment, parent_run_id=parent))
    return stores, client, experiment, parent


def start_running_sweep(ws: Workspace, tmp) -> None:
    """A sweep whose one trial is mid-way, as a worker leaves MLflow after its first validation grid."""
    spec = load_sweep_spec(search_spec("running", "asd", trials=1))
    stores, client, experiment, parent = register_sweep(ws, spec)
    identity = tracking.TrialIdentity(
        "running",
        experiment,
        parent,
        "ray-0",
        0,
        ["a red cube", "a blue ball"],
        {"guidance.eta": 0.5},
        "c0ffee",
    )
    run = tracking.TrialRun.open(client, identity, {})
    grid = tmp / "step_0000010.png"
    iio.imwrite(grid, np.full((8, 16, 3), 200, dtype=np.uint8))
    run.log_artifact(grid, "prompt_000/validation")
    run.log_metrics(10, {"prompt_000/train/loss": 0.5}, force=True)


def finished_objectives(ws: Workspace, name: str) -> list[float]:
    record = ws.record(name)
    client = mlflow.MlflowClient(record.stores.mlflow_uri)
    runs = client.search_runs(
        [record.experiment_id],
        filter_string="tags.`dreamsweep.role` = 'trial' and attributes.status = 'FINISHED'",
    )
    return [run.data.metrics["objective"] for run in runs]


def test_two_sweeps_compared_in_json_match_mlflows_numbers(workspace, capsys):
    args = ["compare", "asd", "sds", "--workspace", str(workspace.root), "--format", "json", "--top", "4"]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["objective"] == {"metric": "train/loss", "mode": "min", "aggregate": "mean"}
    every = []
    for summary in result["sweeps"]:
        values = finished_objectives(workspace, summary["sweep"])
        every += [(v, summary["sweep"]) for v in values]
        q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
        assert summary["finished"] == summary["trials"] == TRIALS[summary["sweep"]]
        assert summary["best"] == pytest.approx(min(values)) and summary["worst"] == pytest.approx(
            max(values)
        )
        assert (summary["q1"], summary["median"], summary["q3"]) == pytest.approx((q1, median, q3))
    assert [s["sweep"] for s in result["sweeps"]] == ["asd", "sds"]
    # the joint top-K: the 4 lowest losses of both sweeps, best first, each with its sweep and run
    expected = sorted(every)[:4]
    assert [(r["objective"], r["sweep"]) for r in result["top"]] == [pytest.approx(e) for e in expected]
    for row in result["top"]:
        run = mlflow.MlflowClient(workspace.record(row["sweep"]).stores.mlflow_uri).get_run(row["run_id"])
        assert run.data.metrics["objective"] == pytest.approx(row["objective"])


def test_the_table_shows_each_sweeps_summary_then_the_joint_top(workspace, capsys):
    assert main(["compare", "asd", "sds", "--workspace", str(workspace.root), "--top", "2"]) == 0
    summary, top = capsys.readouterr().out.strip().split("\n\n")
    assert summary.splitlines()[0].split()[:3] == ["sweep", "objective", "mode"]
    assert [line.split()[0] for line in summary.splitlines()[1:]] == ["asd", "sds"]
    assert len(top.splitlines()) == 1 + 2


def test_sweeps_with_different_objectives_are_refused_naming_both(workspace, capsys):
    for command in ("compare", "report"):
        assert main([command, "asd", "psnr", "--workspace", str(workspace.root)]) == 2
        err = capsys.readouterr().err
        assert "different objectives" in err
        assert "metric=train/loss mode=min" in err and "metric=eval/psnr mode=max" in err


def test_a_report_of_an_unknown_sweep_lists_the_sweeps_that_exist(workspace, capsys):
    assert main(["report", "nope", "--workspace", str(workspace.root)]) == 2
    assert "no sweep named 'nope'" in (err := capsys.readouterr().err)
    assert "sweeps there: asd, psnr, running, sds" in err


@pytest.mark.parametrize("top", ["0", "-2"])
def test_a_top_that_is_not_positive_is_refused(workspace, top, capsys, tmp_path):
    for command in ("report", "compare"):
        args = [
            command,
            "asd",
            "--top",
            top,
            "--workspace",
            str(workspace.root),
            "--output",
            str(tmp_path / "r"),
        ]
        assert main(args if command == "report" else args[:-2]) == 2
        assert f"--top must be a positive number of trials (got {top})" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_an_existing_output_directory_is_refused_unless_forced(workspace, tmp_path, capsys):
    out = tmp_path / "report"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    args = ["report", "running", "--workspace", str(workspace.root), "--output", str(out)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"{out} already exists" in err and "--force" in err
    assert not (out / "index.html").exists()
    assert main([*args, "--force"]) == 0
    assert (out / "index.html").is_file()


def test_a_sweep_with_no_finished_trial_says_so_and_still_shows_what_exists(workspace, tmp_path):
    out = tmp_path / "running"
    assert main(["report", "running", "--workspace", str(workspace.root), "--output", str(out)]) == 0
    page = (out / "index.html").read_text()
    assert "No trial of &#x27;running&#x27; has finished yet (1 started)" in page
    record = workspace.record("running")
    run_id = tracking.trial_runs(mlflow.MlflowClient(record.stores.mlflow_uri), record.experiment_id)[
        0
    ].info.run_id
    assert run_id in page and "RUNNING" in page  # listed with its state
    assert ">running<" in page and "step 10" in page  # and its validation grid so far, shown
    assert "The plots appear once a trial has finished." in page


def test_the_report_holds_the_top_k_the_worst_and_the_study_and_goes_to_the_parent_run(
    workspace, tmp_path, capsys
):
    out = tmp_path / "asd"
    assert (
        main(["report", "asd", "--top", "2", "--workspace", str(workspace.root), "--output", str(out)]) == 0
    )
    record = workspace.record("asd")
    # and says how to browse the sweep's runs (mlflow ui with dreamsweep's app: tests/test_mlflow_app.py)
    assert (
        f"asd in MLflow: mlflow ui --backend-store-uri {record.stores.mlflow_uri} --app-name dreamsweep, "
        f"then #/experiments/{record.experiment_id}"
    ) in capsys.readouterr().out
    page = (out / "index.html").read_text()
    best, second, worst = (r["run_id"] for r in _rows(workspace, "asd"))
    assert page.index(">best<") < page.index(">#2<") < page.index(">worst<")
    for title in (
        "Optimisation history",
        "Parallel coordinates",
        "Parameter importances",
        "Objective against",
    ):
        assert title in page
    sources = re.findall(r'(?:src|href)="([^"]*)"', page)
    assert sources and all(s.startswith("data:") for s in sources)  # self-contained: works offline
    assert page.count('src="data:image/png;base64,') >= 4 + 3  # 4 plots, a validation grid per trial
    client = mlflow.MlflowClient(record.stores.mlflow_uri)
    assert "report/index.html" in {a.path for a in client.list_artifacts(record.parent_run_id, "report")}


def _rows(ws, name):
    from orchestrator.track.report import compare

    return compare(name, ws)


def test_mlflows_views_get_the_experiment_kind_run_descriptions_and_images_over_steps(workspace):
    record = workspace.record("asd")
    client = mlflow.MlflowClient(record.stores.mlflow_uri)
    experiment = client.get_experiment(record.experiment_id)
    assert experiment.tags[internals.MLFLOW_EXPERIMENT_KIND_TAG] == internals.MLFLOW_TRAINING_EXPERIMENT
    for run in tracking.trial_runs(client, record.experiment_id):
        params = json.loads(run.data.tags[tracking.TAG_PARAMS])
        description = run.data.tags[internals.MLFLOW_RUN_NOTE_TAG]
        assert description.startswith("a red cube | a blue ball · guidance.eta=")
        assert f"{params['guidance.eta']:.4g}" in description and "\n" not in description
        images = [a.path for a in client.list_artifacts(run.info.run_id, "images")]
        # the fake trainer logs one validation grid per prompt, at its last step (global steps)
        assert internals.mlflow_image_steps(images, "prompt_000/validation") == [STEPS]
        assert internals.mlflow_image_steps(images, "prompt_001/validation") == [2 * STEPS]


# -------------------------------------------------------------------------------------------------
# Progress with an ETA


def test_a_trials_speed_is_measured_between_reports():
    rate = StepRate(smoothing=1.0)
    rate.update(10, now=100.0)
    assert rate.rate is None  # one report: no speed yet
    rate.update(30, now=110.0)
    assert rate.rate == pytest.approx(2.0)
    rate.update(30, now=115.0)  # a report without progress (a checkpoint) changes nothing
    assert rate.rate == pytest.approx(2.0)


def test_the_sweep_eta_counts_running_and_queued_trials_at_the_running_speed():
    # two trials of 100 steps run at 2 and 1 it/s with 50 and 20 steps left; 2 trials not started
    eta = sweep_eta([(50, 2.0), (20, 1.0)], queued=2, steps_per_trial=100)
    work = 50 / 2.0 + 20 / 1.0 + 2 * 100 / 1.5  # trial-seconds, queued ones at the mean speed
    assert eta == pytest.approx(work / 2)
    assert sweep_eta([(50, None)], queued=1, steps_per_trial=100) is None  # no speed measured yet
    assert (
        format_duration(3725) == "1:02:05" and format_duration(65) == "1:05" and format_duration(None) == "-"
    )


class FakeTrial:
    def __init__(self, trial_id, number, status, step=None):
        self.trial_id, self.status = trial_id, status
        self.config = {"_optuna_trial": number}
        self.last_result = {"step": step} if step is not None else {}


def test_console_and_status_show_each_running_trials_step_speed_and_eta(tmp_path, capsys):
    ws = Workspace(tmp_path / "ws")
    spec = load_sweep_spec(search_spec("live", "asd"))
    ws.register(spec, SweepRecord(spec.name, ws.stores_for(spec)))
    now = [100.0]
    progress = SweepProgress(
        "live",
        total=3,
        mode="min",
        steps_per_trial=40,
        progress_file=str(progress_file(ws, "live")),
        log_every_s=0.0,
        clock=lambda: now[0],
    )
    running = FakeTrial("a", 0, "RUNNING", step=10)
    trials = [running, FakeTrial("b", 1, "PENDING")]
    progress.on_trial_result(0, trials, running, {"step": 10})
    running.last_result = {"step": 30}
    now[0] = 110.0
    progress.on_trial_result(0, trials, running, {"step": 30})  # 20 steps in 10 s: 2 it/s
    out = capsys.readouterr().out
    assert "trial 0: step 30/40  2 it/s  ETA 0:05" in out
    # 10 steps left at 2 it/s, then 2 trials not started of 40 steps each, one at a time
    assert "ETA 0:45" in out
    assert main(["status", "live", "--workspace", str(ws.root), "--format", "json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["live"]["eta_s"] == pytest.approx(45.0) and shown["live"]["running"] == 1
    assert shown["live"]["trials"][0]["it_s"] == pytest.approx(2.0)
    assert shown["live"]["trials"][0]["eta_s"] == pytest.approx(5.0)


def test_status_says_when_the_driver_stopped_reporting(tmp_path, capsys):
    ws = Workspace(tmp_path / "ws")
    spec = load_sweep_spec(search_spec("stale", "asd"))
    ws.register(spec, SweepRecord(spec.name, ws.stores_for(spec)))
    view = {"updated_at": time.time() - 600, "finished": False, "trials": [], "running": 1, "done": 0}
    progress_file(ws, "stale").write_text(json.dumps(view | {"total": 3, "failed": 0, "eta_s": 5}))
    from orchestrator.track.report import live_progress, merge_live

    live = live_progress("stale", ws)
    assert live["age_s"] >= 599
    rows = merge_live([{"ray_trial_id": "x", "step": 3}], live)
    assert rows[0]["eta_s"] is None and rows[0]["it_s"] is None  # a stale view is not shown as live


# -------------------------------------------------------------------------------------------------
# Replicated trials (`replicates: R`): mean ± s.e.

# The quickstart's best and worst configs over 3 seeds (issue 18), and one between them.
SEEDED = [(15.3012, 0.5412, 0.2), (14.8, 0.41, 0.5), (14.0871, 0.2903, 0.9)]  # (mean, s.e., eta)


@pytest.fixture(scope="module")
def replicated(tmp_path_factory):
    """A finished sweep of 3 trials, each trained with 3 seeds, as a packed sweep leaves its stores: the
    mean as each trial's Optuna value and MLflow `objective`, the s.e. as the Optuna user attribute and
    the MLflow metric `objective_sem` (orchestrator/run/packed.py; tests/test_sweep_packed.py checks it
    writes them)."""
    import optuna

    from orchestrator.run.tuner import optuna_storage
    from orchestrator.track.report_data import SEM

    ws = Workspace(tmp_path_factory.mktemp("ws-seeds"))
    extra = {"pack": 3, "replicates": 3, "objective": {"metric": "eval/psnr", "mode": "max"}}
    spec = load_sweep_spec(search_spec("seeds", "asd", **extra))
    stores, client, experiment, parent = register_sweep(ws, spec)
    study = optuna.create_study(
        study_name="seeds", storage=optuna_storage(stores.optuna_url), direction="maximize"
    )
    space = {"guidance.eta": optuna.distributions.FloatDistribution(0.0, 1.0)}
    for number, (mean, sem, eta) in enumerate(SEEDED):
        study.add_trial(
            optuna.trial.create_trial(
                params={"guidance.eta": eta}, distributions=space, value=mean, user_attrs={SEM: sem}
            )
        )
        identity = tracking.TrialIdentity(
            "seeds",
            experiment,
            parent,
            f"pack-{number:04d}",
            number,
            ["a red cube"],
            {"guidance.eta": eta},
            "c0ffee",
        )
        run = tracking.TrialRun.open(client, identity, {})
        run.log_metrics(STEPS, {"objective": mean, SEM: sem, "eval/psnr": mean}, force=True)
        run.finish()
    return ws


def test_a_mean_over_seeds_is_written_with_its_standard_error_to_two_significant_figures():
    from orchestrator.track.page import mean_sem

    assert mean_sem(15.3012, 0.5412) == "15.30 ± 0.54"
    assert mean_sem(14.0871, 0.02903) == "14.087 ± 0.029"
    assert mean_sem(231.4, 12.7) == "231 ± 13"
    assert mean_sem(15.3012, 0.0) == "15.301 ± 0"
    assert mean_sem(15.3012, None) == "15.301"  # one seed: the number as any other
    assert mean_sem(None, None) == "-"


def test_a_replicated_sweeps_report_shows_mean_and_standard_error_wherever_it_shows_an_objective(
    replicated, tmp_path
):
    out = tmp_path / "seeds"
    assert (
        main(["report", "seeds", "--top", "1", "--workspace", str(replicated.root), "--output", str(out)])
        == 0
    )
    page = (out / "index.html").read_text()
    summary = re.search(r'<p class="meta">search · per-prompt · objective .*?</p>', page).group(0)
    assert "mean ± s.e. over 3 seeds" in summary and "best 15.30 ± 0.54" in summary
    side = page[
        page.index('<table class="side">') : page.index("</table>", page.index('<table class="side">'))
    ]
    assert "eval/psnr = 15.30 ± 0.54" in side and "eval/psnr = 14.09 ± 0.29" in side  # best, worst
    every = page[page.index("<h3>Every trial</h3>") :]
    assert "objective (mean ± s.e.)" in every
    assert [every.count(text) for text in ("15.30 ± 0.54", "14.80 ± 0.41", "14.09 ± 0.29")] == [1, 1, 1]
    assert "Optimisation history (± s.e. over seeds)" in page
    assert "Objective against each parameter (± s.e. over seeds)" in page
    # and a comparison of sweeps shows each sweep's best with its s.e.
    from orchestrator.track.report import summarize

    assert summarize("seeds", replicated)["best_sem"] == pytest.approx(0.5412)


def test_the_plot_of_objective_against_a_parameter_draws_each_trials_standard_error_as_its_error_bar(
    replicated,
):
    from matplotlib.container import ErrorbarContainer

    from orchestrator.track.page import history_with_error_bars, slice_with_error_bars
    from orchestrator.track.report import load_study

    study = load_study("seeds", replicated)
    for axes in (slice_with_error_bars(study)[0][0], history_with_error_bars(study)):
        (bars,) = [c for c in axes.containers if isinstance(c, ErrorbarContainer)]
        (segments,) = bars.lines[2]
        drawn = sorted((y1 - y0) / 2 for (_, y0), (_, y1) in segments.get_segments())
        assert drawn == pytest.approx(sorted(sem for _, sem, _ in SEEDED))
    assert slice_with_error_bars(study)[0][0].get_xlabel() == "guidance.eta"


def test_trials_without_replicates_show_their_objective_as_before(workspace, tmp_path):
    out = tmp_path / "asd"
    assert main(["report", "asd", "--workspace", str(workspace.root), "--output", str(out)]) == 0
    page = (out / "index.html").read_text()
    assert "±" not in page and "seeds" not in page
    best = min(finished_objectives(workspace, "asd"))
    assert f"train/loss = {best:.5g}</th>" in page
