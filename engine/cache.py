"""Caches of node results: in process memory, and on disk by fingerprint.

Disk entries live under ``<cache root>/results/<fp[:2]>/<fp>/``: one folder per
output port (written by the port type's ``save``) and ``manifest.json``
(written last) with the size and sha256 of every file.  An entry is used only
if its manifest parses and every file matches, so a corrupt or partial entry
is recomputed, never used.  Entries are written in a staging folder and moved
into place with one rename.  Nothing is fsynced: the verification on every read
is what makes a torn write harmless, and it keeps caching off the hot path.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .fingerprint import hash_bytes_of
from .ports import PortType

MANIFEST = "manifest.json"


@dataclass
class CacheEntry:
    fingerprint: str
    path: Path
    manifest: dict[str, Any]


class MemoryCache:
    """Live node outputs (and the files they wrote) by fingerprint within one process, LRU-bounded."""

    def __init__(self, max_entries: int = 256) -> None:
        self.max_entries = max_entries
        self._items: OrderedDict[str, tuple[dict[str, Any], list[str]]] = OrderedDict()

    def get(self, fp: str) -> dict[str, Any] | None:
        if fp in self._items:
            self._items.move_to_end(fp)
            return self._items[fp][0]
        return None

    def artifacts(self, fp: str) -> list[str]:
        return list(self._items[fp][1]) if fp in self._items else []

    def put(self, fp: str, outputs: dict[str, Any], artifacts: list[str] | None = None) -> None:
        self._items[fp] = (outputs, list(artifacts or []))
        self._items.move_to_end(fp)
        while len(self._items) > self.max_entries:
            self._items.popitem(last=False)

    def drop(self, fp: str) -> None:
        self._items.pop(fp, None)

    def __len__(self) -> int:
        return len(self._items)


def port_versions(port_names: dict[str, str], port_types: dict[str, PortType]) -> dict[str, str]:
    """Output port -> storage version of its port type (recorded in, and checked against, each entry)."""
    return {port: port_types[name].version for port, name in port_names.items()}


class DiskCache:
    """Node results on disk, keyed by fingerprint."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.results = root / "results"

    def entry_dir(self, fp: str) -> Path:
        return self.results / fp[:2] / fp

    def lookup(self, fp: str, versions: dict[str, str] | None = None) -> CacheEntry | None:
        """A verified entry, or None if absent, partial, corrupt or stored in another layout (then removed).

        ``versions`` maps each output port to its port type's storage version.
        """
        d = self.entry_dir(fp)
        mpath = d / MANIFEST
        if not mpath.is_file():
            return None
        try:
            manifest = json.loads(mpath.read_text())
            if versions is not None and manifest.get("port_versions") != versions:
                raise ValueError("stored by another version of its port types")
            for rel, (size, sha) in manifest["files"].items():
                f = d / rel
                if f.stat().st_size != size or hash_bytes_of(f) != sha:
                    raise ValueError(f"{rel} does not match its manifest")
        except (OSError, ValueError, KeyError, TypeError):
            self.discard(d)
            return None
        return CacheEntry(fp, d, manifest)

    def load(self, entry: CacheEntry, port_types: dict[str, PortType]) -> dict[str, Any]:
        out = {}
        for port, ptype in entry.manifest["outputs"].items():
            out[port] = port_types[ptype].load(entry.path / port)
        return out

    def store(self, fp: str, outputs: dict[str, Any], port_names: dict[str, str],
              port_types: dict[str, PortType], meta: dict[str, Any]) -> CacheEntry:
        """Write outputs atomically; return the entry (already verified by construction)."""
        staging = self.root / "tmp" / f"{fp}-{uuid.uuid4().hex[:8]}"
        staging.mkdir(parents=True)
        try:
            for port, value in outputs.items():
                (staging / port).mkdir()
                port_types[port_names[port]].save(value, staging / port)
            # no fsync: every read verifies sizes and sha256 sums, so a torn write is recomputed, never used
            files = {f.relative_to(staging).as_posix(): [f.stat().st_size, hash_bytes_of(f)]
                     for f in sorted(staging.rglob("*")) if f.is_file()}
            manifest = {"fingerprint": fp, "outputs": port_names, "files": files, "created": time.time(),
                        "port_versions": port_versions(port_names, port_types), **meta}
            (staging / MANIFEST).write_text(json.dumps(manifest, default=str))
            final = self.entry_dir(fp)
            final.parent.mkdir(parents=True, exist_ok=True)
            existing = self.lookup(fp, port_versions(port_names, port_types)) if final.exists() else None
            if existing is not None and existing.manifest.get("files") == files:
                shutil.rmtree(staging, ignore_errors=True)  # the same bytes, maybe in use by another run: keep
                return existing
            if final.exists():
                self.discard(final)
            try:
                os.replace(staging, final)
            except OSError:  # another process stored the same result first: keep theirs if it verifies
                theirs = self.lookup(fp)
                if theirs is None:
                    raise
                shutil.rmtree(staging, ignore_errors=True)
                return theirs
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return CacheEntry(fp, final, manifest)

    def discard(self, d: Path) -> None:
        trash = self.root / "tmp" / f"trash-{uuid.uuid4().hex[:8]}"
        try:
            trash.parent.mkdir(parents=True, exist_ok=True)
            os.replace(d, trash)
        except OSError:
            trash = d
        shutil.rmtree(trash, ignore_errors=True)

    # ------------------------------------------------------------ listing / pruning
    def entries(self) -> list[dict[str, Any]]:
        out = []
        if not self.results.is_dir():
            return out
        for m in sorted(self.results.glob(f"*/*/{MANIFEST}")):
            try:
                manifest = json.loads(m.read_text())
            except (OSError, ValueError):
                manifest = {}
            size = sum(f.stat().st_size for f in m.parent.rglob("*") if f.is_file())
            out.append({"fingerprint": m.parent.name, "type": manifest.get("type", "?"),
                        "node": manifest.get("node", "?"), "recipe": manifest.get("recipe", "?"),
                        "created": manifest.get("created", m.stat().st_mtime),
                        "used": m.parent.stat().st_mtime, "size": size, "path": str(m.parent)})
        return out

    def touch(self, entry: CacheEntry) -> None:
        try:
            os.utime(entry.path)
        except OSError:
            pass

    def prune(self, *, older_than: float | None = None, max_size: int | None = None) -> list[dict[str, Any]]:
        """Remove entries not used for ``older_than`` seconds, then oldest-used until under ``max_size`` bytes."""
        entries = sorted(self.entries(), key=lambda e: e["used"])
        removed = []
        now = time.time()
        if older_than is not None:
            for e in list(entries):
                if now - e["used"] > older_than:
                    self.discard(Path(e["path"]))
                    removed.append(e)
                    entries.remove(e)
        if max_size is not None:
            total = sum(e["size"] for e in entries)
            for e in list(entries):
                if total <= max_size:
                    break
                self.discard(Path(e["path"]))
                removed.append(e)
                total -= e["size"]
        shutil.rmtree(self.root / "tmp", ignore_errors=True)
        return removed
