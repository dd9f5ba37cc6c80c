"""Where a sweep's stores live, and the registry of the sweeps a workspace holds.

    <workspace>/                      --workspace DIR, else $DREAMSWEEP_WORKSPACE, else ./dreamsweep-workspace
      optuna.db                       the Optuna storage (SQLite; one study per sweep, named after it)
      mlflow.db, mlartifacts/         the MLflow tracking store and its artifacts
      ray_results/<name>/             Ray Tune's experiment state, trial dirs and checkpoints
      sweeps/<name>/spec.yaml         the resolved spec the sweep was submitted with
      sweeps/<name>/sweep.json        its record: the stores it uses, its MLflow experiment and parent run

Each store can be pointed elsewhere by the spec's `storage` (PostgreSQL, an `mlflow server`, a shared
file system or s3://); the record keeps what a sweep was started with, so `resume`, `status` and
`compare` need only its name. It keeps the URLs as written, `${NAME}` unresolved and any literal password
as `***` (orchestrator.spec.secrets): each use resolves them with `usable_url`.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.errors import UnknownSweepError
from orchestrator.spec.spec import SpecError, SweepSpec, load_sweep_spec, save_spec

ENV_VAR = "DREAMSWEEP_WORKSPACE"
DEFAULT_WORKSPACE = "dreamsweep-workspace"


@dataclass
class Stores:
    optuna_url: str
    mlflow_uri: str
    mlflow_artifacts: str | None  # None: the tracking server decides (mlflow server --artifacts-destination)
    tune_path: str


@dataclass
class SweepRecord:
    name: str
    stores: Stores
    created: float = field(default_factory=time.time)
    experiment_id: str | None = None
    parent_run_id: str | None = None
    # The per-worker runtime facts the trainable needs but the spec does not say (e.g. a test's fake trainer).
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SweepRecord:
        return cls(**{**data, "stores": Stores(**data["stores"])})


class Workspace:
    def __init__(self, root: str | Path | None = None):
        chosen = root if root is not None else os.environ.get(ENV_VAR) or DEFAULT_WORKSPACE
        self.root = Path(chosen).expanduser().resolve()

    def __repr__(self) -> str:
        return f"Workspace({str(self.root)!r})"

    # -- stores --------------------------------------------------------------------------------------

    def stores_for(self, spec: SweepSpec) -> Stores:
        storage = spec.storage.redacted()
        local_mlflow = "mlflow" not in storage
        return Stores(
            optuna_url=storage.get("optuna") or f"sqlite:///{self.root / 'optuna.db'}",
            mlflow_uri=storage.get("mlflow") or f"sqlite:///{self.root / 'mlflow.db'}",
            mlflow_artifacts=(self.root / "mlartifacts").as_uri() if local_mlflow else None,
            tune_path=storage.get("tune") or str(self.root / "ray_results"),
        )

    # -- registry ------------------------------------------------------------------------------------

    def sweep_dir(self, name: str) -> Path:
        return self.root / "sweeps" / name

    def exists(self, name: str) -> bool:
        return (self.sweep_dir(name) / "sweep.json").is_file()

    def sweeps(self) -> list[str]:
        folder = self.root / "sweeps"
        if not folder.is_dir():
            return []
        return sorted(p.name for p in folder.iterdir() if (p / "sweep.json").is_file())

    def register(self, spec: SweepSpec, record: SweepRecord) -> None:
        folder = self.sweep_dir(spec.name)
        folder.mkdir(parents=True, exist_ok=True)
        save_spec(spec, folder / "spec.yaml")
        self.save_record(record)

    def save_record(self, record: SweepRecord) -> None:
        folder = self.sweep_dir(record.name)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / "sweep.json.tmp"
        tmp.write_text(json.dumps(asdict(record), indent=2))
        os.replace(tmp, folder / "sweep.json")  # atomic: a kill never leaves half a record

    def record(self, name: str) -> SweepRecord:
        self.require(name)
        return SweepRecord.from_dict(json.loads((self.sweep_dir(name) / "sweep.json").read_text()))

    def spec(self, name: str) -> SweepSpec:
        self.require(name)
        try:
            # Paths in a saved spec are absolute already; the files they point to were checked at submit.
            return load_sweep_spec(self.sweep_dir(name) / "spec.yaml", check=False)
        except SpecError as exc:
            raise SpecError(f"the saved spec of sweep {name!r} no longer loads: {exc}") from None

    def require(self, name: str) -> None:
        if not self.exists(name):
            existing = self.sweeps()
            listed = ", ".join(existing) if existing else "none yet (dreamsweep submit SPEC)"
            raise UnknownSweepError(
                f"no sweep named {name!r} in workspace {self.root}; sweeps there: {listed}"
            )
