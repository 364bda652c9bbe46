"""Model residency: one manager owns loaded models and the memory budget.

Nodes ask for a model by key with a loader; a hot model is returned at once.
When loading would exceed the budget, the least recently used models are
released first (inference pipelines before others when a node asks to
``make_room`` for training).  Knows nothing of torch: plugins pass ``size``
and ``release`` callables.
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Resident:
    """A loaded model and what the manager knows about it."""

    key: str
    value: Any
    size: int = 0
    kind: str = "inference"
    release: Callable[[Any], None] | None = None
    loaded_at: float = field(default_factory=time.time)
    load_seconds: float = 0.0
    hits: int = 0


def _default_budget() -> int | None:
    raw = os.environ.get("FLUXKILN_MODEL_BUDGET_GB")
    return int(float(raw) * 2**30) if raw else None


class Residency:
    """LRU cache of live models under a byte budget (``None``: unlimited)."""

    def __init__(self, budget: int | None = None) -> None:
        self.budget = budget if budget is not None else _default_budget()
        self._items: OrderedDict[str, Resident] = OrderedDict()
        self._lock = threading.RLock()
        self.evictions: list[str] = []

    def __contains__(self, key: str) -> bool:
        return key in self._items

    def keys(self) -> list[str]:
        return list(self._items)

    @property
    def used(self) -> int:
        return sum(r.size for r in self._items.values())

    def get(self, key: str, loader: Callable[[], Any], *, size: Callable[[Any], int] | int | None = None,
            release: Callable[[Any], None] | None = None, kind: str = "inference",
            expected_size: int = 0) -> Any:
        """Return the model under ``key``, loading it with ``loader()`` if it is not resident."""
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                self._items[key].hits += 1
                return self._items[key].value
            if expected_size:
                self.make_room(expected_size)
            t0 = time.perf_counter()
            value = loader()
            nbytes = size(value) if callable(size) else int(size or 0)
            self._items[key] = Resident(key, value, nbytes, kind, release, load_seconds=time.perf_counter() - t0)
            self._fit(keep=key)
            return value

    def put(self, key: str, value: Any, *, size: int = 0, kind: str = "inference",
            release: Callable[[Any], None] | None = None) -> None:
        """Hold an already-built value under ``key``."""
        with self._lock:
            self.evict(key)
            self._items[key] = Resident(key, value, size, kind, release)
            self._fit(keep=key)

    def make_room(self, nbytes: int, *, prefer_kinds: tuple[str, ...] = ("inference",), keep: tuple[str, ...] = ()) -> None:
        """Release least-recently-used models (``prefer_kinds`` first) until ``nbytes`` fits the budget."""
        if self.budget is None:
            return
        with self._lock:
            for kinds in (prefer_kinds, None):
                for key in list(self._items):
                    if self.used + nbytes <= self.budget:
                        return
                    r = self._items[key]
                    if key in keep or (kinds is not None and r.kind not in kinds):
                        continue
                    self.evict(key)

    def release_kind(self, *kinds: str, keep: tuple[str, ...] = ()) -> list[str]:
        """Release every model of the given kinds (e.g. ``"inference"`` before training)."""
        with self._lock:
            gone = [k for k, r in self._items.items() if r.kind in kinds and k not in keep]
            for k in gone:
                self.evict(k)
            return gone

    def evict(self, key: str) -> bool:
        """Release one model; True if it was resident."""
        with self._lock:
            r = self._items.pop(key, None)
        if r is None:
            return False
        self.evictions.append(key)
        if r.release is not None:
            r.release(r.value)
        return True

    def clear(self) -> None:
        for key in list(self._items):
            self.evict(key)

    def _fit(self, keep: str) -> None:
        if self.budget is not None and self.used > self.budget:
            self.make_room(0, keep=(keep,))

    def describe(self) -> list[dict[str, Any]]:
        return [{"key": r.key, "kind": r.kind, "size": r.size, "hits": r.hits, "load_seconds": round(r.load_seconds, 3)}
                for r in self._items.values()]
