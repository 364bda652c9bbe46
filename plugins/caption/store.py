"""Caption files users can read and edit: ``<stem>.txt`` in the caption folder, plus a manifest.

The manifest (``.fluxkiln-captions.json`` in the same folder) records, for
every file the node wrote, the exact text written, the image it belongs to
(content hash) and the raw model output with the settings that produced it.
That tells apart

* a file the user edited (its text differs from what was written) or added
  (no record): its text wins and is used verbatim;
* a file the node wrote and nobody touched: it may be rewritten;

and lets a rerun that only changed ``prefix``/``suffix``/``trigger_word`` reuse
the raw captions without loading the model.  :func:`edited_captions_fingerprint`
hashes exactly the user's edits, for the engine's fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fluxkiln.engine.paths import temp_name

MANIFEST = ".fluxkiln-captions.json"
_UNSAFE = re.compile(r"[^\w.\-]+")


def stems_for(names: Iterable[str]) -> list[str]:
    """A unique, filesystem-safe caption file stem for each item name ("a/b.png" -> "a__b"; repeats get "-2")."""
    out: list[str] = []
    seen: set[str] = set()
    for i, name in enumerate(names):
        p = Path(name)
        base = "__".join([*p.parent.parts, p.stem]) if p.parent != Path(".") else p.stem
        base = _UNSAFE.sub("_", base).strip("._") or f"image-{i:05d}"
        stem, n = base, 1
        while stem.lower() in seen:
            n += 1
            stem = f"{base}-{n}"
        seen.add(stem.lower())
        out.append(stem)
    return out


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8", errors="replace").strip()
    except FileNotFoundError:
        return None


def _write_atomic(path: Path, text: str) -> None:
    tmp = temp_name(path)
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_manifest(folder: Path) -> dict[str, dict[str, Any]]:
    try:
        data = json.loads((folder / MANIFEST).read_text())
        return dict(data.get("entries") or {})
    except (OSError, ValueError, AttributeError):
        return {}


def user_files(folder: Path, entries: dict[str, dict[str, Any]] | None = None) -> dict[str, str]:
    """Caption files in ``folder`` the user edited or added: stem -> stripped text."""
    entries = load_manifest(folder) if entries is None else entries
    found: dict[str, str] = {}
    if not folder.is_dir():
        return found
    for path in sorted(folder.glob("*.txt")):
        text = _read_text(path)
        rec = entries.get(path.stem)
        if text is not None and (rec is None or rec.get("text") != text):
            found[path.stem] = text
    return found


def edited_captions_fingerprint(params: dict[str, Any], node_dir: Path, recipe_dir: Path | None = None) -> str:
    """Hash of the user's edits in the caption folder (empty string when there are none).

    The engine adds this to the ``caption`` node's fingerprint, so an edited,
    added or removed-edit caption file makes the node (and what depends on it)
    run again, while files the node wrote itself do not.
    """
    folder = Path(node_dir)
    if params.get("captions_dir"):
        folder = Path(params["captions_dir"]).expanduser()
        if not folder.is_absolute() and recipe_dir is not None:
            folder = Path(recipe_dir) / folder
    edits = user_files(folder)
    if not edits:
        return ""
    return hashlib.sha256(json.dumps(edits, sort_keys=True).encode()).hexdigest()


class CaptionStore:
    """The caption folder of one caption node: read edits, reuse raw captions, write files."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.entries = load_manifest(folder)
        self.edits = user_files(folder, self.entries)

    def user_text(self, stem: str) -> str | None:
        """The user's own text for ``stem`` (edited or added file), if any."""
        return self.edits.get(stem)

    def cached_raw(self, stem: str, image_sha: str, gen_key: str) -> str | None:
        """The raw caption generated earlier for the same image with the same settings."""
        rec = self.entries.get(stem) or {}
        if rec.get("image") == image_sha and rec.get("gen") == gen_key and isinstance(rec.get("raw"), str):
            return rec["raw"]
        return None

    def write(self, stem: str, text: str, *, image_sha: str, source: str, raw: str | None = None,
              gen_key: str | None = None) -> Path:
        """Write ``<stem>.txt`` (unless the user owns it) and remember what was written."""
        path = self.folder / f"{stem}.txt"
        if stem in self.edits:
            return path
        if _read_text(path) != text:
            _write_atomic(path, text + "\n")
        self.entries[stem] = {"text": text, "image": image_sha, "source": source, "raw": raw, "gen": gen_key}
        return path

    def prune(self, keep: set[str]) -> list[str]:
        """Delete files this node wrote for images no longer in the dataset; user files stay."""
        gone = []
        for stem in list(self.entries):
            if stem in keep:
                continue
            path = self.folder / f"{stem}.txt"
            if stem not in self.edits and path.exists():
                path.unlink()
                gone.append(stem)
            self.entries.pop(stem, None)
        return gone

    def save(self) -> None:
        _write_atomic(self.folder / MANIFEST, json.dumps({"version": 1, "entries": self.entries}, indent=1,
                                                        ensure_ascii=False))
