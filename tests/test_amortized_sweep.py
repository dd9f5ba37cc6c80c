"""An amortized sweep through the orchestrator: each trial one Ray Train run of 2 workers, each worker
holding one logical GPU, on a local Ray with 4 logical GPUs (one Ray instance for the module), so that
the sweep's 2 trials run at once.

The sweep trains on the reference benchmark (16 px, a few steps) with one held-out prompt, so that its
trials report ground truth on prompts they never trained on, as the amortized quickstart's do; what it
leaves in MLflow, `compare`, `best`, `generate --sweep` and the report (in Chromium too) are read from it.
"""

import os
from pathlib import Path

import optuna
import pytest
import ray
from ray.tune import ExperimentAnalysis

from orchestrator.run.sweep import submit
from orchestrator.run.workspace import Workspace
from orchestrator.spec.spec import SpecError, load_sweep_spec
from orchestrator.track import tracking
from orchestrator.track.report import best_config_yaml
from tests import test_report_browser as browser
from tests.test_amortized_data_parallel import TINY

PROMPTS = ["a red cube", "a blue sphere", "a green cone"]
HELD_OUT = "a purple torus"  # never trained on: the run shows it beside the training prompt
TRIALS = 2  # the best and the worst, side by side in the report
# The reference prior, small: 6 views at 16 px, an unconditional branch of 2 prompts (as the per-prompt
# browser test's), so that its cache builds in seconds.
REFERENCE = {
    "name": "reference",
    "image_size": 16,
    "reference": {"n_views": 6, "uncond_prompts": ["a blue sphere", "a yellow cone"]},
}


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, num_gpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def spec(cache_dir: str = "", **changes):
    base = {k: v for k, v in TINY.items() if k not in ("trainer", "prompts")}
    out = {
        "name": "amortized",
        "trainer": "amortized",
        "kind": "search",
        "base": {
            **base,
            "trainer": "amortized",
            "max_steps": 4,
            "prior": {**REFERENCE, "cache_dir": cache_dir or None},
            "eval_prompts": {"n_train": 1, "held_out": [HELD_OUT]},
            "logging": {**base["logging"], "val_every": 2, "eval_views": 2},
        },
        "prompts": {"items": PROMPTS},
        "search": {"space": {"guidance.eta": {"type": "float", "low": 0.0, "high": 1.0}}, "seed": 0},
        "objective": {"metric": "eval/held_out/psnr", "mode": "max"},
        "trials": TRIALS,
        "max_concurrent": TRIALS,
        "resources": {"gpus": 1, "cpus": 0.5},
    }
    return out | changes


@pytest.fixture(scope="module")
def amortized_sweep(local_ray, tmp_path_factory):
    ws = Workspace(tmp_path_factory.mktemp("ws-amortized"))
    outcome = submit(spec(str(tmp_path_factory.mktemp("reference-cache"))), workspace=ws)
    return ws, outcome


def test_an_amortized_trial_is_one_two_worker_run_each_worker_holding_a_gpu(amortized_sweep):
    ws, outcome = amortized_sweep
    record = ws.record("amortized")
    assert outcome.complete == TRIALS
    study = optuna.load_study(study_name="amortized", storage=record.stores.optuna_url)
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * TRIALS
    for trial in ExperimentAnalysis(f"{record.stores.tune_path}/amortized").trials:
        assert trial.last_result["workers"] == 2
        assert trial.last_result["worker/num_gpus"] == 1  # rank 0's own GPU; every worker asked for one


def test_the_trials_mlflow_run_holds_rank_zeros_metrics_once_per_step_and_its_renders(amortized_sweep):
    ws, _ = amortized_sweep
    record = ws.record("amortized")
    client = tracking.MlflowClient(record.stores.mlflow_uri)
    run = tracking.trial_runs(client, record.experiment_id)[0]
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert steps == [1, 2, 3, 4]  # one value per step: only rank 0's reports are logged
    assert run.data.params["prompts.count"] == "3"
    assert run.info.status == "FINISHED"
    files = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "metrics.yaml", "evaluation_prompts.json", "validation", "renders"} <= files


