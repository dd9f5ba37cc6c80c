"""CLIP R@1 of a fan-out sweep, computed at its end over its finished trials.

R@1 ranks each image against a set of prompts, so no single trial can compute it. Each trial's final
evaluation keeps its CLIP image embeddings (an artifact of its MLflow run); at the end the driver reads
them back, embeds the finished trials' prompts once, and logs `eval/clip_r_at_1`: each trial's (its
prompt's images ranked among the finished prompts) to its child run, their mean to the parent run. Only
the CLIP text tower is run on the driver; no renders, no GPU needed.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from orchestrator.track import tracking

RECALL_METRIC = "eval/clip_r_at_1"
TAG_RECALL_NOTE = "dreamsweep.clip_r_at_1"  # why the parent run has no R@1, when it has none


def finalize_fanout(spec, record, client) -> float | None:
    """At the end of a sweep: R@1 for a fan-out whose trainer config names a CLIP model, else nothing.

    A failure here (no CLIP on the driver, an unreadable artifact) is reported and tagged on the parent
    run, never raised: the sweep's stores must still be made consistent."""
    from orchestrator.spec.spec import base_config_dict
    from trainers.config import load_train_config

    if spec.kind != "fanout":
        return None
    clip = load_train_config(base_config_dict(spec), spec.overrides).evaluation.clip
    if not clip:
        return None
    try:
        return log_fanout_recall(client, record.experiment_id, record.parent_run_id, clip)
    except Exception as exc:  # noqa: BLE001 - see the docstring
        message = f"R@1 not computed: {type(exc).__name__}: {exc}"
        print(f"sweep {spec.name}: {message}")
        client.set_tag(record.parent_run_id, TAG_RECALL_NOTE, message[:4000])
        return None


def log_fanout_recall(client, experiment_id: str, parent_run_id: str, clip: str) -> float | None:
    """Log R@1 over the finished trials whose runs hold CLIP embeddings; returns it, or None (with the
    reason as a tag of the parent run) when fewer than two distinct prompts finished."""
    import torch

    from trainers.evaluation import EMBEDDINGS_FILE
    from trainers.evaluation.clip import SINGLE_PROMPT_R_AT_1, load_clip, retrieval_scores

    found: list[tuple[str, dict[str, Any]]] = []
    with tempfile.TemporaryDirectory() as scratch:
        for run in tracking.trial_runs(client, experiment_id):
            if run.info.status != "FINISHED":
                continue
            path = _find_artifact(client, run.info.run_id, EMBEDDINGS_FILE.name)
            if path is not None:
                local = client.download_artifacts(run.info.run_id, path, scratch)
                found.append((run.info.run_id, torch.load(local, weights_only=True)))
    prompts = list(dict.fromkeys(record["prompt"] for _, record in found))
    if len(prompts) < 2:
        client.set_tag(
            parent_run_id, TAG_RECALL_NOTE, f"{len(found)} finished trial(s): {SINGLE_PROMPT_R_AT_1}"
        )
        return None
    model = load_clip(clip)
    scores = retrieval_scores(
        [record["image_embeds"].float().to(model.device) for _, record in found],
        [prompts.index(record["prompt"]) for _, record in found],
        model.embed_texts(prompts),
    )
    for (run_id, _), score in zip(found, scores, strict=True):
        client.log_metric(run_id, RECALL_METRIC, float(score["recall_at_1"]))
    value = sum(float(score["recall_at_1"]) for score in scores) / len(scores)
    client.log_metric(parent_run_id, RECALL_METRIC, value)
    client.set_tag(
        parent_run_id, TAG_RECALL_NOTE, f"over {len(prompts)} prompts of {len(found)} finished trials"
    )
    return value


def _find_artifact(client, run_id: str, name: str, folder: str | None = None) -> str | None:
    """The artifact path of the first file called `name` in the run: where the trial logs renders
    (`renders/`), else searched depth first."""
    if folder is None:
        hit = next(
            (i.path for i in client.list_artifacts(run_id, "renders") if Path(i.path).name == name), None
        )
        if hit:
            return hit
    for item in client.list_artifacts(run_id, folder):
        if item.is_dir:
            hit = _find_artifact(client, run_id, name, item.path)
            if hit:
                return hit
        elif Path(item.path).name == name:
            return item.path
    return None
