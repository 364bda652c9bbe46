"""Small question dialogs: quit with unsaved changes, open another recipe, disk changes, overwrite.

Each is a :class:`ChoiceDialog` that dismisses with the id of the button pressed
(escape gives the safe answer).  The safe button has the focus, so an Enter
typed by reflex never writes or throws anything away.
"""

from __future__ import annotations

from dataclasses import dataclass

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Footer, Label


@dataclass(frozen=True)
class Choice:
    """One button: the answer it gives, its label and its variant."""

    answer: str
    label: str
    variant: str = "default"


class ChoiceDialog(ModalScreen[str]):
    """A question with buttons; the ``safe`` answer has the focus and is what escape gives."""

    BINDINGS = [Binding("escape", "close", "close")]

    def __init__(self, title: str, message: str, choices: list[Choice], safe: str) -> None:
        super().__init__()
        self.title_text, self.message, self.choices, self.safe = title, message, choices, safe

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog choice"):
            yield Label(Text(self.title_text, style="bold"), classes="dialog-title")
            if self.message:
                yield Label(Text(self.message), classes="dialog-message")
            with Horizontal(classes="buttons"):
                for c in self.choices:
                    yield Button(c.label, variant=c.variant, id=c.answer)  # type: ignore[arg-type]
        yield Footer(compact=True)

    def on_mount(self) -> None:
        self.query_one(f"#{self.safe}", Button).focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        self.dismiss(str(event.button.id))

    def action_close(self) -> None:
        self.dismiss(self.safe)


def confirm_quit() -> ChoiceDialog:
    return ChoiceDialog("The recipe has unsaved changes.", "Quit anyway?", [
        Choice("save", "Save and quit", "primary"), Choice("discard", "Quit without saving", "error"),
        Choice("stay", "Stay")], safe="stay")


def confirm_open(name: str) -> ChoiceDialog:
    return ChoiceDialog("The recipe has unsaved changes.", f"Save them before opening {name}?", [
        Choice("save", "Save", "primary"), Choice("discard", "Discard", "error"), Choice("cancel", "Cancel")],
        safe="cancel")


def disk_conflict(name: str) -> ChoiceDialog:
    return ChoiceDialog(f"{name} changed on disk.",
                        "You have unsaved edits. Reload the file from disk (your edits are lost), or keep yours "
                        "(runs use the text in the editor; saving asks before overwriting).",
                        [Choice("reload", "Reload from disk", "warning"), Choice("keep", "Keep mine", "primary")],
                        safe="keep")


def confirm_overwrite(name: str) -> ChoiceDialog:
    return ChoiceDialog(f"{name} changed on disk since it was opened or saved here.",
                        "Saving replaces that change with the editor's text.",
                        [Choice("overwrite", "Overwrite", "error"), Choice("cancel", "Cancel")], safe="cancel")
