"""Files nodes write into a run folder: recorded by content, kept with the cache entry, put back on a cache hit.

A node records each file it writes with ``ctx.artifact(path)``.  After it
runs, every such file inside the run folder is recorded by its path relative
to the run folder, its size and its sha256, and the disk cache keeps a copy
with the node's entry.  When a later run reuses the node from a cache, each of
these files must be in *that* run's folder with *that* content:

* missing, or an older output fluxkiln wrote there and nobody changed since:
  it is put there from the cache in one rename (a file of 16 KiB or more as
  a hard link to the cache's read-only copy, where the file system allows;
  smaller ones, such as captions and reports, as ordinary copies);
* a file of that name with other content that fluxkiln did not write (or that
  was edited since): it is never overwritten; the node runs again instead,
  and says so.

``<run folder>/.fluxkiln/files.json`` remembers what fluxkiln wrote into the
folder (node, size, sha256, plus the inode and mtime that let an unchanged
file be trusted without hashing it again).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from .blobs import link_or_copy, unique_tmp
from .fingerprint import hash_bytes_of

STATE_DIR = ".fluxkiln"
FILES = "files.json"
LINK_MIN = 16 * 1024  # smaller files are copied: as cheap as a link, and they stay yours to edit


@dataclass(frozen=True)
class Artifact:
    """One file a node wrote: where (relative to the run folder, if inside it), its size and sha256."""

    path: str
    size: int
    sha: str
    rel: str | None = None  # posix path inside the run folder; None for a file outside it
    stored: str | None = None  # the copy's path inside the cache entry, once stored

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_json(cls, data: Any) -> Artifact:
        """An artifact record from a manifest; ValueError if it is malformed or points outside its folder."""
        if not isinstance(data, dict):
            raise ValueError("artifact record is not an object")
        art = cls(path=str(data["path"]), size=int(data["size"]), sha=str(data["sha"]),
                  rel=data.get("rel"), stored=data.get("stored"))
        for inner in (art.rel, art.stored):
            if inner is not None and not safe_rel(inner):
                raise ValueError(f"artifact path {inner!r} leaves its folder")
        return art

    def in_run(self, run_dir: Path) -> Path:
        """Where this file belongs in ``run_dir`` (outside files stay where they are)."""
        return run_dir / self.rel if self.rel is not None else Path(self.path)


def safe_rel(rel: Any) -> bool:
    if not isinstance(rel, str) or not rel:
        return False
    p = PurePosixPath(rel)
    return not p.is_absolute() and ".." not in p.parts and "\\" not in rel and p.parts[0] != STATE_DIR


def _stamp(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def _files_under(path: Path) -> Iterable[Path]:
    if path.is_dir() and not path.is_symlink():
        yield from sorted(p for p in path.rglob("*") if p.is_file() and not p.is_symlink())
    elif path.is_file():
        yield path


def record(paths: Iterable[str], run_dir: Path) -> list[Artifact]:
    """Record the files a node reported (folders expand to their files; vanished files are dropped)."""
    root = run_dir.resolve()
    out: list[Artifact] = []
    seen: set[str] = set()
    for raw in paths:
        for f in _files_under(Path(raw)):
            path = Path(os.path.abspath(f))
            if str(path) in seen:
                continue
            seen.add(str(path))
            rel = None
            if not f.is_symlink():
                try:
                    rel = path.resolve().relative_to(root).as_posix()
                except ValueError:
                    rel = None
            if rel is not None and not safe_rel(rel):
                continue  # the engine's own bookkeeping is not a node's output
            out.append(Artifact(str(path), f.stat().st_size, hash_bytes_of(f), rel))
    return out


class RunFiles:
    """What fluxkiln wrote into one run folder, and whether each file still holds it."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.path = run_dir / STATE_DIR / FILES
        self._files: dict[str, dict[str, Any]] = {}
        self._dirty = False
        try:
            data = json.loads(self.path.read_text())
            self._files = {k: v for k, v in data.items() if isinstance(v, dict) and safe_rel(k)}
        except (OSError, ValueError, AttributeError):
            self._files = {}

    def _stat(self, rel: str) -> os.stat_result | None:
        p = self.run_dir / rel
        try:
            st = p.lstat()
        except OSError:
            return None
        return st if p.is_file() and not p.is_symlink() else None

    def _content(self, rel: str, st: os.stat_result) -> str:
        rec = self._files.get(rel)
        if rec and rec.get("stamp") == _stamp(st):
            return str(rec.get("sha"))
        return hash_bytes_of(self.run_dir / rel)

    def holds(self, art: Artifact) -> bool:
        """The file at ``art.rel`` exists and holds exactly ``art``'s content."""
        st = self._stat(str(art.rel))
        return st is not None and st.st_size == art.size and self._content(str(art.rel), st) == art.sha

    def ours(self, rel: str) -> bool:
        """The file at ``rel`` is absent, or holds exactly what fluxkiln last wrote there."""
        p = self.run_dir / rel
        if not p.exists() and not p.is_symlink():
            return True
        st = self._stat(rel)
        rec = self._files.get(rel)
        return st is not None and rec is not None and self._content(rel, st) == rec.get("sha")

    def inside(self, rel: str) -> bool:
        """``rel``'s folder really lies in the run folder (no symlinked folder leads elsewhere)."""
        parent = (self.run_dir / rel).parent
        probe = parent
        while not probe.exists() and probe != self.run_dir:
            probe = probe.parent
        try:
            probe.resolve().relative_to(self.run_dir.resolve())
        except ValueError:
            return False
        return True

    def note(self, art: Artifact, node: str) -> None:
        """Remember that ``node`` wrote ``art`` into this folder (with the file's current stat)."""
        if art.rel is None:
            return
        st = self._stat(art.rel)
        if st is None:
            return
        self._files[art.rel] = {"node": node, "sha": art.sha, "stamp": _stamp(st)}
        self._dirty = True

    def unshare(self, node: str) -> None:
        """Give ``node``'s files a private copy before it runs again, so it never writes into a shared file."""
        for rel, rec in list(self._files.items()):
            if rec.get("node") != node:
                continue
            st = self._stat(rel)
            if st is None or st.st_nlink < 2:
                continue
            p = self.run_dir / rel
            tmp = unique_tmp(p.parent, p.name)
            try:
                shutil.copyfile(p, tmp)
                os.replace(tmp, p)
            finally:
                tmp.unlink(missing_ok=True)
            self.note(Artifact(str(p), st.st_size, str(rec.get("sha")), rel), node)

    def save(self) -> None:
        if not self._dirty:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = unique_tmp(self.path.parent, FILES)
        try:
            tmp.write_text(json.dumps(self._files, sort_keys=True))
            os.replace(tmp, self.path)
        finally:
            tmp.unlink(missing_ok=True)
        self._dirty = False


