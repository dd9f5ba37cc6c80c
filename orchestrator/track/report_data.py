"""What the report page shows, as data: orchestrator.track.report builds it from the stores and
orchestrator.track.page draws it. A module of its own, so that the page needs nothing of the report's
readers (and the two no longer import each other).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

LIVE_FRESH_S = 30.0  # a progress file older than this, of a sweep not finished: its driver stopped
# A replicated trial's (`replicates: R`) standard error of its objective over its R seeds: an Optuna user
# attribute, an MLflow metric, and the key of `compare`'s rows.
SEM = "objective_sem"


@dataclass
class Media:
    """An image file's bytes, to embed in the page as a data URI."""

    mime: str
    data: bytes
    caption: str = ""


HELD_OUT, TRAIN = "held_out", "train"  # an amortized trial's evaluation prompts: never trained on, or trained


@dataclass
class TrialView:
    row: dict[str, Any]  # as `compare` gives it
    role: str  # "best", "#2", ..., "worst", or the prompt for a fan-out grid
    metrics: dict[str, float] = field(default_factory=dict)  # final metrics per prompt label
    turntables: list[Media | None] = field(default_factory=list)  # one per prompt of the trial
    validation: list[list[Media]] = field(default_factory=list)  # per prompt: grids over steps
    # The prompts the rows show, when they are not the trial's own (`row["prompts"]`): an amortized
    # trial's evaluation prompts, each with its group (TRAIN or HELD_OUT).
    prompts: list[str] | None = None
    groups: list[str] | None = None

    def prompt(self, i: int) -> str:
        prompts = self.prompts if self.prompts is not None else self.row.get("prompts") or []
        return prompts[i] if i < len(prompts) else ""

    def group(self, i: int) -> str | None:
        return self.groups[i] if self.groups is not None and i < len(self.groups) else None


@dataclass
class SweepReport:
    name: str
    kind: str
    trainer: str  # "per-prompt" or "amortized"
    objective: dict[str, str]
    rows: list[dict[str, Any]]  # every trial, best first
    summary: dict[str, Any]
    shown: list[TrialView]  # top-K, then the worst for contrast
    fanout: list[TrialView]  # a fan-out: every finished prompt
    study: Any  # the Optuna study (for the plots), None if it cannot be loaded
    notes: list[str]
    parent_run_id: str | None
    mlflow_uri: str
    live: dict[str, Any] | None = None
    replicates: int = 1  # seeds per trial: above 1, each objective is a mean shown with its s.e.
