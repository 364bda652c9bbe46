"""Content-addressed storage: every distinct file content is kept once, under its sha256.

``<cache>/blobs/<sha[:2]>/<sha>`` holds one read-only file per content.  The
files of a cache entry are hard links to these blobs (a private copy where the
file system has no hard links), so the same payload stored by several nodes —
the pixels that pass unchanged through ``sample``, ``safety_check`` and
``save``, a LoRA that is both an output and a file in the run folder — takes
its bytes once.  Blobs are written under a unique temporary name and renamed
into place.  They carry no authority of their own: every cache entry verifies
its files when it is read, and a blob found corrupt is removed.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

READ_ONLY = 0o444


def unique_tmp(folder: Path, stem: str) -> Path:
    """A temporary name in ``folder`` no other process or thread will pick."""
    return folder / f".{stem[:40]}.{os.getpid()}-{uuid.uuid4().hex}.tmp"


def link_or_copy(src: Path, dest: Path, *, link: bool = True) -> bool:
    """Put ``src``'s content at ``dest`` atomically: a hard link where possible (and ``link``), else a copy.

    Returns True for a hard link.  ``dest`` is replaced in one rename, so a
    reader sees the old file or the new one, never a partial file.
    """
    tmp = unique_tmp(dest.parent, dest.name)
    linked = link
    try:
        try:
            if not link:
                raise OSError("a copy was asked for")
            os.link(src, tmp)
        except OSError:  # another file system, no hard links, too many links: copy
            if not src.exists():
                raise
            linked = False
            shutil.copyfile(src, tmp)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return linked


class BlobStore:
    """Read-only files named by the sha256 of their content."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, sha: str) -> Path:
        return self.root / sha[:2] / sha

    def _present(self, blob: Path, size: int) -> bool:
        try:
            return blob.stat().st_size == size
        except OSError:
            return False

    def add(self, sha: str, size: int, content: Path, *, private: bool) -> Path:
        """The blob of this content, written from ``content`` if it is not there yet.

        ``private`` says ``content`` is a file nobody else will write (a staging
        file), so the blob may be that very file (hard link) instead of a copy.
        """
        blob = self.path(sha)
        if self._present(blob, size):
            return blob
        blob.parent.mkdir(parents=True, exist_ok=True)
        tmp = unique_tmp(blob.parent, sha)
        try:
            if not private:
                shutil.copyfile(content, tmp)
            else:
                try:
                    os.link(content, tmp)
                except OSError:
                    shutil.copyfile(content, tmp)
            os.chmod(tmp, READ_ONLY)
            os.replace(tmp, blob)
        finally:
            tmp.unlink(missing_ok=True)
        return blob

    def share(self, sha: str, size: int, dest: Path, content: Path | None = None) -> None:
        """Make ``dest`` hold content ``sha``, as a hard link to its blob where the file system allows.

        ``content`` is where the content is now (a user's file, copied into the
        blob store); ``None`` means ``dest`` itself already holds it (a staging file).
        """
        src = content or dest
        try:
            blob = self.add(sha, size, src, private=content is None)
        except OSError:
            if content is not None:
                shutil.copyfile(content, dest)
            return
        if content is None and dest.exists() and os.path.samefile(blob, dest):
            return
        try:
            link_or_copy(blob, dest)
        except FileNotFoundError:  # the blob was pruned meanwhile: keep a private copy
            if content is not None:
                shutil.copyfile(content, dest)

    def remove(self, sha: str) -> None:
        try:
            self.path(sha).unlink()
        except OSError:
            pass

    def scan(self) -> Iterator[tuple[str, int, float]]:
        """(sha, size, mtime) of every blob."""
        if not self.root.is_dir():
            return
        for sub in os.scandir(self.root):
            if not sub.is_dir(follow_symlinks=False):
                continue
            for f in os.scandir(sub.path):
                if f.name.startswith(".") or not f.is_file(follow_symlinks=False):
                    continue
                try:
                    st = f.stat(follow_symlinks=False)
                except OSError:
                    continue
                yield f.name, st.st_size, st.st_mtime

    def total(self) -> int:
        return sum(size for _sha, size, _m in self.scan())

    def collect(self, referenced: set[str], *, grace: float = 600.0) -> int:
        """Remove blobs no entry references (older than ``grace`` seconds: a store may be under way)."""
        freed, now = 0, time.time()
        for sha, size, mtime in list(self.scan()):
            if sha not in referenced and now - mtime > grace:
                self.remove(sha)
                freed += size
        return freed
