"""nerfacc's CUDA kernels, built once per node however many workers start together.

nerfacc compiles its kernels just in time (about a minute on an H100 machine) at the first import of
`nerfacc.cuda._backend`, into torch's extensions folder. Its own guard is racy: a process that finds
the build folder empty deletes it and builds, one that finds it non-empty loads whatever is there, so
workers starting together each build, or delete a build another is writing. Here the first import
happens under an exclusive file lock beside that folder: the first worker builds while the others
wait, then they load its build in seconds.

    ensure_nerfacc_cuda()     # before the first nerfacc CUDA call; returns nerfacc's compiled module

The renderer calls it when it first uses the occupancy grid on CUDA (the only nerfacc kernels the
project uses); it is cheap after the first call.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from trainers.node_lock import node_lock

BACKEND = "nerfacc.cuda._backend"
_BUILT: dict[str, Any] = {}


def build_lock_path() -> Path:
    """The lock beside nerfacc's build folder (not inside it: nerfacc takes a non-empty folder for a
    finished build). The folder is per user, Python and CUDA version, as torch's extensions are."""
    from torch.utils.cpp_extension import _get_build_directory

    build_dir = Path(_get_build_directory("nerfacc_cuda", verbose=False))
    return build_dir.with_name(build_dir.name + ".dreamsweep-build.lock")


def import_backend() -> Any:
    """nerfacc's own first import of its CUDA backend (builds it when no build is there)."""
    return importlib.import_module(BACKEND)._C


def ensure_nerfacc_cuda(
    build: Callable[[], Any] = import_backend,
    lock_path: Path | None = None,
    timeout_s: float = 1800.0,
    poll_s: float = 0.5,
    log: Callable[[str], None] | None = None,
) -> Any:
    """Run `build` (nerfacc's first backend import) once per process, one process per node at a time.

    Waits up to `timeout_s` for another process's build, then raises TimeoutError naming its pid."""
    if "result" in _BUILT:
        return _BUILT["result"]
    if build is import_backend and BACKEND in sys.modules:  # imported before this was first called
        _BUILT["result"] = sys.modules[BACKEND]._C
        return _BUILT["result"]
    with node_lock(lock_path or build_lock_path(), "nerfacc's CUDA build", timeout_s, poll_s, log):
        result = build()
    _BUILT["result"] = result
    return result
