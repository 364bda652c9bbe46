"""Caches of node results: in process memory, and on disk by fingerprint.

Disk entries live under ``<cache root>/results/<fp[:2]>/<fp>/``: one folder per
output port (written by the port type's ``save``), ``artifacts/`` (copies of
the files the node wrote into its run folder) and ``manifest.json`` (written
last) with the size and sha256 of every file.  Each file is a hard link to a
content-addressed blob (:mod:`.blobs`), so a payload several entries hold is
stored once.  An entry is used only if its manifest parses, names exactly the
node's outputs and port versions, and every file matches, so a corrupt,
partial or foreign entry is recomputed, never used.  Entries are written in a
uniquely named staging folder and moved into place with one rename.  Nothing
is fsynced: the verification on every read is what makes a torn write
harmless, and it keeps caching off the hot path.

A cache that cannot be written (read-only, or a file where one of its folders
belongs) is described once by :meth:`DiskCache.probe`; the run then stores
nothing and says how to fix it.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .artifacts import Artifact, safe_rel
from .blobs import BlobStore, unique_tmp
from .fingerprint import hash_bytes_of
from .ports import PortType

MANIFEST = "manifest.json"
LAYOUT = 2  # entries written by older versions (other layouts) are recomputed, never misread
ENTRY_ERRORS = (OSError, ValueError, KeyError, TypeError, AttributeError)


class CacheUnavailable(Exception):
    """The disk cache cannot be written; the message says why and how to fix it."""


@dataclass
class CacheEntry:
    fingerprint: str
    path: Path
    manifest: dict[str, Any]
    artifacts: list[Artifact] = field(default_factory=list)


@dataclass
class MemoryHit:
    outputs: dict[str, Any]
    artifacts: list[Artifact]
    entry: Path | None  # the disk entry backing these values (its files are what they point to)


class MemoryCache:
    """Live node outputs (and the files they wrote) by fingerprint within one process, LRU-bounded."""

    def __init__(self, max_entries: int = 256) -> None:
        self.max_entries = max_entries
        self._items: OrderedDict[str, MemoryHit] = OrderedDict()

    def get(self, fp: str) -> dict[str, Any] | None:
        hit = self.hit(fp)
        return hit.outputs if hit else None

    def hit(self, fp: str) -> MemoryHit | None:
        """The live result, unless the disk entry its values point into was pruned or removed meanwhile."""
        hit = self._items.get(fp)
        if hit is None:
            return None
        if hit.entry is not None and not hit.entry.is_dir():
            self.drop(fp)
            return None
        self._items.move_to_end(fp)
        return hit

    def put(self, fp: str, outputs: dict[str, Any], artifacts: list[Artifact] | None = None,
            entry: Path | None = None) -> None:
        self._items[fp] = MemoryHit(outputs, list(artifacts or []), entry)
        self._items.move_to_end(fp)
        while len(self._items) > self.max_entries:
            self._items.popitem(last=False)

    def drop(self, fp: str) -> None:
        self._items.pop(fp, None)

    def keys(self) -> set[str]:
        return set(self._items)

    def __len__(self) -> int:
        return len(self._items)


def port_versions(port_names: dict[str, str], port_types: dict[str, PortType]) -> dict[str, str]:
    """Output port -> storage version of its port type (recorded in, and checked against, each entry)."""
    return {port: port_types[name].version for port, name in port_names.items()}


def describe_os_error(exc: OSError, root: Path) -> str:
    """Why the cache at ``root`` cannot be written, and how to fix it, in one line."""
    where = exc.filename or root
    env = "or set FLUXKILN_CACHE to a writable folder"
    if isinstance(exc, (FileExistsError, NotADirectoryError)) or exc.errno in (errno.EEXIST, errno.ENOTDIR):
        return f"{where} is a file where the cache keeps a folder; move or delete it, {env}"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"{where} is read-only ({exc.strerror}); make it writable (e.g. chmod -R u+w {root}), {env}"
    if exc.errno == errno.ENOSPC:
        return f"no space left on the device of {root}; free space (fluxkiln cache prune --max-size 5G), {env}"
    return f"{where}: {exc.strerror or exc}; check the folder, {env}"


class DiskCache:
    """Node results on disk, keyed by fingerprint, their files shared through a blob store."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.results = root / "results"
        self.tmp = root / "tmp"
        self.blobs = BlobStore(root / "blobs")
        self.problem: str | None = None  # why results cannot be stored now (None: they can)
        self._verified: dict[tuple[int, ...], str] = {}

    def entry_dir(self, fp: str) -> Path:
        return self.results / fp[:2] / fp

    # ------------------------------------------------------------ health
    def probe(self) -> str | None:
        """Check that results can be stored; return (and remember) why not, or None."""
        try:
            for d in (self.root, self.results, self.tmp, self.blobs.root):
                d.mkdir(parents=True, exist_ok=True)
            for d in (self.results, self.blobs.root):
                for sub in os.scandir(d):
                    if not sub.is_dir():
                        raise NotADirectoryError(errno.ENOTDIR, "not a folder", sub.path)
            probe = unique_tmp(self.tmp, "probe")
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            self.problem = describe_os_error(exc, self.root)
            return self.problem
        self.problem = None
        return None

    def disable(self, exc: OSError) -> str:
        """Stop storing for now (a write failed); return the message for the one warning."""
        self.problem = describe_os_error(exc, self.root)
        return self.problem

    # ------------------------------------------------------------ reading
    def begin(self) -> None:
        """Start a new planning pass: files are verified afresh (once per pass, however many entries share them)."""
        self._verified.clear()

    def check(self, path: Path, size: int, sha: str) -> bool:
        """The file has this size and sha256 (each distinct file is hashed once per pass)."""
        st = path.stat()
        if st.st_size != size:
            return False
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        if key not in self._verified:
            self._verified[key] = hash_bytes_of(path)
        return self._verified[key] == sha

    def lookup(self, fp: str, outputs: dict[str, str] | None = None,
               versions: dict[str, str] | None = None, *, again: bool = True) -> CacheEntry | None:
        """A verified entry, or None if absent, partial, corrupt or not what this node stores (then removed).

        ``outputs`` maps each output port to its port type name and ``versions``
        to that port type's storage version; an entry recorded otherwise is a miss.
        An entry another process replaced while it was being read is not corrupt: it is looked up once more.
        """
        d = self.entry_dir(fp)
        read = _identity(d / MANIFEST)
        try:
            text = (d / MANIFEST).read_text()
        except OSError:
            return None
        bad: list[str] = []
        try:
            manifest = json.loads(text)
            arts = self._validate(d, manifest, outputs, versions, bad)
        except ENTRY_ERRORS:
            if _identity(d / MANIFEST) != read:  # replaced meanwhile (a race, not corruption)
                return self.lookup(fp, outputs, versions, again=False) if again else None
            self.discard(d)
            for sha in bad:  # the blob shares the corrupt bytes: drop it so the next store writes it afresh
                self.blobs.remove(sha)
            return None
        return CacheEntry(fp, d, manifest, arts)

    def _validate(self, d: Path, manifest: Any, outputs: dict[str, str] | None, versions: dict[str, str] | None,
                  bad: list[str]) -> list[Artifact]:
        if not isinstance(manifest, dict) or manifest.get("layout") != LAYOUT:
            raise ValueError("stored in another layout")
        if outputs is not None and manifest.get("outputs") != outputs:
            raise ValueError("stored for other outputs")
        if versions is not None and manifest.get("port_versions") != versions:
            raise ValueError("stored by another version of its port types")
        files = manifest["files"]
        arts = [Artifact.from_json(a) for a in manifest.get("artifacts", [])]
        if any(a.stored is not None and a.stored not in files for a in arts):
            raise ValueError("an artifact's copy is not in the manifest")
        for rel, (size, sha) in files.items():
            if not safe_rel(rel) or not self.check(d / rel, size, sha):
                bad.append(str(sha))
                raise ValueError(f"{rel} does not match its manifest")
        return arts

    def load(self, entry: CacheEntry, port_types: dict[str, PortType]) -> dict[str, Any]:
        out = {}
        for port, ptype in entry.manifest["outputs"].items():
            out[port] = port_types[ptype].load(entry.path / port)
        return out

    def entries(self) -> list[dict[str, Any]]:
        """Every readable entry as a dict (fingerprint, type, node, recipe, created, used, size, own, path)."""
        from .cacheadmin import scan

        return [e.to_json() for e in scan(self)]

    def touch(self, entry: CacheEntry) -> None:
        try:
            os.utime(entry.path)
        except OSError:
            pass

    # ------------------------------------------------------------ writing
    def store(self, fp: str, outputs: dict[str, Any], port_names: dict[str, str],
              port_types: dict[str, PortType], meta: dict[str, Any],
              artifacts: list[Artifact] | None = None) -> CacheEntry:
        """Write outputs and copies of the node's run-folder files atomically; return the entry.

        A stored entry that verifies and holds the same bytes is kept (a run may
        be reading it); otherwise the new result replaces it, and if another
        process stores the entry between that check and the rename, the entry
        that got there first is kept.  Raises :class:`CacheUnavailable` when
        storing is off, OSError when a write fails.
        """
        if self.problem:
            raise CacheUnavailable(self.problem)
        self.tmp.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f"{fp[:16]}-", dir=self.tmp))
        try:
            for port, value in outputs.items():
                (staging / port).mkdir()
                port_types[port_names[port]].save(value, staging / port)
            arts = self._stage_artifacts(staging, artifacts or [])
            files = self._share_all(staging)
            arts = [_with_copy(a, files) for a in arts]
            manifest = {"layout": LAYOUT, "fingerprint": fp, "outputs": port_names, "files": files,
                        "artifacts": [a.to_json() for a in arts], "created": time.time(),
                        "port_versions": port_versions(port_names, port_types), **meta}
            (staging / MANIFEST).write_text(json.dumps(manifest, default=str))
            existing = self._same(fp, port_names, manifest)
            if existing is not None:
                shutil.rmtree(staging, ignore_errors=True)  # the same bytes, maybe in use by another run: keep
                return existing
            final, placed = self._place(staging, fp)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        if not placed:
            theirs = self.lookup(fp, port_names, manifest["port_versions"])
            if theirs is None:
                raise OSError(f"could not store the result in {final}: another process holds a broken entry there")
            return theirs
        return CacheEntry(fp, final, manifest, arts)

    def _stage_artifacts(self, staging: Path, artifacts: list[Artifact]) -> list[Artifact]:
        """Copy the node's run-folder files into the entry (files outside the run folder are only recorded)."""
        out = []
        for i, art in enumerate(artifacts):
            if art.rel is None:
                out.append(art)
                continue
            name = f"artifacts/{i:04d}"
            (staging / "artifacts").mkdir(exist_ok=True)
            shutil.copyfile(art.path, staging / name)
            out.append(Artifact(art.path, art.size, art.sha, art.rel, name))
        return out

    def _share_all(self, staging: Path) -> dict[str, list[Any]]:
        files: dict[str, list[Any]] = {}
        for f in sorted(staging.rglob("*")):
            if f.is_file():
                size, sha = f.stat().st_size, hash_bytes_of(f)
                self.blobs.share(sha, size, f)
                files[f.relative_to(staging).as_posix()] = [size, sha]
        return files

    def _same(self, fp: str, port_names: dict[str, str], manifest: dict[str, Any]) -> CacheEntry | None:
        """A stored entry for ``fp`` that verifies and holds exactly these files, if there is one."""
        if not self.entry_dir(fp).exists():
            return None
        existing = self.lookup(fp, port_names, manifest["port_versions"])
        return existing if existing is not None and existing.manifest.get("files") == manifest["files"] else None

    def _place(self, staging: Path, fp: str) -> tuple[Path, bool]:
        """Rename the staging folder into place; (final path, False) if another process's entry got there first."""
        final = self.entry_dir(fp)
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists():
            self.discard(final)
        try:
            os.replace(staging, final)
        except OSError:
            if not (final / MANIFEST).is_file():
                raise
            shutil.rmtree(staging, ignore_errors=True)  # another process stored this result meanwhile
            return final, False
        return final, True

    def discard(self, d: Path) -> None:
        """Take an entry out of place at once (a rename); its files are deleted in the background, off the run's
        critical path (a process that exits first leaves them in ``tmp``, where the next start cleans up)."""
        trash = unique_tmp(self.tmp, "trash")
        try:
            os.replace(d, trash)
        except OSError:
            shutil.rmtree(d, ignore_errors=True)
            return
        threading.Thread(target=shutil.rmtree, args=(trash,), kwargs={"ignore_errors": True},
                         name="fluxkiln-discard", daemon=True).start()


def _identity(path: Path) -> tuple[int, int] | None:
    """The file's (device, inode), None where it is gone: a replaced entry has a new manifest file."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _with_copy(art: Artifact, files: dict[str, list[Any]]) -> Artifact:
    """The record of a stored artifact describes its copy (it is what a later run gets)."""
    if art.stored is None:
        return art
    size, sha = files[art.stored]
    return Artifact(art.path, size, sha, art.rel, art.stored)
