"""The recipe editor: a TextArea with TOML highlighting, an unsaved marker and error lines.

Highlighting comes from :mod:`fluxkiln.tui.highlight` (no tree-sitter needed);
lines with a validation problem get a red background.  Long lines wrap (soft
wrap, on by default; alt+z toggles it).  Saving is atomic: a temp file in the
same folder, fsync, rename.  The editor remembers the file's text as it last
read or wrote it, so a change made on disk by someone else is noticed.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from rich.style import Style
from textual.binding import Binding
from textual.message import Message
from textual.reactive import reactive
from textual.widgets import TextArea
from textual.widgets.text_area import TextAreaTheme

from .highlight import highlight_toml

_STYLES = {
    "heading": Style(color="#569cd6", bold=True),
    "toml.key": Style(color="#9cdcfe"),
    "string": Style(color="#ce9178"),
    "number": Style(color="#b5cea8"),
    "boolean": Style(color="#4ec9b0"),
    "toml.datetime": Style(color="#c586c0"),
    "comment": Style(color="#6a9955", italic=True),
    "operator": Style(color="#808080"),
    "punctuation.bracket": Style(color="#d4d4d4"),
    "punctuation.delimiter": Style(color="#808080"),
    "fluxkiln.link": Style(color="#dcdcaa", bold=True),
    "fluxkiln.var": Style(color="#c586c0", bold=True),
    "fluxkiln.error": Style(bgcolor="#5f1f1f"),
}
THEME = TextAreaTheme(name="fluxkiln", syntax_styles=_STYLES)


class RecipeFileError(ValueError):
    """A recipe file that cannot be opened as text (binary, not UTF-8, unreadable)."""


def read_recipe(path: Path) -> str:
    """The text of a recipe file; RecipeFileError (one line saying what to do) if it is not UTF-8 text."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise RecipeFileError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if b"\0" in data:
        raise RecipeFileError(f"{path} is a binary file, not a recipe: open a UTF-8 TOML file (.toml)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecipeFileError(f"{path} is not UTF-8 text (bad byte at offset {exc.start}): "
                              "a recipe is a UTF-8 TOML file; convert it or open another") from exc


def atomic_write(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old or the new file, never half of one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        if path.exists():
            os.chmod(tmp, path.stat().st_mode & 0o777)
        else:
            os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class RecipeEditor(TextArea):
    """Edits one recipe file; knows whether it has unsaved changes."""

    BINDINGS = [Binding("alt+z", "toggle_wrap", "Soft wrap", tooltip="Wrap long lines on/off (on by default)",
                        show=False)]

    dirty: reactive[bool] = reactive(False)

    @dataclass
    class Saved(Message):
        """The buffer was written to ``path``."""

        path: Path
        text: str

    @dataclass
    class DirtyChanged(Message):
        dirty: bool

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__("", id=id, show_line_numbers=True, tab_behavior="focus", soft_wrap=True)
        self.path: Path | None = None
        self.saved_text = ""
        self.error_lines: set[int] = set()
        self.register_theme(THEME)
        self.theme = "fluxkiln"

    # ------------------------------------------------------------ file
    def open_file(self, path: Path, text: str | None = None) -> None:
        """Load ``path`` (or the given text for it) as the saved state; RecipeFileError if it is not text."""
        text = read_recipe(Path(path)) if text is None else text
        self.path = Path(path)
        self.saved_text = text
        self.error_lines = set()
        self.load_text(text)
        self.dirty = False
        self._title()

    def disk_text(self) -> str | None:
        """The file's text on disk now (None if it cannot be read as a recipe)."""
        if self.path is None:
            return None
        try:
            return read_recipe(self.path)
        except RecipeFileError:
            return None

    def changed_on_disk(self) -> bool:
        """Whether the file on disk differs from what this editor last read or wrote."""
        disk = self.disk_text()
        return disk is not None and disk != self.saved_text

    def reload(self, text: str | None = None) -> None:
        """Take the file's content from disk (or ``text``, read from it), keeping the cursor's line."""
        if self.path is None:
            return
        text = self.disk_text() if text is None else text
        if text is None:
            return
        cursor = self.cursor_location
        self.open_file(self.path, text)
        self.cursor_location = (min(cursor[0], self.document.line_count - 1), 0)

    def action_toggle_wrap(self) -> None:
        self.soft_wrap = not self.soft_wrap
        self.scroll_to(x=0, animate=False)
        self.notify(f"Soft wrap {'on' if self.soft_wrap else 'off'} (alt+z)", timeout=2)

    def on_resize(self) -> None:
        if self.soft_wrap:
            self.scroll_to(x=0, animate=False)

    def save(self) -> Path:
        """Write the buffer atomically; raise OSError if that fails."""
        if self.path is None:
            raise OSError("no file is open")
        text = self.text
        atomic_write(self.path, text)
        self.saved_text = text
        self.dirty = False
        self.post_message(self.Saved(self.path, text))
        return self.path

    def watch_dirty(self, dirty: bool) -> None:
        self._title()
        self.post_message(self.DirtyChanged(dirty))

    def _title(self) -> None:
        name = self.path.name if self.path else "no recipe"
        self.border_title = name + (" ● unsaved" if self.dirty else "")

    def on_text_area_changed(self, event: TextArea.Changed) -> None:
        self.dirty = self.text != self.saved_text

    # ------------------------------------------------------------ problems
    def set_error_lines(self, lines: set[int]) -> None:
        """Highlight these 1-based line numbers as having problems."""
        if lines != self.error_lines:
            self.error_lines = set(lines)
            self._build_highlight_map()
            self.refresh()

    def goto_line(self, line: int) -> None:
        row = max(0, min(line - 1, self.document.line_count - 1))
        self.cursor_location = (row, 0)
        self.scroll_cursor_visible(center=True)
        self.focus()

    def _build_highlight_map(self) -> None:
        """Fill TextArea's highlight map from our TOML tokenizer (byte offsets, as it expects)."""
        self._line_cache.clear()
        highlights = self._highlights
        highlights.clear()
        text = self.document.text
        lines = text.split("\n")
        for row, start, end, name in highlight_toml(text):
            line = lines[row]
            highlights[row].append((len(line[:start].encode()), len(line[:end].encode()), name))
        for number in getattr(self, "error_lines", ()):
            if 0 < number <= len(lines):
                highlights[number - 1].insert(0, (0, None, "fluxkiln.error"))
