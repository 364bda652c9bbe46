"""Sweeps: [nodes.<id>.sweep] cells, per-cell caching, joins, validation, events, report and grid axes."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from fluxkiln.engine import ImageItem, Images, Model, RecipeInvalid, RunContext, Text, hookimpl, node
from fluxkiln.engine.registry import Registry
from fluxkiln.engine.runner import Engine


@node("paint", version="1")
def paint(ctx: RunContext, model: Model, shade: int = 0, label: str = "x", copies: int = 1,
          seed: int | None = None) -> Images:
    """Flat grey images; records its parameters, a timing and a score."""
    from PIL import Image

    return Images(ImageItem(image=Image.new("RGB", (16, 16), (shade, shade, shade)), seed=shade, prompt=label,
                            meta={"model": model.ref, "shade": shade, "copy": i, "scores": {"bright": shade / 255},
                                  "timing": {"seconds_per_image": 0.5, "seconds_per_step": 0.25}})
                  for i in range(copies))


@node("model_stub", version="1", cache="memory")
def model_stub(ctx: RunContext, name: str = "m") -> Model:
    """A stand-in model."""
    return Model(ref=name, kind="stub", key=name)


@node("word_of", version="1")
def word_of(ctx: RunContext, word: str = "w") -> Text:
    """One text (its sweep joins into a list of texts)."""
    return Text(word)


@node("count", version="1")
def count(ctx: RunContext, items: list[Text]) -> Text:
    """Join texts."""
    return Text("+".join(items))


@node("draw", version="1")
def draw(ctx: RunContext, prompt: str, background: str | None = None) -> Images:
    """A mini-flux scene drawn exactly as its prompt says (the background replaced by ``background`` if given):
    what the `evaluate` node's pixel checker scores right, or wrong in one known attribute."""
    import dataclasses
    import random

    from fluxkiln.plugins.miniflux import render, world

    layout = world.realise(world.parse(prompt), random.Random(0))
    if background:
        layout = dataclasses.replace(layout, background=background)
    [image] = render.to_pil(render.render([layout], 128, 128, supersample=1))
    return Images([ImageItem(image=image, seed=0, prompt=prompt)])


class Plugin:
    @hookimpl
    def register_node_types(self, register):
        for n in (paint, model_stub, word_of, count, draw):
            register(n)


BASE = """
[recipe]
name = "sw"
gpu_hour_price = 3.6

[nodes.a]
type = "model_stub"
name = "alpha"

[nodes.b]
type = "model_stub"
name = "beta"

[nodes.study]
type = "paint"
label = "hello"

[nodes.study.sweep]
model = ["@a", "@b"]
shade = [10, 20]
"""


@pytest.fixture
def engine(tmp_path):
    return Engine(Registry.load(extra=[Plugin()], entry_points=False), cache_dir=tmp_path / "cache")


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "sw.toml"
    path.write_text(textwrap.dedent(text))
    return path


def started(result) -> list[str]:
    return [e.node for e in result.events if e.event == "node_started"]


def test_cells_run_in_order_and_join_with_their_axes(engine, tmp_path):
    result = engine.run(write(tmp_path, BASE), output=tmp_path / "run")
    assert result.ok
    cells = ["study[model=a,shade=10]", "study[model=a,shade=20]", "study[model=b,shade=10]",
             "study[model=b,shade=20]"]
    assert started(result) == ["a", "b", *cells, "study"]
    joined = result.outputs["study"]["output"]
    assert [(i.meta["model"], i.meta["shade"]) for i in joined] == [("alpha", 10), ("alpha", 20), ("beta", 10),
                                                                   ("beta", 20)]
    assert joined[3].meta["sweep"] == {"node": "study", "cell": 3, "axes": {"model": "b", "shade": "20"},
                                       "values": {"model": "b", "shade": 20}, "set": {"model": "@b", "shade": 20}}
    assert "sweep" not in result.outputs[cells[0]]["output"][0].meta  # the cached cell value is untouched


