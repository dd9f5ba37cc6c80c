"""nerfacc's CUDA kernels are built once per node: workers that start together wait for one build.

A stand-in build function plays nerfacc's first backend import: it "builds" (sleeps, writes a marker)
when no build is there and loads quickly when one is, and records when it ran, so the tests can see
that builds never overlap and that only one process built."""

from __future__ import annotations

import fcntl
import json
import multiprocessing
import os
import time
from pathlib import Path

import pytest

from trainers import nerfacc_cuda
from trainers.nerfacc_cuda import ensure_nerfacc_cuda


@pytest.fixture(autouse=True)
def fresh_process_state(monkeypatch):
    monkeypatch.setattr(nerfacc_cuda, "_BUILT", {})


def stand_in_build(folder: Path, build_s: float = 0.6):
    def build():
        started = time.time()
        built = (folder / "build.so").exists()
        if not built:
            time.sleep(build_s)  # the nvcc minute
            (folder / "build.so").write_text("kernels")
        with open(folder / "calls.jsonl", "a") as calls:
            calls.write(
                json.dumps({"pid": os.getpid(), "built": not built, "start": started, "end": time.time()})
                + "\n"
            )
        return "compiled module"

    return build


def worker(folder: str, go: float) -> None:
    folder = Path(folder)
    while time.time() < go:  # start together, as workers on one node do
        time.sleep(0.001)
    result = ensure_nerfacc_cuda(
        stand_in_build(folder), lock_path=folder / "build.lock", poll_s=0.01, log=lambda _: None
    )
    assert result == "compiled module"


def test_workers_starting_together_wait_for_one_build_instead_of_each_building(tmp_path):
    context = multiprocessing.get_context("fork")
    go = time.time() + 0.5
    procs = [context.Process(target=worker, args=(str(tmp_path), go)) for _ in range(3)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=30)
        assert proc.exitcode == 0
    calls = sorted(
        (json.loads(line) for line in (tmp_path / "calls.jsonl").read_text().splitlines()),
        key=lambda c: c["start"],
    )
    assert len(calls) == 3 and len({c["pid"] for c in calls}) == 3
    assert [c["built"] for c in calls] == [True, False, False]  # one build, then two loads of it
    for earlier, later in zip(calls, calls[1:], strict=False):
        assert later["start"] >= earlier["end"]  # one at a time: nobody loads a half-written build


def test_a_second_call_in_the_same_process_neither_builds_nor_takes_the_lock(tmp_path):
    build = stand_in_build(tmp_path, build_s=0.0)
    assert (
        ensure_nerfacc_cuda(build, lock_path=tmp_path / "build.lock", log=lambda _: None) == "compiled module"
    )
    with open(tmp_path / "build.lock", "a") as held:  # another process's build in progress
        fcntl.flock(held, fcntl.LOCK_EX)
        assert (
            ensure_nerfacc_cuda(build, lock_path=tmp_path / "build.lock", timeout_s=0.1) == "compiled module"
        )
    assert len((tmp_path / "calls.jsonl").read_text().splitlines()) == 1


def test_a_build_that_never_finishes_times_out_naming_the_process_that_holds_it(tmp_path):
    messages = []
    with open(tmp_path / "build.lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write("4242")
        held.flush()
        with pytest.raises(TimeoutError, match=r"build in process 4242 did not finish within 0 s"):
            ensure_nerfacc_cuda(
                stand_in_build(tmp_path),
                lock_path=tmp_path / "build.lock",
                timeout_s=0.2,
                poll_s=0.01,
                log=messages.append,
            )
    assert messages and "waiting for nerfacc's CUDA build in process 4242" in messages[0]
    assert not (tmp_path / "calls.jsonl").exists()


def test_a_failed_build_releases_the_lock_so_the_next_worker_builds(tmp_path):
    def failing():
        raise RuntimeError("nvcc failed")

    with pytest.raises(RuntimeError, match="nvcc failed"):
        ensure_nerfacc_cuda(failing, lock_path=tmp_path / "build.lock", log=lambda _: None)
    build = stand_in_build(tmp_path, build_s=0.0)
    assert (
        ensure_nerfacc_cuda(build, lock_path=tmp_path / "build.lock", timeout_s=0.5, log=lambda _: None)
        == "compiled module"
    )


def test_the_lock_sits_beside_nerfacc_build_folder_not_inside_it(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    lock = nerfacc_cuda.build_lock_path()
    build_dir = lock.parent / "nerfacc_cuda"  # torch's folder for the extension, under TORCH_EXTENSIONS_DIR
    assert lock.name == "nerfacc_cuda.dreamsweep-build.lock" and tmp_path in lock.parents
    assert build_dir.is_dir() and not list(build_dir.iterdir())  # nerfacc takes a non-empty one for a build
