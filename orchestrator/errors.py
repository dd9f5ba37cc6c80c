"""The errors a dreamsweep command reports as one line (`dreamsweep CMD: error: ...`) instead of a traceback.

They live here, apart from the modules that raise them, so that the CLI can catch them without importing
Ray, MLflow or Optuna: `dreamsweep train` runs on a machine that has only the trainer's packages.
"""

from __future__ import annotations


class ClusterError(RuntimeError):
    """The cluster cannot be reached, or refuses what was asked; the message says what to check."""


class UnknownSweepError(LookupError):
    """A sweep name the workspace does not hold; the message lists the ones it does."""


class SweepExistsError(FileExistsError):
    """Submitting a name that exists: Ray's restore would otherwise overwrite its experiment state."""


class ReportError(ValueError):
    """A report or comparison that cannot be made as asked (the message says why and what to do)."""
