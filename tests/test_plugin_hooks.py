"""One test per hook (named test_hook_<name>), each through the public interfaces a plugin author uses."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import pytest
from pydantic import Field

from fluxkiln.engine import Images, Problem, PortType, RunContext, Text, hookimpl, node
from fluxkiln.engine.cli import main as cli_main
from fluxkiln.engine.runner import Engine

EXAMPLE = Path(__file__).resolve().parent.parent / "plugins" / "example"


def fluxkiln(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in env.items() if k not in ("FLUXKILN_PLUGINS", "FLUXKILN_PLUGIN_MODULES")}
    return subprocess.run([sys.executable, "-m", "fluxkiln.engine.cli", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=120)


# ------------------------------------------------------------------ register_port_types
@dataclass
class Palette:
    colours: list[str]


def _save_palette(value: Palette, folder: Path) -> None:
    (folder / "palette.json").write_text(json.dumps(value.colours))


def _load_palette(folder: Path) -> Palette:
    return Palette(json.loads((folder / "palette.json").read_text()))


@node("extract_palette")
def extract_palette(images: Images, colours: Annotated[int, Field(ge=1, le=16)] = 3) -> Palette:
    """The most common colours of the first image."""
    img = images[0].image.convert("RGB").quantize(colours).convert("RGB")
    found = sorted(img.getcolors(), reverse=True)[:colours]
    return Palette(["#%02x%02x%02x" % rgb for _, rgb in found])


@node("palette_text")
def palette_text(palette: Palette) -> Text:
    """The palette as text."""
    return Text(" ".join(palette.colours))


class PalettePlugin:
    __name__ = "palette-plugin"

    @hookimpl
    def register_port_types(self, register):
        register(PortType("palette", Palette, "A list of colours.", save=_save_palette, load=_load_palette))

    @hookimpl
    def register_node_types(self, register):
        register(extract_palette)
        register(palette_text)


PALETTE_RECIPE = """
[recipe]
name = "palette"

[nodes.pics]
type = "test_images"
pattern = "solid"
count = 1

[nodes.pal]
type = "extract_palette"
images = "@pics"
colours = 1

[nodes.text]
type = "palette_text"
palette = "@pal"
"""


def test_hook_register_port_types(run_recipe, validate_recipe, fluxkiln_registry, monkeypatch):
    plugin = PalettePlugin()
    reg = fluxkiln_registry(plugin)
    assert reg.plugins["palette-plugin"].port_types == ["palette"]
    assert reg.node_types["extract_palette"].outputs == {"output": "palette"}

    run = run_recipe(PALETTE_RECIPE, plugins=[plugin])
    colour = run.output("pal").colours[0]
    assert run.output("text") == colour and colour.startswith("#")

    # saved with the port type's save/load: a new engine (a new process) reuses it from disk
    import os

    engine = Engine(fluxkiln_registry(plugin), cache_dir=Path(os.environ["FLUXKILN_CACHE"]))
    again = engine.run(run.recipe_path, output=run.run_dir)
    assert again.nodes == {"pics": "cached", "pal": "cached", "text": "cached"}
    assert isinstance(again.outputs["pal"]["output"], Palette)

    # a palette link where images belong is a port type mismatch naming both types
    bad = PALETTE_RECIPE + '\n[nodes.wrong]\ntype = "extract_palette"\nimages = "@pal"\n'
    [problem] = validate_recipe(bad, plugins=[plugin])
    assert (problem.node, problem.key) == ("wrong", "images")
    assert "'palette'" in problem.message and "'images'" in problem.message


# ------------------------------------------------------------------ register_node_types
@node("split_text", outputs={"head": Text, "tail": Text}, version="2")
class SplitText:
    """Split a text in two at a separator."""

    def run(self, ctx: RunContext, text: Text,
            sep: Annotated[str, Field(min_length=1, description="where to split")] = " ") -> dict:
        head, _, tail = str(text).partition(sep)
        ctx.log(f"split at {sep!r}")
        return {"head": Text(head), "tail": Text(tail)}


@node("say")
def say(words: Annotated[str, Field(description="what to say")] = "hello world") -> Text:
    """Produce a text (a node without ctx)."""
    return Text(words)


@node("no_hint")
def no_hint(ctx: RunContext, words) -> Text:  # noqa: ANN001 - deliberately missing
    return Text(words)


def test_hook_register_node_types(run_recipe, fluxkiln_registry, installed_plugin, capsys, tmp_path):
    class Plugin:
        __name__ = "words"

        @hookimpl
        def register_node_types(self, register):
            register(say)
            register(SplitText)

    run = run_recipe("""
