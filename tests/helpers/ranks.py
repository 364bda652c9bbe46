"""Run a function on several local processes (``torch.multiprocessing.spawn``) that meet on a free local port,
and collect what they report: the gloo tests of context parallelism use it."""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any


def spawn_ranks(worker: Callable[..., None], nprocs: int, *args: Any) -> dict[Any, Any]:
    """Call ``worker(rank, port, *args, out)`` in ``nprocs`` processes; returns the shared dict ``out`` they
    filled (the ranks set ``MASTER_ADDR``/``MASTER_PORT`` from ``port`` themselves)."""
    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_rank, args=(worker, port, *args, out), nprocs=nprocs, join=True)
        return dict(out)


def _rank(rank: int, worker: Callable[..., None], *args: Any) -> None:
    """One rank: ``worker``, then out of the process without the interpreter's teardown, as ``fluxkiln run``
    leaves (its fast exit): a gloo rank aborted once in CI with "malloc(): unaligned tcache chunk detected" (a
    heap check inside torch; the log did not say whether during the work or in the teardown after the group was
    destroyed), and the teardown is the part a run never does.  A worker that raises goes back to ``mp.spawn``,
    which reports its traceback; a crash prints every thread's Python stack (faulthandler)."""
    import faulthandler

    from fluxkiln.engine.launch import exit_now

    faulthandler.enable()
    worker(rank, *args)
    exit_now(0)
