"""The run report's sweep tables and score columns, read from what images record.

A node that makes images may record in each image's ``meta``:

* ``timing``: ``seconds_per_image``, ``seconds_per_step``, ``peak_gpu_gib``
  (the ``sample`` node does), and
* ``scores``: name -> number (an evaluation node does).

For every swept node the report gets one table with a row per cell — its
axis values, the mean of those numbers over the cell's images and the cost
per image at ``[recipe] gpu_hour_price`` — including cells reused from the
cache, whose numbers are the ones recorded when they ran.

A scoring node usually sits *downstream* of the sweep (``evaluate`` links to
the joined ``@study``), so its scores are not on the sweep's own images.
Such a node writes a ``scores.json`` artifact whose per-image rows carry the
image's cell (``"sweep": {"node", "cell"}``, see :func:`.sweep.cell_of`); the
table joins those rows to its cells by cell id and shows the mean of each
score per cell.  With one source of scores the columns are
``score:<name>``; with several (say a ``mini`` and a ``clip`` evaluation of
the same sweep) they are ``score:<node>.<name>``.
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


def _score_rows(data: Any) -> list[dict[str, Any]]:
    """The per-image rows of a ``scores.json`` that name a sweep cell (malformed rows are skipped)."""
    images = data.get("images") if isinstance(data, dict) else None
    return [r for r in (images if isinstance(images, list) else []) if isinstance(r, dict)
            and isinstance(r.get("sweep"), dict) and isinstance(r.get("scores"), dict)]


def score_sources(nid: str, scored: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Scoring node -> its ``scores.json`` rows of images from the sweep ``nid``, for nodes that scored any."""
    out = {}
    for node, data in scored.items():
        rows = [r for r in _score_rows(data) if r["sweep"].get("node") == nid]
        if rows:
            out[node] = rows
    return out


def cell_scores(cid: str, sources: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Per-cell ``score:`` columns: the mean of each score over the cell's scored images."""
    out: dict[str, Any] = {}
    for node, rows in sources.items():
        mine = [r["scores"] for r in rows if r["sweep"].get("cell") == cid]
        names = list(dict.fromkeys(k for s in mine for k in s))
        prefix = "score:" if len(sources) == 1 else f"score:{node}."
        for name in names:
            found = [float(s[name]) for s in mine if isinstance(s.get(name), (int, float))
                     and not isinstance(s.get(name), bool)]
            if (mean := _mean(found)) is not None:
                out[prefix + name] = mean
        if mine:
            out["scored" if len(sources) == 1 else f"scored:{node}"] = len(mine)
    return out


def sweep_tables(plan: Any, result: Any, scored: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """One table per swept node: ``{"node", "axes", "rows", "scored_by"}``, each row a cell's values and
    numbers.  ``scored`` maps a node to the content of the ``scores.json`` it wrote (see the module doc)."""
    price = plan.checked.recipe.options.get("gpu_hour_price")
    tables = []
    for nid, cells in (getattr(plan.checked, "sweeps", {}) or {}).items():
        sources = score_sources(nid, scored or {})
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
            row.update(cell_scores(cid, sources))
            rows.append(row)
        by = [{"node": n, "metric": (scored or {})[n].get("metric"), "model": (scored or {})[n].get("model")}
              for n in sources]
        tables.append({"node": nid, "axes": axes, "rows": rows, "scored_by": by})
    return tables


def markdown(tables: list[dict[str, Any]], fmt: Any) -> list[str]:
    """Markdown lines of the sweep tables (empty when there are none)."""
    lines: list[str] = []
    for t in tables:
        extra = [c for c in ("images", *TIMING, "cost_per_image") if any(c in r for r in t["rows"])]
        extra += list(dict.fromkeys(c for r in t["rows"] for c in r if c.startswith(("scored", "score:"))))
        cols = ["state", *t["axes"], *extra]
        lines += ["", f"## Sweep `{t['node']}`", ""]
        by = t.get("scored_by") or []
        if by:
            lines += ["Scores: " + "; ".join(f"`{b['node']}` ({b.get('metric')}, {b.get('model')})" for b in by)
                      + ", the mean over each cell's scored images.", ""]
        lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for r in t["rows"]:
            lines.append("| " + " | ".join(fmt(r.get(c)).replace("|", "\\|") for c in cols) + " |")
    return lines
