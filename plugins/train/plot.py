"""Draw the training loss curve as a PNG with Pillow (no plotting library needed)."""

from __future__ import annotations

from pathlib import Path

W, H, LEFT, RIGHT, TOP, BOTTOM = 800, 400, 70, 20, 30, 45


def _smooth(values: list[float], weight: float = 0.9) -> list[float]:
    out, acc = [], None
    for v in values:
        acc = v if acc is None else weight * acc + (1 - weight) * v
        out.append(acc)
    return out


def _fmt(v: float) -> str:
    return f"{v:.3g}"


def loss_curve(steps: list[int], losses: list[float], path: Path, title: str = "training loss") -> Path:
    """Plot raw loss (light) and its moving average (dark) against step; write ``path``."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    d.text((LEFT, 8), title, fill="black")
    x0, x1, y0, y1 = LEFT, W - RIGHT, H - BOTTOM, TOP
    d.rectangle((x0, y1, x1, y0), outline="black")
    if not steps:
        d.text((W // 2 - 40, H // 2), "no steps", fill="gray")
        img.save(path)
        return path
    lo, hi = min(losses), max(losses)
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    s_lo, s_hi = min(steps), max(steps)
    span = max(1, s_hi - s_lo)

    def xy(s: float, v: float) -> tuple[float, float]:
        return x0 + (s - s_lo) / span * (x1 - x0), y0 - (v - lo) / (hi - lo) * (y0 - y1)

    for frac in (0.0, 0.25, 0.5, 0.75, 1.0):
        v = lo + frac * (hi - lo)
        _, y = xy(s_lo, v)
        d.line((x0 - 4, y, x0, y), fill="black")
        d.text((4, y - 6), _fmt(v), fill="black")
        s = s_lo + frac * span
        x, _ = xy(s, lo)
        d.line((x, y0, x, y0 + 4), fill="black")
        d.text((x - 12, y0 + 8), str(int(round(s))), fill="black")
    d.text(((x0 + x1) // 2 - 12, H - 18), "step", fill="black")
    if len(steps) > 1:
        d.line([xy(s, v) for s, v in zip(steps, losses, strict=True)], fill=(170, 190, 235), width=1)
        d.line([xy(s, v) for s, v in zip(steps, _smooth(losses), strict=True)], fill=(20, 60, 160), width=2)
    else:
        x, y = xy(steps[0], losses[0])
        d.ellipse((x - 3, y - 3, x + 3, y + 3), fill=(20, 60, 160))
    img.save(path)
    return path
