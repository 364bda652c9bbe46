"""Terminal observers for the CLI: Rich progress bars and messages, or a JSON-lines stream.

Both are ordinary ``on_event`` observers registered for the run, the same
mechanism the TUI and third-party loggers use.
"""

from __future__ import annotations

import os
import sys
import threading
import time
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


def _progress_every() -> float:
    """Seconds between two plain progress lines of one node (``FLUXKILN_PROGRESS_EVERY``, default 5)."""
    try:
        return max(0.0, float(os.environ.get("FLUXKILN_PROGRESS_EVERY", "5")))
    except ValueError:
        return 5.0


def clock(seconds: float | None) -> str:
    """0:01:05 (or -:--:-- when unknown)."""
    if seconds is None or seconds != seconds or seconds < 0:
        return "-:--:--"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def speed(rate: float | None) -> str:
    """Steps per second as 12.3 it/s, or 4.2 s/it when slower than one step a second."""
    if not rate:
        return "-- it/s"
    return f"{rate:.3g} it/s" if rate >= 1 else f"{1 / rate:.3g} s/it"


def progress_text(d: dict[str, Any]) -> str:
    """step/total · rate · ETA · metrics, from a node_progress event's data (the engine's own rate and ETA)."""
    total, step = d.get("total") or 0, d.get("step", 0)
    parts = [f"{step}/{total}" + (f" ({100 * step // total}%)" if total else "")]
    if d.get("rate") is not None:
        parts += [speed(d["rate"]), f"ETA {clock(d.get('eta'))}"]
    if d.get("resumed_from"):
        parts.append(f"resumed at {d['resumed_from']}")
    parts += [f"{k}={v:.4g}" for k, v in (d.get("metrics") or {}).items()]
    return " · ".join(parts)


