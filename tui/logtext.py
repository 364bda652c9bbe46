"""One log line per engine event, as plain Rich Text (node ids, errors and messages are untrusted)."""

from __future__ import annotations

import time
from typing import Any

from rich.text import Text

_QUIET = {"node_progress"}


def _stamp(event: Any) -> Text:
    return Text(time.strftime("%H:%M:%S ", time.localtime(event.time)), style="dim")


def log_text(event: Any) -> Text | None:
    """The log line for an event, or None for events the log does not show (progress)."""
    name, data, node = event.event, event.data, event.node or ""
    if name in _QUIET:
        return None
    out = _stamp(event)
    if name == "run_started":
        return out.append(f"run {event.run_id} started: {len(data.get('nodes', []))} nodes", style="bold")
    if name == "run_waiting":
        return out.append(str(data.get("message", "")), style="yellow")
    if name == "run_finished":
        style = {"ok": "bold green", "failed": "bold red", "cancelled": "bold magenta"}.get(data.get("status"), "")
        return out.append(f"run {data.get('status')} in {data.get('seconds', 0):.2f} s", style=style)
    out.append(node, style="bold")
    if name == "node_started":
        return out.append(f" started ({data.get('reason', '')})")
    if name == "node_cached":
        return out.append(f" cached ({data.get('source', '')})", style="cyan")
    if name == "node_finished":
        arts = data.get("artifacts") or []
        return out.append(f" done in {data.get('seconds', 0):.2f} s" + (f", {len(arts)} file(s)" if arts else ""),
                          style="green")
    if name == "node_failed":
        out.append(f" failed: {data.get('error_type', 'Error')}: {data.get('error', '')}", style="red")
        if data.get("hint"):
            out.append(f" (try: {data['hint']})")
        return out
    if name == "node_skipped":
        return out.append(f" skipped: {data.get('reason', '')}", style="dim")
    if name == "node_cancelled":
        return out.append(" cancelled", style="magenta")
    if name == "node_log":
        level = data.get("level", "info")
        return out.append(f" {data.get('message', '')}", style="yellow" if level == "warning" else
                          "red" if level == "error" else "")
    return out.append(f" {name}")