def test_widening_a_sweep_runs_only_the_new_cells(engine, tmp_path):
    path = write(tmp_path, BASE)
    engine.run(path, output=tmp_path / "run")
    fresh = Engine(engine.registry, cache_dir=tmp_path / "cache")  # a new process: the disk cache only
    wider = fresh.run(path, output=tmp_path / "run", overrides=["nodes.study.sweep.shade=[10, 20, 30]"])
    assert wider.ok
    ran = [n for n in started(wider) if n.startswith("study[")]
    assert ran == ["study[model=a,shade=30]", "study[model=b,shade=30]"]
    cached = {e.node for e in wider.events if e.event == "node_cached"}
    assert {"study[model=a,shade=10]", "study[model=b,shade=20]"} <= cached
    assert len(wider.outputs["study"]["output"]) == 6


def test_force_on_a_swept_node_reruns_its_cells(engine, tmp_path):
    path = write(tmp_path, BASE)
    engine.run(path, output=tmp_path / "run")
    again = engine.run(path, output=tmp_path / "run", force=["study"])
    assert sum(n.startswith("study[") for n in started(again)) == 4


def test_explain_plan_lists_cells(engine, tmp_path):
    plan = engine.plan(write(tmp_path, BASE), output=tmp_path / "run")
    assert list(plan.nodes)[-1] == "study" and plan.nodes["study"].type == "sweep"
    assert plan.nodes["study[model=b,shade=10]"].type == "paint"


def test_a_non_joinable_output_becomes_a_list(engine, tmp_path):
    path = write(tmp_path, """
    [recipe]
    name = "texts"
    [nodes.c]
    type = "word_of"
    [nodes.c.sweep]
    word = ["red", "green", "blue"]
    [nodes.n]
    type = "count"
    items = "@c"
    """)
    result = engine.run(path, output=tmp_path / "run")
    assert result.ok and result.outputs["n"]["output"] == "red+green+blue"
    assert engine.check(path).nodes["c"].type.outputs == {"output": "list[text]"}


@pytest.mark.parametrize(("sweep", "message", "key"), [
    ("shade = 5", "a sweep value must be a non-empty list", "sweep.shade"),
    ("shade = []", "a sweep value must be a non-empty list", "sweep.shade"),
    ("shad = [1, 2]", "unknown parameter 'shad' for node type 'paint' in its sweep", "sweep.shad"),
    ('shade = [1, "x"]', "sweep value 2 (x): invalid value 'x'", "sweep.shade"),
    ("shade = [1, 1]", "sweep value 2 (1) repeats value 1", "sweep.shade"),
    ("label = ['a', 'b']", "'label' is both set and swept", "sweep.label"),
])
def test_sweep_problems_name_the_key_and_its_line(engine, tmp_path, sweep, message, key):
    text = BASE.replace("shade = [10, 20]", sweep)
    with pytest.raises(RecipeInvalid) as err:
        engine.check(write(tmp_path, text))
    found = [p for p in err.value.problems if message in p.message]
    assert found, [p.format() for p in err.value.problems]
    line = text.splitlines().index(sweep) + 1
    assert (found[0].node, found[0].key, found[0].line) == ("study", key, line)


def test_a_sweep_link_of_the_wrong_type_is_reported(engine, tmp_path):
    text = BASE.replace('model = ["@a", "@b"]', 'model = ["@a", "@study_x"]')
    with pytest.raises(RecipeInvalid) as err:
        engine.check(write(tmp_path, text))
    assert any("link to missing node 'study_x'" in p.message and p.key == "sweep.model" for p in err.value.problems)


def test_too_many_cells(engine, tmp_path):
    text = BASE.replace("shade = [10, 20]", "shade = " + str(list(range(256))) + "\ncopies = [1, 2, 3]")
    with pytest.raises(RecipeInvalid) as err:
        engine.check(write(tmp_path, text))
    assert any("1536 cells, more than 1024" in p.message for p in err.value.problems)


