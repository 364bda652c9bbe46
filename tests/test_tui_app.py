"""The TUI driven with Textual's Pilot on the engine-only test nodes: open, break and fix a recipe,
run, cancel, force, watch, failures, dialogs and escaping of untrusted text."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from fluxkiln.engine.registry import Registry
from fluxkiln.engine.runner import Engine
from fluxkiln.tui.app import FluxkilnApp
from fluxkiln.tui.problems import ProblemList
from fluxkiln.tui.watching import Watch
from helpers import textnodes

RECIPE = '''[recipe]
name = "demo"

[nodes.a]
type = "const"
value = "hi"

[nodes.b]
type = "concat"
left = "@a"
sep = "+"

[nodes.c]
type = "const"
value = "other"

[nodes.d]
type = "concat"
left = "@c"
'''

SLOW = RECIPE + '''
[nodes.s]
type = "slow"
text = "@b"
steps = {steps}
delay = 0.02
'''


def make_app(tmp_path: Path, cache: Path, text: str = RECIPE, name: str = "demo.toml", **kw) -> FluxkilnApp:
    path = tmp_path / name
    path.write_text(text)
    engine = Engine(Registry.load(extra=[textnodes], entry_points=False), cache_dir=cache)
    return FluxkilnApp(path, engine=engine, validate_delay=0.02, watch_debounce=0.1, **kw)


def drive(app: FluxkilnApp, script, size=(120, 40), notifications: bool = False) -> None:
    async def main():
        async with app.run_test(size=size, notifications=notifications) as pilot:
            await until(pilot, lambda: app.main.status.status.problems is not None)
            await script(pilot)

    asyncio.run(main())


async def until(pilot, cond, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for the UI")
        await pilot.pause(0.02)
    await pilot.pause()  # let the screen catch up with the state


async def run_to_end(pilot, app, key: str = "ctrl+r") -> None:
    before = app.main.runs_ended
    await pilot.press(key)
    await until(pilot, lambda: app.main.runs_ended > before)


def states(app: FluxkilnApp) -> dict[str, str]:
    return {n: info.state for n, info in app.main.model.nodes.items()}


def screen_text(app: FluxkilnApp) -> str:
    """Everything on the screen, as the terminal would show it."""
    return "\n".join("".join(seg.text for seg in strip) for strip in app.screen._compositor.render_strips())


def error_bg(app: FluxkilnApp, x: int, y: int) -> bool:
    """Whether the screen cell at (x, y) has the editor's problem-line background."""
    color = app.screen._compositor.get_style_at(x, y).bgcolor
    return color is not None and color.triplet is not None and color.triplet.hex == "#5f1f1f"


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def test_open_shows_graph_in_order_with_reasons_then_runs_until_every_node_is_done(tmp_path, fresh_cache):
    app = make_app(tmp_path, fresh_cache)

    async def script(pilot):
        await until(pilot, lambda: states(app).get("a") == "pending" and app.main.model.nodes["a"].reason)
        assert list(app.main.model.nodes) == ["a", "b", "c", "d"]
        assert app.main.model.nodes["a"].reason == "no cached result"
        assert "demo.toml" in screen_text(app) and "✓ valid" in screen_text(app)
        await run_to_end(pilot, app)
        assert states(app) == dict.fromkeys("abcd", "done")
        assert app.main.status.status.run == "ok"
        await pilot.press("f4")
        await pilot.pause()
        assert "a started (no cached result)" in screen_text(app) and "run ok in" in screen_text(app)
        await run_to_end(pilot, app)
        assert states(app) == dict.fromkeys("abcd", "cached")

    drive(app, script)


