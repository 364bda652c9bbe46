"""The ``grid`` node: lay images out in one labelled picture (rows × columns, title, captions).

Inputs are ``images`` and optional ``images_2`` … ``images_8``.  Layout:

* ``columns`` (or ``rows``) given: all images, in input order, fill the grid
  row by row, wrapping every ``columns`` images;
* else, with several inputs: each input is one row;
* else (one input): a near-square grid.

* ``row_axis`` / ``col_axis`` / ``page_axis`` given, or images from a sweep
  with none of the above: rows, columns and pages by axis (see
  :mod:`.axes`), labelled with the axis values, one picture per page.

``transpose`` swaps rows and columns afterwards.  Each image is fitted into a
``cell_size`` square (aspect kept, letterboxed).  ``label_from`` writes one
caption line per key under every cell (e.g. ``num_inference_steps``).
"""

from __future__ import annotations

import math
import unicodedata
from typing import Annotated, Any, Literal

from pydantic import Field

from fluxkiln.engine import ImageItem, Images, NodeError, RunContext, node

from . import axes
from .save import provenance

MAX_SIDE = 16384
MAX_LABEL_CHARS = 200
BACKGROUNDS = {"white": ((255, 255, 255), (20, 20, 20)), "black": ((0, 0, 0), (235, 235, 235)),
               "gray": ((128, 128, 128), (255, 255, 255))}
SHORT_KEYS = {"num_inference_steps": "steps", "prompt_strength": "strength", "aspect_ratio": "aspect",
              "num_outputs": "outputs", "lora_scale": "lora"}
Extra = Annotated[Images | None, Field(description="More images (see `images`)")]


@node("grid", version="1", category="io")
def grid(
    ctx: RunContext,
    images: Annotated[Images, Field(description="Images; with several inputs each input is one row")],
    images_2: Extra = None, images_3: Extra = None, images_4: Extra = None,
    images_5: Extra = None, images_6: Extra = None, images_7: Extra = None, images_8: Extra = None,
    columns: Annotated[int | None, Field(ge=1, le=64, description="Images per row; fills rows in input order")] = None,
    rows: Annotated[int | None, Field(ge=1, le=64, description="Number of rows (when `columns` is not set)")] = None,
    transpose: Annotated[bool, Field(description="Swap rows and columns")] = False,
    row_labels: Annotated[list[str] | None, Field(description="Labels left of each row")] = None,
    col_labels: Annotated[list[str] | None, Field(description="Labels above each column")] = None,
    title: Annotated[str | None, Field(description="Title above the grid")] = None,
    label_from: Annotated[str | list[str] | None, Field(
        description="Caption each cell with these values: a sample parameter (e.g. num_inference_steps), "
                    "'seed', 'prompt', 'model' or another meta key")] = None,
    cell_size: Annotated[int, Field(ge=32, le=2048, description="Side of each square cell in pixels")] = 256,
    font_size: Annotated[int, Field(ge=6, le=128, description="Label font size in pixels")] = 16,
    background: Annotated[Literal["white", "black", "gray"], Field(description="Background colour")] = "white",
    row_axis: Annotated[str | None, Field(description="One row per value of this axis: a swept key (e.g. model) "
                                          "or an image parameter (seed, prompt, num_inference_steps ...)")] = None,
    col_axis: Annotated[str | None, Field(description="One column per value of this axis")] = None,
    page_axis: Annotated[str | list[str] | None, Field(
        description="One grid picture per value of this axis (or combination of these axes), e.g. prompt")] = None,
) -> Images:
    """Lay images out in one labelled grid picture (rows × columns, title, per-cell captions).

    With several inputs each input is one row (e.g. dev on row 1, schnell on
    row 2); with `columns` the images of all inputs fill the grid row by
    row.  `row_labels`/`col_labels` label rows and columns, `label_from`
    captions every cell with a parameter value such as
    `num_inference_steps` or `seed`.  `row_axis`, `col_axis` and
    `page_axis` lay images out by a swept key or parameter (one picture per
    page, e.g. a grid per prompt); images of a sweep are laid out by its axes
    automatically.  Outputs one image per page.
    """
    groups = [g for g in (images, images_2, images_3, images_4, images_5, images_6, images_7, images_8)
              if g is not None]
    flat = [it for g in groups for it in g]
    pages_by = [page_axis] if isinstance(page_axis, str) else list(page_axis or [])
    by_axes = bool(row_axis or col_axis or pages_by)
    if by_axes or (not (columns or rows) and len(groups) == 1):
        pages_by, row_axis, col_axis = axes.auto_axes(flat, pages_by, row_axis, col_axis)
        by_axes = by_axes or col_axis is not None
    if by_axes:
        if not flat:
            raise NodeError("grid got no images: every input is empty", hint="check the nodes linked to `images`")
        pages = axes.layout(flat, pages_by, row_axis, col_axis, _value, _axis_label)
    else:
        pages = [axes.Page("", [], [], _layout(groups, columns, rows))]
    keys = [label_from] if isinstance(label_from, str) else list(label_from or [])
    out = Images()
    for page in pages:
        cells, rlabels, clabels = page.cells, page.row_labels, page.col_labels
        if transpose:
            cells, rlabels, clabels = [list(c) for c in zip(*cells)], clabels, rlabels
        rlabels, clabels = row_labels or rlabels, col_labels or clabels  # given labels name the final grid's
        ncols = max((len(r) for r in cells), default=0)
        _check_labels(rlabels, len(cells), "row_labels", "rows")
        _check_labels(clabels, ncols, "col_labels", "columns")
        heading = " - ".join(t for t in (title, page.title) if t) or None
        picture = _render(cells, ncols, rlabels, clabels, heading, keys, cell_size, font_size, BACKGROUNDS[background])
        meta = {"node": ctx.node, "node_type": "grid", "params": dict(ctx.params), "rows": len(cells),
                "columns": ncols, "cells": [[_source(it) for it in row] for row in cells], "page": page.values}
        out.append(ImageItem(image=picture, name=ctx.node if len(pages) == 1 else f"{ctx.node}-{len(out)}",
                             meta=meta, prompt=heading))
        ctx.progress(len(out), len(pages), preview=picture)
    return out


