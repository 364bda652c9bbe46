"""pytest plugin for plugin authors (entry point ``pytest11``): test a node plugin in a few lines.

Fixtures ``run_recipe``, ``validate_recipe``, ``fluxkiln_context``,
``fluxkiln_registry`` and ``installed_plugin``, the marker
``fluxkiln_plugin(*plugins)``, the ``test_images`` node and :func:`make_images`;
the plugin guide (``docs/plugins.md``, "Testing") documents them.  Nothing heavy is imported
at module level: pytest loads this module in every session.
"""

import itertools
import os
import re
import sys
import threading
import tomllib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from .testplugins import load_registry
from .testplugins import make_images

__all__ = ["make_images"]


def pytest_configure(config: Any) -> None:
    config.addinivalue_line(
        "markers", "fluxkiln_plugin(*plugins): register these plugin modules or objects in this test's "
                   "fluxkiln fixtures (fluxkiln_registry, run_recipe, validate_recipe)")


# ---------------------------------------------------------------- registry
def _marker_plugins(request: Any) -> list[Any]:
    found: list[Any] = []
    for mark in request.node.iter_markers("fluxkiln_plugin"):
        found.extend(mark.args)
    return found


@pytest.fixture
def fluxkiln_registry(request: Any) -> Callable[..., Any]:
    """Factory: ``fluxkiln_registry(*plugins, builtins=True, entry_points=False, test_nodes=True,
    allow_errors=False)``.

    Returns a fresh :class:`~fluxkiln.engine.registry.Registry` with the built-in
    plugins, the ``test_images`` node and ``plugins`` (modules or objects with
    ``@hookimpl`` functions).  Installed plugins (entry points) are left out
    unless ``entry_points=True``, so a test sees exactly what it asks for.  A
    plugin given here that fails to load or register fails the test with its
    error, unless ``allow_errors=True`` (then read ``registry.plugins[name].error``).

    The registry's public surface: ``node_types`` (name -> ``NodeType``: ``name``,
    ``plugin``, ``version``, ``doc``, ``summary``, ``params``, ``outputs``,
    ``cache``, ``category``), ``port_types`` (name -> ``PortType``), ``plugins``
    (name -> ``PluginInfo``: ``source``, ``distribution``, ``version``,
    ``load_time``, ``error``, ``node_types``, ``port_types``, ``commands``),
    ``commands``, ``plugin_of(node_type)`` and ``failed_plugins()``.
    """

    def make(*plugins: Any, builtins: bool = True, entry_points: bool = False, test_nodes: bool = True,
             allow_errors: bool = False) -> Any:
        return load_registry([*_marker_plugins(request), *plugins], builtins=builtins,
                              entry_points=entry_points, test_nodes=test_nodes, allow_errors=allow_errors)

    return make


# ---------------------------------------------------------------- isolated cache
_shared_builtin: list[Path] = []


def _isolate_cache(tmp_path: Path, monkeypatch: Any) -> Path:
    """Point FLUXKILN_CACHE at ``tmp_path/fluxkiln-cache``; tiny built-in models are shared."""
    from . import paths

    cache = tmp_path / "fluxkiln-cache"
    if cache.exists():
        return cache
    if not _shared_builtin:
        _shared_builtin.append(paths.builtin_models_dir().resolve())
    cache.mkdir()
    (cache / "builtin").symlink_to(_shared_builtin[0], target_is_directory=True)
    monkeypatch.setenv("FLUXKILN_CACHE", str(cache))
    return cache


def _recipe_file(recipe: str | os.PathLike[str], tmp_path: Path) -> Path:
    if isinstance(recipe, str) and ("\n" in recipe or recipe.lstrip().startswith("[")):
        path = tmp_path / "recipe.toml"
        path.write_text(recipe, encoding="utf-8")
        return path
    return Path(recipe).resolve()