def test_report_has_a_table_per_sweep_with_timing_cost_and_scores(engine, tmp_path):
    result = engine.run(write(tmp_path, BASE), output=tmp_path / "run")
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    [table] = report["sweeps"]
    assert table["axes"] == ["model", "shade"]
    row = table["rows"][1]
    assert row["model"] == "a" and row["shade"] == 20 and row["seconds_per_image"] == 0.5
    assert row["cost_per_image"] == pytest.approx(3.6 * 0.5 / 3600)
    assert row["score:bright"] == pytest.approx(20 / 255, abs=1e-4)
    md = (tmp_path / "run" / "report.md").read_text()
    assert "## Sweep `study`" in md and "| state | model | shade | images | seconds_per_image" in md
    assert "score:bright" in md.split("## Sweep")[0]  # the per-node table picks up scores too
    again = engine.run(write(tmp_path, BASE), output=tmp_path / "run")  # all cached: numbers still there
    assert all(n == "cached" for n in again.nodes.values() if n)
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["sweeps"][0]["rows"][0]["seconds_per_image"] == 0.5 and result.ok


# ------------------------------------------------------------------ grid axes
def _grid_run(engine, tmp_path, extra: str, copies: int = 1):
    text = BASE.replace('label = "hello"', f'label = "hello"\ncopies = {copies}') + textwrap.dedent(f"""
    [nodes.g]
    type = "grid"
    images = "@study"
    cell_size = 32
    {extra}
    """)
    result = engine.run(write(tmp_path, text), output=tmp_path / "run")
    assert result.ok, [e.data for e in result.events if e.event == "node_failed"]
    return result.outputs["g"]["output"]


def _shades(page) -> list[list[int | None]]:
    return [[c["seed"] if c else None for c in row] for row in page.meta["cells"]]


def test_grid_lays_a_sweep_out_by_its_axes(engine, tmp_path):
    [page] = _grid_run(engine, tmp_path, "")
    assert _shades(page) == [[10, 20], [10, 20]]  # rows model a/b, columns shade
    assert (page.meta["rows"], page.meta["columns"]) == (2, 2)


def test_grid_axes_pages_and_several_images_per_cell(engine, tmp_path):
    pages = _grid_run(engine, tmp_path, 'page_axis = "model"\ncol_axis = "shade"', copies=2)
    assert len(pages) == 2 and [p.meta["page"] for p in pages] == [{"model": "a"}, {"model": "b"}]
    assert _shades(pages[0]) == [[10, 10, 20, 20]]  # two copies widen each column
    assert pages[1].prompt.endswith("model: b")


def test_grid_row_axis_from_image_parameters(engine, tmp_path):
    [page] = _grid_run(engine, tmp_path, 'row_axis = "shade"\ncol_axis = "model"\ntranspose = true')
    assert _shades(page) == [[10, 20], [10, 20]]


def test_inspect_writes_the_recipe_of_one_cell(engine, tmp_path):
    import tomllib

    from fluxkiln.engine.imagemeta import read_metadata
    from fluxkiln.engine.inspect_cmd import reproduce_recipe

    text = BASE + '\n[nodes.saved]\ntype = "save"\nimages = "@study"\noutput_format = "png"\n'
    result = engine.run(write(tmp_path, text), output=tmp_path / "run")
    assert result.ok
    meta = read_metadata(tmp_path / "run" / "saved_3.png")
    assert meta["prompt"] == "hello" and meta["seed"] == 20
    again, notes = reproduce_recipe(meta, "saved_3.png")
    study = tomllib.loads(again)["nodes"]["study"]
    assert "sweep" not in study and (study["model"], study["shade"]) == ("@b", 20)
    assert any("this image's cell: model = @b, shade = 20" in n for n in notes)
    (tmp_path / "again.toml").write_text(again)
    checked = engine.check(tmp_path / "again.toml")
    assert list(checked.nodes) == ["b", "study", "saved"] and checked.nodes["study"].params["seed"] == 20


