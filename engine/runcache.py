"""The runner's use of its caches: is the disk cache writable, store a finished node, load a cached one,
put its files into the run folder, and keep the cache within its budget after a run.

Messages meant for the user come back as strings; the runner turns them into
events.  A cache that cannot be written costs one warning per process and
problem, never a failed node.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from .artifacts import Artifact, restore
from .cache import CacheEntry, CacheUnavailable, DiskCache, MemoryCache
from .cacheadmin import budget_from_env, enforce_budget, human


class RunCaches:
    """The memory and disk caches of one Engine, and the once-only warnings about them."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.disk = DiskCache(root)
        self.memory = MemoryCache()
        self._warned: set[str] = set()

    def _once(self, message: str) -> str | None:
        if message in self._warned:
            return None
        self._warned.add(message)
        return message

    def _unwritable(self, problem: str) -> str | None:
        return self._once(f"the result cache cannot be written, so this run stores no results in it "
                          f"(results already there are still used): {problem}")

    def before_run(self) -> list[str]:
        """Check the disk cache and the budget setting; the warnings not given yet in this process."""
        warnings = []
        problem = self.disk.probe()
        if problem and (message := self._unwritable(problem)):
            warnings.append(message)
        budget_warning = budget_from_env()[1]
        if budget_warning and (message := self._once(budget_warning)):
            warnings.append(message)
        return warnings

    def store(self, np_: Any, nt: Any, recipe_name: str, outputs: dict[str, Any], arts: list[Artifact],
              port_types: dict[str, Any]) -> tuple[dict[str, Any], CacheEntry | None, str | None]:
        """Keep a finished node's result on disk where it may be.

        Returns the outputs to pass on (read back from the entry, so later nodes
        see exactly what a later process will), the entry, and a warning if the
        cache just turned out to be unwritable.
        """
        disk_ok = nt.cache == "disk" and all(port_types[p].disk_cacheable for p in nt.outputs.values())
        if np_.volatile or not disk_ok or self.disk.problem:
            return outputs, None, None
        try:
            entry = self.disk.store(np_.fingerprint, outputs, dict(nt.outputs), port_types,
                                    {"type": nt.name, "node": np_.id, "recipe": recipe_name}, arts)
        except (OSError, CacheUnavailable) as exc:
            problem = self.disk.disable(exc) if isinstance(exc, OSError) else str(exc)
            return outputs, None, self._unwritable(problem)
        try:
            return self.disk.load(entry, port_types), entry, None
        except OSError:  # another process replaced the entry this instant: pass the values on as computed
            return outputs, None, None

    def remember(self, np_: Any, outputs: dict[str, Any], entry: CacheEntry | None, arts: list[Artifact]) -> None:
        self.memory.put(np_.fingerprint, outputs, entry.artifacts if entry else arts, entry.path if entry else None)

    def load(self, np_: Any, port_types: dict[str, Any]) -> dict[str, Any]:
        """The outputs of a node planned as cached (from memory, or read from its verified disk entry)."""
        if np_.source == "memory":
            outputs = self.memory.get(np_.fingerprint)
            if outputs is None:
                raise LookupError("its result was removed from the cache since the run was planned")
            return outputs
        outputs = self.disk.load(np_.entry, port_types)
        self.disk.touch(np_.entry)
        self.memory.put(np_.fingerprint, outputs, np_.entry.artifacts, np_.entry.path)
        return outputs

    def put_files(self, plan: Any, np_: Any) -> None:
        """Put a cached node's files into the run folder (OSError if the folder refuses them)."""
        restore(np_.restore, plan.files, np_.id)

    def drop(self, np_: Any) -> None:
        """Forget a cached result that could not be read (its entry is removed)."""
        if np_.entry is not None:
            self.disk.discard(np_.entry.path)
        self.memory.drop(np_.fingerprint)

    def state_root(self) -> Path:
        """Where nodes keep resumable state: the cache's ``state`` folder, or a temporary one if it is unusable."""
        root = self.root / "state"
        try:
            root.mkdir(parents=True, exist_ok=True)
            if os.access(root, os.W_OK):
                return root
        except OSError:
            pass
        user = os.getuid() if hasattr(os, "getuid") else "user"
        return Path(tempfile.gettempdir()) / f"fluxkiln-state-{user}"

    def after_run(self, plan: Any) -> str | None:
        """Save the run folder's file record and prune to the budget; a line saying what was pruned, if anything."""
        try:
            plan.files.save()
        except OSError:
            pass  # only a record that saves hashing; the next run checks the files by content
        if self.disk.problem:
            return None
        keep = {np_.fingerprint for np_ in plan.nodes.values()} | self.memory.keys()
        try:
            removed = enforce_budget(self.disk, budget_from_env()[0], keep)
        except OSError:
            return None
        if not removed:
            return None
        return (f"cache over its budget: removed the {len(removed)} least recently used entries "
                f"({human(sum(e.own for e in removed))})")
