"""The run context a node receives as its ``ctx`` argument.

It is the node's only door to the engine: report progress, check for
cancellation, log, find its output folder and persistent state folder, reach
the model residency manager, resolve model references and know the device.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import Cancelled
from .events import Event


class RunContext:
    """Everything a running node may ask of the engine."""

    def __init__(self, *, run_id: str, node: str, type: str, run_dir: Path, state_root: Path,
                 emit: Callable[[Event], None], cancel: threading.Event, models: Any,
                 resolver: Callable[[str], str | None], recipe: Any = None, params: dict[str, Any] | None = None,
                 fingerprint: str = "", identity: dict[str, Any] | None = None, plugin: str = "",
                 reason: str = "") -> None:
        self.run_id = run_id
        self.node = node
        self.type = type
        self.run_dir = run_dir
        self.recipe = recipe
        self.params = dict(params or {})
        self.fingerprint = fingerprint
        self.plugin = plugin
        self.reason = reason  # why the node runs: "param `seed` changed", "forced", ...
        self.models = models
        self.artifacts: list[str] = []
        self._state_root = state_root
        self._emit = emit
        self._cancel = cancel
        self._resolver = resolver
        self._identity = identity or {}
        self._started = time.perf_counter()
        self._first_step: tuple[int, float] | None = None  # (step, time) the rate counts from
        self._resumed_from = 0

    @property
    def forced(self) -> bool:
        """True when the user forced this node to run (``--force``, or a node it depends on was forced)."""
        return self.reason.startswith("forced")

    # -------------------------------------------------------------- events
    def _event(self, name: str, data: dict[str, Any], objects: dict[str, Any] | None = None) -> None:
        self._emit(Event(name, self.run_id, self.node, self.type, data, objects or {}))

    def progress(self, step: int, total: int | None = None, *, metrics: dict[str, float] | None = None,
                 preview: Any = None, preview_path: str | Path | None = None, message: str | None = None,
                 resumed: bool = False) -> None:
        """Report progress (``step`` of ``total``), optional metrics (loss, lr) and a preview image.

        ``rate`` (steps per second) and ``eta`` (seconds) in the event count only the steps run in this
        session.  Pass ``resumed=True`` where the work starts or continues at ``step`` (a training resumed
        from a checkpoint, or the end of set-up work): the steps up to ``step`` and the time spent so far
        are then left out of the rate, and the event carries ``resumed_from``.
        """
        now = time.perf_counter()
        elapsed = now - self._started
        data: dict[str, Any] = {"step": step, "total": total, "elapsed": round(elapsed, 3)}
        if resumed:
            self._first_step = (step, now)
            if step > 0:
                self._resumed_from = step
        elif self._first_step is None:  # a node whose first report is past 0: that step took the time so far
            self._first_step = (step - 1 if step > 0 else 0, self._started)
        if self._resumed_from:
            data["resumed_from"] = self._resumed_from
        done = step - self._first_step[0]
        if total and done > 0:
            rate = done / (now - self._first_step[1]) if now > self._first_step[1] else 0.0
            data["rate"] = round(rate, 4)
            data["eta"] = round((total - step) / rate, 2) if rate > 0 else None
        if metrics:
            data["metrics"] = {k: float(v) for k, v in metrics.items()}
        if message:
            data["message"] = message
        if preview_path is not None:
            data["preview_path"] = str(preview_path)
        self._event("node_progress", data, {"preview": preview} if preview is not None else None)

    def log(self, message: str, level: str = "info") -> None:
        """Send a line to the run log (shown by the CLI, the TUI and the JSON stream)."""
        self._event("node_log", {"level": level, "message": str(message)})

    # -------------------------------------------------------------- cancellation
    @property
    def cancelled(self) -> bool:
        """True once the run was asked to stop; long loops should stop at the next safe point."""
        return self._cancel.is_set()

    def check_cancelled(self) -> None:
        """Raise :class:`Cancelled` if the run was asked to stop (call it at safe points)."""
        if self._cancel.is_set():
            raise Cancelled(f"node '{self.node}' cancelled")

    # -------------------------------------------------------------- files
    def node_dir(self) -> Path:
        """This node's folder in the run folder (``runs/<recipe>/<node>/``), created on first use."""
        d = self.run_dir / self.node
        d.mkdir(parents=True, exist_ok=True)
        return d

    def artifact(self, path: str | Path) -> Path:
        """Record a file written for the user; it is listed in ``node_finished``'s artifacts."""
        p = Path(path)
        self.artifacts.append(str(p))
        return p

    def state_dir(self, *ignore: str) -> Path:
        """A persistent folder for this node's resumable state (checkpoints).

        It is keyed by the node's identity without the parameters named in
        ``ignore``, so e.g. ``ctx.state_dir("steps")`` is shared by runs that
        differ only in ``steps`` (raising ``steps`` continues a run).
        """
        ident = {k: v for k, v in self._identity.items() if k != "params"}
        ident["params"] = {k: v for k, v in (self._identity.get("params") or {}).items() if k not in ignore}
        key = hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:24]
        d = self._state_root / f"{self.type}-{key}"
        d.mkdir(parents=True, exist_ok=True)
        return d

    @contextmanager
    def using_state(self, *ignore: str) -> Iterator[Path]:
        """``state_dir(*ignore)``, locked while the block runs (nodes that resume from it should use this).

        Another run resuming the same state (the same node configuration, from any recipe or run folder)
        waits until this one is done, with a message in its log, then continues from what this one left.
        """
        from . import locks

        d = self.state_dir(*ignore)
        with locks.hold(locks.state_lock(d), f"the resumable state of node '{self.node}' ({d})",
                        on_wait=lambda m: self.log(m, "warning"), cancel=self._cancel):
            yield d

    # -------------------------------------------------------------- models / device
    def resolve_model(self, ref: str) -> str | None:
        """Resolve a prefixed model reference (``builtin:tiny-flux``, ``myhub:x``) through plugins."""
        return self._resolver(ref)

    @property
    def device(self) -> str:
        """``"cuda"`` when a GPU is available, else ``"cpu"`` (imports torch on first use)."""
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
