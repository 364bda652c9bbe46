"""Say in one line why a plugin failed to load, pointing at the plugin's code, not at importlib."""

from __future__ import annotations

import importlib
import os
import traceback
from typing import Any

import pluggy

_INTERNAL = tuple(os.path.dirname(m.__file__ or "") + os.sep for m in (importlib, pluggy)) + (
    os.path.dirname(os.path.abspath(__file__)) + os.sep,)

# What a plugin may raise while it is imported or registers, and is reported instead of ending fluxkiln.
PLUGIN_FAILURES: tuple[type[BaseException], ...] = (Exception, SystemExit, KeyboardInterrupt)


def short_error(exc: BaseException) -> str:
    """``Type: message (file:line)`` with the last frame outside importlib, pluggy and the engine."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if not f.filename.startswith(_INTERNAL) and not f.filename.startswith("<frozen")]
    where = f" ({frames[-1].filename}:{frames[-1].lineno})" if frames else ""
    if isinstance(exc, SystemExit):
        return f"SystemExit: the plugin called sys.exit({exc.code!r}){where}"
    if isinstance(exc, KeyboardInterrupt):
        return f"KeyboardInterrupt: raised by the plugin{where}"
    return f"{type(exc).__name__}: {exc}{where}"


def entry_point_error(exc: BaseException, ep: Any, dist: str | None) -> str:
    """The error of an entry point that failed to load; a missing module names the entry point and module."""
    module = ep.value.split(":")[0].strip()
    missing = getattr(exc, "name", None) if isinstance(exc, ModuleNotFoundError) else None
    if missing and (module == missing or module.startswith(missing + ".")):
        owner = f" of distribution '{dist}'" if dist else ""
        fix = f"reinstall it (pip install --force-reinstall {dist})" if dist else "reinstall its distribution"
        return (f"ModuleNotFoundError: entry point '{ep.name} = {ep.value}'{owner} names module '{module}', "
                f"which cannot be imported (No module named '{missing}'); {fix} or fix the entry point")
    if isinstance(exc, AttributeError) and ":" in ep.value:
        return f"AttributeError: entry point '{ep.name} = {ep.value}': {exc}"
    return short_error(exc)
