"""Per-node progress bars: step/total, percent, speed and ETA of every running node.

The percent is the graph's own number (:func:`~fluxkiln.tui.state.percent`), so
the two never disagree; a node without steps yet says what it is doing and for
how long (``loading model… 12 s``).
"""

from __future__ import annotations

import time

from rich.text import Text
from textual.containers import Vertical
from textual.widgets import Label, ProgressBar

from .state import NodeInfo, activity, percent


def format_eta(seconds: float | None) -> str:
    if seconds is None:
        return "--:--"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def format_rate(rate: float | None) -> str:
    if not rate:
        return "-- it/s"
    return f"{rate:.1f} it/s" if rate >= 1 else f"{1 / rate:.1f} s/it"


def stats_text(info: NodeInfo, now: float | None = None) -> Text:
    if info.total:
        text = (f"{info.step or 0}/{info.total} · {percent(info)}% · {format_rate(info.rate)} · "
                f"ETA {format_eta(info.eta)}")
    elif info.step is not None:
        text = f"step {info.step}"
    else:
        text = activity(info, time.time() if now is None else now)
    return Text(text)


def label_text(info: NodeInfo) -> Text:
    out = Text.assemble((info.id, "bold"), ("  ", "dim"), stats_text(info))
    if info.message:
        out.append("  ")
        out.append(info.message, style="dim")
    return out


class NodeProgress(Vertical):
    """One running node: name and numbers, then the bar."""

    def __init__(self, info: NodeInfo) -> None:
        super().__init__(classes="node-progress")
        self.node = info.id
        self._label = Label(label_text(info), classes="progress-label")
        self._bar = ProgressBar(total=None, show_eta=False, show_percentage=False, classes="progress-bar")

    def compose(self):
        yield self._label
        yield self._bar

    def show(self, info: NodeInfo) -> None:
        if info.total:
            self._bar.update(total=info.total, progress=info.step or 0)
        self._label.update(label_text(info))


class ProgressPanel(Vertical):
    """A bar for each running node; hidden when nothing runs."""

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.border_title = "Progress"
        self.bars: dict[str, NodeProgress] = {}

    def on_mount(self) -> None:
        self.display = False

    def show(self, info: NodeInfo) -> None:
        """Add, update or remove the bar of ``info`` according to its state."""
        bar = self.bars.get(info.id)
        if info.state != "running":
            if bar is not None:
                del self.bars[info.id]
                bar.remove()
        elif bar is None:
            bar = self.bars[info.id] = NodeProgress(info)
            self.mount(bar)
            bar.call_after_refresh(bar.show, info)
        else:
            bar.show(info)
        self.display = bool(self.bars)

    def tick(self, nodes: dict[str, NodeInfo]) -> None:
        """Refresh the labels of bars whose node reports no steps yet (their elapsed seconds)."""
        for node, bar in self.bars.items():
            info = nodes.get(node)
            if info is not None and info.step is None:
                bar.show(info)

    def clear(self) -> None:
        for bar in self.bars.values():
            bar.remove()
        self.bars.clear()
        self.display = False
