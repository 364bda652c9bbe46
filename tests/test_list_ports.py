"""List port types: list[X] for every port type, prompts = list[text], validation, disk round-trip."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from fluxkiln.engine import Images, Prompts, RecipeInvalid, RunContext, Text, hookimpl, node
from fluxkiln.engine.ports import Model
from fluxkiln.engine.registry import Registry
from fluxkiln.engine.runner import Engine
from fluxkiln.engine.testing import make_images


@node("words", version="1")
def words(ctx: RunContext, text: str = "a b") -> list[Text]:
    """Split text into a list of texts."""
    return [Text(w) for w in text.split()]


@node("one_text", version="1")
def one_text(ctx: RunContext, text: str = "solo") -> Text:
    """One text."""
    return Text(text)


@node("as_prompts", version="1")
def as_prompts(ctx: RunContext, text: str = "x y") -> Prompts:
    """Prompts, the older name of list[text]."""
    return Prompts(text.split())


@node("shout", version="1")
def shout(ctx: RunContext, items: list[Text]) -> Prompts:
    """Upper-case a list of texts."""
    return Prompts(t.upper() for t in items)


@node("batches", version="1")
def batches(ctx: RunContext, count: int = 2) -> list[Images]:
    """A list of image lists."""
    return [make_images(i + 1, width=8, height=8) for i in range(count)]


@node("count_batches", version="1")
def count_batches(ctx: RunContext, batches: list[Images]) -> Text:
    """Sizes of each image list."""
    return Text(",".join(str(len(b)) for b in batches))


@node("a_model", version="1", cache="memory")
def a_model(ctx: RunContext) -> Model:
    """A stand-in model."""
    return Model(ref="m", kind="x", key="m")


@node("bad_list", version="1")
def bad_list(ctx: RunContext) -> list[Text]:
    """Returns a list holding a number."""
    return [Text("ok"), 3]  # type: ignore[list-item]


class Plugin:
    @hookimpl
    def register_node_types(self, register):
        for n in (words, one_text, as_prompts, shout, batches, count_batches, a_model, bad_list):
            register(n)


@pytest.fixture
def registry():
    return Registry.load(extra=[Plugin()], entry_points=False)


def write(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "r.toml"
    path.write_text('[recipe]\nname = "lists"\n' + textwrap.dedent(body))
    return path


def test_every_port_type_has_a_list_type_and_prompts_is_list_of_text(registry):
    names = set(registry.port_types)
    for base in ("images", "model", "lora", "dataset", "text"):
        assert f"list[{base}]" in names
    assert "prompts" not in names
    assert registry.port_types["list[images]"].disk_cacheable
    assert not registry.port_types["list[model]"].disk_cacheable  # models live in memory only
    assert registry.node_types["as_prompts"].outputs == {"output": "list[text]"}
    assert registry.node_types["shout"].params["items"].ports == ("list[text]",)


def test_list_inputs_take_lists_prompts_and_a_single_value_as_a_list_of_one(registry, tmp_path):
    path = write(tmp_path, """
    [nodes.w]
    type = "words"
    text = "red green"
    [nodes.p]
    type = "as_prompts"
    [nodes.one]
    type = "one_text"
    [nodes.a]
    type = "shout"
    items = "@w"
    [nodes.b]
    type = "shout"
    items = "@p"
    [nodes.c]
    type = "shout"
    items = "@one"
    [nodes.d]
    type = "shout"
    items = "@a"
    """)
    result = Engine(registry, cache_dir=tmp_path / "cache").run(path, output=tmp_path / "run")
    assert result.ok, result.events
    out = {n: result.outputs[n]["output"] for n in "abcd"}
    assert out == {"a": ["RED", "GREEN"], "b": ["X", "Y"], "c": ["SOLO"], "d": ["RED", "GREEN"]}
    assert isinstance(out["a"], Prompts)


def test_link_of_the_wrong_type_names_both_types_readably(registry, tmp_path):
    path = write(tmp_path, """
    [nodes.m]
    type = "a_model"

    [nodes.a]
    type = "shout"
    items = "@m"
    """)
    with pytest.raises(RecipeInvalid) as err:
        Engine(registry, cache_dir=tmp_path / "cache").check(path)
    [problem] = err.value.problems
    assert (problem.node, problem.key, problem.line) == ("a", "items", 9)
    assert "'model'" in problem.message and "'list[text] (prompts)'" in problem.message


def test_allowed_text_says_a_single_value_counts_as_a_list(registry):
    allowed = registry.node_types["shout"].params["items"].allowed()
    assert allowed == ("a link to a node's 'list[text] (prompts)' output (a single 'text' is taken as a list "
                       "of one)")


def test_list_values_round_trip_through_the_disk_cache(registry, tmp_path):
    path = write(tmp_path, """
    [nodes.b]
    type = "batches"
    count = 3
    [nodes.n]
    type = "count_batches"
    batches = "@b"
    [nodes.w]
    type = "words"
    text = "one two three"
    """)
    first = Engine(registry, cache_dir=tmp_path / "cache").run(path, output=tmp_path / "run")
    assert first.ok and first.outputs["n"]["output"] == "1,2,3"
    again = Engine(registry, cache_dir=tmp_path / "cache").run(path, output=tmp_path / "run")
    assert again.nodes == {"b": "cached", "n": "cached", "w": "cached"}
    loaded = again.outputs["b"]["output"]
    assert [len(x) for x in loaded] == [1, 2, 3] and all(isinstance(x, Images) for x in loaded)
    assert loaded[2][1].image.tobytes() == first.outputs["b"]["output"][2][1].image.tobytes()
    assert again.outputs["w"]["output"] == ["one", "two", "three"]
    entry = next((tmp_path / "cache" / "results").rglob("list.json"))
    assert sorted(p.name for p in entry.parent.iterdir())[:2] == ["00000", "00001"]  # element by element


def test_a_list_output_with_a_wrong_element_fails_the_node(registry, tmp_path):
    path = write(tmp_path, '[nodes.x]\ntype = "bad_list"\n')
    result = Engine(registry, cache_dir=tmp_path / "cache").run(path, output=tmp_path / "run")
    [failed] = [e for e in result.events if e.event == "node_failed"]
    assert "expected list[Text]" in failed.data["error"]


def test_list_port_names_are_reserved(tmp_path):
    from fluxkiln.engine import PortType

    class Clash:
        @hookimpl
        def register_port_types(self, register):
            register(PortType("list[thing]", list))
            register(PortType("prompts", list))

    reg = Registry.load(extra=[Clash()], entry_points=False)
    errors = [p.error for p in reg.plugins.values() if p.error]
    assert any("'list[thing]' is reserved" in e and "'prompts' is reserved" in e for e in errors)


class Thing:
    """Not a port type."""


def test_an_unregistered_list_element_is_a_plugin_error(tmp_path):
    @node("gives_things")
    def gives_things(ctx: RunContext) -> list[Thing]:
        return []

    class P:
        @hookimpl
        def register_node_types(self, register):
            register(gives_things)

    reg = Registry.load(extra=[P()], entry_points=False)
    [error] = [p.error for p in reg.plugins.values() if p.error]
    assert "is not a registered port type" in error and "list[C]" in error
