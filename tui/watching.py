"""Watch mode for the TUI: the engine's folder watcher, reporting changes as messages.

Saves made in the editor rerun the recipe directly (the screen handles
``RecipeEditor.Saved``); this also catches edits made outside the app and
changes to files the recipe reads (datasets, images).  The run's own output
folder and the cache are ignored.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from textual.message import Message

from fluxkiln.engine.runner import resolve_run_dir
from fluxkiln.engine.watch import RecipeWatcher, watched_paths


class Watch:
    """Owns a :class:`RecipeWatcher` while watch mode is on; posts ``FilesChanged`` to ``target``."""

    @dataclass
    class FilesChanged(Message):
        paths: set[str]

    def __init__(self, target: Any, debounce: float = 0.3) -> None:
        self.target = target
        self.debounce = debounce
        self.watcher: RecipeWatcher | None = None
        self.path: Path | None = None

    @property
    def active(self) -> bool:
        return self.watcher is not None

    def toggle(self, path: Path, checked: Any, output: str | None) -> bool:
        """Turn watch mode on (watching ``path`` and the files ``checked`` reads) or off; return the new state."""
        if self.active:
            self.stop()
            return False
        self.path = path
        self.watcher = RecipeWatcher(self._changed, debounce=self.debounce)
        self.watcher.set_paths({path.resolve()})
        self.update(checked, output)
        return True

    def update(self, checked: Any, output: str | None) -> None:
        """Follow the files of the latest valid recipe; ignore its run folder and the cache."""
        if self.watcher is None or checked is None or self.path is None:
            return
        engine = getattr(self.target, "engine", None)
        ignore = [resolve_run_dir(checked.recipe, output)]
        if engine is not None:
            ignore.append(Path(engine.cache_root))
        self.watcher.ignore = [p.resolve() for p in ignore]
        self.watcher.set_paths(watched_paths(checked) | {self.path.resolve()})

    def recipe_changed(self, changed: set[str]) -> bool:
        """Whether the recipe file itself is among ``changed``."""
        return self.path is not None and self.path.resolve() in {Path(p).resolve() for p in changed}

    def only_recipe(self, changed: set[str]) -> bool:
        """Whether the recipe file is the only thing that changed (no file it reads)."""
        return self.path is not None and {Path(p).resolve() for p in changed} <= {self.path.resolve()}

    def _changed(self, paths: set[str]) -> None:
        self.target.post_message(self.FilesChanged(set(paths)))

    def stop(self) -> None:
        if self.watcher is not None:
            self.watcher.stop()
            self.watcher = None
