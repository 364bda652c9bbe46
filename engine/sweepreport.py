"""The run report's sweep tables and score columns, read from what images record.

A node that makes images may record in each image's ``meta``:

* ``timing``: ``seconds_per_image``, ``seconds_per_step``, ``peak_gpu_gib``
  (the ``sample`` node does), and
* ``scores``: name -> number (an evaluation node does).

For every swept node the report gets one table with a row per cell — its
axis values, the mean of those numbers over the cell's images and the cost
per image at ``[recipe] gpu_hour_price`` — including cells reused from the
cache, whose numbers are the ones recorded when they ran.
"""

from __future__ import annotations

from typing import Any

TIMING = ("seconds_per_image", "seconds_per_step", "peak_gpu_gib")


def _images(outputs: dict[str, Any] | None) -> list[Any]:
    from .ports import Images

    return [item for v in (outputs or {}).values() if isinstance(v, Images) for item in v]


def _mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 4) if values else None


def image_numbers(items: list[Any]) -> dict[str, float]:
    """Mean timing and ``score:<name>`` columns over images (only those they record)."""
    out: dict[str, float] = {}
    for key in TIMING:
        found = [float(i.meta["timing"][key]) for i in items if isinstance(i.meta.get("timing"), dict)
                 and isinstance(i.meta["timing"].get(key), (int, float))]
        if (mean := _mean(found)) is not None:
            out[key] = mean
    names: list[str] = []
    for i in items:
        scores = i.meta.get("scores")
        names += [k for k in (scores if isinstance(scores, dict) else {}) if k not in names]
    for name in names:
        found = [float(i.meta["scores"][name]) for i in items if isinstance(i.meta.get("scores"), dict)
                 and isinstance(i.meta["scores"].get(name), (int, float))]
        if (mean := _mean(found)) is not None:
            out[f"score:{name}"] = mean
    return out


def sweep_tables(plan: Any, result: Any) -> list[dict[str, Any]]:
    """One table per swept node: ``{"node", "axes", "rows"}``, each row a cell's values and numbers."""
    price = plan.checked.recipe.options.get("gpu_hour_price")
    tables = []
    for nid, cells in (getattr(plan.checked, "sweeps", {}) or {}).items():
        axes: list[str] = []
        rows = []
        for cid in cells:
            rn = plan.checked.nodes.get(cid)
            cell = (rn.cell if rn is not None else None) or {}
            axes += [a for a in cell.get("values", {}) if a not in axes]
            row: dict[str, Any] = {"cell": cid, "state": result.nodes.get(cid, "skipped"),
                                   **{a: v for a, v in cell.get("values", {}).items()}}
            items = _images(result.outputs.get(cid))
            if items:
                row["images"] = len(items)
            row.update(image_numbers(items))
            if isinstance(price, (int, float)) and isinstance(row.get("seconds_per_image"), float):
                row["cost_per_image"] = round(price * row["seconds_per_image"] / 3600, 6)
            rows.append(row)
        tables.append({"node": nid, "axes": axes, "rows": rows})
    return tables


def markdown(tables: list[dict[str, Any]], fmt: Any) -> list[str]:
    """Markdown lines of the sweep tables (empty when there are none)."""
    lines: list[str] = []
    for t in tables:
        extra = [c for c in ("images", *TIMING, "cost_per_image") if any(c in r for r in t["rows"])]
        extra += sorted({c for r in t["rows"] for c in r if c.startswith("score:")})
        cols = ["state", *t["axes"], *extra]
        lines += ["", f"## Sweep `{t['node']}`", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for r in t["rows"]:
            lines.append("| " + " | ".join(fmt(r.get(c)).replace("|", "\\|") for c in cols) + " |")
    return lines