# ---------------------------------------------------------------- run results
@dataclass
class RecipeRun:
    """The result of :func:`run_recipe`: the engine's ``RunResult`` plus helpers.

    Attributes of the ``RunResult`` (``status``, ``nodes``, ``outputs``,
    ``events``, ``run_dir``, ``seconds``, ``plan``) are available directly.
    """

    result: Any
    recipe_path: Path
    engine: Any = field(repr=False, default=None)

    def __getattr__(self, name: str) -> Any:
        if name == "result":
            raise AttributeError(name)
        return getattr(self.result, name)

    def output(self, node: str, port: str | None = None) -> Any:
        """The value node ``node`` produced on ``port`` (default: its only or first output)."""
        if node not in self.result.outputs:
            raise KeyError(f"node '{node}' has no outputs in this run (state: {self.result.nodes.get(node)!r})")
        outs = self.result.outputs[node]
        return outs[port] if port else next(iter(outs.values()))

    def events_of(self, event: str | None = None, node: str | None = None) -> list[Any]:
        """Events, optionally only those named ``event`` and/or of node ``node``."""
        return [e for e in self.result.events
                if (event is None or e.event == event) and (node is None or e.node == node)]

    def artifacts(self, node: str | None = None) -> list[Path]:
        """Files nodes recorded with ``ctx.artifact`` (of one node, or all)."""
        return [Path(a) for a in self.result.artifacts(node)]

    def failure(self, node: str) -> dict[str, Any] | None:
        """The data of node ``node``'s ``node_failed`` event (error, error_type, hint, plugin ...)."""
        found = self.events_of("node_failed", node)
        return found[-1].data if found else None

    def summary(self) -> str:
        lines = [f"run {self.result.status}: " + ", ".join(f"{k}={v}" for k, v in self.result.nodes.items())]
        for e in self.events_of("node_failed"):
            d = e.data
            lines.append(f"  {e.node} ({e.type}, plugin {d.get('plugin')}): {d.get('error_type')}: {d.get('error')}")
            if d.get("traceback"):
                lines.append("    " + d["traceback"].rstrip().replace("\n", "\n    "))
        return "\n".join(lines)


@pytest.fixture
def run_recipe(request: Any, tmp_path: Path, monkeypatch: Any) -> Callable[..., RecipeRun]:
    """Factory: ``run_recipe(text_or_path, plugins=(), overrides=None, only=None, force=None,
    force_all=False, expect="ok") -> RecipeRun``.

    TOML text is written to ``tmp_path/recipe.toml`` (relative paths in it are
    relative to ``tmp_path``); a path is run where it is.  Runs use a cache of
    this test's own (``FLUXKILN_CACHE`` is set for the test; the tiny built-in
    models are shared) and write under ``tmp_path/runs/<name>``.  Calls in one
    test share one Engine per set of plugins, so a second run reuses cached
    results like ``fluxkiln watch``.  An invalid recipe raises ``RecipeInvalid``;
    a run whose status is not ``expect`` fails the test with each node's error
    (``expect=None`` accepts any status).
    """
    engines: dict[tuple[int, ...], Any] = {}

    def run(recipe: str | os.PathLike[str], *, plugins: Iterable[Any] = (), overrides: list[str] | None = None,
            only: list[str] | None = None, force: list[str] | None = None, force_all: bool = False,
            expect: str | None = "ok") -> RecipeRun:
        from .runner import Engine

        __tracebackhide__ = True
        cache = _isolate_cache(tmp_path, monkeypatch)
        all_plugins = [*_marker_plugins(request), *plugins]
        key = tuple(id(p) for p in all_plugins)
        if key not in engines:
            engines[key] = Engine(load_registry(all_plugins), cache_dir=cache)
        engine = engines[key]
        path = _recipe_file(recipe, tmp_path)
        result = engine.run(path, overrides=overrides, only=only, force=force, force_all=force_all,
                            output=_run_dir(path, tmp_path))
        run_ = RecipeRun(result, path, engine)
        if expect is not None and result.status != expect:
            pytest.fail(f"expected status {expect!r}, got {result.status!r}\n{run_.summary()}", pytrace=False)
        return run_

    return run


def _run_dir(path: Path, tmp_path: Path) -> Path | None:
    try:
        head = tomllib.loads(path.read_text(encoding="utf-8")).get("recipe") or {}
    except (OSError, tomllib.TOMLDecodeError):
        return None  # the engine reports it
    if head.get("output_dir"):
        return None
    name = str(head.get("name") or "recipe")
    return tmp_path / "runs" / (name if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name) else "recipe")


@pytest.fixture
def validate_recipe(request: Any, tmp_path: Path) -> Callable[..., list[Any]]:
    """Factory: ``validate_recipe(text_or_path, plugins=(), overrides=None) -> list[Problem]``.

    Every problem ``fluxkiln validate`` would report (each has ``message``,
    ``line``, ``node``, ``key``, ``hint`` and ``format()``); empty when valid.
    """

    def check(recipe: str | os.PathLike[str], *, plugins: Iterable[Any] = (),
              overrides: list[str] | None = None) -> list[Any]:
        from .errors import RecipeInvalid
        from .validate import check_file

        reg = load_registry([*_marker_plugins(request), *plugins])
        try:
            check_file(_recipe_file(recipe, tmp_path), reg, overrides)
        except RecipeInvalid as exc:
            return exc.problems
        return []

    return check


