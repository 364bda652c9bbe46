"""Many processes, one owner: the world of torch.distributed workers a run spans, and what nodes use of it.

A launcher (``fluxkiln run --gpus N``, ``torchrun``, ``accelerate launch``)
starts one process per GPU (per CPU worker with gloo) and sets ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK``.  Rank 0 owns the recipe, the plan, the
cache, the run folder, the events and the report; the other ranks compute.
A node type that splits its work marks itself with :func:`parallel` and uses
:func:`shard` and :func:`run_shard`; in a world of one process all of this is
a no-op, so the same code serves one GPU, many GPUs and CPU tests with gloo.

torch is imported only when a world of several processes is set up.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from .errors import Cancelled, NodeError

PARALLEL_ATTR = "__fluxkiln_parallel__"
CELLS_ATTR = "__fluxkiln_cells__"
CANCEL_KEY = "fluxkiln/cancel"
DEFAULT_TIMEOUT_S = 1800.0


@dataclass(frozen=True)
class World:
    """Where this process stands: its rank, how many processes there are, its GPU on this host."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def owner(self) -> bool:
        """True on rank 0, the one process that writes the cache, run folder, events and report."""
        return self.rank == 0

    @property
    def many(self) -> bool:
        return self.size > 1


def from_env(env: Mapping[str, str] | None = None) -> World:
    """The world a launcher described in ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` (one process if unset)."""
    env = os.environ if env is None else env
    try:
        size = int(env.get("WORLD_SIZE", "1") or 1)
        rank = int(env.get("RANK", "0") or 0)
        local = int(env.get("LOCAL_RANK", str(rank)) or 0)
    except ValueError as exc:
        raise NodeError(f"RANK / WORLD_SIZE / LOCAL_RANK must be whole numbers ({exc})",
                        hint="start the workers with fluxkiln run --gpus N, torchrun or accelerate launch") from None
    if size < 1 or not 0 <= rank < size:
        raise NodeError(f"RANK {rank} is outside WORLD_SIZE {size}", hint="let the launcher set these variables")
    return World(rank, size, local)


_world = World()


def current() -> World:
    """This process's world (a world of one until :func:`init` joined a larger one)."""
    return _world


NCCL_DEFAULTS = {
    # connect every peer when a communicator starts, not at a collective's first use: a first use inside a CUDA
    # graph recording (context parallelism's whole steps) cannot connect, and a 2-GPU run hung there without this
    "NCCL_RUNTIME_CONNECT": "0",
}


def nccl_defaults(env: dict[str, str] | Any) -> None:
    """Set :data:`NCCL_DEFAULTS` in ``env`` where the user has not set them (NCCL reads them as it starts)."""
    for key, value in NCCL_DEFAULTS.items():
        env.setdefault(key, value)