[recipe]
name = "words"
[nodes.src]
type = "say"
[nodes.parts]
type = "split_text"
text = "@src"
[nodes.again]
type = "split_text"
text = "@parts.tail"
sep = "r"
""", plugins=[Plugin()])
    assert run.output("parts", "head") == "hello" and run.output("parts", "tail") == "world"
    assert run.output("again", "head") == "wo" and run.output("again", "tail") == "ld"
    assert [e.data["message"] for e in run.events_of("node_log", "again")] == ["split at 'r'"]

    # a declaration mistake is reported with the plugin, node type and key; the plugin's other nodes still load
    class Broken:
        __name__ = "broken-words"

        @hookimpl
        def register_node_types(self, register):
            register(no_hint)

    reg = fluxkiln_registry(Broken(), allow_errors=True)
    assert reg.plugins["broken-words"].error == ("plugin 'broken-words', node type 'no_hint': missing type hint "
                                                 "for 'words'. Please add one to fix.")
    assert "say" in fluxkiln_registry(Plugin()).node_types

    # an installed plugin's node types are documented by `fluxkiln nodes`
    installed_plugin("words_plugin", "from fluxkiln.engine import Text, hookimpl, node\n"
                     "@node('shout')\ndef shout(text: Text) -> Text:\n    '''Upper-case a text.'''\n"
                     "    return Text(text.upper())\n"
                     "@hookimpl\ndef register_node_types(register):\n    register(shout)\n", name="words")
    assert cli_main(["nodes"]) == 0
    assert "shout              Upper-case a text.  [words]" in capsys.readouterr().out.splitlines()
    assert cli_main(["nodes", "shout", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["plugin"] == "words" and doc["keys"][0]["name"] == "text" and doc["keys"][0]["kind"] == "input"


# ------------------------------------------------------------------ on_event
def test_hook_on_event(run_recipe, installed_plugin, tmp_path):
    seen: list[tuple[str, str | None]] = []

    class Observer:
        __name__ = "observer"

        @hookimpl
        def on_event(self, event):
            seen.append((event.event, event.node))

    class Failing:
        __name__ = "failing-observer"

        @hookimpl
        def on_event(self, event):
            raise RuntimeError("observer bug")

    run = run_recipe('[recipe]\nname = "ev"\n[nodes.pics]\ntype = "test_images"\n', plugins=[Observer(), Failing()])
    assert run.status == "ok"  # a failing observer does not break the run
    assert seen == [("run_started", None), ("node_started", "pics"), ("node_finished", "pics"),
                    ("run_finished", None)]
    assert [(e.event, e.node) for e in run.events] == seen

    # an installed observer receives the events of `fluxkiln run`, like the CLI itself
    log = tmp_path / "events.jsonl"
    plugin = installed_plugin("event_logger", f"""
from fluxkiln.engine import Text, hookimpl, node

@node("hello")
def hello() -> Text:
    '''Say hello.'''
    return Text("hello")

@hookimpl
def register_node_types(register):
    register(hello)

@hookimpl
def on_event(event):
    with open({str(log)!r}, "a") as f:
        f.write(event.to_json() + "\\n")
""")
    recipe = tmp_path / "hello.toml"
    recipe.write_text('[recipe]\nname = "hello"\n[nodes.h]\ntype = "hello"\n')
    res = fluxkiln("run", str(recipe), "--json", env=plugin.env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    logged = [json.loads(line) for line in log.read_text().splitlines()]
    assert [e["event"] for e in logged] == ["run_started", "node_started", "node_finished", "run_finished"]
    assert logged == [json.loads(line) for line in res.stdout.splitlines()]  # the same events as --json


# ------------------------------------------------------------------ check_recipe
CHECKER = """
from fluxkiln.engine import Problem, Text, hookimpl, node

@node("greet")
def greet(name: str = "world", shout: bool = False, loud: bool = False) -> Text:
    '''Greet someone.'''
    return Text(name)

@hookimpl
def register_node_types(register):
    register(greet)

@hookimpl
def check_recipe(recipe):
    problems = []
    for nid, spec in recipe.nodes.items():
        if spec.type == "greet" and spec.values.get("shout") and spec.values.get("loud"):
            problems.append(recipe.problem("`shout` and `loud` cannot both be true", node=nid, key="loud",
                                           hint="pick one"))
    return problems or None
