"""fluxkiln's built-in node plugins.

Each subpackage (and ``ports``) is a plugin found exactly as a third-party
plugin is: through an entry point in group ``fluxkiln``, declared in fluxkiln's
own ``pyproject.toml``.  They implement hooks from ``fluxkiln.engine.hookspecs``
with ``@hookimpl``.  None of them imports torch or diffusers at module level, so
``fluxkiln validate`` stays fast.
"""