def test_the_run_holds_a_turntable_per_evaluation_prompt_named_by_prompt_and_grids_over_steps(
    amortized_sweep, tmp_path
):
    import json

    from orchestrator import internals

    ws, _ = amortized_sweep
    record = ws.record("amortized")
    client = tracking.MlflowClient(record.stores.mlflow_uri)
    run_id = tracking.trial_runs(client, record.experiment_id)[0].info.run_id
    turntables = {a.path.rsplit("/", 1)[-1] for a in client.list_artifacts(run_id, "renders/turntables")}
    assert turntables == {"train_00_a_red_cube.gif", "held_out_00_a_purple_torus.gif", "prompts.json"}
    index = json.loads(
        Path(client.download_artifacts(run_id, "renders/turntables/prompts.json", str(tmp_path))).read_text()
    )
    assert [(e["group"], e["prompt"]) for e in index] == [("train", "a red cube"), ("held_out", HELD_OUT)]
    for entry in index:  # each a GIF of its prompt's frames, not an empty file
        gif = Path(client.download_artifacts(run_id, f"renders/turntables/{entry['file']}", str(tmp_path)))
        assert gif.read_bytes()[:6] == b"GIF89a" and gif.stat().st_size > 100
    grids = sorted(a.path.rsplit("/", 1)[-1] for a in client.list_artifacts(run_id, "validation"))
    assert grids == [
        "step_0000002.png", "step_0000002.txt", "step_0000004.png", "step_0000004.txt"
    ]  # fmt: skip
    labels = Path(client.download_artifacts(run_id, "validation/step_0000004.txt", str(tmp_path)))
    assert labels.read_text().splitlines() == ["a red cube", HELD_OUT]  # the grid's rows, in order
    images = [a.path for a in client.list_artifacts(run_id, "images")]
    assert internals.mlflow_image_steps(images, "validation") == [2, 4]  # MLflow's images over steps
    assert [a.path.rsplit("/", 1)[-1] for a in client.list_artifacts(run_id, "checkpoint")] == [
        "step_0000004"
    ]


def test_best_yaml_of_an_amortized_sweep_is_an_amortized_config(amortized_sweep, tmp_path):
    import yaml

    ws, _ = amortized_sweep
    best = yaml.safe_load(best_config_yaml("amortized", ws))
    assert best["trainer"] == "amortized" and best["prompts"]["items"] == PROMPTS


def test_an_amortized_fanout_and_an_unknown_objective_are_refused():
    with pytest.raises(SpecError, match="kind: an amortized sweep trains one generator"):
        load_sweep_spec(spec(kind="fanout", search={}, trials=None))
    with pytest.raises(
        SpecError, match="resources.gpus: an amortized sweep's resources are per data-parallel"
    ):
        load_sweep_spec(spec(resources={"gpus": 0.5}))
    tiny_sd = spec()
    tiny_sd["base"] = {
        **tiny_sd["base"],
        "prior": TINY["prior"],
    }  # no ground truth without the reference prior
    with pytest.raises(SpecError, match="objective.metric 'eval/held_out/psnr' is never reported"):
        load_sweep_spec(tiny_sd)


