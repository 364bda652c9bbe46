"""The recipe picker (recipes in the current folder and ``recipes/``) and the new-recipe dialog."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Footer, Input, Label, OptionList
from textual.widgets.option_list import Option

from .templates import DEFAULT, TEMPLATES

_RECIPE_MARK = re.compile(r"^\s*\[(recipe|nodes\.)", re.M)
NEW = "__new__"


def find_recipes(folder: Path) -> list[Path]:
    """Recipe files (TOML with a [recipe] or [nodes.*] table) in ``folder`` and ``folder/recipes``."""
    found = sorted(folder.glob("*.toml"))
    rdir = folder / "recipes"
    if rdir.is_dir():
        found += sorted(rdir.glob("*.toml")) + sorted(rdir.glob("*/*.toml"))
    out = []
    for p in found:
        try:
            head = p.read_text(encoding="utf-8", errors="replace")[:65536]
        except OSError:
            continue
        if _RECIPE_MARK.search(head):
            out.append(p)
    return out


def describe(path: Path, base: Path) -> Text:
    """``recipes/x.toml  name — description`` (all plain text)."""
    try:
        rel = str(path.relative_to(base))
    except ValueError:
        rel = str(path)
    out = Text(rel, style="bold")
    try:
        head = tomllib.loads(path.read_text(encoding="utf-8")).get("recipe", {})
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return out.append("  ").append("(not valid TOML)", style="red")
    if isinstance(head, dict):
        desc = str(head.get("description", ""))
        out.append("  ")
        out.append(str(head.get("name", "")), style="cyan")
        if desc:
            out.append(" ")
            out.append(f"— {desc}", style="dim")
    return out


class RecipePicker(ModalScreen[Path | None]):
    """Pick a recipe to open, or start a new one; dismisses with the path (or None)."""

    BINDINGS = [Binding("escape", "dismiss_none", "close")]

    def __init__(self, folder: Path) -> None:
        super().__init__()
        self.folder = folder
        self.recipes = find_recipes(folder)

    def compose(self) -> ComposeResult:
        with Vertical(id="picker", classes="dialog"):
            yield Label(Text("Open a recipe (this folder and recipes/)", style="bold"), classes="dialog-title")
            options = [Option(Text("+ New recipe from a template…", style="bold green"), id=NEW)]
            options += [Option(describe(p, self.folder), id=str(p)) for p in self.recipes]
            yield OptionList(*options, id="recipe-list")
            if not self.recipes:
                yield Label(Text("No recipes here or in recipes/ yet.", style="dim"))
        yield Footer(compact=True)

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        event.stop()
        if event.option.id == NEW:
            self.app.push_screen(NewRecipeScreen(self.folder), self._created)
        else:
            self.dismiss(Path(str(event.option.id)))

    def _created(self, path: Path | None) -> None:
        if path is not None:
            self.dismiss(path)

    def action_dismiss_none(self) -> None:
        self.dismiss(None)


class NewRecipeScreen(ModalScreen[Path | None]):
    """Ask for a file name and a template; write the new recipe and dismiss with its path."""

    BINDINGS = [Binding("escape", "dismiss_none", "close")]

    def __init__(self, folder: Path, name: str | None = None) -> None:
        super().__init__()
        self.folder = folder
        sub = "recipes/" if (folder / "recipes").is_dir() else ""
        self.default = name or f"{sub}my-recipe.toml"
        self.template = DEFAULT

    def compose(self) -> ComposeResult:
        with Vertical(id="new-recipe", classes="dialog"):
            yield Label(Text("New recipe", style="bold"), classes="dialog-title")
            yield Label("File (relative to the current folder):")
            yield Input(self.default, id="new-path")
            yield Label("Template:")
            yield OptionList(*[Option(Text(t.title), id=t.key) for t in TEMPLATES.values()], id="template-list")
            yield Label("", id="new-error")
            with Horizontal(classes="buttons"):
                yield Button("Create", variant="primary", id="create")
                yield Button("Cancel", id="cancel")
        yield Footer(compact=True)

    def on_mount(self) -> None:
        self.query_one("#template-list", OptionList).highlighted = list(TEMPLATES).index(self.template)
        self.query_one("#new-path", Input).focus()

    def on_option_list_option_highlighted(self, event: OptionList.OptionHighlighted) -> None:
        self.template = str(event.option.id)

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        self.template = str(event.option.id)
        self.create()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.create()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "create":
            self.create()
        else:
            self.dismiss(None)

    def create(self) -> None:
        raw = self.query_one("#new-path", Input).value.strip()
        try:
            path = create_recipe(self.folder, raw, self.template)
        except (ValueError, OSError) as exc:
            self.query_one("#new-error", Label).update(Text(str(exc), style="bold red"))
            return
        self.dismiss(path)

    def action_dismiss_none(self) -> None:
        self.dismiss(None)


def create_recipe(folder: Path, raw: str, template: str) -> Path:
    """Write a new recipe from a template; refuse to overwrite an existing file."""
    raw = raw.strip()
    if not raw:
        raise ValueError("give a file name, e.g. recipes/my-recipe.toml")
    path = Path(raw).expanduser()
    path = path if path.is_absolute() else folder / path
    if path.suffix != ".toml":
        path = path.with_name(path.name + ".toml")
    if path.exists():
        raise ValueError(f"{raw} already exists: pick another name, or open it with ctrl+o")
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", path.stem).strip("-._") or "recipe"
    path.parent.mkdir(parents=True, exist_ok=True)
    from .editor import atomic_write

    atomic_write(path, TEMPLATES[template].render(name))
    return path