def _axis_label(axis: str, value: Any) -> str:
    return f"{SHORT_KEYS.get(axis, axis)}: {clean_label('-' if value is None else value)}"


# ------------------------------------------------------------------ layout
def _layout(groups: list[Images], columns: int | None, rows: int | None) -> list[list[ImageItem | None]]:
    flat = [it for g in groups for it in g]
    if not flat:
        raise NodeError("grid got no images: every input is empty", hint="check the nodes linked to `images`")
    if columns or rows:
        ncol = columns or math.ceil(len(flat) / rows)
        cells: list[list[ImageItem | None]] = [list(flat[i:i + ncol]) for i in range(0, len(flat), ncol)]
        if rows and columns and len(cells) > rows:
            raise NodeError(f"{len(flat)} images do not fit in {rows} rows of {columns}",
                            hint="raise `rows` or `columns`, or leave `rows` out", key="rows")
    elif len(groups) > 1:
        cells = [list(g) for g in groups]
    else:
        ncol = math.ceil(math.sqrt(len(flat)))
        cells = [list(flat[i:i + ncol]) for i in range(0, len(flat), ncol)]
    width = max(len(r) for r in cells)
    return [r + [None] * (width - len(r)) for r in cells]  # ragged rows get empty cells


def _check_labels(labels: list[str] | None, count: int, key: str, what: str) -> None:
    if labels and len(labels) > count:
        raise NodeError(f"{key} has {len(labels)} labels but the grid has {count} {what}",
                        hint=f"give at most {count} labels", key=key)


def _value(item: ImageItem, key: str) -> Any:
    if key in ("seed", "prompt", "name"):
        return getattr(item, key)
    params = provenance(item)[1]
    if key in params:
        return params[key]
    return item.meta.get(key)


