"""The fluxkiln Textual app and ``fluxkiln tui [RECIPE]``.

The app holds one :class:`~fluxkiln.engine.runner.Engine` (models stay hot
between runs) and shows the main screen; dialogs (recipe picker, new recipe,
help, node types, quit confirmation) are modal screens on top of it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.text import Text
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Label

from .help import HelpScreen
from .main import MainScreen
from .nodetypes import NodeTypeBrowser
from .picker import NewRecipeScreen, RecipePicker
from .templates import DEFAULT, TEMPLATES


class ConfirmQuit(ModalScreen[str]):
    """Unsaved changes: save and quit, quit anyway, or stay."""

    BINDINGS = [Binding("escape", "stay", "Stay")]

    def compose(self) -> ComposeResult:
        with Vertical(id="confirm", classes="dialog"):
            yield Label(Text("The recipe has unsaved changes.", style="bold"), classes="dialog-title")
            with Horizontal(classes="buttons"):
                yield Button("Save and quit", variant="primary", id="save")
                yield Button("Quit without saving", variant="error", id="discard")
                yield Button("Stay", id="stay")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(str(event.button.id))

    def action_stay(self) -> None:
        self.dismiss("stay")


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
            self.main.open_recipe(self.recipe)
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
        if path is None:
            return
        if self.main.editor.dirty:
            self.notify("Save or undo your changes first (ctrl+s); the recipe was not switched.",
                        severity="warning")
            return
        self.main.open_recipe(path)

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
            self.push_screen(ConfirmQuit(), self._quit_answer)
            return
        self._leave()

    def _quit_answer(self, answer: str | None) -> None:
        if answer == "save":
            self.main.action_save()
            if self.main.editor.dirty:
                return
        if answer in ("save", "discard"):
            self._leave()

    def _leave(self) -> None:
        self.main.shutdown()
        self.exit(0)


def run_tui(recipe: str | None = None) -> int:
    """``fluxkiln tui [RECIPE | FOLDER]``: run the app in this terminal; return the exit code.

    A folder opens the recipe picker on that folder; a file that does not exist
    yet opens a template to save there.
    """
    if recipe and Path(recipe).is_dir():
        app = FluxkilnApp(folder=recipe)
    else:
        app = FluxkilnApp(recipe)
    result = app.run()
    return int(result or 0)
