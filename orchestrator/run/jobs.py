"""Sweeps on a Ray cluster, as Ray Jobs: the laptop validates and uploads, the head runs the driver.

    dreamsweep submit sweeps/x.yaml --address http://HEAD:8265    # prints the job id, returns
    dreamsweep status|logs [--follow]|stop|resume x --address http://HEAD:8265
    dreamsweep list --address http://HEAD:8265

A job's driver is `dreamsweep submit` (or `resume`) itself, run on the head from the uploaded code:
it joins the cluster through the $RAY_ADDRESS that Ray Jobs sets, keeps the sweep's registry in the
head's workspace, and writes to the stores the spec names (orchestrator.run.stores checks them here,
before anything is uploaded). The laptop may disconnect once `submit` returns.

What travels (the runtime env's working_dir): the project's files as git sees them (.gitignore and
`cluster.excludes` honoured), plus `.dreamsweep/spec.yaml`, a self-contained copy of the spec (its
trainer config inlined, its prompts resolved to the selected items), since the laptop's paths do
not exist on the cluster. Jobs carry metadata (`dreamsweep.sweep`, ...) so that a sweep's jobs can
be found again by name.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from orchestrator.errors import ClusterError, SweepExistsError, UnknownSweepError
from orchestrator.run.cluster import ClusterConfig, check_trial_fits, load_cluster
from orchestrator.run.stores import check_stores_for_cluster
from orchestrator.spec.prompts import load_prompts
from orchestrator.spec.spec import SweepSpec, base_config_dict, load_sweep_spec, spec_to_dict

ADDRESS_ENV = "DREAMSWEEP_ADDRESS"
CONNECT_TIMEOUT_S = 8.0  # an unreachable head is reported within this (the bound is 10 s)
PROJECT_ROOT = Path(__file__).resolve().parents[2]
SPEC_IN_JOB = ".dreamsweep/spec.yaml"
RUNTIME_IN_JOB = ".dreamsweep/runtime.json"
# The head's workspace: the registry of the sweeps it ran, and the stores the spec leaves unset.
HEAD_WORKSPACE = "${DREAMSWEEP_WORKSPACE:-$HOME/dreamsweep-workspace}"
META_SWEEP, META_ACTION, META_WORKSPACE = "dreamsweep.sweep", "dreamsweep.action", "dreamsweep.workspace"
ACTIVE = ("PENDING", "RUNNING")
# Never uploaded, whatever .gitignore says: version control and local stores (mlruns: MLflow's
# default file store, which a script logging without a tracking URI leaves in the current folder).
ALWAYS_EXCLUDED = (".git", ".venv", "dreamsweep-workspace", "mlruns", "__pycache__")


def resolve_address(given: str | None) -> str | None:
    """--address, else $DREAMSWEEP_ADDRESS, else $RAY_ADDRESS when it is a Jobs address (http[s]://).

    A job's own driver sees a $RAY_ADDRESS of the form HOST:PORT (the GCS), which is not a Jobs
    address: it runs its sweep where it is instead of submitting another job."""
    for candidate in (given, os.environ.get(ADDRESS_ENV), os.environ.get("RAY_ADDRESS")):
        if not candidate:
            continue
        if candidate.startswith(("http://", "https://")):
            return candidate.rstrip("/")
        if candidate is given or candidate == os.environ.get(ADDRESS_ENV):
            raise ClusterError(
                f"address {candidate!r}: give the head's dashboard (Ray Jobs) address, "
                "http://HEAD:8265 (`ray dashboard CLUSTER.yaml` forwards it to http://localhost:8265)"
            )
    return None


# ---------------------------------------------------------------------------------------------------
# Connecting


def connect(address: str, timeout_s: float = CONNECT_TIMEOUT_S):
    """A JobSubmissionClient for `address`, after a bounded probe.

    Ray's client sends its requests without a timeout, so a head that accepts the connection but
    never answers would hang it forever: probe Ray's version endpoint first, with a deadline."""
    import requests
    from ray.job_submission import JobSubmissionClient

    try:
        requests.get(f"{address}/api/version", timeout=(timeout_s / 2, timeout_s / 2))
    except requests.exceptions.Timeout:
        raise ClusterError(
            f"the Ray cluster at {address} did not answer within {timeout_s:g} s; is that the head's "
            "dashboard port (8265), and is the head healthy?"
        ) from None
    except requests.exceptions.RequestException as exc:
        raise ClusterError(
            f"cannot reach the Ray cluster at {address} ({type(exc).__name__}); forward the head's dashboard "
            "port: `ray dashboard CLUSTER.yaml` (the dashboard listens on the head's loopback; README: Clusters)"
        ) from None
    from ray.exceptions import AuthenticationError

    try:
        return JobSubmissionClient(address)
    except AuthenticationError as exc:
        refused = str(exc).split("\n")[0]
        raise ClusterError(
            f"the Ray cluster at {address} asks for Ray's token ({refused}): set RAY_AUTH_MODE=token and "
            "RAY_AUTH_TOKEN to the cluster's token (README: Clusters, Secrets, says where it lives)"
        ) from None
    except (ConnectionError, RuntimeError) as exc:
        raise ClusterError(f"the Ray Jobs API at {address} refused the connection: {exc}") from None


def cluster_nodes(address: str) -> list[dict[str, float]]:
    """Each alive node's total resources, from the head's state API."""
    from ray.util.state import list_nodes

    nodes = list_nodes(address=address, filters=[("state", "=", "ALIVE")], timeout=int(CONNECT_TIMEOUT_S))
    return [dict(node.resources_total) for node in nodes]


# ---------------------------------------------------------------------------------------------------
# Upload


def project_files(root: Path, excludes: list[str]) -> list[Path]:
    """The project's files as git sees them (tracked and untracked-but-not-ignored), minus `excludes`."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
            cwd=root,
            capture_output=True,
            check=True,
        ).stdout.decode()
        paths = [Path(p) for p in listed.split("\0") if p]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout (e.g. an sdist)
        paths = [p.relative_to(root) for p in root.rglob("*") if p.is_file()]
    import fnmatch

    def excluded(path: Path) -> bool:
        parts = path.parts
        if any(part in ALWAYS_EXCLUDED for part in parts):
            return True
        text = path.as_posix()
        return any(
            fnmatch.fnmatch(text, pattern) or fnmatch.fnmatch(parts[0], pattern) for pattern in excludes
        )

    return [p for p in paths if not excluded(p) and (root / p).is_file()]


def portable_spec(spec: SweepSpec) -> dict[str, Any]:
    """The spec with what lives on the laptop inlined: the trainer config and the selected prompts."""
    data = spec_to_dict(spec)
    data["base"] = base_config_dict(spec) or None
    prompts = [str(p) for p in load_prompts(spec.prompts).column("prompt").to_pylist()]
    data["prompts"] = {"items": prompts}
    cluster = load_cluster(spec.cluster).model_dump(mode="json", exclude_none=True)
    cluster.pop("address", None)  # the job's driver joins through $RAY_ADDRESS
    data["cluster"] = cluster
    return {key: value for key, value in data.items() if value is not None}


def upload_limit_bytes() -> int:
    from orchestrator.internals import ray_package_limit_bytes

    return ray_package_limit_bytes()


def stage(
    spec: SweepSpec | None,
    excludes: list[str],
    root: Path = PROJECT_ROOT,
    runtime: dict[str, Any] | None = None,
) -> Path:
    """A folder with the project's files (hard links where possible), the portable spec and the
    SweepContext overrides (`runtime`, as orchestrator.run.sweep.submit takes them)."""
    files = project_files(root, excludes)
    size = sum((root / p).stat().st_size for p in files)
    limit = upload_limit_bytes()
    if size > limit:
        largest = sorted(files, key=lambda p: (root / p).stat().st_size, reverse=True)[:5]
        shown = ", ".join(f"{p} ({(root / p).stat().st_size / 2**20:.1f} MiB)" for p in largest)
        raise ClusterError(
            f"the project to upload is {size / 2**20:.0f} MiB, over Ray's {limit / 2**20:.0f} MiB limit; "
            f"largest files: {shown}; add them to .gitignore or cluster.excludes"
        )
    folder = Path(tempfile.mkdtemp(prefix="dreamsweep-job-"))
    for relative in files:
        target = folder / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(root / relative, target)
        except OSError:
            shutil.copy2(root / relative, target)
    if spec is not None:
        (folder / SPEC_IN_JOB).parent.mkdir(parents=True, exist_ok=True)
        (folder / SPEC_IN_JOB).write_text(yaml.safe_dump(portable_spec(spec), sort_keys=False))
    if runtime:
        (folder / RUNTIME_IN_JOB).parent.mkdir(parents=True, exist_ok=True)
        (folder / RUNTIME_IN_JOB).write_text(json.dumps(runtime))
    return folder


# ---------------------------------------------------------------------------------------------------
# Jobs of a sweep


@dataclass
class SweepJob:
    submission_id: str
    sweep: str
    action: str
    status: str
    workspace: str
    start_time: float | None  # seconds since the epoch
    end_time: float | None
    message: str

    @classmethod
    def from_details(cls, details) -> SweepJob | None:
        meta = details.metadata or {}
        if META_SWEEP not in meta:
            return None  # a job that is not a sweep
        status = getattr(details.status, "value", str(details.status))
        return cls(
            details.submission_id,
            meta[META_SWEEP],
            meta.get(META_ACTION, "submit"),
            status,
            meta.get(META_WORKSPACE, HEAD_WORKSPACE),
            details.start_time / 1000 if details.start_time else None,
            details.end_time / 1000 if details.end_time else None,
            details.message or "",
        )


def sweep_jobs(client) -> dict[str, list[SweepJob]]:
    """Sweep name -> its jobs, oldest first."""
    jobs: dict[str, list[SweepJob]] = {}
    for details in client.list_jobs():
        job = SweepJob.from_details(details)
        if job is not None:
            jobs.setdefault(job.sweep, []).append(job)
    for listed in jobs.values():
        listed.sort(key=lambda j: j.start_time or 0.0)
    return jobs


def jobs_of(client, address: str, name: str) -> list[SweepJob]:
    jobs = sweep_jobs(client)
    if name not in jobs:
        listed = ", ".join(sorted(jobs)) or "none yet (dreamsweep submit SPEC --address ...)"
        raise UnknownSweepError(
            f"no sweep named {name!r} on the cluster at {address}; sweeps there: {listed}"
        )
    return jobs[name]


def _submit(
    client,
    *,
    name: str,
    action: str,
    command: str,
    workspace: str,
    staged: Path,
    excludes: list[str],
) -> str:
    submission_id = f"dreamsweep-{name}-{action}-{time.strftime('%Y%m%d-%H%M%S')}"
    entrypoint = f"python -m orchestrator.cli {command} --workspace {workspace}"
    runtime_env = {
        "working_dir": str(staged),
        "excludes": list(excludes),
        "env_vars": {
            ADDRESS_ENV: "",  # the driver runs its sweep on this cluster; it never submits another job
            # `dreamsweep stop`: Tune saves its state on SIGINT; give it time before Ray's SIGKILL.
            "RAY_JOB_STOP_SIGNAL": "SIGINT",
            "RAY_JOB_STOP_WAIT_TIME_S": "30",
        },
    }
    metadata = {META_SWEEP: name, META_ACTION: action, META_WORKSPACE: workspace}
    return client.submit_job(
        entrypoint=entrypoint, submission_id=submission_id, runtime_env=runtime_env, metadata=metadata
    )


def _workspace_expr(workspace: str | None) -> str:
    return shlex.quote(workspace) if workspace else f'"{HEAD_WORKSPACE}"'


def submit_job(
    spec_source: str | Path,
    address: str,
    *,
    name: str | None = None,
    workspace: str | None = None,
    resume_existing: bool = False,
    runtime: dict[str, Any] | None = None,
) -> tuple[str, str]:
    """Validate the spec and its stores for `address`, check a trial fits a node, upload, submit.
    Returns (the sweep's name, the job's submission id); the sweep runs on the cluster."""
    spec = load_sweep_spec(spec_source, name=name)
    cluster: ClusterConfig = load_cluster(spec.cluster)
    check_stores_for_cluster(spec.storage, cluster, address)  # before anything is uploaded
    client = connect(address)
    existing = sweep_jobs(client).get(spec.name, [])
    running = [j for j in existing if j.status in ACTIVE]
    if running:
        raise ClusterError(
            f"sweep {spec.name!r} is already running on the cluster (job {running[-1].submission_id}); "
            f"`dreamsweep logs {spec.name} --follow` follows it, `dreamsweep stop {spec.name}` stops it"
        )
    if existing and not resume_existing:
        raise SweepExistsError(
            f"a sweep named {spec.name!r} already ran on the cluster at {address}: `dreamsweep resume "
            f"{spec.name} --address {address}` continues it, `--name NEW` starts another"
        )
    if not cluster.autoscaling:
        check_trial_fits(
            spec.resources.cpus, spec.resources.gpus, cluster_nodes(address), f"the cluster at {address}"
        )
    ws = existing[-1].workspace if existing else _workspace_expr(workspace)
    staged = stage(spec, cluster.excludes, runtime=runtime)
    try:
        if existing:  # --resume of a sweep the cluster knows: continue it with its saved spec
            return spec.name, _submit(
                client,
                name=spec.name,
                action="resume",
                command=f"resume {shlex.quote(spec.name)}",
                workspace=ws,
                staged=staged,
                excludes=cluster.excludes,
            )
        return spec.name, _submit(
            client,
            name=spec.name,
            action="submit",
            command=f"submit {SPEC_IN_JOB} --name {shlex.quote(spec.name)}"
            + (f" --runtime {RUNTIME_IN_JOB}" if runtime else ""),
            workspace=ws,
            staged=staged,
            excludes=cluster.excludes,
        )
    finally:
        shutil.rmtree(staged, ignore_errors=True)


def resume_job(name: str, address: str) -> str:
    """Continue a sweep the cluster ran (after `stop`, a crash, a lost head process) as a new job."""
    client = connect(address)
    jobs = jobs_of(client, address, name)
    running = [j for j in jobs if j.status in ACTIVE]
    if running:
        raise ClusterError(f"sweep {name!r} is still running (job {running[-1].submission_id})")
    staged = stage(None, [])
    try:
        return _submit(
            client,
            name=name,
            action="resume",
            command=f"resume {shlex.quote(name)}",
            workspace=jobs[-1].workspace,
            staged=staged,
            excludes=[],
        )
    finally:
        shutil.rmtree(staged, ignore_errors=True)


def stop_job(name: str, address: str) -> SweepJob | None:
    """Stop the sweep's running job (SIGINT: Tune saves its state). Returns it, or None if none ran."""
    client = connect(address)
    running = [j for j in jobs_of(client, address, name) if j.status in ACTIVE]
    if not running:
        return None
    client.stop_job(running[-1].submission_id)
    return running[-1]


def job_logs(name: str, address: str, follow: bool = False, out=None) -> SweepJob:
    """Print the latest job's driver log; with `follow`, until the job ends."""
    import asyncio
    import sys

    out = out or sys.stdout
    client = connect(address)
    job = jobs_of(client, address, name)[-1]
    if not follow:
        out.write(client.get_job_logs(job.submission_id))
        return job

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job.submission_id):
            out.write(chunk)
            out.flush()

    asyncio.run(tail())
    return job


def job_table(name: str, address: str) -> list[dict[str, Any]]:
    client = connect(address)
    return [_row(job) for job in jobs_of(client, address, name)]


def list_table(address: str) -> list[dict[str, Any]]:
    client = connect(address)
    return [{**_row(jobs[-1]), "jobs": len(jobs)} for _, jobs in sorted(sweep_jobs(client).items())]


def _row(job: SweepJob) -> dict[str, Any]:
    def when(t: float | None) -> str:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else ""

    return {
        "sweep": job.sweep,
        "job": job.submission_id,
        "action": job.action,
        "status": job.status,
        "started": when(job.start_time),
        "ended": when(job.end_time),
        "message": job.message[:120],
    }
