"""Where fluxkiln keeps things on disk (the cache root, built-in models) and how folders get there safely."""

from __future__ import annotations

import errno
import os
import stat
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


def temp_name(path: Path) -> Path:
    """A hidden temporary sibling of ``path`` no other process or thread will pick (pid + random part).

    Write there, then ``os.replace`` it onto ``path``: readers see the old or the new file, never half."""
    import uuid

    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


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


class BadPath(ValueError):
    """A path from a recipe that cannot be used; the message says why and how to fix it."""


def expand(raw: str, base: Path) -> Path:
    """``raw`` with ``~`` expanded, made absolute against ``base``; raise :class:`BadPath` if it cannot be."""
    if "\x00" in raw:
        raise BadPath("the path contains a NUL character; remove it")
    try:
        path = Path(raw).expanduser()
    except RuntimeError:
        user = raw[1:].split("/", 1)[0]
        raise BadPath(f"cannot expand '~{user}': no such user (or no home directory); "
                      "write the full path instead") from None
    return path if path.is_absolute() else base / path


def probe(path: Path) -> str | None:
    """Why ``path`` cannot be read as a local input (None: it is a regular file or a folder).

    Never raises for odd paths: over-long names, link loops, dangling links,
    devices and FIFOs each get a message that says what to do.
    """
    long = next((p for p in path.parts if len(os.fsencode(p)) > 255), None)
    if long is not None:
        return f"a path component is longer than 255 bytes ({long[:40]}...); shorten that file or folder name"
    try:
        st = path.stat()
    except FileNotFoundError:
        if path.is_symlink():
            return f"{path} is a dangling symbolic link (it points to {os.readlink(path)}, which does not exist)"
        return "not found"
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return f"{path} is a symbolic link loop; fix or remove the link"
        return f"cannot read {path}: {exc.strerror or exc}"
    if stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode):
        return None
    return (f"{path} is not a regular file or folder (it is a {file_kind(st.st_mode)}); "
            "only regular files and folders are read")


def file_kind(mode: int) -> str:
    """A word for a non-regular file type (for messages)."""
    for test, word in ((stat.S_ISFIFO, "FIFO"), (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
                       (stat.S_ISSOCK, "socket"), (stat.S_ISLNK, "symbolic link"), (stat.S_ISDIR, "folder")):
        if test(mode):
            return word
    return "special file"
