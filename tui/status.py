"""The status bar: open file, unsaved marker, validity, run state and watch mode."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from rich.text import Text
from textual.widgets import Static


@dataclass
class Status:
    path: Path | None = None
    dirty: bool = False
    problems: int | None = None  # None: not validated yet
    run: str = "idle"  # idle | running | cancelling | ok | failed | cancelled
    run_note: str = ""
    watching: bool = False


def _gap(out: Text, n: int = 2) -> None:
    """Spaces as their own segment (SVG renderers trim spaces that lead a run of text)."""
    out.append(" " * n, style="dim")


def status_text(s: Status) -> Text:
    out = Text()
    out.append(" fluxkiln ", style="bold reverse")
    _gap(out, 1)
    if s.path is None:
        out.append("no recipe open — ctrl+o open, ctrl+n new", style="dim")
        return out
    try:
        name = os.path.relpath(s.path)
    except ValueError:
        name = str(s.path)
    out.append(name if not name.startswith("../..") else str(s.path), style="bold")
    if s.dirty:
        _gap(out, 1)
        out.append("● unsaved", style="bold yellow")
    _gap(out)
    if s.problems is None:
        out.append("checking…", style="dim")
    elif s.problems:
        out.append(f"✗ {s.problems} problem{'s' if s.problems != 1 else ''}", style="bold red")
    else:
        out.append("✓ valid", style="green")
    style = {"running": "bold yellow", "cancelling": "bold magenta", "ok": "bold green", "failed": "bold red",
             "cancelled": "magenta"}.get(s.run, "dim")
    _gap(out)
    out.append("run:")
    _gap(out, 1)
    out.append(s.run + (f" {s.run_note}" if s.run_note else ""), style=style)
    _gap(out)
    out.append("watch:")
    _gap(out, 1)
    out.append("ON" if s.watching else "off", style="bold cyan" if s.watching else "dim")
    return out


class StatusBar(Static):
    """One line at the top of the main screen."""

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__("", id=id, markup=False)
        self.status = Status()

    def set(self, **changes: object) -> None:
        for key, value in changes.items():
            setattr(self.status, key, value)
        self.update(status_text(self.status))
