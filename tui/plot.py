"""A live line plot of training metrics (loss, learning rate) drawn with braille characters.

No plotting dependency: each character cell holds 2x4 dots, so a plot of W x H
cells has 2W x 4H points.
"""

from __future__ import annotations

import math

from rich.console import Group
from rich.text import Text
from textual.widget import Widget

_BITS = ((0x01, 0x08), (0x02, 0x10), (0x04, 0x20), (0x40, 0x80))  # [row][column]
PREFERRED = ("loss", "lr", "learning_rate")
MAX_POINTS = 5000


def _resample(values: list[float], n: int) -> list[float]:
    """Shrink ``values`` to ``n`` points by averaging buckets (or keep them if fewer)."""
    if len(values) <= n:
        return values
    out = []
    for i in range(n):
        a, b = i * len(values) // n, max((i + 1) * len(values) // n, i * len(values) // n + 1)
        out.append(sum(values[a:b]) / (b - a))
    return out


def braille_plot(values: list[float], width: int, height: int) -> list[str]:
    """``height`` lines of ``width`` braille characters tracing ``values`` (finite ones) across the width."""
    width, height = max(1, width), max(1, height)
    cols, rows = 2 * width, 4 * height
    vals = _resample([v for v in values if math.isfinite(v)], cols)
    grid = [[0] * width for _ in range(height)]
    if not vals:
        return ["\u2800" * width] * height
    lo, hi = min(vals), max(vals)
    ys = [rows // 2 if hi == lo else round((hi - v) / (hi - lo) * (rows - 1)) for v in vals]
    xs = [0] if len(vals) == 1 else [round(i * (cols - 1) / (len(vals) - 1)) for i in range(len(vals))]
    points = list(zip(xs, ys))
    for (x0, y0), (x1, y1) in zip(points, points[1:] or points):
        for x in range(x0, max(x0, x1) + 1):
            t = 0.0 if x1 == x0 else (x - x0) / (x1 - x0)
            y_here = round(y0 + (y1 - y0) * t)
            y_next = round(y0 + (y1 - y0) * min(1.0, t + 1 / max(1, x1 - x0))) if x1 != x0 else y1
            for yy in range(min(y_here, y_next), max(y_here, y_next) + 1):
                grid[yy // 4][x // 2] |= _BITS[yy % 4][x % 2]
    return ["".join(chr(0x2800 + c) for c in row) for row in grid]


def _fmt(v: float) -> str:
    return f"{v:.3g}" if 1e-3 <= abs(v) < 1e4 or v == 0 else f"{v:.2e}"


class MetricPlot(Widget):
    """Plots the latest node's metrics; one band per metric (at most two)."""

    DEFAULT_CSS = "MetricPlot { height: 8; }"

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.border_title = "Metrics"
        self.node: str | None = None
        self.series: dict[str, dict[str, list[float]]] = {}

    def on_mount(self) -> None:
        self.display = False

    def add_points(self, node: str, points: list[tuple[int, dict[str, float]]]) -> None:
        if not points:
            return
        series = self.series.setdefault(node, {})
        for _step, metrics in points:
            for key, value in metrics.items():
                values = series.setdefault(key, [])
                values.append(float(value))
                if len(values) > MAX_POINTS:
                    del values[: len(values) - MAX_POINTS]
        self.node = node
        self.border_title = f"Metrics: {node}"
        self.display = True
        self.refresh()

    def clear(self) -> None:
        self.series.clear()
        self.node = None
        self.display = False

    def metrics(self) -> list[str]:
        series = self.series.get(self.node or "", {})
        keys = [k for k in PREFERRED if k in series] + [k for k in series if k not in PREFERRED]
        return keys[:2]

    def render(self) -> Group:
        keys = self.metrics()
        if not keys:
            return Group(Text("no metrics yet", style="dim"))
        if self.content_size.height < 4 * len(keys):
            keys = keys[:1]  # too short for two bands: the first metric (loss) only
        width = max(1, self.content_size.width)
        band = max(1, (self.content_size.height - len(keys)) // len(keys))
        parts: list[Text] = []
        colors = ("bold magenta", "bold cyan")
        for key, color in zip(keys, colors):
            values = self.series[self.node][key]
            finite = [v for v in values if math.isfinite(v)]
            label = f"{key} {_fmt(values[-1])}" + (f"  min {_fmt(min(finite))} max {_fmt(max(finite))}"
                                                    if finite else "")
            parts.append(Text(label[:width], style=color))
            parts += [Text(line, style=color.split()[-1]) for line in braille_plot(values, width, band)]
        return Group(*parts)
