"""Where fluxkiln keeps things on disk: the cache root and the run folder."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """``$FLUXKILN_CACHE`` or the user cache directory (e.g. ``~/.cache/fluxkiln``)."""
    raw = os.environ.get("FLUXKILN_CACHE")
    if raw:
        return Path(raw).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("fluxkiln", appauthor=False))


def builtin_models_dir() -> Path:
    """Folder where tiny built-in models are saved once and loaded with ``from_pretrained``."""
    d = cache_root() / "builtin"
    d.mkdir(parents=True, exist_ok=True)
    return d
