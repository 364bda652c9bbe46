"""Which process is compiling a block variant right now, so that two processes never compile the same one at once.

A process about to compile a variant ahead of time (:func:`.precompiled.compile_ahead`) claims it with a
``<key>.pending`` file beside the saved variants, holding its process id, created exclusively; it removes the file
when the variant is saved (or given up).  Another process that needs the same variant — a run whose helper
processes (:mod:`.ahead`) compile it while the model loads, or a second run started meanwhile — finds the claim,
waits for the saved file instead of compiling it too (:func:`wait`), and loads it.  A claim whose process has
died is stale: it is taken over.

Nothing here imports torch.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

POLL_S = 0.05
WAIT_LIMIT_S = 300.0  # never wait longer than this for another process's compilation (then compile here)


def _path(where: Path, key: str) -> Path:
    return where / f"{key}.pending"


def holder(where: Path, key: str) -> int | None:
    """The live process that has claimed ``key`` in ``where``, or None (no claim, or its process is gone)."""
    try:
        pid = int(_path(where, key).read_text().strip() or "0")
    except (OSError, ValueError):
        return None
    return pid if pid > 0 and _alive(pid) else None


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs: it exists and, where ``/proc`` says, has not ended unreaped (a helper that
    crashed stays a zombie until the run that started it reaps it)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's: the cache folder should be ours alone, but it is alive
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


@contextlib.contextmanager
def claim(where: Path, key: str) -> Iterator[bool]:
    """Claim ``key`` for this process while the ``with`` block compiles it; yields False when another live process
    holds it (then do not compile: :func:`wait` for it).  A stale claim (its process died) is taken over."""
    path = _path(where, key)
    mine = False
    for _ in range(2):
        try:
            where.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        except FileExistsError:
            if holder(where, key) is not None:
                break
            with contextlib.suppress(OSError):
                path.unlink()  # stale: its process is gone
            continue
        except OSError:  # a read-only cache: compile without a claim, as before
            mine = True
            break
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        mine = True
        break
    try:
        yield mine
    finally:
        if mine and holder(where, key) == os.getpid():
            with contextlib.suppress(OSError):
                path.unlink()


def wait(where: Path, key: str, limit_s: float = WAIT_LIMIT_S) -> float:
    """Wait while another live process holds a claim on ``key`` (at most ``limit_s``); returns the seconds waited
    (0.0 at once when nobody holds it)."""
    t0 = time.perf_counter()
    while holder(where, key) not in (None, os.getpid()) and time.perf_counter() - t0 < limit_s:
        time.sleep(POLL_S)
    return time.perf_counter() - t0
