"""Where fluxkiln keeps things on disk (the cache root, built-in models) and how folders get there safely."""

from __future__ import annotations

import os
from collections.abc import Callable
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


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (after a rename into it) where the OS allows it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def build_once(name: str, marker: str, build: Callable[[Path], None]) -> Path:
    """``builtin_models_dir()/name``, built by ``build(folder)`` on first use.

    The folder is built in a temporary sibling and renamed into place, so a
    failed build leaves nothing and two processes racing both end up with one
    complete folder.  ``marker`` is a file (relative path) that only a
    complete build has.
    """
    import shutil
    import tempfile

    root = builtin_models_dir()
    final = root / name
    if (final / marker).is_file():
        return final
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=root))
    try:
        build(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / marker).is_file():  # a real failure, not a race lost to another process
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final
