"""Starting many workers: ``--gpus N`` through PyTorch's elastic launcher, and what each rank then does.

``fluxkiln run RECIPE --gpus N`` (and ``watch``) starts N copies of the same
command with ``torch.distributed.launcher`` (what ``torchrun`` uses), without
the launch options.  A process that finds ``WORLD_SIZE`` > 1 in its
environment (set by that launcher, ``torchrun`` or ``accelerate launch``)
joins the process group: rank 0 runs the command with an
:class:`~.follow.OwnerEngine`, the others serve as :class:`~.follow.Worker`.
On a machine without CUDA the workers are CPU processes talking over gloo.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from . import distributed as dist

LAUNCH_FLAGS = {"--gpus": 1, "--procs": 1, "--nnodes": 1, "--rdzv-endpoint": 1, "--rdzv-id": 1}


def add_launch_args(p: argparse.ArgumentParser) -> None:
    """The ``run`` / ``watch`` options that start several workers."""
    p.add_argument("--gpus", "--procs", dest="gpus", type=int, default=None, metavar="N",
                   help="start N workers on this machine (one per GPU; CPU processes with gloo where there is "
                        "no GPU) through PyTorch's elastic launcher")
    p.add_argument("--nnodes", type=int, default=1, metavar="M",
                   help="with --gpus: hosts taking part (start the same command on each; needs --rdzv-endpoint)")
    p.add_argument("--rdzv-endpoint", metavar="HOST:PORT",
                   help="with --nnodes > 1: the rendezvous address every host can reach (e.g. the first host)")
    p.add_argument("--rdzv-id", default="fluxkiln", metavar="ID", help="rendezvous id shared by the hosts of one run")


def make_engine(registry: Any = None) -> Any:
    """The engine for this process: an :class:`~.follow.OwnerEngine` on rank 0 of several, else an Engine."""
    if dist.current().many:
        from .follow import OwnerEngine

        return OwnerEngine(registry)
    from .runner import Engine

    return Engine(registry)


def route(args: argparse.Namespace, argv: list[str], command: Callable[[argparse.Namespace], int]) -> int:
    """Run ``command`` as this process's part: launch workers, serve as a worker, or just run it."""
    launched = dist.from_env().many
    if not launched and (args.gpus is not None or args.nnodes != 1):
        return launch(args, argv)
    if not launched:
        return command(args)
    signal.signal(signal.SIGINT, GATE)  # from here on a Ctrl-C is never lost, even before the run starts
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # one that came while starting arrives now
    try:
        world = dist.init(timeout_s=7 * 24 * 3600.0 if args.command == "watch" else None)
        code = _own(args, command) if world.owner else _serve()
    except KeyboardInterrupt:  # a second Ctrl-C: abort now (the launcher stops the other ranks)
        _abort()
        raise
    finally:
        dist.shutdown()
    _leave(code)
    return code


def _leave(code: int) -> None:
    """End a worker process of a launched run now that its work is done and the process group is left,
    without the interpreter's teardown: torch.distributed's C++ threads (gloo, the rendezvous store) racing
    the static destructors there can abort the process ("terminate called without an active exception",
    SIGABRT) after a run that ended well."""
    if not writes_at_exit():
        exit_now(code)


WRITES_AT_EXIT = ("wandb", "coverage")


def writes_at_exit() -> bool:
    """True when a loaded library writes its data in the interpreter's teardown (W&B, coverage)."""
    return any(name in sys.modules for name in WRITES_AT_EXIT)


