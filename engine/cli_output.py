"""Terminal observers for the CLI: Rich progress bars and messages, or a JSON-lines stream.

Both are ordinary ``on_event`` observers registered for the run, the same
mechanism the TUI and third-party loggers use.
"""

from __future__ import annotations

import sys
import threading
from typing import Any, TextIO

from .events import Event
from .hookspecs import hookimpl


class JsonObserver:
    """Prints one JSON object per event on stdout."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stdout
        self._lock = threading.Lock()

    @hookimpl
    def on_event(self, event: Event) -> None:
        with self._lock:
            self.stream.write(event.to_json() + "\n")
            self.stream.flush()


class ConsoleObserver:
    """Human output: a line per node, progress bars for long work, errors with hints."""

    def __init__(self, console: Any = None, quiet: bool = False) -> None:
        from rich.console import Console

        self.console = console or Console(stderr=True, highlight=False)
        self.quiet = quiet
        self._progress: Any = None
        self._tasks: dict[str, Any] = {}

    def _bar(self) -> Any:
        if self._progress is None:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(TextColumn("  {task.description}"), BarColumn(), MofNCompleteColumn(),
                                      TextColumn("{task.fields[metrics]}"), TimeRemainingColumn(),
                                      console=self.console, transient=True)
            self._progress.start()
        return self._progress

    def _stop_bar(self, node: str | None) -> None:
        """Remove a node's bar; the live display itself ends with the run (``node=None``)."""
        if self._progress is not None and node in self._tasks:
            self._progress.remove_task(self._tasks.pop(node))
        if self._progress is not None and node is None:
            self._progress.stop()
            self._progress = None

    def _print(self, text: str) -> None:
        from rich.markup import escape

        self.console.print(escape(text) if "[" in text else text, soft_wrap=True)

    @hookimpl
    def on_event(self, event: Event) -> None:
        d = event.data
        name = event.event
        if name == "run_waiting":
            self._print(f"fluxkiln: {d['message']}")
        elif name == "run_started":
            self._print(f"fluxkiln: running recipe '{d['name']}' -> {d['run_dir']}")
        elif name == "node_started":
            self._print(f"▶ {event.node} ({event.type}): {d.get('reason', '')}")
        elif name == "node_cached":
            if not self.quiet:
                self._print(f"✓ {event.node} ({event.type}): cached ({d.get('source')})")
        elif name == "node_progress":
            self._on_progress(event)
        elif name == "node_log":
            self._print(f"  {event.node}: {d.get('message', '')}")
        elif name == "node_finished":
            self._stop_bar(event.node)
            arts = d.get("artifacts") or []
            extra = f", wrote {len(arts)} file(s)" if arts else ""
            self._print(f"✓ {event.node} ({event.type}): done in {d.get('seconds', 0):.2f} s{extra}")
        elif name == "node_failed":
            self._stop_bar(event.node)
            self._failed(event)
        elif name == "node_skipped":
            self._print(f"- {event.node} ({event.type}): skipped, {d.get('reason', '')}")
        elif name == "node_cancelled":
            self._stop_bar(event.node)
            self._print(f"■ {event.node} ({event.type}): cancelled")
        elif name == "run_finished":
            self._stop_bar(None)
            counts: dict[str, int] = {}
            for state in d["nodes"].values():
                counts[state] = counts.get(state, 0) + 1
            summary = ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
            self._print(f"fluxkiln: {d['status']} in {d['seconds']:.2f} s ({summary}); outputs in {d['run_dir']}")

    def _on_progress(self, event: Event) -> None:
        d = event.data
        total = d.get("total")
        if not total:
            return
        bar = self._bar()
        metrics = " ".join(f"{k}={v:.4g}" for k, v in (d.get("metrics") or {}).items())
        if event.node not in self._tasks:
            self._tasks[event.node] = bar.add_task(f"{event.node}", total=total, metrics=metrics)
        bar.update(self._tasks[event.node], completed=d.get("step", 0), total=total, metrics=metrics)

    def _failed(self, event: Event) -> None:
        d = event.data
        self._print(f"✗ {event.node} ({event.type}, plugin {d.get('plugin')}) failed: {d.get('error_type')}: {d.get('error')}")
        if d.get("inputs"):
            self._print("  inputs: " + ", ".join(f"{k}={v}" for k, v in d["inputs"].items()))
        if d.get("where"):
            self._print(f"  at {d['where']}")
        if d.get("hint"):
            self._print(f"  hint: {d['hint']}")