def init(timeout_s: float | None = None) -> World:
    """Join the process group the launcher described: NCCL for GPUs (gloo beside it for CPU tensors), gloo on CPU."""
    global _world
    world = from_env()
    if not world.many:
        return world
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        if torch.cuda.is_available():
            local = int(os.environ.get("LOCAL_WORLD_SIZE", world.local_rank + 1))
            if local > torch.cuda.device_count():
                raise RuntimeError(
                    f"{local} workers were started on this host but it has {torch.cuda.device_count()} visible CUDA "
                    "GPU(s): start at most one worker per GPU (torchrun --nproc-per-node, accelerate "
                    "--num_processes), or hide the GPUs (CUDA_VISIBLE_DEVICES=) to run CPU workers with gloo")
            torch.cuda.set_device(world.local_rank)
            nccl_defaults(os.environ)
            backend = "cpu:gloo,cuda:nccl"
        else:
            backend = "gloo"
        seconds = timeout_s or float(os.environ.get("FLUXKILN_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))
        dist.init_process_group(backend, timeout=timedelta(seconds=seconds))
    _world = world
    return world


_before_shutdown: list[Callable[[], None]] = []


def before_shutdown(release: Callable[[], None]) -> None:
    """Have ``release`` called (once per registration, even twice registered) before :func:`shutdown` leaves the
    process group: CUDA graphs that recorded collectives must be freed first, or NCCL waits for them forever."""
    if release not in _before_shutdown:
        _before_shutdown.append(release)


def shutdown() -> None:
    """Leave the process group (end of the command), after the :func:`before_shutdown` callbacks."""
    global _world
    while _before_shutdown:
        release = _before_shutdown.pop(0)
        try:
            release()
        except Exception as exc:  # noqa: BLE001 - leaving the group must not be stopped by a failed release
            import warnings

            warnings.warn(f"releasing {getattr(release, '__qualname__', release)} before leaving the process group "
                          f"failed: {type(exc).__name__}: {exc}", RuntimeWarning, stacklevel=2)
    if _world.many:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    _world = World()


# ------------------------------------------------------------------ collectives
def broadcast(obj: Any = None) -> Any:
    """Rank 0's ``obj`` on every rank (pickled; keep it to plain values, images and small tensors)."""
    if not _world.many:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj: Any) -> list[Any] | None:
    """Every rank's ``obj`` in rank order on rank 0; None on the others."""
    if not _world.many:
        return [obj]
    import torch.distributed as dist

    out: list[Any] | None = [None] * _world.size if _world.owner else None
    dist.gather_object(obj, out, dst=0)
    return out


def all_gather(obj: Any) -> list[Any]:
    """Every rank's ``obj`` in rank order, on every rank."""
    if not _world.many:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * _world.size
    dist.all_gather_object(out, obj)
    return out


def any_rank(flag: bool, group: Any = None) -> bool:
    """True on every rank (of ``group``, default all) if ``flag`` is true on any (e.g. to stop together at the same
    step)."""
    if not _world.many:
        return flag
    import torch
    import torch.distributed as dist

    box = torch.tensor([1 if flag else 0], dtype=torch.int32)  # a CPU tensor: gloo, beside NCCL on GPUs
    dist.all_reduce(box, op=dist.ReduceOp.MAX, group=group)
    return bool(box.item())


# ------------------------------------------------------------------ splitting work
def shard(n: int, world: World | None = None) -> range:
    """This rank's contiguous share of ``n`` items; lower ranks take the remainder (rank 0 is never idle)."""
    w = world or _world
    base, extra = divmod(n, w.size)
    start = w.rank * base + min(w.rank, extra)
    return range(start, start + base + (1 if w.rank < extra else 0))


class RankFailed(NodeError):
    """Another rank failed while computing its share."""


def run_shard(work: Callable[[range], list[Any]], n: int, log: Callable[[str], None] | None = None) -> list[Any]:
    """Run ``work(indices)`` on this rank's share of ``n`` items and return all ``n`` results in order on rank 0.

    ``log`` (rank 0) hears how many items each rank made.  Every rank reports ok / cancelled / failed;
    rank 0 raises :class:`RankFailed` naming a rank that failed, or :class:`Cancelled` if any rank was
    cancelled.  Other ranks get their own share back.
    """
    part = shard(n)
    if not _world.many:
        return work(part)
    try:
        mine: tuple[str, Any] = ("ok", work(part))
    except Cancelled:
        mine = ("cancelled", None)
    except Exception as exc:  # noqa: BLE001 - reported to rank 0, which fails the node naming this rank
        mine = ("failed", f"{type(exc).__name__}: {exc}")
    parts = gather(mine)
    if parts is None:  # not rank 0: rank 0 reports the outcome of every rank
        if mine[0] == "cancelled":
            raise Cancelled("cancelled")
        if mine[0] == "failed":
            raise NodeError(mine[1])
        return mine[1]
    for rank, (state, value) in enumerate(parts):
        if state == "failed":
            raise RankFailed(f"rank {rank} of {_world.size} failed: {value}",
                             hint="the other ranks' work was discarded; fix the cause and run again")
    if any(state == "cancelled" for state, _ in parts):
        raise Cancelled("cancelled on another rank")
    if log:
        log(f"{n} item(s) over {_world.size} ranks: " + ", ".join(f"{len(v)} on rank {r}" for r, (_s, v) in
                                                              enumerate(parts)))
    return [item for _state, value in parts for item in value]


def parallel(obj: Any) -> Any:
    """Mark a node function or class as splitting its work across ranks (every rank runs it)."""
    setattr(obj, PARALLEL_ATTR, True)
    return obj


def is_parallel(node_type: Any) -> bool:
    return bool(getattr(node_type.func, PARALLEL_ATTR, False))


def whole_cells(when: Callable[[dict[str, Any]], bool]) -> Callable[[Any], Any]:
    """Mark a parallel node type whose sweep cells may run whole, one rank per cell.

    ``when(inputs)`` (the cell's input values, on rank 0) says whether a cell can: it then runs alone on
    one rank (in a world of one, see :func:`alone`), must write no files and return picklable outputs.
    The cells of a sweep are then dealt out to the ranks instead of splitting each cell's images.
    """
    def mark(obj: Any) -> Any:
        setattr(obj, CELLS_ATTR, when)
        return obj
    return mark


def runs_whole_cells(node_type: Any, inputs: dict[str, Any]) -> bool:
    when = getattr(node_type.func, CELLS_ATTR, None)
    return bool(is_parallel(node_type) and when is not None and when(inputs))


@contextlib.contextmanager
def alone() -> Iterator[World]:
    """Inside: this process acts as a world of one (no collectives), e.g. to make a whole sweep cell."""
    global _world
    saved, _world = _world, World()
    try:
        yield _world
    finally:
        _world = saved


def is_live(node_type: Any, port_types: Mapping[str, Any]) -> bool:
    """A node whose outputs live only in memory (a loaded model): every rank makes its own copy."""
    return node_type.cache == "memory" or any(not port_types[p].disk_cacheable for p in node_type.outputs.values())


# ------------------------------------------------------------------ cancellation
def _store() -> Any:
    if not _world.many:
        return None
    import torch.distributed as dist

    return dist.distributed_c10d._get_default_store()


class CancelFlag(threading.Event):
    """A cancel event shared by every rank through the process group's key-value store.

    ``set()`` on any rank (its SIGINT handler) is seen by ``is_set()`` on every other rank at its
    next safe point; work that needs every rank to stop at the same step agrees on it in a collective.
    """

    def __init__(self) -> None:
        super().__init__()
        self._shared = _store()

    def set(self) -> None:
        super().set()
        if self._shared is not None:
            try:
                self._shared.set(CANCEL_KEY, str(_world.rank))
            except RuntimeError:  # the store went away: the run is ending anyway
                pass

    def is_set(self) -> bool:
        if super().is_set():
            return True
        if self._shared is not None:
            try:
                if self._shared.check([CANCEL_KEY]):
                    super().set()
                    return True
            except RuntimeError:
                return False
        return False

    def clear(self) -> None:
        super().clear()
        if self._shared is not None and _world.owner:
            try:
                self._shared.delete_key(CANCEL_KEY)
            except RuntimeError:
                pass
