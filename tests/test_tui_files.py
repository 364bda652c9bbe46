"""Files in the TUI (Pilot and CLI): binary and non-UTF-8 recipes are refused, a fatal error exits
non-zero, a disk change under unsaved edits asks (reload / keep mine), saving warns before it
overwrites an outside change, runs use the text the panels show, and the editor soft-wraps."""

from __future__ import annotations

import subprocess
import sys

import pytest
from test_tui_app import RECIPE, drive, make_app, screen_text, states, until

from fluxkiln.tui import app as app_module
from fluxkiln.tui.dialogs import ChoiceDialog
from fluxkiln.tui.main import MainScreen

PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256))
LATIN1 = '[recipe]\nname = "caf\xe9"\n'.encode("latin-1")


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


@pytest.mark.parametrize("name, data, says", [("shot.png", PNG, "is a binary file, not a recipe"),
                                              ("latin.toml", LATIN1, "is not UTF-8 text")],
                         ids=["binary", "latin-1"])
def test_cli_refuses_a_binary_or_non_utf8_file_with_one_line_and_status_2(tmp_path, fresh_cache, name, data, says):
    (tmp_path / name).write_bytes(data)
    res = subprocess.run([sys.executable, "-m", "fluxkiln.engine.cli", "tui", name], cwd=tmp_path,
                         capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert res.returncode == 2, res
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and says in lines[0] and name in lines[0], res.stderr
    assert "Traceback" not in res.stderr + res.stdout


def test_open_dialog_refuses_a_non_utf8_recipe_with_a_toast_and_keeps_the_open_one(tmp_path, fresh_cache):
    (tmp_path / "latin.toml").write_bytes(LATIN1)
    app = make_app(tmp_path, fresh_cache)

    async def script(pilot):
        await pilot.press("ctrl+o")
        await pilot.pause()
        picker = app.screen.query_one("#recipe-list")
        picker.highlighted = next(i for i in range(picker.option_count)
                                  if str(picker.get_option_at_index(i).id).endswith("latin.toml"))
        await pilot.press("enter")
        await until(pilot, lambda: app.screen is app.main)
        assert app.is_running
        assert app.main.editor.path.name == "demo.toml" and app.main.editor.text == RECIPE
        await until(pilot, lambda: "is not UTF-8 text" in screen_text(app), timeout=3)

    drive(app, script, notifications=True)


def test_a_fatal_error_exits_non_zero(tmp_path, fresh_cache, monkeypatch):
    (tmp_path / "demo.toml").write_text(RECIPE)

    def crash(self, path, text=None):
        raise RuntimeError("boom while opening")

    monkeypatch.setattr(MainScreen, "open_recipe", crash)
    assert app_module.run_tui("demo.toml", headless=True, hard_exit=False) == 1


def test_disk_change_under_unsaved_edits_asks_reload_or_keep_and_save_warns(tmp_path, fresh_cache):
    app = make_app(tmp_path, fresh_cache)
    path = tmp_path / "demo.toml"

    async def answer(pilot, choice: str) -> None:
        await until(pilot, lambda: isinstance(app.screen, ChoiceDialog))
        await pilot.click(f"#{choice}")
        await pilot.pause()

    async def script(pilot):
        editor, main = app.main.editor, app.main
        await pilot.press("ctrl+t")
        assert main.watcher.active
        mine = RECIPE.replace('value = "hi"', 'value = "mine"')
        editor.load_text(mine)
        runs = main.runs_started
        path.write_text(RECIPE.replace('value = "other"', 'value = "theirs"'))  # edited elsewhere
        await answer(pilot, "keep")
        assert editor.text == mine and editor.dirty and main.runs_started == runs  # nothing ran from disk
        await pilot.press("ctrl+s")  # the outside change would be overwritten: asks first
        await answer(pilot, "cancel")
        assert 'value = "theirs"' in path.read_text()
        before = main.runs_ended
        await pilot.press("ctrl+s")
        await answer(pilot, "overwrite")
        assert path.read_text() == mine
        await until(pilot, lambda: main.runs_ended > before)
        assert main.model.nodes["a"].params["value"] == "mine" and states(app)["a"] == "done"
        editor.load_text(mine + "# more\n")
        before = main.runs_ended
        path.write_text(RECIPE.replace('value = "hi"', 'value = "disk"'))
        await answer(pilot, "reload")
        await until(pilot, lambda: main.runs_ended > before)
        assert 'value = "disk"' in editor.text and not editor.dirty
        assert main.last_run_text == editor.text and main.model.nodes["a"].params["value"] == "disk"

    drive(app, script)


def test_save_without_watch_warns_before_overwriting_an_outside_change(tmp_path, fresh_cache):
    app = make_app(tmp_path, fresh_cache)
    path = tmp_path / "demo.toml"

    async def script(pilot):
        app.main.editor.load_text(RECIPE + "# mine\n")
        path.write_text(RECIPE + "# theirs\n")
        await pilot.press("ctrl+s")
        await until(pilot, lambda: isinstance(app.screen, ChoiceDialog))
        assert app.screen.focused.id == "cancel"
        await pilot.press("enter")
        await pilot.pause()
        assert path.read_text().endswith("# theirs\n") and app.main.editor.dirty

    drive(app, script)


def test_a_data_file_change_under_unsaved_edits_runs_the_editors_text(tmp_path, fresh_cache):
    (tmp_path / "in.txt").write_text("one")
    text = '[recipe]\nname = "files"\n[nodes.r]\ntype = "read_file"\npath = "in.txt"\n' \
           '[nodes.j]\ntype = "concat"\nleft = "@r"\nsep = "+"\n'
    app = make_app(tmp_path, fresh_cache, text, name="files.toml")

    async def script(pilot):
        main = app.main
        await pilot.press("ctrl+t")
        main.editor.load_text(text.replace('sep = "+"', 'sep = "-"'))  # not saved
        before = main.runs_ended
        (tmp_path / "in.txt").write_text("two")
        await until(pilot, lambda: main.runs_ended > before)
        assert main.last_run_text == main.editor.text and main.model.nodes["j"].params["sep"] == "-"
        assert main.editor.dirty

    drive(app, script)


def test_editor_soft_wraps_by_default_alt_z_toggles_and_it_is_wide_enough(tmp_path, fresh_cache):
    long = 'prompt = "' + "a very long prompt " * 8 + '"'
    app = make_app(tmp_path, fresh_cache, RECIPE.replace('value = "hi"', 'value = "hi"\n# ' + long))

    async def script(pilot):
        editor = app.main.editor
        assert editor.soft_wrap
        assert editor.content_region.width - editor.gutter_width >= 50  # at 120 columns
        assert editor.wrapped_document.height > editor.document.line_count
        editor.focus()
        await pilot.press("alt+z")
        assert not editor.soft_wrap
        editor.cursor_location = (6, 0)  # the long comment line
        await pilot.press("end")
        await pilot.pause()
        assert editor.scroll_x > 0
        await pilot.press("alt+z")
        await pilot.pause()
        assert editor.soft_wrap and editor.scroll_x == 0
        await pilot.resize_terminal(80, 24)
        await pilot.pause()
        assert editor.scroll_x == 0 and editor.wrapped_document.height > editor.document.line_count

    drive(app, script)
