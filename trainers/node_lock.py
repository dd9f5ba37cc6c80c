"""One process per node at a time: an exclusive file lock for work that workers starting together
would otherwise each do (nerfacc's CUDA build, the first torch.compile of the prior's UNet).

    with node_lock(path, "nerfacc's CUDA build"):
        build()        # the first process builds; the others wait here, then find the build done

flock is released when its holder exits, even by kill -9, so a dead holder never blocks the others.
"""

from __future__ import annotations

import fcntl
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

# Seconds this process waited for each lock (by path), for the start-up benchmarks.
WAITED_S: dict[str, float] = {}


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@contextmanager
def node_lock(
    path: Path,
    what: str,
    timeout_s: float = 1800.0,
    poll_s: float = 0.5,
    log: Callable[[str], None] | None = None,
) -> Iterator[None]:
    """Hold the lock at `path` for the block; wait up to `timeout_s` for another process's `what`,
    saying once whose it is (the holder writes its pid into the file), then raise TimeoutError."""
    log = log or _stderr
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as lock:
        deadline, waited_since = time.monotonic() + timeout_s, None
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if waited_since is None:
                    waited_since = time.monotonic()
                    log(f"waiting for {what} in process {holder(lock)} ({path})")
                if time.monotonic() > deadline:
                    # flock is released when its holder exits, even by kill -9: the work is still going.
                    raise TimeoutError(
                        f"{what} in process {holder(lock)} did not finish within {timeout_s:.0f} s "
                        f"(lock {path}); is that process stuck?"
                    ) from None
                time.sleep(poll_s)
        try:
            lock.seek(0)
            lock.truncate()
            lock.write(str(os.getpid()))
            lock.flush()
            if waited_since is not None:
                WAITED_S[str(path)] = time.monotonic() - waited_since
                log(f"{what}: waited {WAITED_S[str(path)]:.1f} s for another process")
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def holder(lock) -> str:
    lock.seek(0)
    return lock.read().strip() or "unknown"
