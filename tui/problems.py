"""The problem list under the editor: every validation problem, each with its line.

The first problem is highlighted; Enter (or a click) on a problem moves the editor to its line.  Problem text comes from the
recipe (node ids, values, file names) and is shown as plain text, never markup.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rich.text import Text
from textual.message import Message
from textual.widgets import OptionList
from textual.widgets.option_list import Option


def problem_text(problem: Any) -> Text:
    """One problem as styled plain text: ``line 12  node 'x' key 'y': message (hint)``."""
    out = Text()
    out.append(f"line {problem.line:<4}" if problem.line else "        ", style="bold red")
    where = []
    if problem.node is not None:
        where.append(f"node '{problem.node}'")
    if problem.key is not None:
        where.append(f"key '{problem.key}'")
    if where:
        out.append(" ".join(where) + ": ", style="bold")
    out.append(problem.message)
    if problem.hint:
        out.append(f"  ({problem.hint})", style="dim")
    return out


class ProblemList(OptionList):
    """Lists validation problems; hidden when there are none."""

    @dataclass
    class GotoLine(Message):
        """The user picked a problem located at ``line``."""

        line: int

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.problems: list[Any] = []
        self.border_title = "Problems"

    def show(self, problems: list[Any]) -> None:
        self.problems = list(problems)
        self.clear_options()
        self.add_options(Option(problem_text(p), id=str(i)) for i, p in enumerate(self.problems))
        self.border_title = f"{len(self.problems)} problem{'s' if len(self.problems) != 1 else ''}"
        self.display = bool(self.problems)
        if self.problems:
            self.highlighted = 0

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        event.stop()
        problem = self.problems[int(event.option.id or 0)]
        if problem.line:
            self.post_message(self.GotoLine(problem.line))
