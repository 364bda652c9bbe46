"""Looking after the disk cache: what it holds (by node type and by recipe), its size budget, LRU pruning.

Sizes count every stored byte once: a blob several entries share (the same
pixels after ``sample``, ``safety_check`` and ``save``) is attributed to the
entry that stored it first, so the per-entry, per-type and per-recipe figures
add up to the cache's size.  After every run the engine prunes the least
recently used entries until the cache fits its budget
(``FLUXKILN_CACHE_BUDGET``, default 20 GiB), never touching an entry the run
(or the process's memory cache) uses.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .cache import MANIFEST, DiskCache

BUDGET_ENV = "FLUXKILN_CACHE_BUDGET"
DEFAULT_BUDGET = 20 * 2**30
_SIZES = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
_OFF = {"off", "none", "unlimited", "no"}
STALE_TMP = 3600.0


def parse_size(text: str) -> int:
    """``"500M"``, ``"20G"``, ``"1.5t"``, ``"4096"`` -> bytes (powers of 1024); ValueError otherwise."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*", (text or "").lower())
    if not m:
        raise ValueError(f"bad size {text!r}: use e.g. 500M, 10G")
    return int(float(m.group(1)) * _SIZES[m.group(2)])


def budget_from_env() -> tuple[int | None, str | None]:
    """(budget in bytes, or None for no limit; a warning if the variable is malformed)."""
    raw = os.environ.get(BUDGET_ENV, "").strip()
    if not raw:
        return DEFAULT_BUDGET, None
    if raw.lower() in _OFF:
        return None, None
    try:
        return parse_size(raw), None
    except ValueError:
        return DEFAULT_BUDGET, (f"{BUDGET_ENV}={raw!r} is not a size (use e.g. 20G, 500M, or 'off'); "
                                f"using the default budget of {human(DEFAULT_BUDGET)}")


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


@dataclass
class EntryInfo:
    """One cache entry as listed: what stored it, when it was last used, its bytes."""

    fingerprint: str
    type: str
    node: str
    recipe: str
    created: float
    used: float
    size: int  # every file of the entry (shared ones too)
    own: int = 0  # bytes this entry stored first (shared blobs count once, here or elsewhere)
    path: str = ""
    files: dict[str, int] = field(default_factory=dict)  # sha -> size
    manifest_bytes: int = 0

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "files"}


def _read(mpath: Path) -> EntryInfo | None:
    try:
        st_dir = mpath.parent.stat()
        raw = mpath.read_bytes()
        manifest = json.loads(raw)
        files = {str(sha): int(size) for size, sha in manifest.get("files", {}).values()}
    except (OSError, ValueError, TypeError, AttributeError):
        return None
    return EntryInfo(mpath.parent.name, str(manifest.get("type", "?")), str(manifest.get("node", "?")),
                     str(manifest.get("recipe", "?")), float(manifest.get("created", st_dir.st_mtime) or 0),
                     st_dir.st_mtime, sum(files.values()), path=str(mpath.parent), files=files,
                     manifest_bytes=len(raw))


def scan(cache: DiskCache) -> list[EntryInfo]:
    """Every readable entry, with shared bytes attributed to the entry that stored them first."""
    if not cache.results.is_dir():
        return []
    entries = [e for m in cache.results.glob(f"*/*/{MANIFEST}") if (e := _read(m)) is not None]
    seen: set[str] = set()
    for e in sorted(entries, key=lambda e: e.created):
        e.own = e.manifest_bytes + sum(size for sha, size in e.files.items() if sha not in seen)
        seen.update(e.files)
    return entries


def summary(entries: Iterable[EntryInfo]) -> dict[str, Any]:
    """Total bytes and entry counts by node type and by recipe."""
    by_type: dict[str, dict[str, int]] = {}
    by_recipe: dict[str, dict[str, int]] = {}
    total = 0
    for e in entries:
        total += e.own
        for table, key in ((by_type, e.type), (by_recipe, e.recipe)):
            row = table.setdefault(key, {"entries": 0, "bytes": 0})
            row["entries"] += 1
            row["bytes"] += e.own
    return {"total": total, "by_type": by_type, "by_recipe": by_recipe}


def other_folders(cache: DiskCache) -> dict[str, int]:
    """Bytes in each folder of the cache root that holds no results (plugins' compiled code, training state,
    built-in models): listed beside the results, neither counted in the budget nor pruned."""
    own = {cache.results.name, cache.tmp.name, cache.blobs.root.name}
    out = {}
    for sub in sorted(cache.root.iterdir() if cache.root.is_dir() else []):
        if sub.is_dir() and not sub.is_symlink() and sub.name not in own:
            out[sub.name] = sum(f.stat().st_size for f in sub.rglob("*") if f.is_file() and not f.is_symlink())
    return out


def prune(cache: DiskCache, *, older_than: float | None = None, max_size: int | None = None,
          keep: set[str] | frozenset[str] = frozenset()) -> list[EntryInfo]:
    """Remove entries unused for ``older_than`` seconds, then the least recently used until the cache
    takes at most ``max_size`` bytes.  Entries whose fingerprint is in ``keep`` stay."""
    entries = scan(cache)
    refs = Counter(sha for e in entries for sha in e.files)
    sizes = {sha: size for e in entries for sha, size in e.files.items()}
    total = sum(sizes.values()) + sum(e.manifest_bytes for e in entries)
    removed: list[EntryInfo] = []
    now = time.time()
    for e in sorted(entries, key=lambda e: e.used):
        too_old = older_than is not None and now - e.used > older_than
        too_big = max_size is not None and total > max_size
        if e.fingerprint in keep or not (too_old or too_big):
            continue
        cache.discard(Path(e.path))
        if Path(e.path).exists():  # a read-only cache: nothing was removed
            continue
        removed.append(e)
        total -= e.manifest_bytes
        for sha in e.files:
            refs[sha] -= 1
            if refs[sha] == 0:
                total -= sizes[sha]
                cache.blobs.remove(sha)
    cache.blobs.collect({sha for sha, n in refs.items() if n > 0})
    _clean_tmp(cache)
    return removed


def enforce_budget(cache: DiskCache, budget: int | None, keep: set[str]) -> list[EntryInfo]:
    """Prune to ``budget`` if the stored blobs exceed it (a cheap check first: one stat per blob)."""
    if budget is None or cache.blobs.total() <= budget:
        return []
    return prune(cache, max_size=budget, keep=keep)


def _clean_tmp(cache: DiskCache) -> None:
    """Remove staging and trash folders left by processes that died (an hour old: none is still writing)."""
    if not cache.tmp.is_dir():
        return
    now = time.time()
    for item in cache.tmp.iterdir():
        try:
            if now - item.lstat().st_mtime < STALE_TMP:
                continue
            if item.is_dir() and not item.is_symlink():
                shutil.rmtree(item, ignore_errors=True)
            else:
                item.unlink()
        except OSError:
            continue
