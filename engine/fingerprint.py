"""Fingerprints: what identifies a node's result, independent of node ids and table order.

A node's identity is its type, implementation version, canonical literal
parameters (secrets excluded), the fingerprints of its inputs and the content
hashes of files it reads.  Files are hashed by content; a small index keyed by
(path, size, mtime) makes unchanged files cheap to re-check.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import threading
from pathlib import Path
from typing import Any

from . import devmode

_CHUNK = 1 << 20


def canonical(value: Any) -> str:
    """Canonical JSON: sorted keys, no whitespace, floats by repr."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str, ensure_ascii=False)


def digest(value: Any) -> str:
    return hashlib.sha256(canonical(value).encode()).hexdigest()


class NotRegularFile(OSError):
    """A path that must be hashed is a FIFO, device or socket (reading it could block or never end)."""


def hash_bytes_of(path: Path) -> str:
    """sha256 of a regular file's bytes; raise :class:`NotRegularFile` for anything else, without blocking."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # a FIFO must not block the open
    with os.fdopen(fd, "rb") as f:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            from .paths import file_kind

            raise NotRegularFile(f"{path} is not a regular file (it is a {file_kind(mode)}); "
                                 "only regular files and folders are read")
        h = hashlib.sha256()
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


class FileHasher:
    """Content hashes of files and folders, remembered by (size, mtime) in an index file."""

    def __init__(self, index_path: Path | None = None) -> None:
        self.index_path = index_path
        self._lock = threading.Lock()
        self._index: dict[str, list[Any]] = {}
        if index_path and index_path.exists():
            try:
                self._index = json.loads(index_path.read_text())
            except (OSError, ValueError):
                self._index = {}
        self._dirty = False

    def file(self, path: Path) -> str:
        st = path.stat()
        key = str(path.resolve())
        stamp = [st.st_size, st.st_mtime_ns]
        with self._lock:
            known = self._index.get(key)
            if known and known[:2] == stamp:
                return known[2]
        h = hash_bytes_of(path)
        with self._lock:
            self._index[key] = [*stamp, h]
            self._dirty = True
        return h

    def path(self, path: Path) -> str:
        """Hash of a file's content, or of a folder's relative names and file contents."""
        if path.is_dir():
            h = hashlib.sha256()
            for p in sorted(path.rglob("*")):
                if p.is_file() and not p.is_symlink():
                    name = os.fsencode(p.relative_to(path).as_posix())  # the bytes on disk, UTF-8 or not
                    h.update(name + b"\0" + self.file(p).encode())
            return h.hexdigest()
        return self.file(path)

    def save(self) -> None:
        if not (self.index_path and self._dirty):
            return
        with self._lock:
            data = json.dumps(self._index)
            self._dirty = False
        from .paths import temp_name

        tmp = temp_name(self.index_path)
        self.index_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            tmp.write_text(data)
            os.replace(tmp, self.index_path)
        finally:
            tmp.unlink(missing_ok=True)


def identity(type_name: str, version: str, params: dict[str, Any], inputs: dict[str, str],
             files: dict[str, str]) -> dict[str, Any]:
    """The identity of a node's result; its digest is the fingerprint."""
    return {"type": type_name, "version": version, "params": params, "inputs": inputs, "files": files}


def diff_reasons(old: dict[str, Any] | None, new: dict[str, Any], file_names: dict[str, str]) -> list[str]:
    """Explain in words what differs between two identities (why a node re-runs)."""
    if not old:
        return []
    reasons: list[str] = []
    if old.get("type") != new["type"]:
        reasons.append(f"type changed {old.get('type')} -> {new['type']}")
    elif old.get("version") != new["version"]:
        reasons.append(f"implementation version changed {old.get('version')} -> {new['version']}")
    op, np_ = old.get("params", {}), new["params"]
    for k in sorted(set(op) | set(np_)):
        if op.get(k) != np_.get(k):
            reasons.append(f"param '{k}' changed {_short(op.get(k))} -> {_short(np_.get(k))}")
    oi, ni = old.get("inputs", {}), new["inputs"]
    for k in sorted(set(oi) | set(ni)):
        if oi.get(k) != ni.get(k):
            reasons.append(f"input '{k}' changed")
    of, nf = old.get("files", {}), new["files"]
    for k in sorted(set(of) | set(nf)):
        if k == devmode.LABEL and (k in of) != (k in nf):
            reasons.append(f"development mode (FLUXKILN_DEV) switched {'on' if k in nf else 'off'}")
        elif of.get(k) != nf.get(k):
            reasons.append(f"{k[1:-1]} changed" if k.startswith("(") else f"file '{file_names.get(k, k)}' changed")
    return reasons


def _short(v: Any) -> str:
    text = canonical(v) if not isinstance(v, str) else repr(v)
    return text if len(text) <= 40 else text[:37] + "..."
