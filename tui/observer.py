"""The engine observer of a TUI run: turns engine events into Textual messages.

It runs in the engine's worker thread.  ``post_message`` is thread-safe, so
events reach the screen as messages without blocking the run.  Progress events
are coalesced (at most ``interval`` seconds apart per node, but no metric point
is lost) and preview images are shrunk to thumbnails here, off the UI thread.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fluxkiln.engine import hookimpl
from textual.message import Message

from .state import IMAGE_SUFFIXES

THUMB_SIZE = 256


@dataclass
class Thumb:
    """A small copy of an image for the preview, with an (untrusted) caption."""

    image: Any
    caption: str
    node: str = ""
    live: bool = False


def caption(node: str, *details: object) -> str:
    """The one caption format of the gallery: ``node · detail · detail``."""
    return " · ".join([node, *(str(d) for d in details if d not in (None, ""))])


def thumbnail(image: Any, size: int = THUMB_SIZE) -> Any:
    """A small RGB copy of a PIL image."""
    im = image.convert("RGB") if image.mode != "RGB" else image.copy()
    im.thumbnail((size, size))
    return im


def thumb_from_file(path: str | Path, caption: str, node: str = "") -> Thumb | None:
    """Load an image file as a thumbnail; None if it cannot be read."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.draft("RGB", (THUMB_SIZE, THUMB_SIZE))
            return Thumb(thumbnail(im), caption, node)
    except (OSError, UnidentifiedImageError, ValueError):
        return None


def thumbs_from_images(node: str, images: Any, limit: int = 16) -> list[Thumb]:
    """Thumbnails of an ``Images`` value, captioned with node, seed and prompt."""
    out = []
    for i, item in enumerate(list(images)[:limit]):
        seed = f"seed {item.seed}" if item.seed is not None else None
        out.append(Thumb(thumbnail(item.image), caption(node, f"#{i + 1}", seed, item.prompt), node))
    return out


def final_thumbs(result: Any) -> list[Thumb]:
    """Thumbnails of the images of the last node of a run that output images."""
    from fluxkiln.engine.ports import Images

    for node in reversed(list(result.outputs)):
        images = [v for v in result.outputs[node].values() if isinstance(v, Images)]
        if images and images[0]:
            return thumbs_from_images(node, images[0])
    return []


class RunObserver:
    """Registered with the engine for one run; forwards its events to ``target``."""

    @dataclass
    class EngineEvent(Message):
        """An engine event (and, for progress, every metric point since the last one sent)."""

        event: Any
        points: list[tuple[int, dict[str, float]]] = field(default_factory=list)

    @dataclass
    class Preview(Message):
        """New images to show in the preview."""

        thumbs: list[Thumb]
        live: bool = False

    def __init__(self, target: Any, interval: float = 0.1) -> None:
        self.target = target
        self.interval = interval
        self._last: dict[str, float] = {}
        self._held: dict[str, Any] = {}
        self._points: dict[str, list[tuple[int, dict[str, float]]]] = {}
        self.shown_files = False  # image files written by the run were sent to the preview

    @hookimpl
    def on_event(self, event: Any) -> None:
        node = event.node or ""
        if event.event == "node_progress":
            self._progress(node, event)
            return
        self._flush(node)
        self.target.post_message(self.EngineEvent(event))
        if event.event in ("node_finished", "node_cached"):
            self._artifact_previews(node, event.data.get("artifacts") or [])

    def _progress(self, node: str, event: Any) -> None:
        metrics = event.data.get("metrics")
        if metrics:
            self._points.setdefault(node, []).append((int(event.data.get("step") or 0), dict(metrics)))
        self._send_preview(node, event)
        self._held[node] = event
        step, total = event.data.get("step"), event.data.get("total")
        if time.monotonic() - self._last.get(node, 0.0) >= self.interval or (total and step == total):
            self._flush(node)

    def _flush(self, node: str) -> None:
        event = self._held.pop(node, None)
        if event is None:
            return
        self._last[node] = time.monotonic()
        self.target.post_message(self.EngineEvent(event, self._points.pop(node, [])))

    def _send_preview(self, node: str, event: Any) -> None:
        image = event.objects.get("preview")
        step = event.data.get("step")
        message = event.data.get("message")
        text = caption(node, f"step {step}", message)
        thumb = None
        if image is not None:
            thumb = Thumb(thumbnail(image), text, node)
        elif event.data.get("preview_path"):
            thumb = thumb_from_file(event.data["preview_path"], text, node)
        if thumb is not None:
            self.target.post_message(self.Preview([thumb], live=True))

    def _artifact_previews(self, node: str, artifacts: list[str]) -> None:
        images = [a for a in artifacts if str(a).lower().endswith(IMAGE_SUFFIXES)][-16:]
        thumbs = [t for a in images if (t := thumb_from_file(a, caption(node, Path(a).name), node))]
        if thumbs:
            self.shown_files = True
            self.target.post_message(self.Preview(thumbs))
