"""The Log tab: a RichLog that keeps its lines as text and wraps them again for the width it has.

A plain RichLog renders each line once, at the width it has at that moment; lines
written while its tab is hidden (width 0) would be wrapped at ``min_width`` for
good.  This log renders only while it is visible and re-wraps every line when its
width changes.
"""

from __future__ import annotations

from collections import deque

from rich.text import Text
from textual.events import Resize
from textual.widgets import RichLog


class RunLog(RichLog):
    """The run log; ``add`` a line (plain Rich Text, never markup)."""

    def __init__(self, *, id: str | None = None, max_lines: int = 5000) -> None:
        super().__init__(id=id, markup=False, highlight=False, wrap=True, min_width=1, max_lines=max_lines)
        self.entries: deque[Text] = deque(maxlen=max_lines)
        self._wrapped_at = 0

    def add(self, line: Text) -> None:
        """Append a line; it is drawn now if the log is visible, else when it is shown."""
        self.entries.append(line)
        width = self.scrollable_content_region.width
        if width > 0 and width == self._wrapped_at:
            self.write(line)
        elif width > 0:
            self.rewrap()

    def on_resize(self, event: Resize) -> None:
        super().on_resize(event)
        self.call_after_refresh(self.rewrap)

    def on_show(self) -> None:
        self.call_after_refresh(self.rewrap)

    def rewrap(self) -> None:
        """Render every kept line again at the current width (nothing to do while hidden)."""
        width = self.scrollable_content_region.width
        if width <= 0 or width == self._wrapped_at:
            return
        self._wrapped_at = width
        self.clear()
        for line in self.entries:
            self.write(line, scroll_end=False)
        self.scroll_end(animate=False, immediate=True)
