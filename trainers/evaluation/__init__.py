"""Evaluation of trained models.

- `ground_truth`: renders against the true scene, for prompts of the reference benchmark
  (`eval/psnr`, `eval/ssim`, `eval/iou`, `eval/depth_l1`);
- `clip`: the paper's CLIP protocol (`clip_scores`: similarity and R@1), `eval/clip_similarity` in training
  when `evaluation.clip` names a model.

The functions below are the hooks `trainers.per_prompt` calls; `clip_scores` is imported lazily, so that
reading a config does not import transformers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trainers.evaluation import ground_truth
from trainers.evaluation.config import EvaluationConfig

CLIP_SIMILARITY = "eval/clip_similarity"
CLIP_R_AT_1 = "eval/clip_r_at_1"  # needs several prompts: a fan-out sweep's, or `dreamsweep eval`'s
EMBEDDINGS_FILE = Path("evaluation") / "clip_image_embeddings.pt"  # under the run's output_dir

__all__ = [
    "CLIP_R_AT_1",
    "CLIP_SIMILARITY",
    "EvaluationConfig",
    "clip_scores",
    "evaluate_clip",
    "evaluate_trainer",
    "metric_names",
    "prepare",
    "saved_files",
]


def metric_names(config) -> set[str]:
    """The `eval/...` metrics a run of `config` (a TrainConfig) reports."""
    names = ground_truth.metric_names(config)
    if config.evaluation.clip:
        names.add(CLIP_SIMILARITY)
    return names


def prepare(trainer) -> None:
    """Load what the evaluation needs before training starts, so that a bad `evaluation.clip` fails in
    seconds rather than after the last step."""
    if trainer.config.evaluation.clip:
        _clip_model(trainer)


def evaluate_trainer(trainer) -> dict[str, float]:
    """The final evaluation: ground truth where the prompt has one, CLIP similarity where a CLIP model is
    configured (its image embeddings are kept in `saved_files`, for a fan-out's R@1), else {}."""
    metrics = ground_truth.evaluate_trainer(trainer)
    if trainer.config.evaluation.clip:
        metrics |= evaluate_clip(trainer, save_embeddings=True)
    return metrics


def due(config, step: int) -> bool:
    """Whether the CLIP evaluation runs after `step` (every `evaluation.every` steps, before the last)."""
    every = config.evaluation.every
    return bool(config.evaluation.clip and every and step % every == 0 and step < config.max_steps)


def evaluate_clip(trainer, save_embeddings: bool = False) -> dict[str, float]:
    """`eval/clip_similarity` of the trainer's model on the protocol's orbit."""
    import torch

    from trainers.evaluation.clip import orbit_renders, retrieval_scores

    config, ev = trainer.config, trainer.config.evaluation
    model = _clip_model(trainer)
    resolution = ev.resolution or config.resolution

    def render(cameras, width, height):
        trainer.renderer.eval()
        return trainer.renderer.render(cameras.to(trainer.device), width, height, train=False)

    images = orbit_renders(render, ev.views, ev.elevation, config.camera, resolution, ev.batch_size)
    image_embeds = model.embed_images(images, ev.batch_size)
    (score,) = retrieval_scores([image_embeds], [0], model.embed_texts([config.prompt]))
    if save_embeddings:
        path = Path(config.output_dir) / EMBEDDINGS_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        record = {"prompt": config.prompt, "clip": ev.clip, "views": ev.views, "elevation": ev.elevation}
        torch.save({**record, "image_embeds": image_embeds.half().cpu()}, path)
    return {CLIP_SIMILARITY: float(score["similarity"])}


def saved_files(config) -> list[Path]:
    """Files the final evaluation wrote under output_dir, for the trainer to hand on as artifacts."""
    path = Path(config.output_dir) / EMBEDDINGS_FILE
    return [path] if config.evaluation.clip and path.exists() else []


def _clip_model(trainer):
    from trainers.evaluation.clip import load_clip

    cache_dir = trainer.config.prior.cache_dir
    return load_clip(trainer.config.evaluation.clip, device=trainer.device, cache_dir=cache_dir)


def __getattr__(name: str) -> Any:
    if name == "clip_scores":
        from trainers.evaluation.clip import clip_scores

        return clip_scores
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
