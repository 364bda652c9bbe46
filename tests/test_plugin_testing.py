"""The pytest fixtures fluxkiln ships for plugin authors (fluxkiln.engine.testing, entry point pytest11)."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from fluxkiln.engine import Cancelled, Images, ImageItem, RunContext, Text, hookimpl, node
from fluxkiln.engine.testing import make_images

pytest_plugins = ["pytester"]


@node("count_images")
def count_images(ctx: RunContext, images: Images) -> Text:
    """Count images, reporting progress."""
    for i, _ in enumerate(images):
        ctx.check_cancelled()
        ctx.progress(i + 1, len(images), metrics={"seen": i + 1})
    ctx.log(f"{len(images)} images")
    (ctx.node_dir() / "count.txt").write_text(str(len(images)))
    ctx.artifact(ctx.node_dir() / "count.txt")
    return Text(str(len(images)))


@node("fail_on_empty")
def fail_on_empty(images: Images, limit: int = 1) -> Images:
    """Fails when there are more than `limit` images."""
    if len(images) > limit:
        raise ValueError(f"{len(images)} > {limit}")
    return images


class Counting:
    __name__ = "counting"

    @hookimpl
    def register_node_types(self, register):
        register(count_images)
        register(fail_on_empty)


COUNTING = Counting()
RECIPE = """
[recipe]
name = "count"

[nodes.pics]
type = "test_images"
count = 3

