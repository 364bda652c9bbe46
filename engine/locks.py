"""Locks on shared state on disk: a run folder, and a node's resumable state folder.

Two fluxkiln processes (or two engines in one process) that would write the
same run folder, or resume the same training state, take turns: the second
one says who holds the lock and waits for it (a cancel request stops the
wait).  The locks are OS file locks (``flock``; :mod:`filelock` where there is
no ``fcntl``), so the OS releases them when the holder exits in any way,
``kill -9`` included: a crash never leaves a stale lock behind.  A small ``.owner`` file beside the
lock names the holder for the waiting message; it is informative only.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import Cancelled

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

POLL_SECONDS = 0.2


def _owner_text(lock: Path) -> str:
    try:
        info = json.loads(lock.with_name(lock.name + ".owner").read_text())
        since = time.strftime("%H:%M:%S", time.localtime(info["since"]))
        return f"pid {info['pid']} on {info['host']}, since {since}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another fluxkiln process"


def _write_owner(lock: Path) -> None:
    owner = lock.with_name(lock.name + ".owner")
    tmp = owner.with_name(f".{owner.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    try:
        tmp.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}))
        os.replace(tmp, owner)
    except OSError:  # informative only; a full or read-only disk leaves no temporary file behind
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


@contextmanager
def hold(lock: Path, what: str, *, on_wait: Callable[[str], None] = lambda _m: None,
         cancel: threading.Event | None = None, timeout_s: float | None = None) -> Iterator[None]:
    """Hold the lock file ``lock`` (created with its folder) while the block runs.

    If another process or engine holds it, ``on_wait`` gets one message naming ``what`` and the
    holder, then this waits; when ``cancel`` is set meanwhile, :class:`Cancelled` is raised, and
    after ``timeout_s`` seconds of waiting, :class:`TimeoutError`.
    """
    lock.parent.mkdir(parents=True, exist_ok=True)
    handle = _Flock(lock) if fcntl is not None else _Portable(lock)
    if not handle.try_acquire():
        on_wait(f"{what} is in use by {_owner_text(lock)}; waiting until it is free "
                "(runs of one recipe into one folder, or of one training state, take turns)")
        start = time.monotonic()
        while not handle.try_acquire():
            if cancel is not None and cancel.is_set():
                handle.close()
                raise Cancelled(f"cancelled while waiting for {what}")
            if timeout_s is not None and time.monotonic() - start > timeout_s:
                handle.close()
                raise TimeoutError(f"{what} was still in use by {_owner_text(lock)} after {timeout_s:g} s")
            time.sleep(POLL_SECONDS)
    try:
        _write_owner(lock)
        yield
    finally:
        handle.release()


class _Flock:
    """An exclusive ``flock`` on its own open file (so two engines in one process exclude each other too)."""

    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)

    def try_acquire(self) -> bool:
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def close(self) -> None:
        os.close(self.fd)

    def release(self) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        self.close()


class _Portable:
    """The same through :mod:`filelock` (platforms without ``fcntl``)."""

    def __init__(self, path: Path) -> None:
        from filelock import FileLock

        self.lock = FileLock(path, thread_local=False)

    def try_acquire(self) -> bool:
        from filelock import Timeout

        try:
            self.lock.acquire(timeout=0)
        except Timeout:
            return False
        return True

    def close(self) -> None:
        return None

    def release(self) -> None:
        self.lock.release()


def run_folder_lock(run_dir: Path) -> Path:
    """The lock file of a run folder."""
    return run_dir / ".fluxkiln" / "run.lock"


def state_lock(state_dir: Path) -> Path:
    """The lock file of a node's resumable state folder."""
    return state_dir / ".lock"
