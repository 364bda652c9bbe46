"""The node-type browser: every registered node type with its `fluxkiln nodes` documentation."""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Footer, OptionList, Static
from textual.widgets.option_list import Option

from fluxkiln.engine.docs import node_rich


class NodeTypeBrowser(ModalScreen[None]):
    """Node types on the left, the highlighted one's documentation on the right."""

    BINDINGS = [Binding("escape,f2", "close", "close")]

    def __init__(self, registry: Any, selected: str | None = None) -> None:
        super().__init__()
        self.registry = registry
        self.names = sorted(registry.node_types)
        self.selected = selected if selected in registry.node_types else (self.names[0] if self.names else None)

    def compose(self) -> ComposeResult:
        with Horizontal(id="nodetypes", classes="dialog"):
            yield OptionList(*[Option(Text(n), id=n) for n in self.names], id="type-list")
            with VerticalScroll(id="type-doc"):
                yield Static(self._doc(self.selected), id="type-doc-body")
        yield Footer(compact=True)

    def _doc(self, name: str | None) -> Any:
        if name is None:
            return Text("no node types are registered", style="dim")
        failed = self.registry.failed_plugins()
        doc = node_rich(self.registry.node_types[name])
        if failed:
            from rich.console import Group

            note = Text("plugins that failed to load: " + ", ".join(f"{p.name} ({p.error})" for p in failed),
                        style="red")
            return Group(doc, note)
        return doc

    def on_mount(self) -> None:
        if self.selected:
            opts = self.query_one("#type-list", OptionList)
            opts.highlighted = self.names.index(self.selected)
            opts.focus()

    def on_option_list_option_highlighted(self, event: OptionList.OptionHighlighted) -> None:
        self.selected = str(event.option.id)
        self.query_one("#type-doc-body", Static).update(self._doc(self.selected))

    def action_close(self) -> None:
        self.dismiss(None)
