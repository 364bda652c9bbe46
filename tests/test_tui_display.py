"""What the TUI shows (Pilot): the Log re-wraps lines written while hidden, graph columns follow the
width (id, state and reason at 80x24), no stale "recipe invalid" or last-run time, one percent for
graph and bar, "loading model… N s" while a node has no steps, and a failed node's error first."""

from __future__ import annotations

import re
import time
import types

import pytest
from test_tui_app import RECIPE, SLOW, drive, make_app, run_to_end, screen_text, states, until

from fluxkiln.engine import RunContext, Text, hookimpl, node
from fluxkiln.engine.registry import Registry
from fluxkiln.engine.runner import Engine
from fluxkiln.tui.app import FluxkilnApp
from fluxkiln.tui.details import NodeDetails
from fluxkiln.tui.logview import RunLog
from helpers import textnodes


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def widget_text(widget) -> list[str]:
    """The screen lines inside ``widget``'s region."""
    lines = screen_text(widget.app).split("\n")
    r = widget.region
    return [line[r.x:r.right] for line in lines[r.y:r.bottom]]


def test_log_lines_written_while_hidden_are_wrapped_for_the_width_shown(tmp_path, fresh_cache):
    app = make_app(tmp_path, fresh_cache)

    async def script(pilot):
        await pilot.press("f4")  # shown once
        await pilot.pause()
        await pilot.press("f3")  # hidden while the run writes
        await run_to_end(pilot, app)
        await pilot.press("f4")
        await pilot.pause()
        log = app.main.query_one(RunLog)
        lines = widget_text(log)
        assert any("a started (no cached result)" in line for line in lines), lines
        assert max(len(line.rstrip()) for line in lines) > 30  # not wrapped at ~20 columns
        await pilot.resize_terminal(200, 40)
        await pilot.pause(0.2)
        assert max(s.cell_length for s in log.lines) <= log.scrollable_content_region.width

    drive(app, script)


def test_graph_columns_follow_the_width_and_80x24_shows_id_state_and_reason(tmp_path, fresh_cache):
    app = make_app(tmp_path, fresh_cache, SLOW.format(steps=400))

    async def script(pilot):
        graph = app.main.graph
        await until(pilot, lambda: all(n.reason for n in app.main.model.nodes.values()))
        await pilot.press("ctrl+r")
        await until(pilot, lambda: (app.main.model.nodes["s"].step or 0) >= 2)
        await pilot.resize_terminal(80, 24)
        await until(pilot, lambda: graph._layout() == (graph._columns, graph._widths))
        await pilot.pause(0.2)
        shown = "\n".join(widget_text(graph))
        for nid in ("a", "b", "s"):
            assert f" {nid} " in shown
        assert "✓ done" in shown and "▶ " in shown
        assert "no cached result" in shown  # the reason, readable
        narrow = graph._widths[-1]
        await pilot.resize_terminal(200, 40)
        await until(pilot, lambda: graph._widths[-1] > narrow + 20)
        assert "type" in graph._columns and "concat" in "\n".join(widget_text(graph))
        await pilot.press("escape")
        await until(pilot, lambda: not app.main.running)

    drive(app, script, size=(120, 40))


def test_invalid_run_note_clears_once_fixed_and_pending_details_forget_the_last_run(tmp_path, fresh_cache):
    app = make_app(tmp_path, fresh_cache)

    async def script(pilot):
        main = app.main
        await run_to_end(pilot, app)
        main.graph.move_cursor(row=1)  # node b
        await pilot.pause()
        assert "took " in "\n".join(widget_text(main.query_one(NodeDetails)))
        main.editor.load_text(RECIPE.replace('sep = "+"', 'sep = "-"'))
        await until(pilot, lambda: states(app)["b"] == "pending")
        await pilot.pause()
        details = "\n".join(widget_text(main.query_one(NodeDetails)))
        assert "○ pending" in details and "took " not in details
        main.editor.load_text(RECIPE.replace('sep = "+"', "sep = 5"))
        await until(pilot, lambda: main.status.status.problems == 1)
        await pilot.press("ctrl+r")
        await until(pilot, lambda: main.status.status.run_note == "(recipe invalid)")
        main.editor.load_text(RECIPE)
        await until(pilot, lambda: main.status.status.problems == 0)
        assert "recipe invalid" not in screen_text(app)

    drive(app, script)


def test_graph_and_progress_bar_show_the_same_percent(tmp_path, fresh_cache):
    app = make_app(tmp_path, fresh_cache, SLOW.format(steps=3).replace("delay = 0.02", "delay = 1.5"))

    async def script(pilot):
        await pilot.press("ctrl+r")
        await until(pilot, lambda: app.main.model.nodes["s"].step == 2)
        await pilot.pause(0.2)
        shown = screen_text(app)
        assert "▶ 66%" in shown and "2/3 · 66%" in shown  # 2/3 is 66.7 %: one number, everywhere
        assert "67%" not in shown
        await pilot.press("escape")
        await until(pilot, lambda: not app.main.running)

    drive(app, script)


@node("load_slowly", version="1", cache="never")
def load_slowly(ctx: RunContext, seconds: float = 2.5) -> Text:
    """Takes a while and reports no steps, like a model loading."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        ctx.check_cancelled()
        time.sleep(0.05)
    return Text("loaded")


@hookimpl
def register_node_types(register):
    register(load_slowly)


def test_a_node_without_steps_shows_what_it_does_and_for_how_long(tmp_path, fresh_cache):
    path = tmp_path / "load.toml"
    path.write_text('[recipe]\nname = "load"\n[nodes.base]\ntype = "load_slowly"\n')
    plugin = types.SimpleNamespace(register_node_types=register_node_types, __name__="loadslowly")
    engine = Engine(Registry.load(extra=[textnodes, plugin], entry_points=False), cache_dir=fresh_cache)
    app = FluxkilnApp(path, engine=engine, validate_delay=0.02)

    async def script(pilot):
        await until(pilot, lambda: app.main.status.status.problems == 0)
        await pilot.press("ctrl+r")
        elapsed = re.compile(r"loading model… [1-9] s")
        await until(pilot, lambda: len(elapsed.findall(screen_text(app))) == 2, timeout=10)
        assert "starting" not in screen_text(app)  # the graph's row and the progress label both say it
        await until(pilot, lambda: not app.main.running, timeout=10)
        assert states(app) == {"base": "done"}

    drive(app, script)


def test_a_failed_nodes_details_start_with_the_error_and_what_to_try(tmp_path, fresh_cache):
    text = RECIPE + '\n[nodes.x]\ntype = "boom"\ntext = "@b"\nmessage = "it broke"\n'
    app = make_app(tmp_path, fresh_cache, text)

    async def script(pilot):
        await run_to_end(pilot, app)
        app.main.graph.move_cursor(row=list(app.main.model.nodes).index("x"))
        await pilot.pause()
        lines = [line.strip() for line in widget_text(app.main.query_one(NodeDetails)) if line.strip()]
        assert lines[0].startswith("x  boom  ✗ failed")
        assert lines[1].startswith("NodeError: it broke") and lines[2].startswith("try: try again")
        assert lines.index(next(ln for ln in lines if ln.startswith("parameters"))) > 2

    drive(app, script)
