"""What the UI knows about each node of the recipe: a plain model fed by engine events.

Widgets render this model; it never touches Textual, so it is easy to test.
States: pending, cached, running, done, failed, skipped, cancelled.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

STATES = ("pending", "cached", "running", "done", "failed", "skipped", "cancelled")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


@dataclass
class NodeInfo:
    """One node as shown in the graph panel and the details pane."""

    id: str
    type: str
    state: str = "pending"
    reason: str = ""
    params: dict[str, Any] = field(default_factory=dict)
    links: dict[str, str] = field(default_factory=dict)
    artifacts: list[str] = field(default_factory=list)
    error: dict[str, Any] | None = None
    seconds: float | None = None
    step: int | None = None
    total: int | None = None
    rate: float | None = None
    eta: float | None = None
    message: str = ""
    started: float | None = None  # wall-clock time the node started running


def percent(info: NodeInfo) -> int | None:
    """Whole percent done of a node with a known total (the graph and the progress bar show this same number)."""
    if not info.total:
        return None
    return max(0, min(100, 100 * (info.step or 0) // info.total))


def activity(info: NodeInfo, now: float) -> str:
    """What a running node does, for a node without a step count yet: ``loading model… 12 s``."""
    what = "loading model…" if info.type.startswith("load_") else "working…"
    if info.started is None:
        return what
    return f"{what} {max(0, int(now - info.started))} s"


@dataclass
class RunModel:
    """The recipe's nodes in execution order and what the last plan or run said about them."""

    nodes: dict[str, NodeInfo] = field(default_factory=dict)
    run_id: str | None = None
    status: str = "idle"  # idle | running | ok | failed | cancelled
    run_dir: str | None = None

    def set_recipe(self, checked: Any) -> None:
        """Take the node list from a validated recipe, keeping what is known of unchanged nodes."""
        old = self.nodes
        self.nodes = {}
        for nid in checked.order:
            rn = checked.nodes[nid]
            info = old.get(nid) if old.get(nid) and old[nid].type == rn.type.name else NodeInfo(nid, rn.type.name)
            info.params = dict(rn.params)
            info.links = {k: str(link) for k, link in rn.links.items()}
            self.nodes[nid] = info

    def apply_plan(self, plan: Any) -> None:
        """Show what a run would do now: cached or pending, and why."""
        for nid, np_ in plan.nodes.items():
            info = self.nodes.get(nid)
            if info is None or info.state == "running":
                continue
            if np_.action == "cached":
                info.state, info.reason = "cached", _cached_reason(np_.source)
            else:
                info.state, info.reason = "pending", np_.reason
                _forget_last_run(info)

    def apply(self, event: Any) -> NodeInfo | None:
        """Update the model from one engine event; return the node it concerns, if any."""
        name, data = event.event, event.data
        if name == "run_started":
            self._run_started(event)
            return None
        if name == "run_finished":
            self._run_finished(data)
            return None
        info = self.nodes.get(event.node or "")
        if info is None:
            return None
        if name == "node_started":
            _started(info, data, event.time)
        elif handler := _HANDLERS.get(name):
            handler(info, data)
        return info

    def _run_started(self, event: Any) -> None:
        self.run_id, self.status, self.run_dir = event.run_id, "running", event.data.get("run_dir")
        plan = event.data.get("plan") or {}
        for nid, info in self.nodes.items():
            p = plan.get(nid)
            if p is None:
                continue
            info.state = "pending"
            info.reason = p.get("reason") or _cached_reason(p.get("source"))
            _forget_last_run(info)

    def _run_finished(self, data: dict[str, Any]) -> None:
        self.status = data.get("status", "ok")
        if self.status == "cancelled":
            for info in self.nodes.values():
                if info.state in ("pending", "running"):
                    info.state, info.reason = "cancelled", "run cancelled before it ran"

    def counts(self) -> dict[str, int]:
        out = {s: 0 for s in STATES}
        for info in self.nodes.values():
            out[info.state] = out.get(info.state, 0) + 1
        return out

    def image_artifacts(self) -> list[tuple[str, str]]:
        """(node, path) of every image file the nodes wrote, in execution order."""
        return [(n.id, a) for n in self.nodes.values() for a in n.artifacts if a.lower().endswith(IMAGE_SUFFIXES)]


def _cached_reason(source: str | None) -> str:
    return {"memory": "cached in memory", "disk": "cached on disk", "not needed": "not needed"}.get(
        source or "", "cached")


def _forget_last_run(info: NodeInfo) -> None:
    """A node about to run again shows nothing of its previous run (time, files, error, progress)."""
    info.artifacts, info.seconds, info.message, info.error, info.started = [], None, "", None, None
    info.step = info.total = info.rate = info.eta = None


def _started(info: NodeInfo, data: dict[str, Any], when: float) -> None:
    _forget_last_run(info)
    info.state, info.reason, info.started = "running", data.get("reason", ""), when


def _cached(info: NodeInfo, data: dict[str, Any]) -> None:
    info.state, info.reason = "cached", _cached_reason(data.get("source"))
    if data.get("artifacts"):
        info.artifacts = list(data["artifacts"])


def _progress(info: NodeInfo, data: dict[str, Any]) -> None:
    info.step, info.total = data.get("step"), data.get("total")
    info.rate, info.eta = data.get("rate"), data.get("eta")
    info.message = str(data.get("message") or "")


def _finished(info: NodeInfo, data: dict[str, Any]) -> None:
    info.state, info.seconds = "done", data.get("seconds")
    info.artifacts = list(data.get("artifacts", []))


def _failed(info: NodeInfo, data: dict[str, Any]) -> None:
    info.state, info.error = "failed", dict(data)


def _skipped(info: NodeInfo, data: dict[str, Any]) -> None:
    info.state, info.reason = "skipped", data.get("reason", "")


def _cancelled(info: NodeInfo, data: dict[str, Any]) -> None:
    info.state, info.seconds = "cancelled", data.get("seconds")
    info.artifacts = list(data.get("artifacts", []))


_HANDLERS = {
    "node_cached": _cached, "node_progress": _progress, "node_finished": _finished,
    "node_failed": _failed, "node_skipped": _skipped, "node_cancelled": _cancelled,
}
