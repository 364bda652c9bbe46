"""Snapshot tests (pytest-textual-snapshot) of the TUI's main screens.

Update them after an intended change with ``pytest tests/test_tui_snapshots.py --snapshot-update``
and look at the report.  The registry holds only the engine's port types and the test nodes,
so new built-in node types do not change these pictures.
"""

from __future__ import annotations

import time

import pytest
from textual.command import CommandList
from textual.widgets import Input

import fluxkiln.plugins.ports as ports_plugin
from fluxkiln.engine.registry import Registry
from fluxkiln.engine.runner import Engine
from fluxkiln.tui.app import FluxkilnApp
from helpers import textnodes

RECIPE = '''[recipe]
name = "demo"
description = "snapshot recipe"

[vars]
word = "hello"

[nodes.a]
type = "const"
value = "${word}"  # a variable

[nodes.b]
type = "concat"
left = "@a"
sep = "+"

[nodes.x]
type = "boom"
text = "@b"
message = "[b]kaput[/b]"

[nodes.y]
type = "concat"
left = "@x"
'''

BROKEN = RECIPE.replace('left = "@a"', 'left = "@nope"').replace('sep = "+"', 'sep = "+"\nspeed = 11')


@pytest.fixture
def app(tmp_path, fresh_cache, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo.toml").write_text(RECIPE)
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "other.toml").write_text('[recipe]\nname = "other"\ndescription = "[b]x[/b]"\n')
    registry = Registry.load(extra=[ports_plugin, textnodes], builtins=False, entry_points=False)
    return FluxkilnApp("demo.toml", engine=Engine(registry, cache_dir=fresh_cache), validate_delay=0.01)


async def until(pilot, cond, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out waiting for the UI"
        await pilot.pause(0.02)
    await pilot.pause()


async def settled(pilot) -> None:
    """Validated and planned; no blinking cursor."""
    app = pilot.app
    app.main.editor.cursor_blink = False
    await until(pilot, lambda: app.main.status.status.problems is not None)
    if app.main.status.status.problems == 0:
        await until(pilot, lambda: all(n.reason for n in app.main.model.nodes.values()))


def steady_cursor(field: Input) -> None:
    """A blinking cursor is drawn or not by the clock; a steady one is always drawn in a focused field."""
    field.cursor_blink = False


SIZES = [pytest.param((80, 24), id="80x24"), pytest.param((120, 40), id="120x40")]


@pytest.mark.parametrize("size", SIZES)
def test_main_screen_valid_recipe_with_plan(app, snap_compare, size):
    assert snap_compare(app, terminal_size=size, run_before=settled)


@pytest.mark.parametrize("size", SIZES)
def test_main_screen_with_problems(app, snap_compare, size):
    async def broken(pilot):
        await settled(pilot)
        pilot.app.main.editor.load_text(BROKEN)
        await until(pilot, lambda: pilot.app.main.status.status.problems == 2)

    assert snap_compare(app, terminal_size=size, run_before=broken)


@pytest.mark.parametrize("size", SIZES)
def test_main_screen_after_a_failed_run(app, snap_compare, size):
    async def ran(pilot):
        await settled(pilot)
        main = pilot.app.main
        await pilot.press("ctrl+r")
        await until(pilot, lambda: main.runs_ended == 1)
        main.graph.move_cursor(row=2)  # the failed node
        main.graph.focus()
        main.status.set(run_note="")  # its duration varies
        await pilot.pause()

    assert snap_compare(app, terminal_size=size, run_before=ran)


@pytest.mark.parametrize("size", SIZES)
def test_help_screen(app, snap_compare, size):
    assert snap_compare(app, terminal_size=size, press=["f1"], run_before=settled)


def test_node_type_browser(app, snap_compare):
    assert snap_compare(app, terminal_size=(120, 40), press=["f2"], run_before=settled)


def test_recipe_picker(app, snap_compare):
    assert snap_compare(app, terminal_size=(80, 24), press=["ctrl+o"], run_before=settled)


def test_new_recipe_dialog(app, snap_compare):
    async def dialog(pilot):
        await settled(pilot)
        await pilot.press("ctrl+n")
        await until(pilot, lambda: bool(pilot.app.screen.query("#new-path")))
        steady_cursor(pilot.app.screen.query_one("#new-path", Input))

    assert snap_compare(app, terminal_size=(80, 24), run_before=dialog)


def test_quit_dialog_with_stay_focused(app, snap_compare):
    async def edited(pilot):
        await settled(pilot)
        pilot.app.main.editor.load_text(BROKEN)
        await until(pilot, lambda: pilot.app.main.status.status.problems == 2)
        await pilot.press("ctrl+q")
        await until(pilot, lambda: getattr(pilot.app.screen.focused, "id", None) == "stay")

    assert snap_compare(app, terminal_size=(80, 24), run_before=edited)


def test_command_palette_finds_run(app, snap_compare):
    def searched(pilot) -> bool:
        """The search for all of "run" has finished and its hits are listed.  Each key starts a new search (for
        "r", then "ru"): on a busy machine the hits of an earlier one may still be showing, or the list may
        still be filling, when the first hits appear."""
        palette = pilot.app.screen
        searching = any(w.group == palette._GATHER_COMMANDS_GROUP and not w.is_finished for w in pilot.app.workers)
        return (palette.query_one(Input).value == "run" and not searching
                and palette.query_one(CommandList).option_count > 0)

    async def palette(pilot):
        await settled(pilot)
        await pilot.press("ctrl+p")
        await until(pilot, lambda: bool(pilot.app.screen.query(Input)))
        steady_cursor(pilot.app.screen.query_one(Input))
        await pilot.press(*"run")
        await until(pilot, lambda: searched(pilot))
        await pilot.pause(0.3)

    assert snap_compare(app, terminal_size=(120, 40), run_before=palette)
