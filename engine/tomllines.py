"""Find the line of every table and key in a TOML document.

``tomllib`` gives values but no positions; recipe errors must name a line.
This scanner reads the text once and maps each key path (``("nodes", "a",
"seed")``) to the 1-based line where it is defined.  It understands table
headers, dotted and quoted keys, multi-line strings and multi-line arrays;
it does not validate TOML (tomllib does that).
"""

from __future__ import annotations

import re

_BARE = re.compile(r"[A-Za-z0-9_-]+")


def _parse_key(s: str, i: int) -> tuple[list[str], int]:
    """Parse a (dotted) key starting at s[i]; return its parts and the index after it."""
    parts: list[str] = []
    n = len(s)
    while i < n:
        while i < n and s[i] in " \t":
            i += 1
        if i < n and s[i] in "\"'":
            q = s[i]
            j = i + 1
            buf = []
            while j < n and s[j] != q:
                if q == '"' and s[j] == "\\" and j + 1 < n:
                    buf.append(s[j + 1])
                    j += 2
                    continue
                buf.append(s[j])
                j += 1
            parts.append("".join(buf))
            i = j + 1
        else:
            m = _BARE.match(s, i)
            if not m:
                break
            parts.append(m.group(0))
            i = m.end()
        while i < n and s[i] in " \t":
            i += 1
        if i < n and s[i] == ".":
            i += 1
            continue
        break
    return parts, i


def _scan_value(s: str, state: dict) -> None:
    """Update bracket depth / open multi-line string state from a chunk of value text."""
    i, n = 0, len(s)
    while i < n:
        if state["ml"]:
            end = s.find(state["ml"], i)
            if end < 0:
                return
            i = end + 3
            state["ml"] = None
            continue
        c = s[i]
        if c == "#":
            return
        if s.startswith('"""', i) or s.startswith("'''", i):
            state["ml"] = s[i:i + 3]
            i += 3
            continue
        if c in "\"'":
            j = i + 1
            while j < n and s[j] != c:
                j += 2 if (c == '"' and s[j] == "\\") else 1
            i = j + 1
            continue
        if c in "[{":
            state["depth"] += 1
        elif c in "]}":
            state["depth"] -= 1
        i += 1


def key_lines(text: str) -> dict[tuple[str, ...], int]:
    """Map every table path and key path in ``text`` to its 1-based line number."""
    lines: dict[tuple[str, ...], int] = {}
    table: tuple[str, ...] = ()
    state = {"ml": None, "depth": 0}
    for lineno, raw in enumerate(text.splitlines(), start=1):
        if state["ml"] or state["depth"] > 0:
            _scan_value(raw, state)
            continue
        s = raw.strip()
        if not s or s.startswith("#"):
            continue
        if s.startswith("["):
            double = s.startswith("[[")
            parts, _ = _parse_key(s, 2 if double else 1)
            table = tuple(parts)
            lines.setdefault(table, lineno)
            continue
        parts, i = _parse_key(s, 0)
        if parts and i < len(s) and s[i] == "=":
            path = table + tuple(parts)
            lines.setdefault(path, lineno)
            for k in range(1, len(parts)):
                lines.setdefault(table + tuple(parts[:k]), lineno)
            _scan_value(s[i + 1:], state)
    return lines


def line_of(lines: dict[tuple[str, ...], int], *path: str) -> int | None:
    """Line of the longest prefix of ``path`` that is known."""
    for k in range(len(path), 0, -1):
        if tuple(path[:k]) in lines:
            return lines[tuple(path[:k])]
    return None
