"""List the members of a dataset source (zip, tar or folder) safely, refusing anything hostile.

An archive is untrusted input.  Every member name is checked before anything
is read: absolute paths, drive letters and ``..`` components are refused, as
are links, devices and FIFOs (in any archive, under any name), names that are
not UTF-8, and (in folders) link loops and dangling links.  Hidden files,
``._*`` resource forks and ``__MACOSX/`` are skipped.  The number of members
looked at is capped, skipped archive members are charged to the byte cap
before they are passed over, and a tar's whole decompressed stream is capped.  Nothing here writes to disk: members are handed out as
:class:`Member` objects whose ``open()`` returns a readable stream, so the
caller can count bytes while it copies them.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
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
    in_archive: bool = True  # passing over an archive member still reads it; a folder's file is not read


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


def printable(name: str) -> str:
    """A member name for messages: bytes that are not UTF-8 as ``\\xff``, control characters escaped."""
    text = name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


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


Charge = Callable[[str, int], None]


def iter_members(source: Path, max_files: int, charge: Charge | None = None,
                 max_stream_bytes: int | None = None) -> Iterator[Member | tuple[str, str]]:
    """Yield each regular member as a :class:`Member`, or ``(name, reason)`` for a skipped one.

    ``charge(name, size)`` is called for every skipped archive member before it is passed over (a tar
    decompresses it to skip it); it raises :class:`Refused` to stop.  ``max_stream_bytes`` caps every
    byte decompressed from a tar, headers and skipped members included.
    """
    counter = _Counter(max_files)
    charge = charge or (lambda _name, _size: None)
    lower = source.name.lower()
    if source.is_dir():
        yield from _iter_folder(source, counter)
    elif lower.endswith(".zip") or (not lower.endswith(TAR_SUFFIXES) and zipfile.is_zipfile(source)):
        if not zipfile.is_zipfile(source):
            raise Refused(source.name, "not a valid zip file")
        yield from _iter_zip(source, counter, charge)
    elif _is_tar(source):
        yield from _iter_tar(source, counter, charge, max_stream_bytes)
    else:
        raise Refused(source.name, "not a zip or tar archive or a folder (allowed: .zip, "
                      + ", ".join(TAR_SUFFIXES) + ", or a folder of images)")


def _is_tar(source: Path) -> bool:
    try:
        return tarfile.is_tarfile(source)
    except OSError:
        return False


def _utf8_name(raw: str, what: str) -> str:
    """``raw`` if it is valid UTF-8 text, else :class:`Refused` naming the member by its bytes."""
    try:
        raw.encode("utf-8")
    except UnicodeEncodeError:
        raise Refused(raw, f"the {what} name is not valid UTF-8; rename it to UTF-8 (e.g. `convmv -f latin1 -t "
                      "utf8 --notest -r <folder>`) and pack the source again") from None
    return raw


def _open_zip(source: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(source)
    except UnicodeDecodeError as exc:  # the UTF-8 flag is set but a name is not UTF-8
        raise Refused(exc.object.decode("utf-8", "surrogateescape"),
                      "a member name is marked UTF-8 but is not valid UTF-8; repack the archive with UTF-8 names "
                      "(e.g. `zip -r` from a UTF-8 folder, or 7-Zip)") from None
    except (zipfile.BadZipFile, OSError) as exc:
        raise Refused(source.name, f"not a valid zip file ({exc})") from None


def _iter_zip(source: Path, counter: _Counter, charge: Charge) -> Iterator[Member | tuple[str, str]]:
    with _open_zip(source) as zf:
        for info in zf.infolist():
            counter.tick(info.filename)
            name = safe_name(_utf8_name(info.filename, "member"))
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
                charge(name, info.file_size)
                yield (name, reason)
                continue
            yield Member(name, info.file_size, lambda info=info: zf.open(info))


class _Capped:
    """A read-only stream that refuses the source once more than ``limit`` bytes came out of it."""

    def __init__(self, raw: IO[bytes], limit: int | None, source: str):
        self.raw, self.limit, self.source, self.count = raw, limit, source, 0

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.count += len(data)
        if self.limit is not None and self.count > self.limit:
            raise Refused(self.source, f"decompresses to more than {self.limit} bytes (max_total_bytes plus "
                          "headers; possible decompression bomb)")
        return data


def _decompressed(source: Path) -> IO[bytes]:
    """The tar bytes of ``source``: gzip, bzip2 and xz are recognised by their magic numbers.

    Python's own decompressor objects read in bounded chunks, so skipping a large member costs its
    decompression only (``tarfile``'s ``r|*`` stream mode slows down badly on highly compressed data).
    """
    raw = open(source, "rb")
    magic = raw.read(6)
    raw.seek(0)
    if magic.startswith(b"\x1f\x8b"):
        return gzip.GzipFile(fileobj=raw)
    if magic.startswith(b"BZh"):
        return bz2.BZ2File(raw)
    if magic.startswith(b"\xfd7zXZ\x00"):
        return lzma.LZMAFile(raw)
    return raw


def _iter_tar(source: Path, counter: _Counter, charge: Charge,
              max_stream_bytes: int | None) -> Iterator[Member | tuple[str, str]]:
    # Stream mode ("r|"): members are read in order, nothing is listed up front.
    with _decompressed(source) as stream, \
            tarfile.open(fileobj=_Capped(stream, max_stream_bytes, source.name), mode="r|") as tf:
        for ti in tf:
            counter.tick(ti.name)
            name = safe_name(_utf8_name(ti.name, "member"))
            if ti.isdir():
                continue
            if ti.issym() or ti.islnk():
                raise Refused(ti.name, f"links are not allowed in a dataset archive (points to {ti.linkname!r})")
            if not ti.isreg():
                raise Refused(ti.name, "only regular files are allowed (this is a device, FIFO or special member)")
            reason = skip_reason(name)
            if reason:
                charge(name, ti.size)  # before tarfile decompresses it to pass over it
                yield (name, reason)
                continue
            yield Member(name, ti.size, lambda ti=ti: tf.extractfile(ti))


def _iter_folder(root: Path, counter: _Counter) -> Iterator[Member | tuple[str, str]]:
    real_root = root.resolve()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        rel_dir = Path(dirpath).relative_to(root).as_posix()
        keep = []
        for d in sorted(dirnames):
            rel = _utf8_name(d if rel_dir == "." else f"{rel_dir}/{d}", "folder")
            counter.tick(rel)
            if skip_reason(rel):
                yield (rel, skip_reason(rel) or "")
            elif (Path(dirpath) / d).is_symlink():
                yield (rel, "symbolic link to a folder (not followed)")
            else:
                keep.append(d)
        dirnames[:] = keep
        for f in sorted(filenames):
            rel = _utf8_name(f if rel_dir == "." else f"{rel_dir}/{f}", "file")
            counter.tick(rel)
            reason = skip_reason(rel)
            if reason:
                yield (rel, reason)
                continue
            path = Path(dirpath) / f
            yield _folder_member(path, rel, real_root)


def _link_target(path: Path, rel: str) -> Path:
    """Where a symbolic link in a dataset folder leads; loops and dangling links are refused by name."""
    try:
        return path.resolve(strict=True)
    except FileNotFoundError:
        raise Refused(rel, f"dangling symbolic link (it points to {os.readlink(path)!r}, which does not exist); "
                      "remove the link or restore its target") from None
    except (RuntimeError, OSError) as exc:  # Python 3.11 reports a loop as RuntimeError, later ones as ELOOP
        raise Refused(rel, f"symbolic link loop ({exc}); remove or fix the link") from None


def _folder_member(path: Path, rel: str, real_root: Path) -> Member:
    if path.is_symlink():
        target = _link_target(path, rel)
        if not target.is_relative_to(real_root):
            raise Refused(rel, f"symbolic link pointing outside the dataset folder ({target})")
    st = path.stat()
    if not stat.S_ISREG(st.st_mode):
        raise Refused(rel, "only regular files are allowed (this is a device, FIFO or socket)")
    return Member(rel, st.st_size, lambda: open(path, "rb"), in_archive=False)
