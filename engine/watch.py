"""The watcher: rerun a recipe whenever it, or a file it reads, changes.

Watches folders, not files (editors save by writing a temp file and renaming
it), debounces bursts of events into one rerun, ignores the run's own
outputs, keeps the last valid recipe when an edit is invalid, and cancels a
run in progress at its next safe point when a new change arrives.  Models and
results stay hot in the one :class:`~fluxkiln.engine.runner.Engine`.
"""

from __future__ import annotations

import argparse
import json
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import RecipeInvalid
from .launch import exit_now


class RecipeWatcher:
    """Calls ``on_change(paths)`` once per burst of changes to the watched paths."""

    def __init__(self, on_change: Callable[[set[str]], None], *, debounce: float = 0.3,
                 ignore: list[Path] | None = None) -> None:
        self.on_change = on_change
        self.debounce = debounce
        self.ignore = [p.resolve() for p in (ignore or [])]
        self._targets: set[Path] = set()
        self._folders: set[Path] = set()
        self._pending: set[str] = set()
        self._timer: threading.Timer | None = None
        self._lock = threading.Lock()
        self._observer: Any = None
        self._watches: dict[Path, Any] = {}

    def set_paths(self, paths: set[Path]) -> None:
        """Watch these files and folders (their parent folders are what watchdog observes)."""
        from watchdog.events import FileSystemEventHandler

        handler = self

        class _Handler(FileSystemEventHandler):
            def on_any_event(self, event: Any) -> None:
                if event.event_type in ("opened", "closed_no_write"):
                    return
                for attr in ("src_path", "dest_path"):
                    p = getattr(event, attr, "")
                    if p:
                        handler._seen(Path(p if isinstance(p, str) else p.decode()))

        with self._lock:
            self._targets = {p.resolve() for p in paths}
            folders = {p if p.is_dir() else p.parent for p in self._targets}
        self._start_observer()
        for folder in folders - self._folders:
            if folder.exists():
                self._watches[folder] = self._observer.schedule(_Handler(), str(folder), recursive=folder in self._targets)
        for folder in self._folders - folders:
            watch = self._watches.pop(folder, None)
            if watch is not None:
                self._observer.unschedule(watch)
        self._folders = folders

    def _start_observer(self) -> None:
        if self._observer is None:
            from watchdog.observers import Observer

            self._observer = Observer()
            self._observer.daemon = True
            self._observer.start()

    def _relevant(self, path: Path) -> bool:
        path = path.resolve()
        if any(path == ig or ig in path.parents for ig in self.ignore):
            return False
        return any(path == t or t in path.parents for t in self._targets)

    def _seen(self, path: Path) -> None:
        if not self._relevant(path):
            return
        with self._lock:
            self._pending.add(str(path))
            if self._timer is not None:
                self._timer.cancel()
            self._timer = threading.Timer(self.debounce, self._fire)
            self._timer.daemon = True
            self._timer.start()

    def _fire(self) -> None:
        with self._lock:
            paths, self._pending = self._pending, set()
            self._timer = None
        if paths:
            self.on_change(paths)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
            self._observer = None


def watched_paths(checked: Any) -> set[Path]:
    """The recipe file and every file or folder its nodes read."""
    paths = {Path(checked.recipe.path)} if checked.recipe.path else set()
    for rn in checked.nodes.values():
        paths |= set(rn.files.values())
    return paths