"""


def test_hook_check_recipe(installed_plugin, tmp_path, validate_recipe):
    plugin = installed_plugin("greeter", CHECKER)
    recipe = tmp_path / "greet.toml"
    recipe.write_text('[recipe]\nname = "greet"\n\n[nodes.hi]\ntype = "greet"\nshout = true\nloud = true\n')
    res = fluxkiln("validate", str(recipe), env=plugin.env, cwd=tmp_path)
    assert res.returncode == 2
    assert (f"{recipe}:7: node 'hi' key 'loud': `shout` and `loud` cannot both be true (pick one)"
            in res.stderr.splitlines())

    # reported together with the built-in problems, in line order
    recipe.write_text(recipe.read_text().replace('name = "greet"', 'name = "greet"\n[nodes.x]\ntype = "gret"'))
    res = fluxkiln("validate", str(recipe), "--json", env=plugin.env, cwd=tmp_path)
    assert res.returncode == 2
    problems = json.loads(res.stdout)
    assert [(p["node"], p["line"]) for p in problems] == [("x", 4), ("hi", 9)]
    assert "did you mean 'greet'" in problems[0]["hint"]

    ok = tmp_path / "ok.toml"
    ok.write_text('[recipe]\nname = "ok"\n[nodes.hi]\ntype = "greet"\nshout = true\n')
    assert fluxkiln("validate", str(ok), env=plugin.env, cwd=tmp_path).returncode == 0

    class Plugin:
        __name__ = "rule"

        @hookimpl
        def check_recipe(self, recipe):
            return [Problem("no more than one node, please", recipe.file, 1)] if len(recipe.nodes) > 1 else []

    two = '[recipe]\nname = "two"\n[nodes.a]\ntype = "test_images"\n[nodes.b]\ntype = "test_images"\n'
    assert [p.message for p in validate_recipe(two, plugins=[Plugin()])] == ["no more than one node, please"]


# ------------------------------------------------------------------ resolve_model
def test_hook_resolve_model(run_recipe, monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLE))
    import fluxkiln_example

    asked: list[str] = []

    class NotMine:
        __name__ = "not-mine"

        @hookimpl
        def resolve_model(self, ref):
            asked.append(ref)
            return None

    class MyHub:
        __name__ = "myhub"

        @hookimpl
        def resolve_model(self, ref):
            if not ref.startswith("myhub:"):
                return None
            from fluxkiln.plugins.flux.tiny import tiny_flux_path

            return str(tiny_flux_path({"tiny": "dev", "tiny-fast": "schnell"}[ref.removeprefix("myhub:")]))

    recipe = """
[recipe]
name = "myhub"

[nodes.base]
type = "load_model"
model = "myhub:tiny-fast"

[nodes.pics]
type = "sample"
model = "@base"
prompt = "a lighthouse"
aspect_ratio = "custom"
width = 256
height = 256
num_inference_steps = 1
seed = 3

[nodes.small]
type = "resize"
images = "@pics"
width = 64
"""
    run = run_recipe(recipe, plugins=[MyHub(), NotMine(), fluxkiln_example])
    assert run.output("base").info["variant"] == "schnell"  # the folder myhub: resolved to
    assert "myhub:tiny-fast" in asked  # other plugins were asked too; None means "not mine"
    [item] = run.output("small")
    assert item.image.size == (64, 64) and item.seed == 3

    failed = run_recipe(recipe.replace("myhub:tiny-fast", "otherhub:tiny"), plugins=[MyHub(), fluxkiln_example],
                        expect="failed")
    assert "no plugin resolves the model reference 'otherhub:tiny'" in failed.failure("base")["error"]


def test_hook_register_commands(tmp_path, monkeypatch, capsys):
    from fluxkiln.engine import cli
    from fluxkiln.engine.registry import Registry

    seen: list = []

    class Palettes:  # the argparse way: a subparser, a handler that gets the parsed arguments
        __name__ = "palettes"

        @hookimpl
        def register_commands(self, subparsers):
            parser = subparsers.add_parser("palettes", help="list colour palettes")
            parser.add_argument("names", nargs="*")
            parser.add_argument("--warm", action="store_true")
            parser.set_defaults(main=lambda args: seen.append((args.names, args.warm)) or 3)

    class Legacy:  # the older way: main(argv) with the raw arguments
        __name__ = "legacy"

        @hookimpl
        def register_commands(self, register):
            register("shades", "list shades", lambda argv: seen.append(argv) or 4)

    class Clash:
        __name__ = "clash"

        @hookimpl
        def register_commands(self, subparsers, register):
            register("mine", "fine on its own", lambda argv: 0)
            subparsers.add_parser("run", help="clash with a built-in")

    def registry():
        return Registry.load(extra=[Palettes(), Legacy(), Clash()], entry_points=False)

    monkeypatch.setattr(cli, "_registry", registry)
    assert cli.main(["palettes", "--warm", "a", "b"]) == 3 and seen == [(["a", "b"], True)]
    assert cli.main(["shades", "--any", "x"]) == 4 and seen[-1] == ["--any", "x"]
    reg = registry()
    assert reg.plugins["clash"].error == "plugin 'clash': command 'run' is already provided by 'fluxkiln'"
    assert "mine" not in reg.commands and reg.plugins["clash"].commands == []  # a failed plugin adds nothing
    assert reg.plugins["palettes"].commands == ["palettes"] and reg.commands["shades"].plugin == "legacy"

    with pytest.raises(SystemExit) as exit_:  # argparse errors and --help work as for built-in commands
        cli.main(["palettes", "--cold"])
    assert exit_.value.code == 2 and "unrecognized arguments: --cold" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["palettes", "--help"])
    assert "usage: fluxkiln palettes [-h] [--warm] [names ...]" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "palettes list colour palettes [palettes]" in out and "shades list shades [legacy]" in out

    class NoHandler:
        __name__ = "no-handler"

        @hookimpl
        def register_commands(self, subparsers):
            subparsers.add_parser("orphan", help="forgot set_defaults")

    bad = Registry.load(extra=[NoHandler()], entry_points=False).plugins["no-handler"].error
    assert bad == ("plugin 'no-handler': command 'orphan' has no handler; call parser.set_defaults(main=fn) "
                   "where fn(args) returns the exit code")
