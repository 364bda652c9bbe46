"""TOML syntax highlighting for the recipe editor, without tree-sitter.

A small line-by-line tokenizer (it carries multi-line strings and open arrays
from one line to the next) that yields ``(line, start, end, name)`` spans in
character columns.  Beyond plain TOML it marks fluxkiln's own syntax: links
(``"@node"``, ``"@node.port"``) and variable references (``${name}``).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

Span = tuple[int, int, int, str]  # (line, start column, end column, highlight name)

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_NUMBER = re.compile(r"[+-]?(?:0x[0-9A-Fa-f_]+|0o[0-7_]+|0b[01_]+|inf|nan|"
                     r"\d[\d_]*(?:\.\d[\d_]*)?(?:[eE][+-]?\d+)?)(?![\w.:-])")
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}(?:[T ]\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?(?:Z|[+-]\d{2}:\d{2})?)?"
                   r"|\d{2}:\d{2}:\d{2}(?:\.\d+)?")
_BOOL = re.compile(r"(?:true|false)(?![\w-])")
_VAR = re.compile(r"\$\{[^}]*\}")
_LINK = re.compile(r"@(?!@)[A-Za-z_][A-Za-z0-9_-]*(?:\.[A-Za-z0-9_-]+)?$")


@dataclass
class _State:
    ml_quote: str | None = None  # open multi-line string delimiter
    depth: int = 0  # open [ / { in a value spanning lines


def highlight_toml(text: str) -> list[Span]:
    """Every highlight span of a TOML document."""
    state = _State()
    spans: list[Span] = []
    for row, line in enumerate(text.split("\n")):
        spans.extend(_line_spans(row, line, state))
    return spans


def _line_spans(row: int, line: str, st: _State) -> Iterator[Span]:
    col = 0
    if st.ml_quote:
        end = line.find(st.ml_quote)
        if end < 0:
            yield (row, 0, len(line), "string")
            return
        col = end + 3
        yield (row, 0, col, "string")
        st.ml_quote = None
    else:
        col = len(line) - len(line.lstrip())
        if col >= len(line):
            return
        if st.depth == 0 and line[col] == "#":
            yield (row, col, len(line), "comment")
            return
        if st.depth == 0 and line[col] == "[":
            yield from _header(row, line, col)
            return
        if st.depth == 0:
            col = yield from _key(row, line, col)
    yield from _values(row, line, col, st)


def _header(row: int, line: str, col: int) -> Iterator[Span]:
    close = line.find("]]" if line.startswith("[[", col) else "]", col)
    end = len(line) if close < 0 else close + (2 if line.startswith("[[", col) else 1)
    yield (row, col, end, "heading")
    rest = line.find("#", end)
    if rest >= 0:
        yield (row, rest, len(line), "comment")


def _key(row: int, line: str, col: int) -> Iterator[Span]:
    """Highlight ``a.b."c" =``; return the column after the ``=`` (or where the key ended)."""
    start = col
    while col < len(line):
        ch = line[col]
        if ch in "\"'":
            close = line.find(ch, col + 1)
            col = len(line) if close < 0 else close + 1
        elif m := _BARE_KEY.match(line, col):
            col = m.end()
        elif ch in " \t.":
            col += 1
        else:
            break
    if col > start:
        yield (row, start, len(line[:col].rstrip()), "toml.key")
    if col < len(line) and line[col] == "=":
        yield (row, col, col + 1, "operator")
        col += 1
    return col


def _values(row: int, line: str, col: int, st: _State) -> Iterator[Span]:
    n = len(line)
    while col < n:
        ch = line[col]
        if ch in " \t":
            col += 1
        elif ch == "#":
            yield (row, col, n, "comment")
            return
        elif line.startswith(('"""', "'''"), col):
            quote = line[col:col + 3]
            end = line.find(quote, col + 3)
            if end < 0:
                st.ml_quote = quote
                yield (row, col, n, "string")
                return
            yield (row, col, end + 3, "string")
            col = end + 3
        elif ch in "\"'":
            col = yield from _string(row, line, col)
        elif ch in "[{":
            st.depth += 1
            yield (row, col, col + 1, "punctuation.bracket")
            col += 1
            if ch == "{":
                col = yield from _inline_key(row, line, col)
        elif ch in "]}":
            st.depth = max(0, st.depth - 1)
            yield (row, col, col + 1, "punctuation.bracket")
            col += 1
        elif ch == ",":
            yield (row, col, col + 1, "punctuation.delimiter")
            col += 1
            if st.depth and _inside_brace(line, col):
                col = yield from _inline_key(row, line, col)
        elif m := _DATE.match(line, col):
            yield (row, col, m.end(), "toml.datetime")
            col = m.end()
        elif m := _NUMBER.match(line, col) or _BOOL.match(line, col):
            yield (row, col, m.end(), "boolean" if m.group(0) in ("true", "false") else "number")
            col = m.end()
        elif st.depth and (m := _BARE_KEY.match(line, col)):
            yield (row, col, m.end(), "toml.key")
            col = m.end()
        else:
            col += 1


def _inside_brace(line: str, col: int) -> bool:
    return line.rfind("{", 0, col) > line.rfind("[", 0, col)


def _inline_key(row: int, line: str, col: int) -> Iterator[Span]:
    """Inside ``{ key = value, ... }`` the word before ``=`` is a key."""
    m = re.match(r"\s*([A-Za-z0-9_.-]+|\"[^\"]*\")\s*(=)", line[col:])
    if not m:
        return col
    yield (row, col + m.start(1), col + m.end(1), "toml.key")
    yield (row, col + m.start(2), col + m.end(2), "operator")
    return col + m.end()


def _string(row: int, line: str, col: int) -> Iterator[Span]:
    """A one-line basic or literal string; links and ``${var}`` get their own highlight."""
    quote = line[col]
    end = col + 1
    while end < len(line) and line[end] != quote:
        end += 2 if quote == '"' and line[end] == "\\" else 1
    end = min(end + 1, len(line))
    body = line[col + 1:end - 1] if end - col >= 2 else ""
    if _LINK.match(body):
        yield (row, col, end, "fluxkiln.link")
        return end
    yield (row, col, end, "string")
    for m in _VAR.finditer(body):
        yield (row, col + 1 + m.start(), col + 1 + m.end(), "fluxkiln.var")
    return end