# ------------------------------------------------------------------ scores of a downstream evaluate node
SCORED = """
[recipe]
name = "scored"

[nodes.study]
type = "draw"

[nodes.study.sweep]
prompt = ["a large red circle at the top left on a blue background",
          "a small yellow star at the right on a green background"]
background = BACKGROUNDS

[nodes.judged]
type = "evaluate"
images = "@study"
metric = "mini"
"""


def _scored_table(run_dir: Path) -> dict:
    return next(t for t in json.loads((run_dir / "report.json").read_text())["sweeps"] if t["node"] == "study")


def test_a_downstream_evaluate_reports_its_scores_per_cell_of_the_sweep(engine, tmp_path):
    text = SCORED.replace("BACKGROUNDS", '["", "white"]')  # as the prompt says, and wrong
    result = engine.run(write(tmp_path, text), output=tmp_path / "run")
    assert result.ok, [e.data for e in result.events if e.event == "node_failed"]
    table = _scored_table(tmp_path / "run")
    assert table["scored_by"] == [{"node": "judged", "metric": "mini", "model": "mini-flux pixel checker"}]
    right, wrong = table["rows"][0], table["rows"][1]
    assert right["background"] == "" and wrong["background"] == "white" and right["prompt"].startswith("a large red")
    assert right["score:score"] == 1.0 and right["score:background"] == 1.0 and right["score:position"] == 1.0
    assert wrong["score:background"] == 0.0 and wrong["score:colour"] == 1.0 and wrong["score:all"] == 0.0
    assert 0 < wrong["score:score"] < 1 and right["scored"] == 1
    scores = json.loads((tmp_path / "run" / "judged" / "scores.json").read_text())
    assert scores["images"][3]["sweep"] == {"node": "study", "cell": table["rows"][3]["cell"]}
    md = (tmp_path / "run" / "report.md").read_text()
    sweep_md = md.split("## Sweep `study`")[1].split("##")[0]
    assert "Scores: `judged` (mini, mini-flux pixel checker)" in sweep_md
    assert "| state | prompt | background | images | score:score | score:colour |" in sweep_md
    before, scores_md = md.split("## Scores")
    assert "| cell |" not in before and "study[prompt=#2,background=white]" in scores_md


def test_sweep_scores_survive_the_cache_and_widening_runs_only_new_cells(engine, tmp_path):
    text = SCORED.replace("BACKGROUNDS", '["white"]')
    path = write(tmp_path, text)
    engine.run(path, output=tmp_path / "run")
    fresh = Engine(engine.registry, cache_dir=tmp_path / "cache")  # a new process: the disk cache only
    again = fresh.run(path, output=tmp_path / "run")
    assert set(again.nodes.values()) == {"cached"}
    assert [r["score:background"] for r in _scored_table(tmp_path / "run")["rows"]] == [0.0, 0.0]
    wider = fresh.run(path, output=tmp_path / "run", overrides=['nodes.study.sweep.background=["white", "blue"]'])
    assert [n for n in started(wider) if n.startswith("study[")] == ["study[prompt=#1,background=blue]",
                                                                   "study[prompt=#2,background=blue]"]
    assert "judged" in started(wider)  # the evaluate node scores the widened sweep again
    rows = _scored_table(tmp_path / "run")["rows"]
    assert [(r["state"], r["background"], r["score:background"]) for r in rows] == [
        ("cached", "white", 0.0), ("ran", "blue", 1.0), ("cached", "white", 0.0), ("ran", "blue", 0.0)]


def test_two_scoring_nodes_on_one_sweep_get_their_own_columns(engine, tmp_path):
    text = SCORED.replace("BACKGROUNDS", '["white"]') + """
[nodes.checked_again]
type = "evaluate"
images = "@study"
aliases = { ring = "circle" }
"""
    assert engine.run(write(tmp_path, text), output=tmp_path / "run").ok
    table = _scored_table(tmp_path / "run")
    assert [b["node"] for b in table["scored_by"]] == ["judged", "checked_again"]
    row = table["rows"][0]
    assert row["score:judged.background"] == row["score:checked_again.background"] == 0.0
    assert row["scored:judged"] == 1 and "score:score" not in row
