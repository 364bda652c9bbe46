"""What fluxkiln's pytest fixtures (:mod:`.testing`) are built from: deterministic test pictures
(:func:`make_images`), the ``test_images`` node, and registries of the plugins under test, each module plugin
under the entry point name it has when installed.  Nothing heavy is imported at module level."""

import tomllib
import types
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest

TEST_NODES_PLUGIN = "fluxkiln.testing"


# ---------------------------------------------------------------- test images
def make_images(count: int = 1, width: int = 64, height: int = 64, pattern: str = "gradient",
                seed: int = 0) -> Any:
    """Deterministic RGB test pictures as :class:`Images` (``gradient``, ``solid`` or ``noise``)."""
    import random

    from PIL import Image

    from .ports import ImageItem, Images

    out = Images()
    for i in range(count):
        rng = random.Random(seed * 1000 + i)
        if pattern == "noise":
            img = Image.frombytes("RGB", (width, height), rng.randbytes(width * height * 3))
        elif pattern == "solid":
            img = Image.new("RGB", (width, height), tuple(rng.randrange(256) for _ in range(3)))
        else:
            horiz = Image.linear_gradient("L").rotate(90).resize((width, height))
            vert = Image.linear_gradient("L").resize((width, height))
            img = Image.merge("RGB", (horiz, vert, Image.new("L", (width, height), rng.randrange(256))))
        out.append(ImageItem(image=img, seed=seed + i, prompt=f"test image {i}", name=f"test-{i:02d}"))
    return out


def test_nodes_plugin() -> Any:
    """A plugin object with the ``test_images`` node (registered in every test registry)."""
    from typing import Annotated, Literal

    from pydantic import Field

    from . import Images, RunContext, hookimpl, node

    @node("test_images", version="1", category="testing")
    def test_images_node(
        ctx: RunContext,
        count: Annotated[int, Field(ge=1, le=64, description="Number of images")] = 2,
        width: Annotated[int, Field(ge=8, le=2048, description="Width in pixels")] = 64,
        height: Annotated[int, Field(ge=8, le=2048, description="Height in pixels")] = 64,
        pattern: Annotated[Literal["gradient", "solid", "noise"], Field(description="What to draw")] = "gradient",
        seed: Annotated[int, Field(ge=0, description="Seed of the colours")] = 0,
    ) -> Images:
        """Deterministic test pictures, no model needed (available in fluxkiln's pytest fixtures only)."""
        return make_images(count, width, height, pattern, seed)

    test_images_node.__test__ = False  # not a pytest test

    class TestNodes:
        __test__ = False

        def __init__(self) -> None:
            self.__name__ = TEST_NODES_PLUGIN

        @hookimpl
        def register_node_types(self, register: Callable[[Any], None]) -> None:
            register(test_images_node)

    return TestNodes()


# ---------------------------------------------------------------- registry
def load_registry(plugins: Iterable[Any], *, builtins: bool = True, entry_points: bool = False,
                   test_nodes: bool = True, allow_errors: bool = False) -> Any:
    from .registry import Registry

    extra = _unique(plugins)
    test_nodes = test_nodes and builtins  # test_images needs the built-in port types
    reg = Registry.load(extra=([test_nodes_plugin()] if test_nodes else []) + extra,
                        entry_points=entry_points, builtins=builtins)
    for obj in extra:
        _use_installed_name(reg, obj)
    names = {p.name for p in reg.plugins.values() if p.source == "extra"}
    names.add(TEST_NODES_PLUGIN)
    bad = [p for p in reg.plugins.values() if p.error and p.name in names]
    if bad and not allow_errors:
        pytest.fail("plugin failed to load: " + "; ".join(f"{p.name}: {p.error}" for p in bad)
                    + " (pass allow_errors=True to fluxkiln_registry to inspect the failure)", pytrace=False)
    return reg


def _unique(plugins: Iterable[Any]) -> list[Any]:
    """Each plugin once: a module given by a marker and again as ``plugins=[...]`` is one plugin."""
    out: list[Any] = []
    for p in plugins:
        if not any(p is q for q in out):
            out.append(p)
    return out


def _installed_name(module: types.ModuleType) -> tuple[str, str | None, str | None] | None:
    """(entry point name, distribution, version) a plugin module has, or will have, when installed.

    Read from installed metadata, else from the ``pyproject.toml`` next to the
    package, so that tests see the plugin under the name users will see.
    """
    from importlib import metadata

    modname = module.__name__
    for ep in metadata.entry_points(group="fluxkiln"):
        if ep.value.split(":")[0].strip() == modname:
            return ep.name, ep.dist.name if ep.dist else None, ep.dist.version if ep.dist else None
    folder = Path(getattr(module, "__file__", None) or ".").resolve().parent
    for candidate in (folder, *folder.parents[:3]):
        pyproject = candidate / "pyproject.toml"
        if not pyproject.is_file():
            continue
        try:
            project = tomllib.loads(pyproject.read_text(encoding="utf-8")).get("project") or {}
        except (OSError, tomllib.TOMLDecodeError):
            return None
        for name, value in ((project.get("entry-points") or {}).get("fluxkiln") or {}).items():
            if str(value).split(":")[0].strip() == modname:
                return name, project.get("name"), project.get("version")
        return None
    return None


def _use_installed_name(reg: Any, obj: Any) -> None:
    """Rename a module plugin given to a fixture to its entry point name (as when pip-installed)."""
    if not isinstance(obj, types.ModuleType) or obj.__name__ not in reg.plugins:
        return
    found = _installed_name(obj)
    if found is None or found[0] in reg.plugins:
        return
    name, dist, version = found
    info = reg.plugins.pop(obj.__name__)
    info.name, info.distribution, info.version = name, dist, version
    reg.plugins[name] = info
    for nt in reg.node_types.values():
        if nt.plugin == obj.__name__:
            nt.plugin = name
