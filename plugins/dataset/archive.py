"""List the members of a dataset source (zip, tar or folder) safely, refusing anything hostile.

An archive is untrusted input.  Every member name is checked before anything
is read: absolute paths, drive letters and ``..`` components are refused, as
are links, devices and FIFOs (in any archive, under any name).  Hidden files,
``._*`` resource forks and ``__MACOSX/`` are skipped.  The number of members
looked at is capped.  Nothing here writes to disk: members are handed out as
:class:`Member` objects whose ``open()`` returns a readable stream, so the
caller can count bytes while it copies them.
"""

from __future__ import annotations

import os
import re
import stat
import tarfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
_DRIVE = re.compile(r"^[A-Za-z]:")


class Refused(Exception):
    """A source member that must not be taken; ``member`` names it."""

    def __init__(self, member: str, reason: str):
        super().__init__(f"{member!r}: {reason}")
        self.member = member
        self.reason = reason


@dataclass
class Member:
    """One regular file of a source: its normalized relative name and how to read it."""

    name: str
    size: int | None
    open: Callable[[], IO[bytes]]


def safe_name(raw: str) -> str:
    """Normalize a member name to a relative POSIX path, or raise :class:`Refused`."""
    name = raw.replace("\\", "/")
    if "\x00" in name:
        raise Refused(raw, "the name contains a NUL byte")
    if name.startswith("/") or _DRIVE.match(name):
        raise Refused(raw, "absolute paths are not allowed in a dataset archive")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise Refused(raw, "'..' in a path would write outside the dataset folder")
    return "/".join(parts)


def skip_reason(name: str) -> str | None:
    """Why a (safe) member name is skipped without reading it, or None to take it."""
    parts = name.split("/")
    if "__MACOSX" in parts:
        return "macOS metadata (__MACOSX/)"
    if any(p.startswith(".") for p in parts):
        return "hidden file"
    return None


class _Counter:
    """Counts every entry looked at and refuses the source past ``limit``."""

    def __init__(self, limit: int):
        self.limit = limit
        self.seen = 0

    def tick(self, name: str) -> None:
        self.seen += 1
        if self.seen > self.limit:
            raise Refused(name, f"the source has more than max_files = {self.limit} entries")


def iter_members(source: Path, max_files: int) -> Iterator[Member | tuple[str, str]]:
    """Yield each regular member as a :class:`Member`, or ``(name, reason)`` for a skipped one."""
    counter = _Counter(max_files)
    lower = source.name.lower()
    if source.is_dir():
        yield from _iter_folder(source, counter)
    elif lower.endswith(".zip") or (not lower.endswith(TAR_SUFFIXES) and zipfile.is_zipfile(source)):
        if not zipfile.is_zipfile(source):
            raise Refused(source.name, "not a valid zip file")
        yield from _iter_zip(source, counter)
    elif _is_tar(source):
        yield from _iter_tar(source, counter)
    else:
        raise Refused(source.name, "not a zip or tar archive or a folder (allowed: .zip, "
                      + ", ".join(TAR_SUFFIXES) + ", or a folder of images)")


def _is_tar(source: Path) -> bool:
    try:
        return tarfile.is_tarfile(source)
    except OSError:
        return False


def _iter_zip(source: Path, counter: _Counter) -> Iterator[Member | tuple[str, str]]:
    with zipfile.ZipFile(source) as zf:
        for info in zf.infolist():
            counter.tick(info.filename)
            name = safe_name(info.filename)
            mode = info.external_attr >> 16  # Unix mode when made on Unix; no type bits means a plain file
            if info.is_dir() or stat.S_ISDIR(mode):
                continue
            if stat.S_ISLNK(mode):
                raise Refused(info.filename, "symbolic links are not allowed in a dataset archive")
            if stat.S_IFMT(mode) and not stat.S_ISREG(mode):
                raise Refused(info.filename, "only regular files are allowed (this is a device, FIFO or socket)")
            if info.flag_bits & 0x1:
                raise Refused(info.filename, "encrypted members are not supported")
            reason = skip_reason(name)
            if reason:
                yield (name, reason)
                continue
            yield Member(name, info.file_size, lambda info=info: zf.open(info))


def _iter_tar(source: Path, counter: _Counter) -> Iterator[Member | tuple[str, str]]:
    # Stream mode ("r|*"): members are read in order, nothing is listed up front.
    with tarfile.open(source, mode="r|*") as tf:
        for ti in tf:
            counter.tick(ti.name)
            name = safe_name(ti.name)
            if ti.isdir():
                continue
            if ti.issym() or ti.islnk():
                raise Refused(ti.name, f"links are not allowed in a dataset archive (points to {ti.linkname!r})")
            if not ti.isreg():
                raise Refused(ti.name, "only regular files are allowed (this is a device, FIFO or special member)")
            reason = skip_reason(name)
            if reason:
                yield (name, reason)
                continue
            yield Member(name, ti.size, lambda ti=ti: tf.extractfile(ti))


def _iter_folder(root: Path, counter: _Counter) -> Iterator[Member | tuple[str, str]]:
    real_root = root.resolve()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        rel_dir = Path(dirpath).relative_to(root).as_posix()
        keep = []
        for d in sorted(dirnames):
            rel = d if rel_dir == "." else f"{rel_dir}/{d}"
            counter.tick(rel)
            if skip_reason(rel):
                yield (rel, skip_reason(rel) or "")
            elif (Path(dirpath) / d).is_symlink():
                yield (rel, "symbolic link to a folder (not followed)")
            else:
                keep.append(d)
        dirnames[:] = keep
        for f in sorted(filenames):
            rel = f if rel_dir == "." else f"{rel_dir}/{f}"
            counter.tick(rel)
            reason = skip_reason(rel)
            if reason:
                yield (rel, reason)
                continue
            path = Path(dirpath) / f
            yield _folder_member(path, rel, real_root)


def _folder_member(path: Path, rel: str, real_root: Path) -> Member:
    if path.is_symlink():
        target = path.resolve()
        if not target.is_relative_to(real_root):
            raise Refused(rel, f"symbolic link pointing outside the dataset folder ({target})")
    st = path.stat()
    if not stat.S_ISREG(st.st_mode):
        raise Refused(rel, "only regular files are allowed (this is a device, FIFO or socket)")
    return Member(rel, st.st_size, lambda: open(path, "rb"))