def test_break_the_recipe_see_every_error_with_its_line_then_fix_it(tmp_path, fresh_cache):
    app = make_app(tmp_path, fresh_cache)

    async def script(pilot):
        editor = app.main.editor
        broken = RECIPE.replace('left = "@a"', 'left = "@nope"').replace('value = "other"',
                                                                          'value = "other"\ncolour = 3')
        editor.load_text(broken)
        await until(pilot, lambda: app.main.status.status.problems == 2)
        problems = app.main.query_one(ProblemList)
        assert problems.display
        lines = {p.line for p in problems.problems}
        assert lines == {10, 16} and editor.error_lines == lines
        shown = screen_text(app)
        assert "line 10  node 'b' key 'left': link to missing node 'nope'" in shown
        assert "line 16  node 'c' key 'colour': unknown parameter 'colour'" in shown
        assert "last valid recipe" in shown
        region = editor.content_region
        text_x = region.x + editor.gutter_width + 1
        assert error_bg(app, text_x, region.y + 9) and error_bg(app, text_x, region.y + 15)
        assert not error_bg(app, text_x, region.y + 8)
        assert app.main.status.status.dirty
        problems.focus()
        problems.highlighted = 1
        await pilot.press("enter")
        await pilot.pause()
        assert editor.cursor_location == (15, 0) and editor.has_focus
        await pilot.press("ctrl+r")  # refused: invalid
        await pilot.pause(0.2)
        assert not app.main.running and app.main.model.status == "idle"
        editor.load_text(RECIPE)
        await until(pilot, lambda: app.main.status.status.problems == 0)
        assert not problems.display and editor.error_lines == set()
        assert not error_bg(app, text_x, region.y + 9) and "last valid recipe" not in screen_text(app)
        assert not app.main.status.status.dirty  # back to what is on disk

    drive(app, script, size=(160, 40))


def test_typing_saving_and_the_unsaved_marker(tmp_path, fresh_cache):
    app = make_app(tmp_path, fresh_cache)
    path = tmp_path / "demo.toml"

    async def script(pilot):
        editor = app.main.editor
        editor.focus()
        editor.cursor_location = (1, 0)
        await pilot.press("#", "space")
        assert editor.dirty and "● unsaved" in screen_text(app)
        assert path.read_text() == RECIPE
        await pilot.press("ctrl+s")
        await pilot.pause()
        assert path.read_text() == RECIPE.replace('name = "demo"', '# name = "demo"')
        assert not editor.dirty and "● unsaved" not in screen_text(app)
        await until(pilot, lambda: app.main.status.status.problems == 1)  # [recipe] name is now missing

    drive(app, script)


def test_cancel_mid_run_keeps_what_finished_and_the_ui_stays_responsive(tmp_path, fresh_cache):
    app = make_app(tmp_path, fresh_cache, SLOW.format(steps=500))

    async def script(pilot):
        await pilot.press("ctrl+r")
        await until(pilot, lambda: (app.main.model.nodes["s"].step or 0) >= 3)
        assert "Progress" in screen_text(app) and "/500" in screen_text(app)
        editor = app.main.editor
        editor.focus()
        editor.cursor_location = (0, 0)
        await pilot.press("#")  # typing while a node runs
        assert editor.text.startswith("#[recipe]") and app.main.running
        await pilot.press("escape")
        await until(pilot, lambda: not app.main.running)
        assert states(app)["s"] == "cancelled" and app.main.model.status == "cancelled"
        assert app.main.model.nodes["s"].step < 500
        assert {n: states(app)[n] for n in "abcd"} == dict.fromkeys("abcd", "done")
        assert editor.text.startswith("#[recipe]")  # the edit is still there
        result_files = sorted(p.name for p in (tmp_path / "runs" / "demo").iterdir())
        assert "report.json" in result_files

    drive(app, script)
    app2 = make_app(tmp_path, fresh_cache, SLOW.format(steps=5))

    async def rerun(pilot):
        await run_to_end(pilot, app2)
        assert {n: states(app2)[n] for n in "abcd"} == dict.fromkeys("abcd", "cached")  # nothing lost
        assert states(app2)["s"] == "done"

    drive(app2, rerun)


def test_ctrl_c_cancels_a_run_and_otherwise_copies(tmp_path, fresh_cache):
    app = make_app(tmp_path, fresh_cache, SLOW.format(steps=500))

    async def script(pilot):
        await pilot.press("ctrl+c")  # idle: copy, not cancel, not quit
        assert app.is_running and not app.main.running
        await pilot.press("ctrl+r")
        await until(pilot, lambda: (app.main.model.nodes["s"].step or 0) >= 2)
        await pilot.press("ctrl+c")
        await until(pilot, lambda: not app.main.running)
        assert states(app)["s"] == "cancelled" and app.is_running

    drive(app, script)


