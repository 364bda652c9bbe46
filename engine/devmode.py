"""Development mode (``FLUXKILN_DEV=1``): a plugin's own source code is part of its nodes' fingerprints.

Editing a plugin's code then reruns its nodes (the reason says "plugin code
changed") without bumping ``version``.  The code is every ``.py`` file of the
plugin's package (or its single module) plus the file that defines the node.
Files are hashed through the engine's file index, so unchanged files cost a
``stat``.  Switching the mode on or off changes fingerprints once.
"""

from __future__ import annotations

import hashlib
import inspect
import os
import sys
from pathlib import Path
from typing import Any

ENV_DEV = "FLUXKILN_DEV"
LABEL = "(plugin code)"


def enabled() -> bool:
    """True when ``FLUXKILN_DEV`` is set to something other than empty, 0, false, no or off."""
    return os.environ.get(ENV_DEV, "").strip().lower() not in ("", "0", "false", "no", "off")


def code_files(nt: Any) -> list[Path]:
    """The source files of a node type's plugin: its package's ``.py`` files and the node's own file."""
    found: set[Path] = set()
    module = sys.modules.get(nt.plugin_module or "")
    if module is not None and getattr(module, "__file__", None):
        root = Path(module.__file__).resolve()
        if getattr(module, "__path__", None):  # a package: all of it
            found.update(p.resolve() for p in root.parent.rglob("*.py") if "__pycache__" not in p.parts)
        else:
            found.add(root)
    try:
        own = inspect.getsourcefile(nt.func)
    except TypeError:
        own = None
    if own:
        found.add(Path(own).resolve())
    return sorted(p for p in found if p.is_file())


def code_digest(nt: Any, hasher: Any) -> str:
    """A digest of the plugin's source files (names and contents)."""
    h = hashlib.sha256()
    for path in code_files(nt):
        h.update(str(path).encode() + b"\0" + hasher.file(path).encode())
    return h.hexdigest()