def exit_now(code: int) -> None:
    """End the process with ``code`` at once, without the interpreter's teardown: logging and the standard
    streams are flushed first; ``atexit`` handlers do not run."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(code)


def _own(args: argparse.Namespace, command: Callable[[argparse.Namespace], int]) -> int:
    try:
        code = command(args)
        if GATE.aborted:  # the other ranks may be inside a collective: leave without another one
            _abort()
        dist.broadcast({"op": "exit"})
        return code
    except RuntimeError as exc:  # a collective failed: another rank is gone
        print(f"fluxkiln: rank 0 lost contact with the other workers ({str(exc).splitlines()[0]})",
              file=sys.stderr)
        return 1


def _abort() -> None:
    """Leave at once with the interrupted exit code, without the collectives of a clean shutdown."""
    exit_now(130)


def _serve() -> int:
    from . import paths
    from .follow import Worker
    from .registry import Registry

    worker = Worker(Registry.load(), paths.cache_root())
    GATE.bind(worker.cancel.set)
    return worker.serve()


class SigintGate:
    """Ctrl-C for a run of several processes, at any moment of its life.

    The first SIGINT calls the bound ``cancel`` (stop at the next safe point); one that arrives before
    anything is bound (the process is still joining the group or loading the registry) is kept and
    delivered by :meth:`bind`.  A repeat within ``window`` seconds is the same Ctrl-C forwarded by a
    launcher (``torchrun`` sends it to its workers as the terminal does) and is ignored; a later one
    raises KeyboardInterrupt (abort now) and marks the gate ``aborted``.
    """

    def __init__(self, window: float = 2.0) -> None:
        self.window = window
        self.count = 0
        self.at = 0.0
        self.pending = False
        self.aborted = False
        self._cancel: Callable[[], None] | None = None

    def __call__(self, signum: int = signal.SIGINT, frame: Any = None) -> None:
        import time

        now = time.monotonic()
        if self.count and now - self.at < self.window:
            return
        self.count += 1
        self.at = now
        if self.count > 1:
            self.aborted = True
            raise KeyboardInterrupt
        if self._cancel is None:
            self.pending = True
        else:
            self._cancel()

    def bind(self, cancel: Callable[[], None]) -> None:
        """Where the first Ctrl-C goes from now on (delivered at once if one already came)."""
        self._cancel = cancel
        if self.pending:
            self.pending = False
            cancel()


GATE = SigintGate()


def strip_launch_args(argv: list[str]) -> list[str]:
    """``argv`` without the launch options (the workers must not launch again)."""
    out: list[str] = []
    skip = 0
    for item in argv:
        if skip:
            skip -= 1
            continue
        name = item.split("=", 1)[0]
        if name in LAUNCH_FLAGS:
            skip = 0 if "=" in item else LAUNCH_FLAGS[name]
            continue
        out.append(item)
    return out


def _check(args: argparse.Namespace) -> str | None:
    if args.gpus is None or args.gpus < 1:
        return "--gpus N needs N >= 1 (workers on this host)"
    if args.nnodes < 1:
        return "--nnodes needs at least 1"
    if args.nnodes > 1 and not args.rdzv_endpoint:
        return "--nnodes > 1 needs --rdzv-endpoint HOST:PORT (an address of the first host every host can reach)"
    return None


def _gpu_shortage(nproc: int) -> str | None:
    """Why ``nproc`` workers cannot each have a GPU of this host (None when they can, or when there is no GPU:
    then the workers are CPU processes talking over gloo)."""
    import torch

    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if visible == 0 or nproc <= visible:
        return None
    shown = os.environ.get("CUDA_VISIBLE_DEVICES")
    where = f" (CUDA_VISIBLE_DEVICES={shown!r})" if shown is not None else ""
    return (f"--gpus {nproc} starts one worker per GPU, but this host has {visible} visible CUDA GPU"
            f"{'s' if visible > 1 else ''}{where}: use --gpus {visible} or fewer, or hide the GPUs to run {nproc} "
            f"CPU workers with gloo (CUDA_VISIBLE_DEVICES= fluxkiln ... --gpus {nproc})")


def launch(args: argparse.Namespace, argv: list[str]) -> int:
    """Start ``--gpus`` workers (per host) running this command; report a failed rank by number."""
    problem = _check(args) or _gpu_shortage(args.gpus)
    if problem:
        print(f"fluxkiln {args.command}: {problem}", file=sys.stderr)
        return 2
    return launch_workers(args.gpus, strip_launch_args(argv), nnodes=args.nnodes, endpoint=args.rdzv_endpoint,
                          rdzv_id=args.rdzv_id)


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity, which a container or ``taskset`` narrows)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def worker_threads(env: Mapping[str, str], cuda: bool, nproc: int, cpus: int) -> str | None:
    """``OMP_NUM_THREADS`` for each of ``nproc`` workers on this host, or None when the user set it.

    Left alone, every worker's intra-op pool would take all ``cpus``: N pools on one host, their threads
    spinning between parallel regions, steal the CPU time the workers need to launch GPU work.  GPU workers
    get 1 (as ``torchrun`` gives them: their compute is on the GPU); CPU workers (gloo) share the CPUs.
    """
    if "OMP_NUM_THREADS" in env:
        return None
    return "1" if cuda else str(max(1, cpus // max(1, nproc)))


def launch_workers(nproc: int, argv: list[str], *, nnodes: int = 1, endpoint: str | None = None,
                   rdzv_id: str = "fluxkiln") -> int:
    """Run ``python -m fluxkiln.engine.cli ARGV`` (the ``fluxkiln`` command) in ``nproc`` workers per host
    (``nnodes`` hosts) and wait for them.

    Returns 0, 130 when interrupted, or 1 after naming the rank that failed.
    """
    import torch
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    threads = worker_threads(os.environ, torch.cuda.is_available(), nproc, usable_cpus())
    if threads is not None:
        os.environ["OMP_NUM_THREADS"] = threads
    for name in [n for n in logging.root.manager.loggerDict if n.startswith("torch.distributed.elastic")]:
        logging.getLogger(name).setLevel(logging.CRITICAL)  # fluxkiln reports a failed or stopped rank itself
    config = LaunchConfig(min_nodes=nnodes, max_nodes=nnodes, nproc_per_node=nproc,
                          run_id=rdzv_id if nnodes > 1 else uuid.uuid4().hex,
                          rdzv_backend="c10d", rdzv_endpoint=endpoint or "localhost:0",
                          max_restarts=0, monitor_interval=0.2)
    # the workers run in sessions of their own: Ctrl-C reaches this launcher, which forwards SIGINT once to
    # every worker and gives them 30 s to stop at a safe point (training checkpoints first) before killing them
    try:
        with _sigint_held_for_children():
            elastic_launch(config, sys.executable)("-m", "fluxkiln.engine.cli", *argv)
    except ChildFailedError as exc:
        return _report(exc.failures)
    except SignalException as exc:
        print(f"fluxkiln: stopped ({exc.sigval.name})", file=sys.stderr)
        return 130 if exc.sigval == signal.SIGINT else 1
    return 0


@contextlib.contextmanager
def _sigint_held_for_children() -> Iterator[None]:
    """Start the workers with SIGINT blocked: a Ctrl-C reaching one while its interpreter still starts then
    waits (pending) until :func:`route` has put the gate in place, instead of killing it half-started.

    The signal mask is inherited across fork and exec, so the main thread (which spawns the workers) blocks
    SIGINT; a helper thread started before keeps it unblocked, so this launcher still hears Ctrl-C (the
    kernel hands a process's signal to a thread that does not block it; Python runs the handler on the
    main thread, which the elastic agent's monitor loop reaches every few tenths of a second).
    """
    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        yield
        return
    done = threading.Event()
    listener = threading.Thread(target=done.wait, name="fluxkiln-sigint", daemon=True)
    listener.start()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
        done.set()


def _report(failures: dict[int, Any]) -> int:
    """Exit 130 when every failed rank was interrupted, else name the rank that died first and exit 1."""
    stopped = (130, -signal.SIGINT)
    if all(f.exitcode in (*stopped, -signal.SIGTERM) for f in failures.values()) and \
            any(f.exitcode in stopped for f in failures.values()):
        return 130  # interrupted; a rank still finishing was stopped by the launcher

    def cause(f: Any) -> str:
        if f.exitcode < 0:
            try:
                return f"was killed by {signal.Signals(-f.exitcode).name}"
            except ValueError:
                return f"was killed by signal {-f.exitcode}"
        return f"exited with code {f.exitcode}"

    def order(item: tuple[int, Any]) -> tuple[int, int]:  # killed first, then errors, then SIGTERMed by the launcher
        f = item[1]
        killed = f.exitcode < 0 and f.exitcode not in (-signal.SIGTERM, -signal.SIGINT)
        return (0 if killed else 1 if f.exitcode > 0 and f.exitcode != 130 else 2, item[0])

    rank, first = min(failures.items(), key=order)
    others = ", ".join(f"rank {r} {cause(f)}" for r, f in sorted(failures.items()) if r != rank)
    print(f"fluxkiln: worker rank {rank} (pid {first.pid}) {cause(first)}; the run failed and every worker was "
          f"stopped{'; ' + others if others else ''}. Finished results stay cached; nothing of the failed node "
          "was stored.", file=sys.stderr)
    return 1