def test_force_reruns_the_selected_node_and_its_dependants(tmp_path, fresh_cache):
    app = make_app(tmp_path, fresh_cache)

    async def script(pilot):
        await run_to_end(pilot, app)
        graph = app.main.graph
        graph.focus()
        graph.move_cursor(row=0)
        await pilot.pause()
        textnodes.CALLS.clear()
        await run_to_end(pilot, app, "f")
        assert states(app) == {"a": "done", "b": "done", "c": "cached", "d": "cached"}
        assert app.main.model.nodes["a"].reason == "forced"
        assert textnodes.CALLS == ["a", "b"]
        graph.move_cursor(row=2)
        await pilot.pause()
        await run_to_end(pilot, app, "ctrl+f")
        assert states(app) == {"a": "cached", "b": "cached", "c": "done", "d": "done"}

    drive(app, script)


def test_watch_reruns_only_affected_nodes_on_save_and_on_disk_change(tmp_path, fresh_cache):
    app = make_app(tmp_path, fresh_cache)
    path = tmp_path / "demo.toml"

    async def script(pilot):
        await run_to_end(pilot, app)
        await pilot.press("ctrl+t")
        assert app.main.watcher.active and "watch: ON" in screen_text(app)
        editor = app.main.editor
        editor.load_text(RECIPE.replace('sep = "+"', 'sep = "-"'))
        textnodes.CALLS.clear()
        await run_to_end(pilot, app, "ctrl+s")
        assert states(app) == {"a": "cached", "b": "done", "c": "cached", "d": "cached"}
        assert "'sep' changed" in app.main.model.nodes["b"].reason
        await pilot.pause(0.5)  # the watcher also saw our own save: it must not rerun again
        assert not app.main.running and textnodes.CALLS == ["b"]
        before = app.main.runs_ended
        path.write_text(path.read_text().replace('value = "other"', 'value = "changed"'))  # edited elsewhere
        await until(pilot, lambda: app.main.runs_ended > before)
        assert states(app) == {"a": "cached", "b": "cached", "c": "done", "d": "done"}
        assert 'value = "changed"' in editor.text and not editor.dirty
        await pilot.press("ctrl+t")
        assert not app.main.watcher.active

    drive(app, script)


def test_watch_runs_a_save_once_when_the_file_event_comes_before_the_saved_message(tmp_path, fresh_cache):
    app = make_app(tmp_path, fresh_cache)
    path = tmp_path / "demo.toml"

    async def script(pilot):
        main, editor = app.main, app.main.editor
        await pilot.press("ctrl+t")
        editor.load_text(RECIPE.replace('value = "hi"', 'value = "mine"'))
        editor.save()  # posts Saved; a loaded machine can deliver the watcher's event first
        main.on_watch_files_changed(Watch.FilesChanged({str(path)}))
        assert main.runs_started == 0  # the event left the rerun to the save
        await until(pilot, lambda: main.runs_ended == 1)
        await pilot.pause(0.5)
        assert main.runs_started == 1 and states(app)["a"] == "done"

    drive(app, script)


def test_watch_reruns_when_a_file_the_recipe_reads_changes(tmp_path, fresh_cache):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "in.txt").write_text("one")
    text = ('[recipe]\nname = "files"\n[nodes.r]\ntype = "read_file"\npath = "data/in.txt"\n'
            '[nodes.j]\ntype = "concat"\nleft = "@r"\n')
    app = make_app(tmp_path, fresh_cache, text, name="files.toml")

    async def script(pilot):
        await run_to_end(pilot, app)
        await pilot.press("ctrl+t")
        before = app.main.runs_ended
        (tmp_path / "data" / "in.txt").write_text("two")
        await until(pilot, lambda: app.main.runs_ended > before)
        assert states(app) == {"r": "done", "j": "done"}
        assert "in.txt" in app.main.model.nodes["r"].reason

    drive(app, script)


def test_a_failed_node_shows_its_error_and_dependants_are_skipped_all_escaped(tmp_path, fresh_cache):
    text = RECIPE + '\n[nodes.x]\ntype = "boom"\ntext = "@b"\nmessage = "[bold red]kaput[/] [link=x]"\n' \
                    '\n[nodes.y]\ntype = "concat"\nleft = "@x"\n'
    app = make_app(tmp_path, fresh_cache, text)

    async def script(pilot):
        await run_to_end(pilot, app)
        assert states(app)["x"] == "failed" and states(app)["y"] == "skipped" and states(app)["d"] == "done"
        app.main.graph.move_cursor(row=list(app.main.model.nodes).index("x"))
        await pilot.pause()
        shown = screen_text(app)
        assert "[bold red]kaput[/] [link=x]" in shown  # literally, not as markup
        assert "try: try again" in shown
        await pilot.press("f4")
        await pilot.pause()
        assert "failed: NodeError: [bold red]kaput[/] [link=x]" in screen_text(app)

    drive(app, script, size=(160, 40))


