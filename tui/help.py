"""The help screen: every key binding, read from the widgets' own binding lists."""

from __future__ import annotations

from typing import Any

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Footer, Label, Static

EDITOR_KEYS = [
    ("ctrl+z / ctrl+y", "undo / redo"),
    ("ctrl+x / ctrl+c / ctrl+v", "cut / copy / paste (ctrl+c cancels instead while a run is going)"),
    ("ctrl+w / ctrl+k", "delete word left / delete to end of line"),
    ("ctrl+a / ctrl+e", "start / end of line"),
    ("alt+z", "soft wrap on / off (on by default)"),
    ("tab / shift+tab", "next / previous panel"),
]


def key_label(key: str) -> str:
    return key.replace("full_stop", ".").replace("comma", ",").replace("question_mark", "?")


def binding_rows(bindings: list[Any]) -> list[tuple[str, str]]:
    """(keys, description) for each Binding (tuples are normalised by Textual elsewhere)."""
    rows = []
    for b in bindings:
        b = b if isinstance(b, Binding) else Binding(*b)
        if b.system:
            continue
        keys = " / ".join(key_label(k.strip()) for k in b.key.split(","))
        desc = b.description or b.action.replace("_", " ")
        rows.append((keys, b.tooltip or desc))
    return rows


def sections(app: Any) -> list[tuple[str, list[tuple[str, str]]]]:
    """The help's sections: title and rows."""
    from .graph import GraphPanel
    from .images import ImagePreview
    from .main import MainScreen

    return [
        ("Everywhere", binding_rows(list(app.BINDINGS))),
        ("Main screen", binding_rows(list(MainScreen.BINDINGS))),
        ("Graph panel (focused)", binding_rows(list(GraphPanel.BINDINGS)) + [("enter", "show the node's details")]),
        ("Image preview (focused)", binding_rows(list(ImagePreview.BINDINGS))),
        ("Problems list (focused)", [("enter", "go to the highlighted problem's line (the first one is "
                                               "highlighted)")]),
        ("Editor", EDITOR_KEYS),
        ("Command palette", [("ctrl+p", "search every action: run, cancel, save, watch, open, new, force, ...")]),
        ("Dialogs", [("escape", "close (the safe answer)"), ("enter", "the focused button")]),
    ]


def help_table(app: Any) -> Table:
    table = Table(show_header=False, box=None, padding=(0, 2), expand=True)
    table.add_column(style="bold cyan", no_wrap=True)
    table.add_column(ratio=1)
    for title, rows in sections(app):
        table.add_row(Text(title, style="bold underline"), "")
        for keys, desc in rows:
            table.add_row(Text(keys), Text(desc))
        table.add_row("", "")
    return table


class HelpScreen(ModalScreen[None]):
    """Lists every key binding; escape, f1, ? or q closes it."""

    BINDINGS = [Binding("escape,f1,question_mark,q", "close", "close")]

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="help", classes="dialog"):
            yield Label(Text("fluxkiln — keys", style="bold"), classes="dialog-title")
            yield Static(help_table(self.app))
        yield Footer(compact=True)

    def action_close(self) -> None:
        self.dismiss(None)