class WatchSession:
    """Runs a recipe, then reruns it on every change until stopped (used by the CLI and tests)."""

    def __init__(self, recipe: str | Path, *, engine: Any = None, overrides: list[str] | None = None,
                 output: str | None = None, observers: list[Any] | None = None, debounce: float = 0.3,
                 say: Callable[[dict[str, Any]], None] | None = None) -> None:
        from .runner import Engine, resolve_run_dir

        self.recipe = Path(recipe).resolve()
        self.engine = engine or Engine()
        self.overrides = overrides or []
        self.output = output
        self.observers = observers or []
        self.say = say or (lambda d: None)
        self.changes: queue.Queue[set[str]] = queue.Queue()
        self.last_valid: Any = None
        self.reruns = 0
        self._resolve_run_dir = resolve_run_dir
        self.watcher = RecipeWatcher(self.changes.put, debounce=debounce,
                                     ignore=[self.engine.cache_root])
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _load(self) -> tuple[Any, bool]:
        """(checked recipe to use, whether the file on disk is valid now)."""
        try:
            checked = self.engine.check(self.recipe, self.overrides)
        except RecipeInvalid as exc:
            self.say({"event": "watch_invalid", "problems": [p.to_dict() for p in exc.problems],
                      "message": "keeping the last valid recipe" if self.last_valid else "waiting for a valid recipe"})
            return self.last_valid, False
        self.last_valid = checked
        run_dir = self._resolve_run_dir(checked.recipe, self.output)
        self.watcher.ignore = [p.resolve() for p in (self.engine.cache_root, run_dir)]
        self.watcher.set_paths(watched_paths(checked))
        return checked, True

    def _run(self, checked: Any) -> Any:
        box: dict[str, Any] = {}

        def target() -> None:
            box["result"] = self.engine.run(checked, output=self.output, observers=self.observers)

        t = threading.Thread(target=target, name="fluxkiln-run", daemon=True)
        self._thread = t
        t.start()
        while t.is_alive():
            t.join(0.05)
            if not self.changes.empty() or self._stop.is_set():
                self.engine.cancel()
        return box.get("result")

    def _next_changes(self) -> set[str]:
        """Wait for the next burst of changes (polling, so that a stop request is seen promptly)."""
        pending: set[str] = set()
        while not self._stop.is_set():
            try:
                pending |= self.changes.get(timeout=0.2)
            except queue.Empty:
                continue
            while not self.changes.empty():
                pending |= self.changes.get_nowait()
            break
        return pending

    @property
    def running(self) -> bool:
        """True while a run's worker thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        """Stop watching; a run in progress stops at its next safe point (``loop`` returns after it)."""
        self._stop.set()
        self.engine.cancel()

    def loop(self, max_runs: int | None = None) -> int:
        """Run, then rerun on changes; return when stopped (or after ``max_runs`` runs)."""
        self.watcher.set_paths({self.recipe})
        checked, run_now = self._load()
        pending: set[str] = set()
        try:
            while not self._stop.is_set():
                if run_now and checked is not None:
                    t0 = time.perf_counter()
                    result = self._run(checked)
                    self.reruns += 1
                    if result is not None:
                        self.say(_summary(result, self.reruns, time.perf_counter() - t0, pending))
                    if max_runs is not None and self.reruns >= max_runs:
                        return 0
                self.say({"event": "watch_waiting", "runs": self.reruns})
                pending = self._next_changes()
                if self._stop.is_set():
                    break
                checked, valid = self._load()
                run_now = valid and bool(pending)
        finally:
            self.watcher.stop()
        return 0


def _summary(result: Any, n: int, seconds: float, changed: set[str]) -> dict[str, Any]:
    ran = [k for k, v in result.nodes.items() if v == "ran"]
    cached = [k for k, v in result.nodes.items() if v == "cached"]
    return {"event": "watch_rerun", "run": n, "status": result.status, "ran": ran, "cached": cached,
            "failed": [k for k, v in result.nodes.items() if v == "failed"], "seconds": round(seconds, 3),
            "changed": sorted(changed)}


def watch_main(args: argparse.Namespace) -> int:
    """``fluxkiln watch RECIPE``."""
    from .cli_output import ConsoleObserver, JsonObserver

    if not Path(args.recipe).is_file():
        from .recipe import load_recipe

        problem = load_recipe(args.recipe)[1][0]  # "not found", with the file the user probably meant
        print(f"fluxkiln watch: {problem.message}" + (f" ({problem.hint})" if problem.hint else ""), file=sys.stderr)
        return 2
    from .launch import make_engine

    observer = JsonObserver() if args.json else ConsoleObserver(quiet=True)

    def say(d: dict[str, Any]) -> None:
        if args.json:
            print(json.dumps(d), flush=True)
        elif d["event"] == "watch_rerun":
            print(f"[watch] run {d['run']}: {d['status']}; ran {', '.join(d['ran']) or 'nothing'}; "
                  f"cached {len(d['cached'])}; {d['seconds']:.2f} s", file=sys.stderr)
        elif d["event"] == "watch_invalid":
            for p in d["problems"]:
                print(_fmt_problem(p), file=sys.stderr)
            print(f"[watch] invalid recipe: {d['message']}", file=sys.stderr)
        elif d["event"] == "watch_waiting":
            print("[watch] waiting for changes (Ctrl-C to stop)", file=sys.stderr)

    session = WatchSession(args.recipe, engine=make_engine(), overrides=args.overrides, output=args.output,
                           observers=[observer], debounce=args.debounce, say=say)
    interrupts = _Interrupts(session)
    old = signal.signal(signal.SIGINT, interrupts.handle)
    try:
        session.loop()
    finally:
        signal.signal(signal.SIGINT, old)
    if interrupts.count:
        # Stopped by Ctrl-C, every run finished at a safe point: exit now.  Interpreter teardown (seconds, with
        # torch loaded) restores the default SIGINT handler, so a second Ctrl-C during it killed the process
        # by signal instead of exiting 130.
        exit_now(130)
    return 0


class _Interrupts:
    """Ctrl-C during ``watch``: the first stops at the next safe point (the run's thread finishes and the
    interpreter exits with no thread inside torch), a second exits at once without unwinding that thread."""

    def __init__(self, session: WatchSession) -> None:
        self.session = session
        self.count = 0

    def handle(self, signum: int, frame: Any) -> None:
        self.count += 1
        if self.count == 1:
            if self.session.running:
                print("\nfluxkiln: stopping at the next safe point (Ctrl-C again to abort now)", file=sys.stderr)
            self.session.stop()
            return
        print("\nfluxkiln: aborted", file=sys.stderr)
        exit_now(130)  # the run thread may be inside native code: never run interpreter teardown under it


def _fmt_problem(d: dict[str, Any]) -> str:
    from .errors import Problem

    return Problem(**d).format()

