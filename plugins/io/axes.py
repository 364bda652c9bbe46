"""Grid layout by axes: rows, columns and pages keyed by a sweep axis or any image parameter.

An axis is a key whose value every image has: a swept key of the node that
made it (``meta["sweep"]``: a linked model shows as its node id), or a
parameter such as ``seed``, ``prompt``, ``num_inference_steps``.  Values keep
their order of first appearance (ascending for numbers).  Several images in
one cell (e.g. ``num_outputs = 2``) widen that column.  Images from a sweep
fill in what is not given: the last free varying axis is the columns, the one
before it the rows, any others make one page each (unless pages are given).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fluxkiln.engine import ImageItem


@dataclass
class Page:
    """One grid picture: its title suffix, labels and cells."""

    title: str
    row_labels: list[str]
    col_labels: list[str]
    cells: list[list[ImageItem | None]]
    values: dict[str, Any] = field(default_factory=dict)


def sweep_values(item: ImageItem) -> dict[str, Any]:
    record = item.meta.get("sweep") if isinstance(item.meta, dict) else None
    return dict(record.get("values") or {}) if isinstance(record, dict) else {}


def axis_value(item: ImageItem, key: str, fallback: Callable[[ImageItem, str], Any]) -> Any:
    swept = sweep_values(item)
    return swept[key] if key in swept else fallback(item, key)


def _distinct(values: list[Any]) -> list[Any]:
    """Distinct values in order of first appearance (ascending when all are numbers)."""
    seen: list[Any] = []
    for v in values:
        if v not in seen:
            seen.append(v)
    if seen and all(isinstance(v, tuple) and len(v) == 1 and isinstance(v[0], (int, float))
                    and not isinstance(v[0], bool) for v in seen):
        seen.sort()
    return seen


def auto_axes(items: list[ImageItem], pages: list[str], row: str | None,
              col: str | None) -> tuple[list[str], str | None, str | None]:
    """Fill what is not given from the images' sweep axes that take more than one value: the last free one
    is the columns, the one before it the rows; the others make pages unless pages are given."""
    keys: list[str] = []
    for item in items:
        keys += [k for k in sweep_values(item) if k not in keys]
    free = [k for k in keys if k not in (*pages, row, col)
            and len(_distinct([(sweep_values(i).get(k),) for i in items])) > 1]
    if col is None and free:
        col = free.pop()
    if row is None and free:
        row = free.pop()
    return (pages or free), row, col


def layout(items: list[ImageItem], pages: list[str], row: str | None, col: str | None,
           value: Callable[[ImageItem, str], Any], text: Callable[[str, Any], str]) -> list[Page]:
    """Group images into pages, rows and columns by the given axes (None: a single row or column)."""
    def key(item: ImageItem, axes: list[str]) -> tuple[Any, ...]:
        return tuple(axis_value(item, a, value) for a in axes)

    out = []
    for page_key in _distinct([key(i, pages) for i in items]):
        members = [i for i in items if key(i, pages) == page_key]
        rows = _distinct([key(i, [row] if row else []) for i in members])
        cols = _distinct([key(i, [col] if col else []) for i in members])
        slots: dict[tuple[Any, Any], list[ImageItem]] = {}
        for i in members:
            slots.setdefault((key(i, [row] if row else []), key(i, [col] if col else [])), []).append(i)
        widths = {c: max(len(slots.get((r, c), [])) for r in rows) for c in cols}
        col_labels = [text(col, c[0]) if col else "" for c in cols for _ in range(widths[c])]
        cells = [[(slots.get((r, c), []) + [None] * widths[c])[k] for c in cols for k in range(widths[c])]
                 for r in rows]
        title = ", ".join(text(a, v) for a, v in zip(pages, page_key, strict=True))
        out.append(Page(title, [text(row, r[0]) if row else "" for r in rows], col_labels, cells,
                        dict(zip(pages, page_key, strict=True))))
    return out
