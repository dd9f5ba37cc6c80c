"""CLIP similarity in training (`evaluation.clip`) and `dreamsweep eval` on finished runs.

Two short runs on reference-scene prompts (so ground truth exists), trained on the tiny-sd prior and
scored with the tiny CLIP: everything on the CPU, nothing downloaded.
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from orchestrator.cli import main
from trainers.config import load_train_config
from trainers.evaluation import CLIP_SIMILARITY, EMBEDDINGS_FILE
from trainers.per_prompt import reported_metrics, train

PROMPTS = ("a red cube", "a green torus")
VIEWS = 3
TINY = [
    "resolution=16",
    "max_steps=4",
    "geometry.encoding.n_levels=4",
    "geometry.encoding.log2_hashmap_size=12",
    "geometry.encoding.base_resolution=8",
    "renderer.num_samples_per_ray=16",
    "logging.log_every=2",
    "logging.turntable_frames=2",
    "logging.val_views=2",
    "logging.eval_views=2",
    f"evaluation.views={VIEWS}",
    "evaluation.every=2",
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_sd_prior, tiny_clip_dir):
    """Two finished runs: {prompt: (output_dir, metrics logged, artifacts, final metrics)}."""
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for prompt in PROMPTS:
        config = load_train_config(
            None,
            [
                *TINY,
                f"prompt={prompt}",
                f"evaluation.clip={tiny_clip_dir}",
                f"output_dir={root / prompt[2:]}",
            ],
        )
        logged, artifacts = [], []
        result = train(
            config,
            tiny_sd_prior,
            on_metrics=lambda step, metrics, logged=logged: logged.append((step, metrics)),
            on_artifact=lambda step, path, artifacts=artifacts: artifacts.append(path),
            progress=False,
        )
        out[prompt] = (config, logged, artifacts, result.final_metrics)
    return out


def test_training_reports_clip_similarity_every_n_steps_and_at_the_end(runs):
    config, logged, artifacts, final = runs["a red cube"]
    assert CLIP_SIMILARITY in reported_metrics(config)
    assert CLIP_SIMILARITY not in reported_metrics(load_train_config(None, ["prompt=a red cube"]))
    assert [step for step, metrics in logged if CLIP_SIMILARITY in metrics] == [2, 4]
    assert -1.0 <= final[CLIP_SIMILARITY] <= 1.0
    # The final evaluation keeps its image embeddings (a fan-out's R@1 reads them) and hands them on.
    embeddings = config.output_dir + "/" + str(EMBEDDINGS_FILE)
    assert embeddings in [str(p) for p in artifacts]
    saved = torch.load(embeddings, weights_only=True)
    assert saved["prompt"] == "a red cube" and saved["image_embeds"].shape[0] == VIEWS
    assert torch.allclose(saved["image_embeds"].float().norm(dim=1), torch.ones(VIEWS), atol=1e-2)


def eval_cli(capsys, *args) -> tuple[int, str, str]:
    code = main(["eval", *[str(a) for a in args]])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_eval_on_two_finished_runs_prints_clip_figures_and_ground_truth(runs, tiny_clip_dir, capsys):
    dirs = [runs[p][0].output_dir for p in PROMPTS]
    code, out, _ = eval_cli(capsys, *dirs, "--clip", tiny_clip_dir, "--views", VIEWS)
    assert code == 0
    header, *rows = out.splitlines()[:3]
    assert header.split() == [
        "run",
        "prompt",
        "step",
        "clip_similarity",
        "clip_r_at_1",
        "eval/psnr",
        "eval/ssim",
        "eval/iou",
        "eval/depth_l1",
    ]
    assert "CLIP similarity:" in out and "CLIP R@1:" in out and "(over 2 prompts)" in out

    code, out, _ = eval_cli(capsys, *dirs, "--clip", tiny_clip_dir, "--views", VIEWS, "--format", "json")
    result = json.loads(out)
    assert code == 0 and result["prompts"] == 2 and 0.0 <= result["recall_at_1"] <= 1.0
    for row, prompt in zip(result["runs"], PROMPTS, strict=True):
        final = runs[prompt][3]
        # The same views of the same checkpoint: the trainer's own final figures, recomputed.
        assert row["step"] == 4 and row["clip_similarity"] == pytest.approx(final[CLIP_SIMILARITY], abs=1e-4)
        assert row["eval/psnr"] == pytest.approx(final["eval/psnr"], abs=1e-3)
        # A fraction of the run's views, each ranked against both prompts.
        assert row["clip_r_at_1"] * VIEWS == pytest.approx(round(row["clip_r_at_1"] * VIEWS))
    assert result["similarity"] == pytest.approx(sum(r["clip_similarity"] for r in result["runs"]) / 2)


def test_eval_of_a_single_prompt_reports_r_at_1_undefined_with_the_reason_before_rendering(
    runs, tiny_clip_dir, capsys
):
    code, out, err = eval_cli(capsys, runs["a red cube"][0].output_dir, "--clip", tiny_clip_dir, "--views", 2)
    assert code == 0
    assert "R@1 is undefined for a single prompt" in err.splitlines()[0]
    assert "CLIP R@1: undefined. R@1 is undefined for a single prompt" in out


@pytest.fixture
def no_rendering(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("rendered before every input was checked")

    monkeypatch.setattr("trainers.evaluation.runs.orbit_renders", refuse)


def test_a_run_directory_without_a_checkpoint_is_refused_before_any_rendering(
    runs, tiny_clip_dir, tmp_path, capsys, no_rendering
):
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.yaml").write_text(yaml.safe_dump({"prompt": "a blue sphere"}))
    code, _, err = eval_cli(capsys, runs["a red cube"][0].output_dir, unfinished, "--clip", tiny_clip_dir)
    assert code == 2
    assert "has no checkpoint" in err and str(unfinished) in err and "--resume latest" in err
    code, _, err = eval_cli(capsys, tmp_path / "nowhere", "--clip", tiny_clip_dir)
    assert code == 2 and "does not exist" in err


def test_a_clip_that_is_missing_or_not_clip_is_refused_before_any_rendering(
    runs, tiny_sd_dir, tmp_path, capsys, no_rendering
):
    run = runs["a red cube"][0].output_dir
    code, _, err = eval_cli(capsys, run, "--clip", tmp_path / "no-clip")
    assert code == 2 and "--clip=" in err and "no such directory" in err
    code, _, err = eval_cli(capsys, run, "--clip", tiny_sd_dir)
    assert code == 2 and "is not a CLIP model" in err
