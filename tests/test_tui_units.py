"""TUI building blocks without a running app: highlighting, plot, half-block images, state model,
atomic save, recipe discovery, templates, log lines and the observer's throttling."""

from __future__ import annotations

import os

import pytest
from PIL import Image

from fluxkiln.engine.events import Event
from fluxkiln.engine.registry import Registry
from fluxkiln.engine.validate import check_text
from fluxkiln.tui.editor import atomic_write
from fluxkiln.tui.highlight import highlight_toml
from fluxkiln.tui.images import halfblock_rows
from fluxkiln.tui.logtext import log_text
from fluxkiln.tui.observer import RunObserver
from fluxkiln.tui.picker import create_recipe, find_recipes
from fluxkiln.tui.plot import braille_plot
from fluxkiln.tui.progress import format_eta, format_rate
from fluxkiln.tui.state import RunModel
from fluxkiln.tui.templates import TEMPLATES
from helpers import textnodes


def spans_by_text(text: str) -> dict[str, set[str]]:
    lines = text.split("\n")
    out: dict[str, set[str]] = {}
    for row, start, end, name in highlight_toml(text):
        out.setdefault(lines[row][start:end], set()).add(name)
    return out


def test_highlight_marks_tables_keys_values_links_vars_and_multiline_strings():
    text = ('[nodes.a]  # the first\ntype = "const"\nleft = "@b.text"\nlit = "@@not a link"\n'
            'p = "x ${trigger} y"\nn = -1.5e3\nok = true\narr = [1,\n  "two"]\n'
            'doc = """one\n[not.a.table]\n"""\nwhen = 2024-05-01\n')
    s = spans_by_text(text)
    assert "heading" in s["[nodes.a]"] and "comment" in s["# the first"]
    assert "toml.key" in s["type"] and "string" in s['"const"']
    assert s['"@b.text"'] == {"fluxkiln.link"}
    assert "fluxkiln.link" not in s['"@@not a link"']
    assert "fluxkiln.var" in s["${trigger}"]
    assert "number" in s["-1.5e3"] and "boolean" in s["true"] and "toml.datetime" in s["2024-05-01"]
    assert "string" in s['"two"']  # continuation line of an open array is values, not a key
    assert s["[not.a.table]"] == {"string"}  # inside a multi-line string


def test_highlight_survives_garbage():
    for text in ('"unterminated\n[[', "= = =\n]]]", '"""never closed\nx = 1', "a = {b = [1, {c = 2}]}"):
        for row, start, end, _name in highlight_toml(text):
            assert 0 <= start <= end <= len(text.split("\n")[row])


def test_braille_plot_spans_the_width_and_falls():
    lines = braille_plot([1 / (i + 1) for i in range(30)], width=20, height=3)
    assert len(lines) == 3 and all(len(line) == 20 for line in lines)
    assert lines[0][0] != "\u2800" and lines[-1][-1] != "\u2800"  # starts high left, ends low right
    assert lines[0][-1] == "\u2800"
    assert braille_plot([float("nan"), float("inf")], 5, 1) == ["\u2800" * 5]
    assert len(braille_plot(list(range(10000)), 8, 2)[0]) == 8


def test_halfblock_rows_fit_and_keep_colours():
    im = Image.new("RGB", (40, 20), (255, 0, 0))
    im.paste((0, 0, 255), (0, 10, 40, 20))
    rows = halfblock_rows(im, width=20, height=20)
    assert len(rows) == 5  # 20 px wide -> 10 px tall -> 5 rows of half blocks
    assert sum(len(s.text) for s in rows[0]) == 20
    assert rows[0][0].style.color.triplet == (255, 0, 0)
    assert rows[-1][0].style.bgcolor.triplet == (0, 0, 255)
    assert halfblock_rows(im, 0, 5) == []


def test_eta_and_rate_formatting():
    assert format_eta(None) == "--:--" and format_eta(65) == "1:05" and format_eta(3725) == "1:02:05"
    assert format_rate(None) == "-- it/s" and format_rate(12.34) == "12.3 it/s" and format_rate(0.5) == "2.0 s/it"


def test_atomic_write_replaces_whole_file_and_keeps_mode(tmp_path):
    p = tmp_path / "r.toml"
    p.write_text("old")
    os.chmod(p, 0o600)
    atomic_write(p, "new ✓")
    assert p.read_text(encoding="utf-8") == "new ✓" and (p.stat().st_mode & 0o777) == 0o600
    assert [f.name for f in tmp_path.iterdir()] == ["r.toml"]  # no temp file left behind
    with pytest.raises(OSError):
        atomic_write(tmp_path / "missing-dir" / "x.toml", "x")


def test_find_recipes_and_create_from_template(tmp_path):
    (tmp_path / "pyproject.toml").write_text("[project]\nname='x'\n")
    (tmp_path / "a.toml").write_text('[recipe]\nname = "a"\n')
    (tmp_path / "recipes" / "sub").mkdir(parents=True)
    (tmp_path / "recipes" / "sub" / "b.toml").write_text('[nodes.x]\ntype = "const"\n')
    assert [p.name for p in find_recipes(tmp_path)] == ["a.toml", "b.toml"]
    path = create_recipe(tmp_path, "recipes/my new[1]", "images")
    assert path == tmp_path / "recipes" / "my new[1].toml"
    assert 'name = "my-new-1"' in path.read_text()
    with pytest.raises(ValueError, match="already exists"):
        create_recipe(tmp_path, "recipes/my new[1].toml", "images")
    with pytest.raises(ValueError, match="file name"):
        create_recipe(tmp_path, "  ", "images")