class ConsoleObserver:
    """Human output: a line per node, progress, warnings set apart, errors with hints.

    In a terminal, progress is a Rich bar per running node, removed when the node ends.  Elsewhere (a pipe,
    a file, nohup, CI) it is a plain line ``node: step/total (pct) · rate · ETA · metrics``, at most one per
    node every ``every`` seconds (``FLUXKILN_PROGRESS_EVERY``, default 5).
    """

    def __init__(self, console: Any = None, quiet: bool = False, *, live: bool | None = None,
                 every: float | None = None, now: Any = time.monotonic) -> None:
        from rich.console import Console

        self.console = console or Console(stderr=True, highlight=False)
        self.quiet = quiet
        self.live = self.console.is_terminal if live is None else live
        self.every = _progress_every() if every is None else every
        self._now = now
        self._progress: Any = None
        self._tasks: dict[str, Any] = {}
        self._ended: set[str] = set()
        self._last_line: dict[str, float] = {}

    def _bar(self) -> Any:
        if self._progress is None:
            from rich.progress import BarColumn, Progress, TextColumn

            self._progress = Progress(TextColumn("  {task.description}"), BarColumn(),
                                      TextColumn("{task.fields[text]}"), console=self.console, transient=True)
            self._progress.start()
        return self._progress

    def _end(self, node: str | None) -> None:
        """A node ended: its bar goes, and the live display stops once no bar is left (nothing is redrawn)."""
        if node is not None:
            self._ended.add(node)
        if self._progress is not None and node in self._tasks:
            self._progress.remove_task(self._tasks.pop(node))
        if self._progress is not None and (node is None or not self._tasks):
            self._progress.stop()
            self._progress = None
            self._tasks.clear()

    def _print(self, text: str, style: str | None = None) -> None:
        from rich.markup import escape

        self.console.print(escape(text), style=style, soft_wrap=True)

    @hookimpl
    def on_event(self, event: Event) -> None:
        d = event.data
        name = event.event
        if name == "run_waiting":
            self._print(f"fluxkiln: {d['message']}")
        elif name == "run_started":
            self._ended.clear()
            self._print(f"fluxkiln: running recipe '{d['name']}' -> {d['run_dir']}")
        elif name == "node_started":
            self._ended.discard(event.node)
            self._print(f"▶ {event.node} ({event.type}): {d.get('reason', '')}")
        elif name == "node_cached":
            self._end(event.node)
            if not self.quiet:
                self._print(f"✓ {event.node} ({event.type}): cached ({d.get('source')})")
        elif name == "node_progress":
            self._on_progress(event)
        elif name == "node_log":
            self._log(event)
        elif name == "node_finished":
            self._end(event.node)
            arts = d.get("artifacts") or []
            extra = f", wrote {len(arts)} file(s)" if arts else ""
            self._print(f"✓ {event.node} ({event.type}): done in {d.get('seconds', 0):.2f} s{extra}")
        elif name == "node_failed":
            self._end(event.node)
            self._failed(event)
        elif name == "node_skipped":
            self._print(f"- {event.node} ({event.type}): skipped, {d.get('reason', '')}")
        elif name == "node_cancelled":
            self._end(event.node)
            self._print(f"■ {event.node} ({event.type}): cancelled")
        elif name == "run_finished":
            self._end(None)
            counts: dict[str, int] = {}
            for state in d["nodes"].values():
                counts[state] = counts.get(state, 0) + 1
            summary = ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
            self._print(f"fluxkiln: {d['status']} in {d['seconds']:.2f} s ({summary}); outputs in {d['run_dir']}")

    def _log(self, event: Event) -> None:
        level = event.data.get("level", "info")
        message = event.data.get("message", "")
        who = event.node if event.node is not None else "fluxkiln"  # no node: about the whole run (the cache)
        if level in ("warning", "error"):
            mark, style = ("⚠", "yellow") if level == "warning" else ("✗", "red")
            self._print(f"  {mark} {who} {level}: {message}", style)
        else:
            self._print(f"  {who}: {message}", "dim" if level == "debug" else None)

    def _on_progress(self, event: Event) -> None:
        d = event.data
        if not d.get("total") or event.node in self._ended:
            return
        if not self.live:
            now = self._now()
            last = self._last_line.get(event.node)
            if last is None or now - last >= self.every:
                self._last_line[event.node] = now
                self._print(f"  {event.node}: {progress_text(d)}")
            return
        bar = self._bar()
        if event.node not in self._tasks:
            self._tasks[event.node] = bar.add_task(f"{event.node}", total=d["total"], completed=d.get("step", 0),
                                                   text=progress_text(d))
        else:
            bar.update(self._tasks[event.node], completed=d.get("step", 0), total=d["total"], text=progress_text(d))

    def _failed(self, event: Event) -> None:
        d = event.data
        self._print(f"✗ {event.node} ({event.type}, plugin {d.get('plugin')}) failed: {d.get('error_type')}: "
                    f"{d.get('error')}", "red")
        if d.get("key"):  # NodeError(key=...): located like a validation error
            self._print(f"  {located_failure(event.node, d)}")
        if d.get("inputs"):
            self._print("  inputs: " + ", ".join(f"{k}={v}" for k, v in d["inputs"].items()))
        if d.get("where"):
            self._print(f"  at {d['where']}")
        if d.get("hint"):
            self._print(f"  hint: {d['hint']}")


def located_failure(node: str | None, data: dict[str, Any]) -> str:
    """A ``node_failed`` event's error as a validation error reads: file:line, node and key (where the node's
    ``NodeError`` named one), then the error."""
    if not data.get("key"):
        return f"node '{node}': {data.get('error')}"
    where = f"{data.get('file') or '<recipe>'}" + (f":{data['line']}" if data.get("line") else "")
    return f"{where}: node '{node}' key '{data['key']}': {data.get('error')}"


def plugins_table(rows: list[dict[str, Any]], console: Any = None) -> None:
    """``fluxkiln plugins``: one row per plugin that fits 80 columns (what it provides wraps), errors below."""
    from rich import box
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = console or Console(highlight=False)
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    table.add_column("plugin", no_wrap=True)
    table.add_column("version", no_wrap=True)
    table.add_column("source", no_wrap=True)
    table.add_column("ms", justify="right", no_wrap=True)
    table.add_column("provides", ratio=1, overflow="fold")
    table.add_column("status", no_wrap=True)
    for r in rows:
        provides = r["node_types"] + [f"port:{p}" for p in r["port_types"]] + [f"command:{c}" for c in r.get("commands", [])]
        table.add_row(escape(r["name"]), escape(r["version"] or ""), escape(r["source"]), f"{r['load_ms']:.0f}",
                      escape(", ".join(provides)), "[red]failed[/red]" if r["error"] else "ok")
    console.print(table)
    for r in rows:
        if r["error"]:
            console.print(f"[red]✗ {escape(r['name'])} failed:[/red] {escape(r['error'])}", soft_wrap=False)
