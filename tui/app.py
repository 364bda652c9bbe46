"""The fluxkiln Textual app and ``fluxkiln tui [RECIPE]``.

The app holds one :class:`~fluxkiln.engine.runner.Engine` (models stay hot
between runs) and shows the main screen; dialogs (recipe picker, new recipe,
help, node types, questions) are modal screens on top of it.  The command
palette (ctrl+p) lists the app's own actions.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from textual.app import App, SystemCommand
from textual.binding import Binding
from textual.screen import Screen

from .dialogs import confirm_open, confirm_quit
from .editor import RecipeFileError, read_recipe
from .help import HelpScreen
from .main import MainScreen
from .nodetypes import NodeTypeBrowser
from .picker import NewRecipeScreen, RecipePicker
from .templates import DEFAULT, TEMPLATES

QUIT_WAIT = 0.5  # seconds a run in progress gets to stop at a safe point when the app quits


class FluxkilnApp(App[int]):
    """Edit, validate, run and monitor fluxkiln recipes."""

    TITLE = "fluxkiln"
    CSS_PATH = "app.tcss"
    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (120, "-wide")]
    VERTICAL_BREAKPOINTS = [(0, "-short"), (36, "-tall")]
    BINDINGS = [
        Binding("f1", "help", "Help", tooltip="Show every key binding"),
        Binding("f2", "node_types", "Node types", tooltip="Browse node types and their documentation",
                show=False),
        Binding("ctrl+o", "open", "Open", tooltip="Open a recipe (current folder and recipes/)", priority=True),
        Binding("ctrl+n", "new", "New", tooltip="New recipe from a template", priority=True),
        Binding("ctrl+q", "quit", "Quit", tooltip="Quit (asks when there are unsaved changes)", priority=True),
    ]

    def __init__(self, recipe: str | Path | None = None, *, engine: Any = None, registry: Any = None,
                 output: str | None = None, folder: str | Path | None = None, validate_delay: float = 0.3,
                 watch_debounce: float = 0.3) -> None:
        super().__init__()
        if engine is None:
            from fluxkiln.engine.runner import Engine

            engine = Engine(registry)
        self.engine = engine
        self.folder = Path(folder) if folder else Path.cwd()
        self.recipe = Path(recipe) if recipe else None
        self.main = MainScreen(engine, output=output, validate_delay=validate_delay, watch_debounce=watch_debounce)

    async def on_mount(self) -> None:
        await self.push_screen(self.main)
        failed = self.engine.registry.failed_plugins()
        if failed:
            self.notify("; ".join(f"{p.name}: {p.error}" for p in failed), title="Plugins that failed to load",
                        severity="warning", markup=False, timeout=10)
        if self.recipe is None:
            self.action_open()
        elif self.recipe.exists():
            self._open_now(self.recipe)
        else:
            name = self.recipe.stem
            self.main.open_recipe(self.recipe, TEMPLATES[DEFAULT].render(name))
            self.notify(f"{self.recipe} does not exist yet: this is a template; ctrl+s creates it.",
                        markup=False, timeout=6)

    # ------------------------------------------------------------ dialogs
    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        """Dialogs open from the main screen only (not on top of one another)."""
        if action in ("open", "new", "help", "node_types"):
            return self.screen is self.main
        return True

    def action_open(self) -> None:
        self.push_screen(RecipePicker(self.folder), self._opened)

    def action_new(self) -> None:
        self.push_screen(NewRecipeScreen(self.folder), self._opened)

    def _opened(self, path: Path | None) -> None:
        """A recipe was picked: once the picker is gone, open it (asking first if there are unsaved edits)."""
        if path is not None:
            self.call_after_refresh(self._open_or_ask, path)

    def _open_or_ask(self, path: Path) -> None:
        """With unsaved edits, ask Save / Discard / Cancel before opening ``path``."""
        if not self.main.editor.dirty:
            self._open_now(path)
            return

        def answer(choice: str | None) -> None:
            if choice == "discard" or (choice == "save" and self._save_before_switching()):
                self._open_now(path)

        self.push_screen(confirm_open(path.name), answer)

    def _save_before_switching(self) -> bool:
        if self.main.editor.changed_on_disk():
            self.notify("The open recipe changed on disk: save it with ctrl+s (it asks) before switching.",
                        severity="warning")
            return False
        return self.main.save_now()

    def _open_now(self, path: Path) -> bool:
        """Open ``path``; a file that is not UTF-8 text gets a toast and the current recipe stays."""
        try:
            self.main.open_recipe(path)
        except RecipeFileError as exc:
            self.notify(str(exc), title="Not opened", severity="error", markup=False, timeout=8)
            return False
        return True

    def action_help(self) -> None:
        self.push_screen(HelpScreen())

    def action_node_types(self) -> None:
        self.push_screen(NodeTypeBrowser(self.engine.registry, self._type_at_cursor()))

    def _type_at_cursor(self) -> str | None:
        """The node type of the graph's selected node, to open the browser on it."""
        node = self.main.graph.selected if self.main.is_mounted else None
        info = self.main.model.nodes.get(node or "")
        return info.type if info else None

    async def action_quit(self) -> None:
        if self.main.is_mounted and self.main.editor.dirty:
            self.push_screen(confirm_quit(), self._quit_answer)
            return
        await self._leave()

    async def _quit_answer(self, answer: str | None) -> None:
        if answer == "save" and not self.main.save_now():
            return
        if answer in ("save", "discard"):
            await self._leave()

    async def _leave(self) -> None:
        """Stop watching, ask a run to stop, give it ``QUIT_WAIT`` seconds to do so, and exit."""
        self.main.shutdown()
        deadline = time.monotonic() + QUIT_WAIT
        while self.main.running and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        self.exit(0)

    # ------------------------------------------------------------ command palette
    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        """The app's own actions first, then Textual's (theme, keys, screenshot, ...)."""
        if screen is self.main:
            main = self.main
            watch = "Watch off" if main.watcher.active else "Watch on"
            yield SystemCommand("Run", "Run the recipe as shown in the editor (ctrl+r)", main.action_run)
            if main.running:
                yield SystemCommand("Cancel run", "Cancel the run at the next safe point (escape)",
                                    main.action_cancel)
            yield SystemCommand("Save", "Save the recipe (ctrl+s)", main.action_save)
            yield SystemCommand(watch, "Rerun what changed on every save (ctrl+t)", main.action_toggle_watch)
            yield SystemCommand("Force node", "Rerun the graph's selected node and its dependants (ctrl+f)",
                                main.action_force)
            yield SystemCommand("Open recipe", "Open another recipe (ctrl+o)", self.action_open)
            yield SystemCommand("New recipe", "New recipe from a template (ctrl+n)", self.action_new)
            yield SystemCommand("Node types", "Browse node types and their documentation (f2)",
                                self.action_node_types)
            yield SystemCommand("Help", "Every key binding (f1 or ?)", self.action_help)
            yield SystemCommand("Soft wrap", "Wrap long lines in the editor on/off (alt+z)",
                                main.editor.action_toggle_wrap)
        yield from super().get_system_commands(screen)


def exit_code(app: App[Any], result: int | None) -> int:
    """The process exit status: non-zero whenever the app stopped on an error."""
    if app.return_code:
        return app.return_code
    return int(result or 0)


def run_tui(recipe: str | None = None, *, headless: bool = False, hard_exit: bool = True) -> int:
    """``fluxkiln tui [RECIPE | FOLDER]``: run the app in this terminal; return the exit code.

    A folder opens the recipe picker on that folder; a file that does not exist
    yet opens a template to save there; a file that is not UTF-8 text is refused
    with one line on stderr and exit status 2.  With ``hard_exit`` the process
    ends as soon as the terminal is restored: tearing down torch and loaded
    models at interpreter exit takes seconds and has nothing left to save.
    """
    path = Path(recipe) if recipe else None
    if path is not None and path.is_file():
        try:
            read_recipe(path)
        except RecipeFileError as exc:
            print(f"fluxkiln tui: error: {exc}", file=sys.stderr)
            return 2
    app = FluxkilnApp(folder=recipe) if path is not None and path.is_dir() else FluxkilnApp(recipe)
    code = exit_code(app, app.run(headless=headless))
    if hard_exit:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code
