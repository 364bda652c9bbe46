"""Run and node lifecycle events, delivered to observers through the ``on_event`` hook.

Event names: ``run_started``, ``node_started`` (with ``reason``), ``node_cached``
(with ``source``: memory or disk), ``node_progress`` (``step``, ``total``,
``metrics``, optional ``preview``), ``node_log``, ``node_finished`` (with
``artifacts``), ``node_failed`` (with ``error`` and ``hint``), ``node_skipped``,
``node_cancelled``, ``run_finished`` (with ``status`` and ``nodes``), and
``run_waiting`` (``message``, ``run_dir``: another run holds the run folder; this one waits).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

EVENT_NAMES = (
    "run_started", "node_started", "node_cached", "node_progress", "node_log", "node_finished",
    "node_failed", "node_skipped", "node_cancelled", "run_finished", "run_waiting",
)


@dataclass
class Event:
    """One event.  ``data`` holds the event's fields; ``objects`` holds live values
    (e.g. a PIL preview image) that observers in this process may use but that
    never go into the JSON stream."""

    event: str
    run_id: str
    node: str | None = None
    type: str | None = None
    data: dict[str, Any] = field(default_factory=dict)
    objects: dict[str, Any] = field(default_factory=dict)
    time: float = field(default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"event": self.event, "run_id": self.run_id, "time": round(self.time, 3)}
        if self.node is not None:
            out["node"] = self.node
            out["type"] = self.type
        out.update(self.data)
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), default=str, ensure_ascii=False)
