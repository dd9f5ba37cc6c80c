"""Evaluation of trained models.

- `ground_truth`: renders against the true scene, for prompts of the reference benchmark.

`metric_names(config)` and `evaluate_trainer(trainer)` are the hooks `trainers.per_prompt` calls.
"""

from trainers.evaluation.ground_truth import evaluate_trainer, metric_names

__all__ = ["evaluate_trainer", "metric_names"]