# ---------------------------------------------------------------- a context for direct calls
def _recording_context_class() -> type:
    from .context import RunContext

    class RecordingContext(RunContext):
        """A real RunContext whose events are kept in ``events``; ``cancel()`` asks the node to stop."""

        events: list[Any]

        def cancel(self) -> None:
            self._cancel.set()

        def events_of(self, event: str | None = None) -> list[Any]:
            """Recorded events, optionally only those named ``event`` (as ``RecipeRun.events_of``)."""
            return [e for e in self.events if event is None or e.event == event]

        def logs(self) -> list[Any]:
            """The ``node_log`` events: ``e.data["message"]``, ``e.data["level"]``."""
            return self.events_of("node_log")

        def progress_events(self) -> list[Any]:
            """The ``node_progress`` events: ``e.data["step"]``, ``e.data["total"]``, ``e.data["metrics"]`` ..."""
            return self.events_of("node_progress")

    return RecordingContext


@pytest.fixture
def fluxkiln_context(request: Any, tmp_path: Path, monkeypatch: Any) -> Callable[..., Any]:
    """Factory: ``fluxkiln_context(node="node", type="test", params=None, plugins=())`` -> a RunContext.

    For calling a node function directly: ``out = my_node(ctx, images=make_images(2))``.
    The context records what the node emits in ``ctx.events`` (``Event`` objects, as
    ``RecipeRun.events_of`` returns; helpers ``ctx.events_of(event=None)``,
    ``ctx.logs()``, ``ctx.progress_events()``), writes under ``tmp_path``, and
    ``ctx.cancel()`` makes ``ctx.check_cancelled()`` raise ``Cancelled``.
    ``ctx.resolve_model`` asks the built-in plugins and ``plugins``.
    """
    counter = itertools.count()

    def make(node: str = "node", type: str = "test", params: dict[str, Any] | None = None,
             plugins: Iterable[Any] = ()) -> Any:
        from .residency import Residency

        cache = _isolate_cache(tmp_path, monkeypatch)
        extra = [*_marker_plugins(request), *plugins]
        holder: list[Any] = []

        def resolve(ref: str) -> str | None:
            if not holder:
                holder.append(load_registry(extra, test_nodes=False))
            return holder[0].resolve_model(ref)

        events: list[Any] = []
        ctx = _recording_context_class()(
            run_id=f"test-{next(counter)}", node=node, type=type, run_dir=tmp_path / "runs" / "test",
            state_root=cache / "state", emit=events.append, cancel=threading.Event(), models=Residency(),
            resolver=resolve, params=params or {}, identity={"type": type, "params": params or {}})
        ctx.events = events
        return ctx

    return make


# ---------------------------------------------------------------- "installed" plugins
@dataclass
class InstalledPlugin:
    """A module made visible as an installed distribution with a ``fluxkiln`` entry point."""

    name: str
    module: str
    distribution: str
    site: Path
    env: dict[str, str]


@pytest.fixture
def installed_plugin(tmp_path: Path, monkeypatch: Any) -> Callable[..., InstalledPlugin]:
    """Factory: ``installed_plugin(module, source, *, name=None, distribution=None, version="0.1.0")``.

    Writes ``source`` as module ``module`` plus a ``.dist-info`` declaring the
    entry point ``name = module`` in group ``fluxkiln`` into a folder that is put
    on ``sys.path`` for this test (so ``Registry.load()`` and in-process
    ``fluxkiln.engine.cli.main([...])`` find it) and on ``PYTHONPATH`` in the
    returned ``env`` (for ``subprocess.run(["fluxkiln", ...], env=p.env)``).
    No pip, no network.
    """
    site = tmp_path / "site-packages"
    created: list[str] = []

    def install(module: str, source: str, *, name: str | None = None, distribution: str | None = None,
                version: str = "0.1.0") -> InstalledPlugin:
        name = name or module
        dist = distribution or module.replace("_", "-")
        site.mkdir(exist_ok=True)
        (site / f"{module}.py").write_text(source, encoding="utf-8")
        info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
        info.mkdir(exist_ok=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        (info / "entry_points.txt").write_text(f"[fluxkiln]\n{name} = {module}\n")
        if not created:
            monkeypatch.syspath_prepend(str(site))
        created.append(module)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(site), *filter(None, [env.get("PYTHONPATH")])])
        return InstalledPlugin(name, module, dist, site, env)

    yield install  # type: ignore[misc]
    for module in created:
        sys.modules.pop(module, None)
