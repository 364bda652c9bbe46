"""Tests of the prompt_sweep node, with fluxkiln's pytest fixtures."""

import pytest

import fluxkiln_example
from fluxkiln.engine import NodeError, Prompts
from fluxkiln_example.sweep import fill, prompt_sweep

RECIPE = """
[recipe]
name = "sweep"

[vars]
trigger = "TOK"

[nodes.prompts]
type = "prompt_sweep"
template = "a {animal} in the style of ${trigger}, {light}"
values = { animal = ["cat", "owl"], light = ["dawn", "dusk", "noon"] }
"""


def test_product_in_a_recipe(run_recipe):
    run = run_recipe(RECIPE, plugins=[fluxkiln_example])
    prompts = run.output("prompts")
    assert isinstance(prompts, Prompts)
    assert prompts[:3] == ["a cat in the style of TOK, dawn", "a cat in the style of TOK, dusk",
                           "a cat in the style of TOK, noon"]
    assert len(prompts) == 6
    [artifact] = run.artifacts("prompts")
    assert artifact.read_text().splitlines() == list(prompts)


def test_zip_and_several_templates(fluxkiln_context):
    out = prompt_sweep(fluxkiln_context(), template=["{a}-{b}", "{{{a}}}"], values={"a": ["1", "2"], "b": ["x", "y"]},
                       mode="zip", max_prompts=10, unique=True)
    assert out == ["1-x", "2-y", "{1}", "{2}"]


def test_zip_needs_equal_lengths(fluxkiln_context):
    with pytest.raises(NodeError, match="same length"):
        prompt_sweep(fluxkiln_context(), template="{a}{b}", values={"a": ["1"], "b": ["x", "y"]}, mode="zip",
                     max_prompts=10, unique=True)


def test_unknown_placeholder_fails_naming_it(run_recipe):
    run = run_recipe(RECIPE.replace("{light}", "{weather}"), plugins=[fluxkiln_example], expect="failed")
    failure = run.failure("prompts")
    assert "{weather}" in failure["error"] and failure["key"] == "values"


def test_unused_values_are_logged(fluxkiln_context):
    ctx = fluxkiln_context()
    prompt_sweep(ctx, template="plain", values={"x": ["1"]}, mode="product", max_prompts=5, unique=True)
    warning, done = ctx.logs()  # Event objects, like RecipeRun.events_of("node_log")
    assert warning.data == {"level": "warning", "message": "values.x is not used by any template"}
    assert done.data == {"level": "info", "message": "1 prompt(s)"}


def test_max_prompts(fluxkiln_context):
    with pytest.raises(NodeError, match="max_prompts=3"):
        prompt_sweep(fluxkiln_context(), template="{a}", values={"a": ["1", "2", "3", "4"]}, mode="product",
                     max_prompts=3, unique=True)


def test_empty_value_list_is_a_validation_error(validate_recipe):
    problems = validate_recipe(RECIPE.replace('"dawn", "dusk", "noon"', ""), plugins=[fluxkiln_example])
    assert [(p.node, p.key) for p in problems] == [("prompts", "values")]


def test_fill_keeps_escaped_braces():
    assert fill("{{x}} {x}", {"x": "1"}) == "{x} 1"


def test_shipped_sweep_recipe_runs(run_recipe):
    from pathlib import Path

    run = run_recipe(Path(__file__).parent.parent / "recipes" / "sweep.toml", plugins=[fluxkiln_example])
    prompts = run.output("prompts")
    assert len(prompts) == 12 and prompts[0] == "a photo of a lighthouse in the style of TOK, watercolour"


def test_prompt_sweep_feeds_the_built_in_sample_node(run_recipe):
    from pathlib import Path

    run = run_recipe(Path(__file__).parent.parent / "recipes" / "sweep-images.toml", plugins=[fluxkiln_example])
    prompts = run.output("prompts")
    images = run.output("images")
    assert [item.prompt for item in images] == list(prompts) and len(images) == 4
    assert [item.seed for item in images] == [1, 1, 1, 1]  # every prompt gets the same seeds
    [grid] = run.output("grid")
    assert grid.meta["columns"] == 4 and grid.meta["rows"] == 1
    assert [p.name for p in run.artifacts("save")] == ["prompts_grid_0.png"]