[nodes.n]
type = "count_images"
images = "@pics"
"""


@pytest.mark.fluxkiln_plugin(COUNTING)
def test_marker_registers_the_plugin_in_every_fixture(fluxkiln_registry, validate_recipe, run_recipe):
    assert fluxkiln_registry().plugin_of("count_images") == "counting"
    assert validate_recipe(RECIPE) == []
    run = run_recipe(RECIPE)
    assert run.output("n") == "3"
    assert [e.data["metrics"] for e in run.events_of("node_progress", "n")] == [{"seen": 1.0}, {"seen": 2.0},
                                                                               {"seen": 3.0}]
    assert [e.data["message"] for e in run.events_of("node_log")] == ["3 images"]


def test_run_recipe_is_isolated_under_tmp_path(run_recipe, tmp_path):
    run = run_recipe(RECIPE, plugins=[COUNTING])
    cache = Path(os.environ["FLUXKILN_CACHE"])
    assert cache == tmp_path / "fluxkiln-cache" and (cache / "results").is_dir()
    assert (cache / "builtin").is_symlink()  # tiny built-in models are shared between tests
    assert run.run_dir == tmp_path / "runs" / "count"
    assert run.artifacts("n") == [tmp_path / "runs" / "count" / "n" / "count.txt"]
    assert run.recipe_path == tmp_path / "recipe.toml"

    again = run_recipe(RECIPE, plugins=[COUNTING])  # same test, same engine: cached in memory
    assert again.nodes == {"pics": "cached", "n": "cached"}
    assert [e.data["source"] for e in again.events_of("node_cached")] == ["memory", "memory"]
    changed = run_recipe(RECIPE.replace("count = 3", "count = 2"), plugins=[COUNTING])
    assert changed.nodes == {"pics": "ran", "n": "ran"} and changed.output("n") == "2"
    assert changed.events_of("node_started", "pics")[0].data["reason"] == "param 'count' changed 3 -> 2"


def test_run_recipe_from_a_path_with_overrides(run_recipe, tmp_path):
    path = tmp_path / "sub" / "r.toml"
    path.parent.mkdir()
    path.write_text(RECIPE)
    run = run_recipe(path, plugins=[COUNTING], overrides=["nodes.pics.count=5"], only=["n"])
    assert run.output("n") == "5" and run.recipe_path == path


def test_run_recipe_expect_failed_and_failure_details(run_recipe):
    run = run_recipe(RECIPE.replace("count_images", "fail_on_empty"), plugins=[COUNTING], expect="failed")
    assert run.status == "failed" and run.nodes == {"pics": "ran", "n": "failed"}
    failure = run.failure("n")
    assert (failure["error"], failure["error_type"], failure["plugin"]) == ("3 > 1", "ValueError", "counting")
    assert "n (fail_on_empty, plugin counting): ValueError: 3 > 1" in run.summary()


def test_invalid_recipe_raises_with_every_problem(run_recipe, validate_recipe):
    from fluxkiln.engine import RecipeInvalid

    bad = RECIPE.replace("count = 3", "count = 0\nwidht = 3")
    with pytest.raises(RecipeInvalid) as info:
        run_recipe(bad, plugins=[COUNTING])
    assert [(p.key, p.line) for p in info.value.problems] == [("count", 7), ("widht", 8)]
    problems = validate_recipe(bad, plugins=[COUNTING])
    assert [p.key for p in problems] == ["count", "widht"] and "did you mean 'width'" in problems[1].hint


def test_test_images_are_deterministic():
    a, b = make_images(2, 32, 16, "noise", seed=7), make_images(2, 32, 16, "noise", seed=7)
    assert [x.image.tobytes() for x in a] == [x.image.tobytes() for x in b]
    assert a[0].image.tobytes() != a[1].image.tobytes()
    assert isinstance(a, Images) and isinstance(a[0], ImageItem) and a[0].image.size == (32, 16)
    assert [x.seed for x in a] == [7, 8]
    solid = make_images(1, 8, 8, "solid")[0].image
    assert solid.getcolors() == [(64, solid.getpixel((0, 0)))]
    gradient = make_images(1, 64, 64)[0].image
    assert gradient.getpixel((0, 0))[:2] != gradient.getpixel((63, 63))[:2]


def test_fluxkiln_context_records_and_cancels(fluxkiln_context, tmp_path):
    ctx = fluxkiln_context(node="n", type="count_images")
    assert count_images(ctx, images=make_images(2)) == "2"
    # one shape with RecipeRun.events_of: Event objects, the level kept
    assert [(e.event, e.node, e.type, e.data["step"]) for e in ctx.progress_events()] == [
        ("node_progress", "n", "count_images", 1), ("node_progress", "n", "count_images", 2)]
    assert ctx.progress_events()[1].data["metrics"] == {"seen": 2.0}
    [log] = ctx.logs()
    assert (log.event, log.data) == ("node_log", {"level": "info", "message": "2 images"})
    assert ctx.events_of() == ctx.events and ctx.events_of("node_log") == [log]
    assert ctx.node_dir() == tmp_path / "runs" / "test" / "n"
    assert ctx.state_dir().is_dir() and str(ctx.state_dir()).startswith(str(tmp_path))
    assert ctx.resolve_model("nohub:x") is None
    ctx.cancel()
    assert ctx.cancelled
    with pytest.raises(Cancelled):
        count_images(ctx, images=make_images(1))


def test_fluxkiln_registry_leaves_installed_plugins_out_unless_asked(fluxkiln_registry, installed_plugin):
    installed_plugin("installed_words", "from fluxkiln.engine import Text, hookimpl, node\n"
                     "@node('installed_word')\ndef w() -> Text:\n    return Text('w')\n"
                     "@hookimpl\ndef register_node_types(register):\n    register(w)\n", name="words")
    assert "installed_word" not in fluxkiln_registry().node_types
    assert fluxkiln_registry(entry_points=True).plugin_of("installed_word") == "words"
    assert "test_images" not in fluxkiln_registry(test_nodes=False).node_types
    assert "sample" not in fluxkiln_registry(builtins=False).node_types


def test_failures_are_reported_to_the_plugin_author(pytester):
    pytester.makepyfile(test_author="""
        from fluxkiln.engine import Images, Text, hookimpl, node

        @node("oops")
        def oops(images: Images) -> Text:
            raise KeyError("missing thing")

        class Plugin:
            __name__ = "author-plugin"

            @hookimpl
            def register_node_types(self, register):
                register(oops)

        class Broken:
            __name__ = "broken-plugin"

            @hookimpl
            def register_node_types(self, register):
                raise RuntimeError("cannot register")

        RECIPE = '[recipe]\\nname = "x"\\n[nodes.t]\\ntype = "test_images"\\n[nodes.o]\\ntype = "oops"\\nimages = "@t"\\n'

        def test_node_failure(run_recipe):
            run_recipe(RECIPE, plugins=[Plugin()])

        def test_broken_plugin(run_recipe):
            run_recipe(RECIPE, plugins=[Broken()])
    """)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines([
        "*expected status 'ok', got 'failed'*",
        "*o (oops, plugin author-plugin): KeyError: 'missing thing'*",
        "*plugin failed to load: broken-plugin: RuntimeError: cannot register*",
    ])


def test_pytest_plugin_is_registered_and_light():
    eps = {ep.name: ep.value for ep in metadata.entry_points(group="pytest11")}
    assert eps.get("fluxkiln") == "fluxkiln.engine.testing"
    code = ("import sys, fluxkiln.engine.testing; "
            "print(sorted(m for m in ('torch', 'diffusers', 'PIL', 'transformers', 'pydantic') if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"


def test_a_plugin_module_gets_its_installed_name(fluxkiln_registry, validate_recipe, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "plugins" / "example"))
    import fluxkiln_example  # not installed here: the name comes from its pyproject.toml

    reg = fluxkiln_registry(fluxkiln_example)
    info = reg.plugins["example"]
    assert (info.distribution, info.version, info.source) == ("fluxkiln-example", "0.1.0", "extra")
    assert "fluxkiln_example" not in reg.plugins and reg.plugin_of("resize") == "example"
    recipe = '[recipe]\nname = "r"\nplugins = ["example", "fluxkiln-example"]\n[nodes.p]\ntype = "prompt_sweep"\n' \
             'template = "x"\n'
    assert validate_recipe(recipe, plugins=[fluxkiln_example]) == []
    messages = [p.message for p in validate_recipe(recipe)]
    assert messages[:2] == ["required plugin 'example' is not installed",
                            "required plugin 'fluxkiln-example' is not installed"]


def test_events_have_one_shape_in_a_context_and_in_a_run(fluxkiln_context, run_recipe):
    ctx = fluxkiln_context(node="n", type="count_images")
    count_images(ctx, images=make_images(3))
    run = run_recipe(RECIPE, plugins=[COUNTING])
    direct = [(type(e), e.event, e.data["level"], e.data["message"]) for e in ctx.logs()]
    in_run = [(type(e), e.event, e.data["level"], e.data["message"]) for e in run.events_of("node_log", "n")]
    assert direct == in_run == [(type(run.events[0]), "node_log", "info", "3 images")]
    assert [e.data["step"] for e in ctx.progress_events()] == \
        [e.data["step"] for e in run.events_of("node_progress", "n")] == [1, 2, 3]


TWICE_PLUGIN = '''
from fluxkiln.engine import Text, node

@node("twice")
def twice() -> Text:
    """Declared once."""
    return Text("once")
'''

TWICE_TEST = '''
import pytest
import twice_plugin

pytestmark = pytest.mark.fluxkiln_plugin(twice_plugin)

def test_both_ways(run_recipe, fluxkiln_registry, validate_recipe):
    reg = fluxkiln_registry(twice_plugin)
    assert reg.plugins["twice_plugin"].node_types == ["twice"]
    recipe = '[recipe]\\nname = "t"\\n[nodes.a]\\ntype = "twice"\\n'
    assert validate_recipe(recipe, plugins=[twice_plugin]) == []
    assert run_recipe(recipe, plugins=[twice_plugin]).output("a") == "once"
'''


def test_a_plugin_given_twice_is_registered_once(fluxkiln_registry, run_recipe, pytester):
    reg = fluxkiln_registry(COUNTING, COUNTING)
    assert reg.plugins["counting"].error is None and reg.plugin_of("count_images") == "counting"
    assert run_recipe(RECIPE, plugins=[COUNTING, COUNTING]).output("n") == "3"

    # a module carrying the module-level marker and also passed explicitly
    pytester.makepyfile(twice_plugin=TWICE_PLUGIN, test_twice=TWICE_TEST)
    pytester.runpytest_subprocess("-p", "no:cacheprovider").assert_outcomes(passed=1)


def test_the_registry_has_a_public_surface(fluxkiln_registry):
    reg = fluxkiln_registry(COUNTING)
    nt = reg.node_types["count_images"]
    assert (nt.name, nt.plugin, nt.version, nt.summary, nt.outputs) == (
        "count_images", "counting", "1", "Count images, reporting progress.", {"output": "text"})
    assert list(nt.params) == ["images"] and nt.params["images"].ports == ("images",)
    assert reg.plugin_of("count_images") == "counting" and reg.plugin_of("sample") == "fluxkiln.plugins.flux"
    assert reg.plugin_of("no_such_type") is None
    assert reg.port_types["images"].cls is Images
    info = reg.plugins["counting"]
    assert (info.source, info.error, info.node_types) == ("extra", None, ["count_images", "fail_on_empty"])
    assert reg.failed_plugins() == [] and reg.commands["tui"].plugin == "fluxkiln.tui"