def _source(item: ImageItem | None) -> dict[str, Any] | None:
    if item is None:
        return None
    return {k: v for k, v in {"node": provenance(item)[0], "seed": item.seed,
                              "index": item.meta.get("index"), "path": item.meta.get("path")}.items() if v is not None}


def clean_label(text: Any) -> str:
    """A printable one-line label: control characters dropped, long text cut."""
    if isinstance(text, float):
        text = f"{text:g}"
    s = "".join(ch if unicodedata.category(ch)[0] != "C" else " " for ch in str(text))
    s = " ".join(s.split())
    return s if len(s) <= MAX_LABEL_CHARS else s[:MAX_LABEL_CHARS] + "..."


# ------------------------------------------------------------------ drawing
def _fit(draw: Any, text: str, font: Any, width: float) -> str:
    if width <= 0:
        return ""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..." if text else ""


def _thumb(item: ImageItem, size: int, bg: tuple[int, int, int]) -> Any:
    from PIL import Image, ImageOps

    im = item.image
    if im.mode in ("RGBA", "LA", "P"):
        im = im.convert("RGBA")
        base = Image.new("RGBA", im.size, bg + (255,))
        im = Image.alpha_composite(base, im)
    return ImageOps.contain(im.convert("RGB"), (size, size), Image.Resampling.LANCZOS)


def _render(cells: list[list[ImageItem | None]], ncols: int, row_labels: list[str], col_labels: list[str],
            title: str | None, keys: list[str], cell: int, font_size: int,
            colours: tuple[tuple[int, int, int], tuple[int, int, int]]) -> Any:
    from PIL import Image, ImageDraw, ImageFont

    bg, fg = colours
    font = ImageFont.load_default(size=font_size)
    title_font = ImageFont.load_default(size=round(font_size * 1.4))
    pad = max(4, font_size // 2)
    line = round(font_size * 1.3)
    scratch = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    rows_txt = [clean_label(x) for x in row_labels]
    label_w = min(2 * cell, max((scratch.textlength(t, font=font) for t in rows_txt), default=0))
    left = pad + (math.ceil(label_w) + pad if rows_txt else 0)
    top = pad + (round(font_size * 1.8) + pad if title else 0)
    head = line + pad // 2 if col_labels else 0
    cap_h = line * len(keys)
    step_x, step_y = cell + pad, cell + cap_h + pad
    width = left + ncols * step_x
    height = top + head + len(cells) * step_y
    if width > MAX_SIDE or height > MAX_SIDE:
        raise NodeError(f"the grid would be {width}×{height} pixels, more than {MAX_SIDE} per side",
                        hint="lower `cell_size` or split the images over several grids", key="cell_size")
    canvas = Image.new("RGB", (width, height), bg)
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((pad, pad), _fit(draw, clean_label(title), title_font, width - 2 * pad), fill=fg, font=title_font)
    for c, text in enumerate(col_labels):
        t = _fit(draw, clean_label(text), font, cell)
        x = left + c * step_x + (cell - draw.textlength(t, font=font)) / 2
        draw.text((x, top), t, fill=fg, font=font)
    for r, row in enumerate(cells):
        y = top + head + r * step_y
        if r < len(rows_txt):
            draw.text((pad, y + cell / 2), _fit(draw, rows_txt[r], font, label_w), fill=fg, font=font, anchor="lm")
        for c, item in enumerate(row):
            if item is None:
                continue
            x = left + c * step_x
            th = _thumb(item, cell, bg)
            canvas.paste(th, (x + (cell - th.width) // 2, y + (cell - th.height) // 2))
            for k, key in enumerate(keys):
                value = _value(item, key)
                text = _fit(draw, clean_label(f"{SHORT_KEYS.get(key, key)}: {'-' if value is None else clean_label(value)}"), font, cell)
                draw.text((x, y + cell + k * line + 2), text, fill=fg, font=font)
    return canvas
