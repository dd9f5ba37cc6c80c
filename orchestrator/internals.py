"""The few private or undocumented details of Ray, Optuna and MLflow that dreamsweep relies on.

Each has a test in tests/test_internals.py that fails loudly when an upgrade changes it.
"""

from __future__ import annotations

# MLflow 3's UI reads the experiment tag `mlflow.experimentKind` to pick the page an experiment opens
# on. With no tag it guesses, and an experiment of nested training runs opened on the GenAI traces
# overview ("Traces 0", "No data available"). "custom_model_development" opens it on its runs. MLflow
# has no public Python constant for either (the values live in its web UI's bundle; the UI itself
# writes the tag when a user picks a kind), hence this module.
MLFLOW_EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MLFLOW_TRAINING_EXPERIMENT = "custom_model_development"

# The run description MLflow's UI shows (and edits) on a run's overview page; documented as a system
# tag, kept here beside the other MLflow UI tag.
MLFLOW_RUN_NOTE_TAG = "mlflow.note.content"


def mlflow_image_steps(artifact_paths: list[str], key: str) -> list[int]:
    """The steps of the images MLflow's `log_image(key=..., step=...)` stored, from their file names
    under `images/` ("<key, '/' as '~'>+step+<step>+timestamp+<ms>+<uuid>.png", plus a compressed
    .webp copy): what MLflow's UI reads to show a key's images over steps."""
    prefix = key.replace("/", "~") + "+step+"
    steps = set()
    for path in artifact_paths:
        name = path.rsplit("/", 1)[-1]
        if name.startswith(prefix) and name.endswith(".png"):
            steps.add(int(name[len(prefix) :].split("+", 1)[0]))
    return sorted(steps)