def test_images_template_is_a_valid_recipe(tmp_path):
    checked, problems = check_text(TEMPLATES["images"].render("demo"), Registry.load(), tmp_path / "demo.toml")
    assert problems == [] and checked.order == ["base", "images", "saved"]


def _checked(text: str):
    reg = Registry.load(extra=[textnodes], entry_points=False)
    checked, problems = check_text(text, reg, None)
    assert not problems, problems
    return checked


def test_run_model_follows_events_and_marks_unstarted_nodes_cancelled():
    checked = _checked('[recipe]\nname="m"\n[nodes.a]\ntype="const"\n[nodes.b]\ntype="concat"\nleft="@a"\n'
                       '[nodes.c]\ntype="concat"\nleft="@b"\n')
    model = RunModel()
    model.set_recipe(checked)
    assert list(model.nodes) == ["a", "b", "c"] and model.nodes["b"].links == {"left": "@a.output"}
    plan = {n: {"action": "run", "reason": "no cached result"} for n in "abc"}
    model.apply(Event("run_started", "r1", data={"plan": plan}))
    model.apply(Event("node_cached", "r1", "a", "const", {"source": "disk"}))
    model.apply(Event("node_started", "r1", "b", "concat", {"reason": "param `sep` changed"}))
    model.apply(Event("node_progress", "r1", "b", "concat", {"step": 3, "total": 10, "rate": 2.0, "eta": 3.5}))
    assert model.nodes["b"].state == "running" and model.nodes["b"].step == 3
    model.apply(Event("node_cancelled", "r1", "b", "concat", {"seconds": 1.0}))
    model.apply(Event("run_finished", "r1", data={"status": "cancelled"}))
    assert [n.state for n in model.nodes.values()] == ["cached", "cancelled", "cancelled"]
    assert model.nodes["c"].reason == "run cancelled before it ran"


class _Sink:
    def __init__(self):
        self.messages = []

    def post_message(self, msg):
        self.messages.append(msg)
        return True


def test_observer_coalesces_progress_without_losing_metric_points():
    sink = _Sink()
    obs = RunObserver(sink, interval=60.0)
    for step in range(1, 11):
        obs.on_event(Event("node_progress", "r", "t", "train", {"step": step, "total": 10,
                                                                  "metrics": {"loss": 1.0 / step}}))
    obs.on_event(Event("node_finished", "r", "t", "train", {"seconds": 1.0}))
    progress = [m for m in sink.messages if m.event.event == "node_progress"]
    assert len(progress) <= 2  # the first one and the last step, not ten
    points = [p for m in progress for p in m.points]
    assert [s for s, _ in points] == list(range(1, 11))
    assert sink.messages[-1].event.event == "node_finished"


def test_observer_turns_previews_and_image_artifacts_into_thumbnails(tmp_path):
    sink = _Sink()
    obs = RunObserver(sink)
    big = Image.new("RGB", (1024, 512), (10, 200, 30))
    obs.on_event(Event("node_progress", "r", "t", "train", {"step": 1, "total": 2}, {"preview": big}))
    path = tmp_path / "out [1].png"
    big.save(path)
    (tmp_path / "notes.txt").write_text("x")
    obs.on_event(Event("node_finished", "r", "s", "save", {"artifacts": [str(path), str(tmp_path / "notes.txt")]}))
    previews = [m for m in sink.messages if isinstance(m, RunObserver.Preview)]
    assert [p.live for p in previews] == [True, False]
    assert max(previews[0].thumbs[0].image.size) <= 256
    assert previews[1].thumbs[0].caption == "s · out [1].png" and obs.shown_files


def test_log_lines_are_plain_text():
    line = log_text(Event("node_failed", "r", "n", "boom", {"error": "[bold]x[/bold]", "error_type": "NodeError",
                                                           "hint": "[link=http://e]y[/link]"}))
    assert "[bold]x[/bold]" in line.plain and "[link=http://e]y[/link]" in line.plain
    assert log_text(Event("node_progress", "r", "n", "t", {})) is None


def test_help_lists_every_binding_of_the_app_and_its_widgets():
    from fluxkiln.tui.app import FluxkilnApp
    from fluxkiln.tui.graph import GraphPanel
    from fluxkiln.tui.editor import RecipeEditor
    from fluxkiln.tui.help import key_label, sections
    from fluxkiln.tui.images import ImagePreview
    from fluxkiln.tui.main import MainScreen

    listed = " ".join(keys for _title, rows in sections(FluxkilnApp) for keys, _desc in rows)
    for cls in (FluxkilnApp, MainScreen, GraphPanel, ImagePreview, RecipeEditor):
        for b in cls.BINDINGS:
            for key in b.key.split(","):
                assert key_label(key) in listed, (cls.__name__, key)


def test_paths_are_shown_relative(tmp_path, monkeypatch):
    from fluxkiln.tui.status import Status, status_text

    monkeypatch.chdir(tmp_path)
    text = status_text(Status(path=tmp_path / "r[1].toml", dirty=True, problems=2, watching=True)).plain
    assert "r[1].toml ● unsaved" in text and "✗ 2 problems" in text and "watch: ON" in text
    assert str(tmp_path) not in text
    assert "no recipe open" in status_text(Status()).plain
