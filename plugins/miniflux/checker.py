"""The pixel-based checker of mini-flux's world: does an image show what its prompt asks for?

No learned model: the background is the median colour of the image's border, objects are the connected
blobs that differ from it (a blob whose inner pixels fall into two or more palette colours, each covering a
fifth of them, is two touching objects and is split by colour), each blob's colour is its median colour
(nearest palette colour), its position the 3x3 cell of its bounding box's centre, its size its half-extent
against :data:`~.world.SIZE_SPLIT`, and its shape the template (drawn by the renderer into the blob's bounding
box) that overlaps it best.  Blobs are matched to the prompt's objects in the order that agrees best.
Deterministic, any image size.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

from .render import shape_mask
from .world import ALL_SHAPES, COLOURS, SIZE_SPLIT, Obj, parse

ATTRIBUTES = ("colour", "shape", "size", "position")
FG_DISTANCE = 80.0  # RGB distance from the background above which a pixel belongs to an object
MIN_BLOB = 0.004  # smallest blob that counts as an object, as a fraction of (shorter side)^2
SPLIT_SHARE = 0.2  # a blob holds two objects where two palette colours each cover this share of its core


@dataclass(frozen=True)
class Blob:
    """One object found in an image."""

    colour: str
    shape: str
    size: str
    position: str
    area: float  # fraction of (shorter side)^2


@dataclass
class Check:
    """The verdict on one image: per attribute the fraction of the prompt's objects that are right (None where
    the prompt does not say), the background (1/0/None), whether the object count is right, and ``all``."""

    scores: dict[str, float | None]
    blobs: list[Blob] = field(default_factory=list)
    background: str = ""

    @property
    def all_right(self) -> bool:
        return self.scores["all"] == 1.0


def palette_name(rgb: Any) -> str:
    import numpy as np

    return list(COLOURS)[int(nearest_palette(np.asarray(rgb, dtype=np.float64)[None])[0])]


def nearest_palette(pixels: Any) -> Any:
    """Each RGB row's nearest palette colour, as its index in :data:`~.world.COLOURS`."""
    import numpy as np

    palette = np.array(list(COLOURS.values()), dtype=np.float64)
    return ((pixels[:, None, :] - palette[None]) ** 2).sum(-1).argmin(1)


