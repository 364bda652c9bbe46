"""Recipe text for tests: ``[nodes.<id>]`` blocks built from keyword parameters, and the small recipes and
settings several test files share.

``node("b", "concat", left="@a", right="@a")`` is the block ``[nodes.b]`` / ``type = "concat"`` / ``left = "@a"`` /
``right = "@a"``, one ``key = value`` line per parameter in the order given, so tests can still ``replace`` a
``"steps = 10"`` in the text.
"""

from __future__ import annotations

from typing import Any

IMAGE_PLUGINS = {"FLUXKILN_PLUGIN_MODULES": "helpers.textnodes,helpers.imagenodes"}  # env for the CLI
SQUARE_256 = {"aspect_ratio": "custom", "width": 256, "height": 256}  # a sample node's size


def toml_value(v: Any) -> str:
    """A TOML literal for a bool, string, number or list of them."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return repr(v)


def node(node_id: str, type_: str, **params: Any) -> str:
    """The block ``[nodes.<node_id>]`` of type ``type_`` with ``params``, ending in a newline."""
    lines = [f"[nodes.{node_id}]", f'type = "{type_}"', *(f"{k} = {toml_value(v)}" for k, v in params.items())]
    return "\n".join(lines) + "\n"


def sample(node_id: str, model: str = "@base", **params: Any) -> str:
    """A ``sample`` node on ``model``."""
    return node(node_id, "sample", model=model, **params)


def load_tiny(node_id: str = "base", model: str = "builtin:tiny-flux", **params: Any) -> str:
    """A ``load_model`` node, by default of the tiny built-in FLUX dev."""
    return node(node_id, "load_model", model=model, **params)


def red_cube(steps: int, seed: int) -> str:
    """Node ``img``: a 256x256 "a red cube" sample on ``base``."""
    return sample("img", prompt="a red cube", **SQUARE_256, num_inference_steps=steps, seed=seed)


def recipe_text(name: str, *blocks: str) -> str:
    """``[recipe]`` named ``name`` followed by the blocks."""
    return f'[recipe]\nname = "{name}"\n' + "".join(blocks)


CONST_HI = node("a", "const", value="hi")
CONCAT_AA = node("b", "concat", left="@a", right="@a")
DEMO = recipe_text("demo", CONST_HI, CONCAT_AA)  # a -> b; what follows links "@b"


def checked_and_saved(images: str = "@gen", **save: Any) -> str:
    """The image test plugin's ``pass_check`` of ``images`` as node ``checked``, then ``saved``, a ``save`` of it."""
    return node("checked", "pass_check", images=images) + node("saved", "save", images="@checked", **save)
