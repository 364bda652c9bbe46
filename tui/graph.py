"""The graph panel: the recipe's nodes in execution order with state, type and reason.

The columns are laid out again whenever the panel's width changes: the node id
and state always show in full, the type column goes first when space is short,
and the reason takes what is left (at least ``MIN_REASON`` cells).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from rich.text import Text
from textual.binding import Binding
from textual.message import Message
from textual.widgets import DataTable

from .state import NodeInfo, RunModel, activity, percent

STATE_STYLE = {
    "pending": ("○", "dim"), "cached": ("◎", "cyan"), "running": ("▶", "bold yellow"),
    "done": ("✓", "bold green"), "failed": ("✗", "bold red"), "skipped": ("–", "dim"),
    "cancelled": ("■", "magenta"),
}
COLUMNS = ("state", "node", "type", "reason")
MIN_REASON = 18
STATE_WIDTH = len("■ cancelled")


def state_text(info: NodeInfo) -> Text:
    icon, style = STATE_STYLE.get(info.state, ("?", ""))
    label = info.state
    if info.state == "running" and (pct := percent(info)) is not None:
        label = f"{pct}%"
    return Text(f"{icon} {label}", style=style)


def reason_text(info: NodeInfo, now: float | None = None) -> Text:
    if info.state == "failed" and info.error:
        return Text(str(info.error.get("error", "")), style="red")
    if info.state == "running" and info.step is None:
        return Text(activity(info, time.time() if now is None else now), style="yellow")
    return Text(info.reason or "", style="dim" if info.state in ("cached", "skipped") else "")


def _fit(text: Text, width: int) -> Text:
    if text.cell_len > width:
        text = text.copy()
        text.truncate(max(1, width - 1))
        text.append("…")
    return text


class GraphPanel(DataTable):
    """One row per node; ``f`` reruns the selected node with force.

    The reason column takes the width left over by the others, so the table
    never needs a horizontal scrollbar; the full reason is in the details pane.
    """

    BINDINGS = [Binding("f", "force", "Force rerun node", show=False)]

    @dataclass
    class NodeSelected(Message):
        node: str

    @dataclass
    class ForceRequested(Message):
        node: str

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id, cursor_type="row", zebra_stripes=False)
        self.border_title = "Graph"
        self._ids: list[str] = []
        self._model = RunModel()
        self._widths: tuple[int, ...] = ()
        self._columns: tuple[str, ...] = ()

    @property
    def selected(self) -> str | None:
        if not self._ids or self.cursor_row is None or not 0 <= self.cursor_row < len(self._ids):
            return None
        return self._ids[self.cursor_row]

    def _layout(self) -> tuple[tuple[str, ...], tuple[int, ...]]:
        """The columns that fit the panel's width now, and their widths."""
        nodes = self._model.nodes.values()
        width = self.scrollable_content_region.width
        pad = 2 * self.cell_padding
        node_w = max([4] + [len(n.id) for n in nodes])
        type_w = max([4] + [len(n.type) for n in nodes])
        fixed = STATE_WIDTH + node_w + 3 * pad
        if width - fixed - type_w - pad - 1 >= MIN_REASON:
            return COLUMNS, (STATE_WIDTH, node_w, type_w, width - fixed - type_w - pad - 1)
        return ("state", "node", "reason"), (STATE_WIDTH, node_w, max(MIN_REASON, width - fixed - 1))

    def _rebuild(self) -> None:
        keep = self.selected
        self.clear(columns=True)
        self._columns, self._widths = self._layout()
        for col, width in zip(self._columns, self._widths):
            self.add_column(col.capitalize(), key=col, width=width)
        self._ids = list(self._model.nodes)
        for info in self._model.nodes.values():
            self.add_row(*self._cells(info), key=info.id)
        if keep in self._ids:
            self.move_cursor(row=self._ids.index(keep))

    def on_resize(self) -> None:
        self.call_after_refresh(self.relayout)

    def relayout(self) -> None:
        """Lay the columns out again if the panel's width asks for other columns or widths."""
        if self._layout() != (self._columns, self._widths):
            self._rebuild()

    def show(self, model: RunModel) -> None:
        """Render the model, rebuilding the rows only when the node list or the layout changed."""
        self._model = model
        if list(model.nodes) != self._ids or self._layout() != (self._columns, self._widths):
            self._rebuild()
        else:
            for info in model.nodes.values():
                self.update_node(info)
        self.show_title(model)

    def show_title(self, model: RunModel) -> None:
        summary = ", ".join(f"{n} {s}" for s, n in model.counts().items() if n)
        self.border_title = f"Graph ({summary})" if summary else "Graph"

    def update_node(self, info: NodeInfo) -> None:
        if info.id not in self._ids:
            return
        for col, value in zip(self._columns, self._cells(info)):
            self.update_cell(info.id, col, value)

    def tick(self) -> None:
        """Refresh the elapsed seconds of running nodes that report no steps (e.g. a model loading)."""
        for info in self._model.nodes.values():
            if info.state == "running" and info.step is None:
                self.update_node(info)

    def _cells(self, info: NodeInfo) -> list[Text]:
        cells = {"state": state_text(info), "node": Text(info.id, style="bold"), "type": Text(info.type)}
        reason_w = self._widths[-1] if self._widths else 40
        cells["reason"] = _fit(reason_text(info), reason_w)
        return [cells[c] for c in self._columns or COLUMNS]

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        event.stop()
        if event.row_key is not None and event.row_key.value is not None:
            self.post_message(self.NodeSelected(str(event.row_key.value)))

    def action_force(self) -> None:
        if self.selected:
            self.post_message(self.ForceRequested(self.selected))