def check(image: Any, prompt: str, aliases: dict[str, str] | None = None, also: tuple[str, ...] = ()) -> Check:
    """Check ``image`` (PIL image or HxWx3 uint8 array) against ``prompt``.  Each blob's shape is read among
    :data:`~.world.ALL_SHAPES`, the shapes the prompt names (a concept's, through ``aliases``) and ``also``."""
    import numpy as np

    arr = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image, dtype=np.float64)
    scene = parse(prompt, aliases)
    h, w = arr.shape[:2]
    frame = max(2, min(h, w) // 50)
    border = np.concatenate([arr[:frame].reshape(-1, 3), arr[-frame:].reshape(-1, 3),
                             arr[:, :frame].reshape(-1, 3), arr[:, -frame:].reshape(-1, 3)])
    bg_rgb = np.median(border, axis=0)
    background = palette_name(bg_rgb)
    named = [o.shape for o in scene.objects if o.shape]
    blobs = find_blobs(arr, bg_rgb, tuple(dict.fromkeys([*ALL_SHAPES, *named, *also])))
    scores = score(scene.objects, blobs, scene.background, background)
    return Check(scores, blobs, background)


def find_blobs(arr: Any, bg_rgb: Any, shapes: tuple[str, ...] = ALL_SHAPES) -> list[Blob]:
    """The objects of an image: connected regions unlike the background (split where one holds two objects of
    different colours that touch), largest first, each read as one of ``shapes``."""
    import numpy as np
    from scipy import ndimage

    h, w = arr.shape[:2]
    short = min(h, w)
    fg = np.sqrt(((arr - bg_rgb) ** 2).sum(-1)) > FG_DISTANCE
    labels, count = ndimage.label(fg)
    if count == 0:
        return []
    areas = ndimage.sum_labels(fg, labels, index=np.arange(1, count + 1))
    least = MIN_BLOB * short * short
    keep = [i + 1 for i in np.argsort(-areas) if areas[i] >= least][:4]
    masks = [part for lab in keep for part in split_by_colour(arr, labels == lab, least)]
    masks.sort(key=lambda m: -int(m.sum()))
    return [_blob(arr, mask, short, shapes) for mask in masks[:4]]


def split_by_colour(arr: Any, mask: Any, least: float) -> list[Any]:
    """``mask`` as one object, or, where the nearest palette colours of its core (the pixels 2 px inside its
    edge: outlines and blended seams are thin) hold two or more parts that are each at least
    :data:`SPLIT_SHARE` of the core (and ``least`` pixels), each of those colours' connected parts as objects
    of their own (the blended pixels where they touch are left out)."""
    import numpy as np
    from scipy import ndimage

    colour_of = np.full(mask.shape, -1)
    colour_of[mask] = nearest_palette(arr[mask])
    core = colour_of[ndimage.binary_erosion(mask, iterations=2)]
    counts = np.bincount(core, minlength=len(COLOURS))
    major = [c for c in np.argsort(-counts) if counts[c] >= max(least, SPLIT_SHARE * len(core))]
    if len(major) < 2:
        return [mask]
    parts = []
    for c in major:
        labels, count = ndimage.label(colour_of == c)
        sizes = ndimage.sum_labels(labels > 0, labels, index=np.arange(1, count + 1))
        parts += [labels == i + 1 for i in range(count) if sizes[i] >= least]
    return parts or [mask]


def _blob(arr: Any, mask: Any, short: int, shapes: tuple[str, ...]) -> Blob:
    import numpy as np
    from scipy import ndimage

    h, w = arr.shape[:2]
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    core = ndimage.binary_erosion(mask, iterations=2)
    pixels = arr[core] if core.any() else arr[mask]
    cx, cy = (x0 + x1) / 2 / w, (y0 + y1) / 2 / h
    half = max(x1 - x0, y1 - y0) / 2 / short
    return Blob(colour=palette_name(np.median(pixels, axis=0)), shape=_fit_shape(mask[y0:y1, x0:x1], shapes),
                size="small" if half < SIZE_SPLIT else "large", position=_cell(cx, cy),
                area=float(mask.sum()) / short / short)


def _cell(x: float, y: float) -> str:
    col = "left" if x < 1 / 3 else "right" if x > 2 / 3 else ""
    row = "top" if y < 1 / 3 else "bottom" if y > 2 / 3 else ""
    return f"{row} {col}".strip() or "center"


def _fit_shape(crop: Any, shapes: tuple[str, ...]) -> str:
    """The one of ``shapes`` whose template, drawn into the crop's box, overlaps the blob best (intersection over
    union)."""
    import torch

    hh, ww = crop.shape
    dy = ((torch.arange(hh, dtype=torch.float32) + 0.5) / hh * 2 - 1)[:, None].expand(hh, ww)
    dx = ((torch.arange(ww, dtype=torch.float32) + 0.5) / ww * 2 - 1)[None, :].expand(hh, ww)
    blob = torch.from_numpy(crop)
    best, best_iou = shapes[0], -1.0
    for shape in shapes:
        tpl = shape_mask(shape, dx, dy)
        iou = float((tpl & blob).sum()) / max(1.0, float((tpl | blob).sum()))
        if iou > best_iou:
            best, best_iou = shape, iou
    return best


def _agreement(obj: Obj, blob: Blob | None) -> dict[str, bool | None]:
    return {a: None if getattr(obj, a) is None else blob is not None and getattr(obj, a) == getattr(blob, a)
            for a in ATTRIBUTES}


def score(objects: tuple[Obj, ...], blobs: list[Blob], said_bg: str | None, found_bg: str) -> dict[str, float | None]:
    """Per-attribute fractions for the best matching of prompt objects to the largest blobs."""
    found: list[Blob | None] = list(blobs[:len(objects)]) + [None] * max(0, len(objects) - len(blobs))
    best: list[dict[str, bool | None]] = []
    for order in itertools.permutations(found):
        rows = [_agreement(o, b) for o, b in zip(objects, order, strict=True)]
        if not best or sum(v is True for r in rows for v in r.values()) > sum(v is True for r in best for v in r.values()):
            best = rows
    scores: dict[str, float | None] = {}
    for a in ATTRIBUTES:
        said = [r[a] for r in best if r[a] is not None]
        scores[a] = sum(bool(v) for v in said) / len(said) if said else None
    scores["background"] = None if said_bg is None else float(said_bg == found_bg)
    scores["count"] = float(len(blobs) == len(objects))
    scores["all"] = float(all(v in (None, 1.0) for v in scores.values()))
    return scores
