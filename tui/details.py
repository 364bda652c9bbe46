"""The node details pane: error and hint (of a failed node), reason, parameters, links and artifacts.

Everything shown is built as Rich ``Text`` (never markup), so a ``[`` in a value,
file name or error message is displayed as typed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text
from textual.containers import VerticalScroll
from textual.widgets import Static

from .graph import state_text
from .state import NodeInfo


def _short_path(path: str) -> str:
    try:
        rel = os.path.relpath(path)
    except ValueError:
        return path
    return rel if not rel.startswith("../..") else path


def _value(v: Any) -> str:
    text = repr(v) if isinstance(v, str) else str(v)
    return text if len(text) <= 200 else text[:197] + "..."


def node_renderable(info: NodeInfo | None) -> Any:
    """What the details pane shows for one node."""
    if info is None:
        return Text("Select a node in the graph to see its parameters, artifacts and last error.", style="dim")
    head = Text.assemble((info.id, "bold"), "  ", (info.type, "cyan"), "  ", state_text(info))
    parts: list[Any] = [head]
    if info.error:
        parts += _error_parts(info.error)
    if info.reason:
        parts.append(Text.assemble(("reason: ", "bold"), info.reason))
    if info.seconds is not None:
        parts.append(Text(f"took {info.seconds:.2f} s"))
    table = Table.grid(padding=(0, 1))
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")
    for key, link in info.links.items():
        table.add_row(Text(key), Text(link, style="yellow"))
    for key, value in info.params.items():
        table.add_row(Text(key), Text(_value(value)))
    if table.row_count:
        parts += [Text("parameters", style="bold underline"), table]
    if info.artifacts:
        parts.append(Text("artifacts", style="bold underline"))
        parts += [Text(_short_path(a)) for a in info.artifacts]
    if info.error and info.error.get("traceback"):
        parts += [Text("traceback", style="bold underline"), Text(str(info.error["traceback"]).rstrip(), style="dim")]
    return Group(*parts)


def _error_parts(err: dict[str, Any]) -> list[Text]:
    """The error and what to try, first thing under the node's name (the traceback goes last)."""
    out = [Text.assemble((f"{err.get('error_type', 'Error')}: ", "bold red"), str(err.get("error", "")))]
    if err.get("hint"):
        out.append(Text.assemble(("try: ", "bold green"), str(err["hint"])))
    if err.get("key"):
        out.append(Text(f"key: {err['key']}"))
    if err.get("where"):
        out.append(Text(f"at {Path(str(err['where'])).name}", style="dim"))
    return out


class NodeDetails(VerticalScroll):
    """Scrollable details of the selected node."""

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self._body = Static(node_renderable(None), markup=False)

    def compose(self):
        yield self._body

    def show(self, info: NodeInfo | None) -> None:
        self._body.update(node_renderable(info))