@dataclass
class Restore:
    """What putting a cached node's files into a run folder takes: (artifact, source file) pairs, or a reason not to."""

    todo: list[tuple[Artifact, Path]]
    reason: str = ""


def plan_restore(arts: list[Artifact], files: RunFiles, source: Callable[[Artifact], Path | None]) -> Restore:
    """Check every file of a cached node against the run folder; ``reason`` says why the node must rerun instead."""
    todo: list[tuple[Artifact, Path]] = []
    for a in arts:
        if a.rel is None:
            if not Path(a.path).exists():
                return Restore([], f"artifact '{a.path}' is missing")
            continue
        if files.holds(a):
            continue
        src = source(a)
        if src is None:
            what = "holds other content" if (files.run_dir / a.rel).exists() else "is missing"
            return Restore([], f"artifact '{files.run_dir / a.rel}' {what} and the cache has no copy")
        if not files.ours(a.rel) or not files.inside(a.rel):
            return Restore([], f"'{a.rel}' in the run folder was not written by fluxkiln or was changed since, "
                               f"so it is kept and the node runs again")
        todo.append((a, src))
    return Restore(todo)


def restore(todo: list[tuple[Artifact, Path]], files: RunFiles, node: str) -> None:
    """Put cached files into the run folder, each in one rename, and remember them.

    Files of ``LINK_MIN`` bytes and more become hard links to the cache's
    read-only copy (no extra space; a copy where links are impossible); smaller
    ones (captions, reports) are writable copies.
    """
    for art, src in todo:
        dest = files.run_dir / str(art.rel)
        dest.parent.mkdir(parents=True, exist_ok=True)
        link_or_copy(src, dest, link=art.size >= LINK_MIN)
        files.note(art, node)


def in_run(arts: list[Artifact], run_dir: Path) -> list[str]:
    """The paths of a node's files as this run's events and report name them."""
    return [str(a.in_run(run_dir)) for a in arts]
