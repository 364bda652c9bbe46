"""The graph panel: the recipe's nodes in execution order with type, state and reason."""

from __future__ import annotations

from dataclasses import dataclass

from rich.text import Text
from textual.binding import Binding
from textual.message import Message
from textual.widgets import DataTable

from .state import NodeInfo, RunModel

STATE_STYLE = {
    "pending": ("○", "dim"), "cached": ("◎", "cyan"), "running": ("▶", "bold yellow"),
    "done": ("✓", "bold green"), "failed": ("✗", "bold red"), "skipped": ("–", "dim"),
    "cancelled": ("■", "magenta"),
}
COLUMNS = ("state", "node", "type", "reason")


def state_text(info: NodeInfo) -> Text:
    icon, style = STATE_STYLE.get(info.state, ("?", ""))
    label = info.state
    if info.state == "running" and info.total:
        label = f"{info.state} {100 * (info.step or 0) // info.total}%"
    return Text(f"{icon} {label}", style=style)


def reason_text(info: NodeInfo) -> Text:
    if info.state == "failed" and info.error:
        return Text(str(info.error.get("error", "")), style="red")
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

    BINDINGS = [Binding("f", "force", "Force rerun node")]

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

    @property
    def selected(self) -> str | None:
        if not self._ids or self.cursor_row is None or not 0 <= self.cursor_row < len(self._ids):
            return None
        return self._ids[self.cursor_row]

    def _column_widths(self) -> tuple[int, ...]:
        nodes = self._model.nodes.values()
        node_w = max([4] + [len(n.id) for n in nodes])
        type_w = max([4] + [len(n.type) for n in nodes])
        state_w = 14 if self.scrollable_content_region.width >= 50 else 11
        used = state_w + node_w + type_w + 2 * self.cell_padding * len(COLUMNS)
        return state_w, node_w, type_w, max(8, self.scrollable_content_region.width - used - 1)

    def _rebuild(self) -> None:
        keep = self.selected
        self.clear(columns=True)
        self._widths = self._column_widths()
        for col, width in zip(COLUMNS, self._widths):
            self.add_column(col.capitalize(), key=col, width=width)
        self._ids = list(self._model.nodes)
        for info in self._model.nodes.values():
            self.add_row(*self._cells(info), key=info.id)
        if keep in self._ids:
            self.move_cursor(row=self._ids.index(keep))

    def on_resize(self) -> None:
        if self._column_widths() != self._widths:
            self._rebuild()

    def show(self, model: RunModel) -> None:
        """Render the model, rebuilding the rows only when the node list or widths changed."""
        self._model = model
        if list(model.nodes) != self._ids or self._column_widths() != self._widths:
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
        for col, value in zip(COLUMNS, self._cells(info)):
            self.update_cell(info.id, col, value)

    def _cells(self, info: NodeInfo) -> tuple[Text, Text, Text, Text]:
        reason_w = self._widths[3] if self._widths else 40
        return state_text(info), Text(info.id, style="bold"), Text(info.type), _fit(reason_text(info), reason_w)

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        event.stop()
        if event.row_key is not None and event.row_key.value is not None:
            self.post_message(self.NodeSelected(str(event.row_key.value)))

    def action_force(self) -> None:
        if self.selected:
            self.post_message(self.ForceRequested(self.selected))
