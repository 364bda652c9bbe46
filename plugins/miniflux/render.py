"""Draw mini-flux scenes with torch, a whole batch at once, on any device (the GPU while training).

Every shape fills the box [-1, 1]^2 of its own coordinates (centre at the object's position, one unit =
the object's half-extent), so one size means the same extent for every shape and the checker can fit a
shape to a blob's bounding box.
"""

from __future__ import annotations

import math
from typing import Any

from .world import COLOURS, DRAWABLE, Layout

MAX_OBJECTS = 2


def _outline(corners: int, inner: float | None = None) -> list[tuple[float, float]]:
    """A regular polygon's corners (a star's with ``inner``: every other corner at that radius), the first at the
    top, stretched to fill the box [-1, 1]^2."""
    points = []
    steps = 2 * corners if inner else corners
    for k in range(steps):
        radius = inner if inner and k % 2 else 1.0
        angle = -math.pi / 2 + k * 2 * math.pi / steps
        points.append((radius * math.cos(angle), radius * math.sin(angle)))
    return _filling(points)


def _filling(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """``points`` moved and stretched to fill the box [-1, 1]^2 (the checker draws a template into a blob's box)."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    cx, cy = (max(xs) + min(xs)) / 2, (max(ys) + min(ys)) / 2
    hx, hy = (max(xs) - min(xs)) / 2, (max(ys) - min(ys)) / 2
    return [((x - cx) / hx, (y - cy) / hy) for x, y in points]


def _heart(n: int = 48) -> list[tuple[float, float]]:
    """The classic heart curve, its point at the bottom (y grows downwards)."""
    return _filling([(16 * math.sin(t) ** 3,
                      -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)))
                     for t in (2 * math.pi * k / n for k in range(n))])


def _moon(n: int = 24) -> list[tuple[float, float]]:
    """A crescent opening to the right: the unit circle's left arc, back along a smaller circle's."""
    outer = [(math.cos(a), math.sin(a)) for a in (math.radians(60 + 240 * k / n) for k in range(n + 1))]
    cx = 0.4667
    r = math.hypot(outer[0][0] - cx, outer[0][1])  # the inner circle meets the outer one at the arc's two ends
    ends = [math.atan2(y, x - cx) for x, y in (outer[-1], outer[0])]
    inner = [(cx + r * math.cos(a), r * math.sin(a))
             for a in (ends[0] - (ends[0] - ends[1] + 2 * math.pi) % (2 * math.pi) * k / n for k in range(1, n))]
    return _filling(outer + inner)


# every shape drawn as one polygon (the others below are formulas); y grows downwards, the box is [-1, 1]^2
POLYGONS: dict[str, list[tuple[float, float]]] = {
    "star": _outline(5, inner=0.45), "pentagon": _outline(5), "sparkle": _outline(4, inner=0.35),
    "hexagram": _outline(6, inner=0.58),
    "heart": _heart(), "moon": _moon(),
    "arrow": [(-1, -0.35), (0.2, -0.35), (0.2, -1), (1, 0), (0.2, 1), (0.2, 0.35), (-1, 0.35)],
    "house": [(-1, 1), (-1, -0.1), (0, -1), (1, -0.1), (1, 1)],
    "kite": [(0, -1), (1, -0.4), (0, 1), (-1, -0.4)],
    "trapezoid": [(-0.45, -1), (0.45, -1), (1, 1), (-1, 1)],
    "chevron": [(-1, 0.3), (0, -1), (1, 0.3), (1, 1), (0, -0.3), (-1, 1)],
    "tee": [(-1, -1), (1, -1), (1, -0.4), (0.3, -0.4), (0.3, 1), (-0.3, 1), (-0.3, -0.4), (-1, -0.4)],
    "ell": [(-1, -1), (-0.35, -1), (-0.35, 0.35), (1, 0.35), (1, 1), (-1, 1)],
}


def _inside(points: list[tuple[float, float]], dx: Any, dy: Any) -> Any:
    """Even-odd test of the closed polygon ``points``."""
    import torch

    odd = torch.zeros_like(dx, dtype=torch.bool)
    for (x1, y1), (x2, y2) in zip(points, points[1:] + points[:1], strict=True):
        if y1 == y2:
            continue
        crosses = (y1 > dy) != (y2 > dy)
        at = x1 + (dy - y1) * (x2 - x1) / (y2 - y1)
        odd ^= crosses & (dx < at)
    return odd


def shape_mask(shape: str, dx: Any, dy: Any) -> Any:
    """Boolean tensor: which points (dx, dy) in the shape's own box coordinates lie inside ``shape``."""
    inside = (dx.abs() <= 1) & (dy.abs() <= 1)
    if shape == "circle":
        return dx * dx + dy * dy <= 1
    if shape == "square":
        return inside
    if shape == "triangle":
        return inside & (dx.abs() <= (dy + 1) / 2)
    if shape == "hexagon":
        return inside & (dx.abs() <= 1 - dy.abs() / 2)
    if shape == "cross":
        return inside & ((dx.abs() <= 1 / 3) | (dy.abs() <= 1 / 3))
    if shape == "diamond":
        return dx.abs() + dy.abs() <= 1
    if shape == "bowtie":  # two triangles joined at their tips (a narrow waist), pointing left and right
        return inside & (dy.abs() <= dx.abs() + 0.25)
    if shape == "ring":
        return (dx * dx + dy * dy <= 1) & (dx * dx + dy * dy >= 0.3)
    if shape == "octagon":
        return inside & (dx.abs() + dy.abs() <= math.sqrt(2))
    if shape in POLYGONS:
        return _inside(POLYGONS[shape], dx, dy)
    raise ValueError(f"unknown shape {shape!r}; known: {', '.join(DRAWABLE)}")


def grid(width: int, height: int, device: Any = "cpu", supersample: int = 1) -> tuple[Any, Any]:
    """Pixel-centre coordinates (fractions of width and height), shaped (H, W)."""
    import torch

    w, h = width * supersample, height * supersample
    u = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w
    v = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h
    return u[None, :].expand(h, w), v[:, None].expand(h, w)


def render(layouts: list[Layout], width: int, height: int, device: Any = "cpu", supersample: int = 2, *,
           masks: bool = False) -> Any:
    """Images (B, 3, height, width) in [-1, 1], antialiased by ``supersample``-times supersampling; with
    ``masks``, also each pixel's object coverage (B, height, width) in [0, 1] (0: background).

    Vectorised over the batch: one pass per object slot and shape, whatever the batch size."""
    import torch
    import torch.nn.functional as F

    names = list(COLOURS)
    palette = torch.tensor([COLOURS[n] for n in names], dtype=torch.float32, device=device) / 127.5 - 1
    u, v = grid(width, height, device, supersample)
    short = min(width, height)
    sx, sy = width / short, height / short
    bg = torch.tensor([names.index(lay.background) for lay in layouts], device=device)
    out = palette[bg][:, :, None, None].expand(-1, -1, *u.shape).clone()
    cover = torch.zeros((len(layouts), *u.shape), device=device)
    for slot in range(max((len(lay.objects) for lay in layouts), default=0)):
        rows = [(i, lay.objects[slot]) for i, lay in enumerate(layouts) if len(lay.objects) > slot]
        idx = torch.tensor([i for i, _ in rows], device=device)
        x, y, r = (torch.tensor([getattr(o, k) for _, o in rows], device=device)[:, None, None] for k in "xyr")
        dx, dy = (u[None] - x) * sx / r, (v[None] - y) * sy / r
        mask = torch.zeros_like(dx, dtype=torch.bool)
        for shape in {o.shape for _, o in rows}:
            pick = torch.tensor([o.shape == shape for _, o in rows], device=device)[:, None, None]
            mask |= pick & shape_mask(shape, dx, dy)
        colour = palette[torch.tensor([names.index(o.colour) for _, o in rows], device=device)]
        part = out[idx]
        out[idx] = torch.where(mask[:, None], colour[:, :, None, None], part)
        cover[idx] = torch.where(mask, 1.0, cover[idx])
    if supersample > 1:
        out = F.avg_pool2d(out, supersample)
        cover = F.avg_pool2d(cover[:, None], supersample)[:, 0]
    return (out, cover) if masks else out


def to_pil(images: Any) -> list[Any]:
    """[-1, 1] tensors (B, 3, H, W) -> PIL images."""
    from PIL import Image

    arr = ((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]
