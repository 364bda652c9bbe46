"""The README stays true and short: its set-up commands, CI's command, its picture; the generated node reference."""

from __future__ import annotations

import re

from helpers import ROOT
from fluxkiln.engine import docs
from fluxkiln.engine.registry import Registry

README = (ROOT / "README.md").read_text()


def setup_commands() -> list[str]:
    block = re.search(r"```bash\n(.*?)```", README, re.S).group(1)
    return [line for line in block.splitlines() if line and not line.startswith("#")]


def test_exactly_two_single_line_setup_commands_at_the_top():
    cmds = setup_commands()
    assert len(cmds) == 2
    assert cmds[0].endswith("fluxkiln run recipes/quickstart.toml") and "pip install" in cmds[0]
    assert cmds[1].endswith("pytest -q -n auto") and '".[test]"' in cmds[1]


def test_ci_runs_the_readme_test_command_verbatim():
    ci = (ROOT / ".ci" / "run").read_text()
    assert setup_commands()[1] in ci.splitlines()


def test_readme_is_short_and_its_first_screen_shows_the_commands_and_a_picture():
    assert len(README.encode()) <= 12 * 1024, "README.md is over 12 KB: move the detail into docs/"
    first_screen = "\n".join(README.splitlines()[:20])
    assert "fluxkiln run recipes/quickstart.toml" in first_screen
    picture = re.search(r"!\[[^\]]+\]\(([^)]+\.png)\)", first_screen)
    assert picture, "the README's first screen shows a picture"
    assert (ROOT / picture.group(1)).is_file(), picture.group(1)


def test_node_reference_is_generated_from_the_declarations_in_one_place():
    page = (ROOT / docs.NODES_PAGE).read_text()
    current = page.split(docs.START)[1].split(docs.END)[0].strip()
    expected = docs.reference_markdown(Registry.load(entry_points=False).node_types).strip()
    assert current == expected, "run: python -m fluxkiln.engine.docs"
    assert docs.START not in README, "the node reference lives in docs/nodes.md only"
    for name in ("load_model", "sample", "apply_lora", "save", "grid", "dataset", "caption", "train_lora",
                 "safety_check"):
        assert f"### `{name}`" in current


def test_every_recipe_in_recipes_is_valid():
    from fluxkiln.engine.cli import main

    for recipe in sorted((ROOT / "recipes").glob("*.toml")):
        assert main(["validate", str(recipe)]) == 0, recipe.name


def test_every_relative_link_in_the_readme_exists():
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", README)
    local = [t for t in targets if "://" not in t]
    assert local, "the README links into the documentation"
    missing = [t for t in local if not (ROOT / t).exists()]
    assert not missing, f"README links to missing files: {missing}"