def test_compare_shows_the_held_out_metrics_of_every_trial_as_mlflow_holds_them(amortized_sweep, capsys):
    import json

    from orchestrator.cli import main

    ws, _ = amortized_sweep
    assert main(["compare", "amortized", "--workspace", str(ws.root), "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    client = tracking.MlflowClient(ws.record("amortized").stores.mlflow_uri)
    assert len(rows) == TRIALS
    for row in rows:
        held_out = client.get_run(row["run_id"]).data.metrics
        columns = {k for k in row if k.startswith("eval/held_out/")}
        assert columns == {
            "eval/held_out/psnr",
            "eval/held_out/ssim",
            "eval/held_out/iou",
            "eval/held_out/depth_l1",
        }
        assert all(row[k] == held_out[k] for k in columns)
        assert row["objective"] == held_out["eval/held_out/psnr"] and row["prompt_count"] == len(PROMPTS)
    assert main(["compare", "amortized", "--workspace", str(ws.root)]) == 0
    header = capsys.readouterr().out.splitlines()[0].split()
    assert "eval/held_out/psnr" in header and "prompt_count" in header and "prompts" not in header


def test_the_best_config_trains_with_dreamsweep_train(amortized_sweep, tmp_path, capsys):
    import yaml

    from orchestrator.cli import main

    ws, _ = amortized_sweep
    best_file = tmp_path / "best.yaml"
    assert main(["best", "amortized", "--workspace", str(ws.root), "--output", str(best_file)]) == 0
    out = tmp_path / "trained"
    # as it is, but for a shorter run in one process (the sweep's trials ran 2 Ray Train workers)
    args = [str(best_file), "max_steps=2", "data_parallel.num_workers=1", f"output_dir={out}"]
    assert main(["train", *args]) == 0
    assert f"done: {out}" in capsys.readouterr().out
    assert "eval/held_out/psnr" in yaml.safe_load((out / "metrics.yaml").read_text())


def test_generate_from_a_sweep_uses_its_best_trials_last_checkpoint(amortized_sweep, tmp_path, capsys):
    from orchestrator.cli import main
    from orchestrator.track.best_run import _from_storage
    from orchestrator.track.report import compare
    from trainers.checkpoint import load_checkpoint

    ws, _ = amortized_sweep
    gif = tmp_path / "cone.gif"
    prompt = "a purple cone on top of a red cube"  # trained on by neither trial
    args = ["generate", "--sweep", "amortized", prompt, "--workspace", str(ws.root), "--output", str(gif)]
    assert main(args) == 0
    best = compare("amortized", ws)[0]
    out = capsys.readouterr().out
    assert f"best trial {best['trial']}" in out and best["run_id"] in out
    assert gif.read_bytes()[:6] == b"GIF89a"
    run_dir = ws.sweep_dir("amortized") / "generate" / f"trial-{best['trial']:04d}"
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step_0000004"]  # from MLflow
    # the sweep's storage holds the same last checkpoint (Ray Train's copy), where MLflow has none
    assert load_checkpoint(_from_storage(ws, "amortized", best))["step"] == 4


def test_generate_from_a_sweep_with_no_finished_trial_lists_its_trials_and_their_states(tmp_path, capsys):
    import mlflow

    from orchestrator.cli import main
    from orchestrator.run.workspace import SweepRecord
    from orchestrator.spec.spec import spec_to_dict

    ws = Workspace(tmp_path / "ws")
    unfinished = load_sweep_spec(spec(name="unfinished"))
    stores = ws.stores_for(unfinished)
    client = mlflow.MlflowClient(stores.mlflow_uri)
    experiment = tracking.ensure_experiment(client, "unfinished", stores.mlflow_artifacts)
    parent = tracking.start_parent_run(client, experiment, "unfinished", spec_to_dict(unfinished), {})
    ws.register(unfinished, SweepRecord("unfinished", stores, experiment_id=experiment, parent_run_id=parent))
    for number, state in enumerate(["RUNNING", "FAILED"]):
        identity = tracking.TrialIdentity(
            "unfinished", experiment, parent, f"ray-{number}", number, PROMPTS, {}, "c0ffee"
        )
        run = tracking.TrialRun.open(client, identity, {})
        if state != "RUNNING":
            run.finish(state)
    args = ["generate", "--sweep", "unfinished", "a red cube", "--workspace", str(ws.root)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "sweep 'unfinished' has no finished trial to generate with" in err
    assert "trial 0: RUNNING; trial 1: FAILED" in err and "dreamsweep status unfinished" in err


def test_the_report_shows_each_trials_evaluation_prompts_held_out_ones_marked(amortized_sweep, tmp_path):
    from orchestrator.cli import main

    ws, _ = amortized_sweep
    out = tmp_path / "report"
    assert main(["report", "amortized", "--top", "1", "--workspace", str(ws.root), "--output", str(out)]) == 0
    page = (out / "index.html").read_text()
    assert page.index(">best<") < page.index(">worst<")
    for alt in ("turntable: a red cube", f"turntable: held-out: {HELD_OUT}"):
        assert page.count(f'alt="{alt}"') == TRIALS  # the best's and the worst's
    for step in (2, 4):  # each prompt's row of each validation grid
        assert page.count(f'alt="validation: held-out: {HELD_OUT}, step {step}"') == TRIALS
    assert (
        page.count('class="held-out-mark">held-out</span> a purple torus') == 2
    )  # turntable, validation rows
    assert "(none logged)" not in page
    # the evaluation prompts only: no row for the other training prompts
    assert "a blue sphere</th>" not in page and "a green cone</th>" not in page
    assert "Amortized sweep: each trial trains one generator on 3 prompts" in page
    assert "eval/held_out/psnr" in page  # its metrics, beside eval/psnr on the trained prompts


# The report in a real browser (headless Chromium, as tests/test_report_browser.py): a page beside the
# report loads it in a frame and writes what it sees of each image, by its alt text.
http_root = browser.http_root  # the fixture: the report and its harness served on 127.0.0.1
AMORTIZED_HARNESS = """<!DOCTYPE html><html><body><pre id="result" hidden>pending</pre>
<iframe id="report" src="report/index.html" style="width:1400px;height:1800px"></iframe>
<script>
document.getElementById("report").addEventListener("load", () => {
  const doc = document.getElementById("report").contentDocument;
  const images = Array.from(doc.images);
  const check = () => {
    if (!images.every((i) => i.complete)) return setTimeout(check, 50);
    document.getElementById("result").textContent = JSON.stringify({
      loaded: images.filter((i) => i.naturalWidth > 0).map((i) => i.alt),
      broken: images.filter((i) => i.naturalWidth === 0).map((i) => i.alt),
      held_out_marks: Array.from(doc.querySelectorAll(".held-out-mark")).map((e) => e.parentElement.textContent),
      none_logged: doc.body.textContent.includes("(none logged)"),
    });
  };
  check();
});
</script></body></html>"""


@pytest.mark.skipif(
    browser.CHROMIUM is None and not os.environ.get("DREAMSWEEP_REQUIRE_BROWSER"),
    reason="no chromium on PATH (apt-get install chromium; .ci/run installs it)",
)
def test_in_a_browser_every_evaluation_prompt_of_every_shown_trial_has_its_images(
    amortized_sweep, http_root, tmp_path
):
    import html
    import json
    import re

    from orchestrator.cli import main
    from orchestrator.track.report import compare

    ws, _ = amortized_sweep
    root, url = http_root
    assert (
        main(
            [
                "report",
                "amortized",
                "--top",
                "1",
                "--workspace",
                str(ws.root),
                "--output",
                str(root / "report"),
            ]
        )
        == 0
    )
    (root / "harness.html").write_text(AMORTIZED_HARNESS)
    dom, pixels = browser.open_page(f"{url}/harness.html", tmp_path, wait_ms=20000)
    seen = json.loads(html.unescape(re.search(r'<pre id="result"[^>]*>(.*?)</pre>', dom, re.S).group(1)))
    assert seen["broken"] == [] and not seen["none_logged"]
    client = tracking.MlflowClient(ws.record("amortized").stores.mlflow_uri)
    shown = compare("amortized", ws)  # --top 1 of 2 trials: the best and the worst
    for row in shown:  # every evaluation prompt the trial's run holds, as a turntable and grid rows
        index = client.download_artifacts(row["run_id"], "renders/turntables/prompts.json", str(tmp_path))
        for entry in json.loads(Path(index).read_text()):
            label = ("held-out: " if entry["group"] == "held_out" else "") + entry["prompt"]
            assert seen["loaded"].count(f"turntable: {label}") == len(shown)
            assert seen["loaded"].count(f"validation: {label}, step 4") == len(shown)
    assert all("held-out" in mark and HELD_OUT in mark for mark in seen["held_out_marks"])
    assert len(seen["held_out_marks"]) == 2  # the turntable row and the validation row
    browser.assert_not_blank(pixels)
