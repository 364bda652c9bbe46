"""Where the engine's time outside the pipeline call goes: each phase of ``Engine.run`` timed by wrapping it for the
duration of a ``with`` block (validation, planning, the run-folder lock, events, the disk-cache store, the
report, the saved state for ``--explain``), and the pipeline call itself, in milliseconds per run."""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Iterator
from typing import Any

# (module, owner attribute path, label, wraps a context manager)
PHASES = [
    ("fluxkiln.engine.runner", "Engine.check", "validate", False),
    ("fluxkiln.engine.runner", "Engine.plan", "plan", False),
    ("fluxkiln.engine.runner", "Engine._run_folder_held", "run-folder lock", True),
    ("fluxkiln.engine.runner", "Engine._save_previous", "state for --explain", False),
    ("fluxkiln.engine.runner", "write_report", "report", False),
    ("fluxkiln.engine.runcache", "RunCaches.before_run", "cache checks", False),
    ("fluxkiln.engine.runcache", "RunCaches.store", "cache store", False),
    ("fluxkiln.engine.runcache", "RunCaches.after_run", "cache budget", False),
    ("fluxkiln.engine.registry", "Registry.emit", "events", False),
    ("fluxkiln.engine.registry", "Registry.observing", "observers", True),
    ("fluxkiln.engine.registry", "Registry.prepare_run", "prepare_run", False),
    ("fluxkiln.plugins.flux.generate", "_call", "pipeline call", False),
]


def _timed(original: Callable[..., Any], label: str, spent: dict[str, float], cm: bool) -> Callable[..., Any]:
    if cm:
        @contextlib.contextmanager
        def entered(*a: Any, **kw: Any) -> Iterator[Any]:
            t0 = time.perf_counter()
            with original(*a, **kw) as value:
                spent[label] = spent.get(label, 0.0) + time.perf_counter() - t0
                yield value
        return entered

    @functools.wraps(original)
    def wrapper(*a: Any, **kw: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return original(*a, **kw)
        finally:
            spent[label] = spent.get(label, 0.0) + time.perf_counter() - t0
    return wrapper


@contextlib.contextmanager
def engine_phases() -> Iterator[dict[str, float]]:
    """Seconds spent per phase while the block runs (accumulated; divide by the runs)."""
    import importlib

    spent: dict[str, float] = {}
    undo = []
    for module, path, label, cm in PHASES:
        owner: Any = importlib.import_module(module)
        *parents, attr = path.split(".")
        for part in parents:
            owner = getattr(owner, part)
        original = owner.__dict__[attr]
        setattr(owner, attr, _timed(original, label, spent, cm))
        undo.append((owner, attr, original))
    try:
        yield spent
    finally:
        for owner, attr, original in reversed(undo):
            setattr(owner, attr, original)


def per_run_ms(spent: dict[str, float], runs: int, wall_s: float) -> dict[str, Any]:
    """Milliseconds per run per phase, and what no phase accounts for (the node's own work around the pipeline)."""
    out = {k: round(1000 * v / runs, 2) for k, v in sorted(spent.items(), key=lambda kv: -kv[1])}
    nested = ("events", "pipeline call")  # events fire inside other phases and the pipeline call
    outside = 1000 * wall_s / runs - sum(v for k, v in out.items() if k not in nested)
    out["unaccounted (node's own work, engine bookkeeping)"] = round(outside - out.get("pipeline call", 0.0), 2)
    return out
