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
        mp.spawn(worker, args=(port, *args, out), nprocs=nprocs, join=True)
        return dict(out)
