"""Image preview: the current run's images and training samples drawn with half-block characters.

Each run has its own gallery; the previous runs' galleries stay one key away
(up / down).

Each character cell shows two pixels: the upper half block ``▀`` in the top
pixel's colour over the bottom pixel's colour as background, so any terminal
with true colour shows a recognisable picture.  Captions (prompts, file
names) are untrusted and shown as plain text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rich.segment import Segment
from rich.style import Style
from rich.text import Text
from textual.binding import Binding
from textual.containers import Vertical
from textual.message import Message
from textual.strip import Strip
from textual.widget import Widget
from textual.widgets import Label

from .observer import Thumb

MAX_GALLERY = 32
MAX_RUNS = 10


def halfblock_rows(image: Any, width: int, height: int) -> list[list[Segment]]:
    """Fit ``image`` into ``width`` x ``height`` cells; one list of segments per row."""
    from PIL import Image

    if width < 1 or height < 1:
        return []
    iw, ih = image.size
    scale = min(width / iw, 2 * height / ih)
    w, h = max(1, int(iw * scale)), max(2, int(ih * scale) // 2 * 2)
    im = image.convert("RGB").resize((w, h), Image.Resampling.BILINEAR)
    px = im.load()
    pad = (width - w) // 2
    rows = []
    for y in range(0, h, 2):
        segs = [Segment(" " * pad)] if pad else []
        for x in range(w):
            top, bottom = px[x, y], px[x, y + 1] if y + 1 < h else (0, 0, 0)
            segs.append(Segment("▀", Style(color=f"rgb{top}", bgcolor=f"rgb{bottom}")))
        rows.append(segs)
    return rows


class ImageView(Widget):
    """Draws one PIL image to fit the widget."""

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.image: Any = None
        self._cache: tuple[tuple[int, int], list[Strip]] | None = None

    def set_image(self, image: Any) -> None:
        self.image = image
        self._cache = None
        self.refresh()

    def _strips(self) -> list[Strip]:
        size = (self.size.width, self.size.height)
        if self._cache is None or self._cache[0] != size:
            rows = halfblock_rows(self.image, *size) if self.image is not None else []
            self._cache = (size, [Strip(r) for r in rows])
        return self._cache[1]

    def render_line(self, y: int) -> Strip:
        strips = self._strips()
        top = max(0, (self.size.height - len(strips)) // 2)
        if top <= y < top + len(strips):
            return strips[y - top].extend_cell_length(self.size.width)
        return Strip.blank(self.size.width)


class ImagePreview(Vertical, can_focus=True):
    """The images of the current run; left/right browse them, up/down go to older/newer runs."""

    BINDINGS = [
        Binding("left,comma", "prev", "Previous image", show=False),
        Binding("right,full_stop", "next", "Next image", show=False),
        Binding("up,pageup", "older", "Older run's images", show=False),
        Binding("down,pagedown", "newer", "Newer run's images", show=False),
    ]

    @dataclass
    class Changed(Message):
        """The current run now has ``count`` images."""

        count: int

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.runs: list[list[Thumb]] = [[]]  # oldest first; the last is the current run
        self.shown = 0  # which run is on screen (index into runs)
        self.index = 0
        self._caption = Label(Text("no images yet", style="dim"), classes="image-caption")
        self._view = ImageView()

    @property
    def thumbs(self) -> list[Thumb]:
        """The images of the run on screen."""
        return self.runs[self.shown]

    def compose(self):
        yield self._caption
        yield self._view

    def new_run(self) -> None:
        """A run starts: its images get a gallery of their own (older runs stay one key away)."""
        if self.runs[-1]:
            self.runs = (self.runs + [[]])[-MAX_RUNS:]
        self.shown, self.index = len(self.runs) - 1, 0
        self._show()
        self.post_message(self.Changed(0))

    def add(self, thumbs: list[Thumb], live: bool = False) -> None:
        """Show new images of the current run: live samples replace the previous sample of their node."""
        current = self.runs[-1]
        if live:
            nodes = {t.node for t in thumbs}
            current[:] = [t for t in current if not (t.live and t.node in nodes)]
            thumbs = [Thumb(t.image, t.caption, t.node, live=True) for t in thumbs]
        current[:] = (current + list(thumbs))[-MAX_GALLERY:]
        self.shown, self.index = len(self.runs) - 1, max(0, len(current) - len(thumbs))
        self._show()
        self.post_message(self.Changed(len(current)))

    def _show(self) -> None:
        if not self.thumbs:
            self._caption.update(Text("no images in this run yet" + self._runs_hint(), style="dim"))
            self._view.set_image(None)
            return
        t = self.thumbs[self.index]
        w, h = t.image.size
        self._caption.update(Text.assemble((f"{self.index + 1}/{len(self.thumbs)} ", "bold"), t.caption,
                                           (f"  ({w}x{h} preview){self._runs_hint()}", "dim")))
        self._view.set_image(t.image)

    def _runs_hint(self) -> str:
        older = self.shown
        if self.shown == len(self.runs) - 1:
            return f"  · ↑ {older} older run{'s' if older != 1 else ''}" if older else ""
        return f"  · run {self.shown + 1} of {len(self.runs)} (↓ newer)"

    def action_prev(self) -> None:
        if self.thumbs:
            self.index = (self.index - 1) % len(self.thumbs)
            self._show()

    def action_next(self) -> None:
        if self.thumbs:
            self.index = (self.index + 1) % len(self.thumbs)
            self._show()

    def action_older(self) -> None:
        self._go(self.shown - 1)

    def action_newer(self) -> None:
        self._go(self.shown + 1)

    def _go(self, run: int) -> None:
        if 0 <= run < len(self.runs) and run != self.shown:
            self.shown, self.index = run, 0
            self._show()
