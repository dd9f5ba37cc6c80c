"""`dreamsweep generate --sweep NAME "a prompt"`: an amortized sweep's best generator, with no path to find.

The best finished trial (as `dreamsweep compare` ranks them) is turned into a run directory that
`trainers.amortized.generate` reads (`config.yaml`, `checkpoints/step_*/`), in the workspace at
`sweeps/NAME/generate/trial-NNNN/`. Its last checkpoint comes from the trial's MLflow run (the
`checkpoint/step_*/` artifact every amortized trial logs when it finishes), else from the sweep's Tune
storage, where Ray Train persisted it (`<storage.tune>/NAME/<trial dir>/ray_train/amortized/checkpoint_*/`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from orchestrator.errors import ReportError
from orchestrator.run.workspace import Workspace


def best_amortized_run(name: str, workspace: Workspace) -> tuple[Path, dict[str, Any]]:
    """(a run directory holding the best trial's config and last checkpoint, its compare row)."""
    from orchestrator.track.report import compare, finished_rows

    spec = workspace.spec(name)
    if spec.trainer != "amortized":
        raise ReportError(
            f"generate --sweep works on amortized sweeps; {name!r} is a {spec.trainer} sweep, whose trials "
            f"each train one 3D model per prompt: take its best config with `dreamsweep best {name}`"
        )
    rows = compare(name, workspace)
    finished = finished_rows(rows)
    if not finished:
        states = "; ".join(f"trial {r['trial']}: {r['state']}" for r in rows) or "none has started"
        raise ReportError(
            f"sweep {name!r} has no finished trial to generate with (its trials: {states}); wait for one "
            f"to finish (dreamsweep status {name}) or continue the sweep (dreamsweep resume {name})"
        )
    best = finished[0]
    run_dir = workspace.sweep_dir(name) / "generate" / f"trial-{best['trial']:04d}"
    if not (run_dir / "config.yaml").is_file() or not list((run_dir / "checkpoints").glob("step_*")):
        shutil.rmtree(run_dir, ignore_errors=True)  # never a mix of two fetches
        checkpoint = _from_mlflow(workspace, name, best) or _from_storage(workspace, name, best)
        if checkpoint is None:
            raise ReportError(
                f"the best trial of {name!r} (trial {best['trial']}, MLflow run {best['run_id']}) has no "
                "checkpoint in its MLflow run (checkpoint/step_*) nor in the sweep's Tune storage"
            )
        _install(checkpoint, run_dir)
    return run_dir, best


def _install(checkpoint: Path, run_dir: Path) -> None:
    """run_dir/checkpoints/<step>/ and run_dir/config.yaml (the checkpoint's own), written atomically."""
    tmp = run_dir.with_name(run_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "checkpoints").mkdir(parents=True)
    step = checkpoint.name if checkpoint.name.startswith("step_") else _step_name(checkpoint)
    shutil.copytree(checkpoint, tmp / "checkpoints" / step)
    shutil.copy(checkpoint / "config.yaml", tmp / "config.yaml")
    tmp.rename(run_dir)


def _step_name(checkpoint: Path) -> str:
    """Ray Train names its copies checkpoint_<date>; the trainer's name says the step."""
    from trainers.checkpoint import checkpoint_name, load_checkpoint

    return checkpoint_name(int(load_checkpoint(checkpoint)["step"]))


def _from_mlflow(workspace: Workspace, name: str, row: dict[str, Any]) -> Path | None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(workspace.record(name).stores.mlflow_uri)
    try:
        steps = sorted(a.path for a in client.list_artifacts(row["run_id"], "checkpoint") if a.is_dir)
    except Exception:  # noqa: BLE001  a store that cannot list it: try the sweep's storage
        return None
    if not steps:
        return None
    local = Path(tempfile.mkdtemp(prefix="dreamsweep-checkpoint-"))
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # the command prints its own line
    return Path(client.download_artifacts(row["run_id"], steps[-1], str(local)))


def _from_storage(workspace: Workspace, name: str, row: dict[str, Any]) -> Path | None:
    """The last checkpoint Ray Train persisted for the trial, on a Tune storage this machine can read."""
    tune_path = workspace.record(name).stores.tune_path
    if "://" in tune_path and not tune_path.startswith("file://"):
        return None  # s3:// or gs://: its MLflow run is where to look
    experiment = Path(tune_path.removeprefix("file://")) / name
    trial_id = row.get("ray_trial_id") or ""
    found = [
        state.parent
        for trial_dir in experiment.glob(f"*{trial_id}*")
        for state in (trial_dir / "ray_train").rglob("state.pt")
    ]
    if not trial_id or not found:
        return None
    from trainers.checkpoint import load_checkpoint

    return max(found, key=lambda path: int(load_checkpoint(path)["step"]))
