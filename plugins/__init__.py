"""fluxkiln's built-in node plugins.

Each module listed in :data:`DEFAULT_PLUGINS` is a plugin registered exactly as a
third-party plugin's entry point is: it implements hooks from
``fluxkiln.engine.hookspecs`` with ``@hookimpl``.  None of them imports torch or
diffusers at module level, so ``fluxkiln validate`` stays fast.
"""

DEFAULT_PLUGINS: tuple[str, ...] = (
    "fluxkiln.plugins.ports",
    "fluxkiln.plugins.flux",
    "fluxkiln.plugins.io",
    "fluxkiln.plugins.dataset",
    "fluxkiln.plugins.train",
    "fluxkiln.plugins.caption",
    "fluxkiln.plugins.safety",
    "fluxkiln.plugins.bench",
    "fluxkiln.plugins.miniflux",
    "fluxkiln.plugins.evaluate",
)