def test_markup_in_file_names_and_values_is_shown_literally(tmp_path, fresh_cache):
    (tmp_path / "data [v1]").mkdir()
    (tmp_path / "data [v1]" / "in[1].txt").write_text("hello")
    text = ('[recipe]\nname = "esc"\n[nodes.r]\ntype = "read_file"\npath = "data [v1]/in[1].txt"\n'
            '[nodes.m]\ntype = "read_file"\npath = "[red]missing[/red].txt"\n')
    app = make_app(tmp_path, fresh_cache, text, name="esc [draft].toml")

    async def script(pilot):
        await until(pilot, lambda: app.main.status.status.problems == 1)
        shown = screen_text(app)
        assert "esc [draft].toml" in shown
        assert "file not found: [red]missing[/red].txt" in shown, shown
        app.main.editor.load_text(text.split("[nodes.m]")[0])
        await until(pilot, lambda: app.main.status.status.problems == 0)
        await run_to_end(pilot, app)
        assert states(app) == {"r": "done"}
        assert "'data [v1]/in[1].txt'" in screen_text(app) or "in[1].txt" in screen_text(app)

    drive(app, script, size=(160, 40))


def test_dialogs_help_node_types_picker_and_new_recipe(tmp_path, fresh_cache):
    app = make_app(tmp_path, fresh_cache)

    async def script(pilot):
        await pilot.press("f1")
        await pilot.pause()
        shown = screen_text(app)
        assert "ctrl+r" in shown and "Toggle watch mode" in shown and "Force rerun node" in shown
        await pilot.press("escape")
        await pilot.press("f2")
        await pilot.pause()
        assert "Join two texts." in screen_text(app) or "Produce a constant text." in screen_text(app)
        await pilot.press("escape")
        await pilot.pause()
        assert app.screen is app.main
        await pilot.press("ctrl+o")
        await pilot.pause()
        assert "New recipe from a template" in screen_text(app) and "demo.toml" in screen_text(app)
        await pilot.press("enter")  # the first option: new recipe
        await pilot.pause()
        inp = app.screen.query_one("#new-path")
        inp.value = "fresh.toml"
        await pilot.press("enter")
        await until(pilot, lambda: app.screen is app.main and app.main.editor.path.name == "fresh.toml")
        assert (tmp_path / "fresh.toml").read_text().startswith("[recipe]\nname = \"fresh\"")
        await until(pilot, lambda: app.main.status.status.problems is not None)

    drive(app, script)


def test_quit_with_unsaved_changes_asks_first(tmp_path, fresh_cache):
    app = make_app(tmp_path, fresh_cache)

    async def script(pilot):
        app.main.editor.load_text(RECIPE + "\n# more\n")
        await pilot.pause()
        await pilot.press("ctrl+q")
        await pilot.pause()
        assert app.is_running and "unsaved changes" in screen_text(app)
        await pilot.press("escape")  # stay
        await pilot.pause()
        assert app.is_running and app.screen is app.main
        await pilot.press("ctrl+q")
        await pilot.pause()
        await pilot.click("#save")
        await pilot.pause()

    drive(app, script)
    assert (tmp_path / "demo.toml").read_text().endswith("# more\n")


def test_missing_recipe_opens_a_template_to_save(tmp_path, fresh_cache):
    engine = Engine(Registry.load(), cache_dir=fresh_cache)
    app = FluxkilnApp(tmp_path / "brand-new.toml", engine=engine, validate_delay=0.02)

    async def script(pilot):
        assert app.main.editor.dirty and 'name = "brand-new"' in app.main.editor.text
        await until(pilot, lambda: app.main.status.status.problems == 0)
        await pilot.press("ctrl+s")
        await pilot.pause()
        assert (tmp_path / "brand-new.toml").exists()

    drive(app, script)
