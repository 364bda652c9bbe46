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
        self._unwritten = 0  # entries added while hidden, not drawn yet

    def add(self, line: Text) -> None:
        """Append a line; it is drawn now if the log is visible, else when it is shown."""
        self.entries.append(line)
        self._unwritten = min(self._unwritten + 1, len(self.entries))
        self.rewrap()

    def on_resize(self, event: Resize) -> None:
        super().on_resize(event)
        self.call_after_refresh(self.rewrap)

    def on_show(self) -> None:
        self.call_after_refresh(self.rewrap)

    def rewrap(self) -> None:
        """Draw new lines, or every kept line again if the width changed (nothing to do while hidden)."""
        width = self.scrollable_content_region.width
        if width <= 0 or not self.display or not self.is_on_screen:
            return
        if width == self._wrapped_at:
            new = list(self.entries)[len(self.entries) - self._unwritten:] if self._unwritten else []
        else:
            self._wrapped_at = width
            self.clear()
            new = list(self.entries)
        self._unwritten = 0
        for line in new:
            self.write(line, scroll_end=False)
        if new:
            self.scroll_end(animate=False, immediate=True)
