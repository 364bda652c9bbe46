"""The run report: ``report.md`` and ``report.json`` in the run folder after every run.

For each node: what happened, wall time, seconds per step, images per second,
peak GPU memory (where there is a GPU) and the estimated cost per image from
``[recipe] gpu_hour_price``, and the mean of any ``scores`` the images record;
one table per sweep (see :mod:`.sweepreport`); artifacts (images, grids,
LoRAs) are linked.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from . import sweepreport
from .paths import temp_name


def _count_images(outputs: dict[str, Any]) -> int:
    from .ports import Images

    return sum(len(v) for v in outputs.values() if isinstance(v, Images))


def _items(outputs: dict[str, Any]) -> list[Any]:
    from .ports import Images

    return [item for v in outputs.values() if isinstance(v, Images) for item in v]


def node_rows(plan: Any, result: Any, stats: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    price = plan.checked.recipe.options.get("gpu_hour_price")
    rows = []
    arts = {e.node: e.data.get("artifacts", []) for e in result.events if e.event in ("node_finished", "node_cached")}
    for nid, np_ in plan.nodes.items():
        st = stats.get(nid, {})
        row: dict[str, Any] = {"node": nid, "type": np_.type, "state": result.nodes.get(nid, "skipped"),
                               "reason": np_.reason if result.nodes.get(nid) == "ran" else (np_.source or "")}
        secs = st.get("seconds")
        if secs is not None:
            row["seconds"] = round(secs, 3)
            prog = st.get("progress") or {}
            if prog.get("total"):
                row["steps"] = prog["total"]
                row["seconds_per_step"] = round(secs / prog["total"], 4)
            n_img = _count_images(st.get("outputs", {}))
            if n_img and np_.type not in ("save", "safety_check", "grid", "sweep"):
                row["images"] = n_img
                row["images_per_second"] = round(n_img / secs, 4) if secs > 0 else None
                row["seconds_per_image"] = round(secs / n_img, 4)
                row.update({k: v for k, v in sweepreport.image_numbers(_items(st["outputs"])).items()
                            if k.startswith("score:")})
                if isinstance(price, (int, float)):
                    row["cost_per_image"] = round(price * secs / 3600 / n_img, 6)
            if st.get("peak_gpu_bytes") is not None:
                row["peak_gpu_gib"] = round(st["peak_gpu_bytes"] / 2**30, 2)
        row["artifacts"] = arts.get(nid, [])
        rows.append(row)
    return rows


def write_report(plan: Any, result: Any, stats: dict[str, dict[str, Any]]) -> None:
    """Write report.json and report.md into the run folder (atomically)."""
    rows = node_rows(plan, result, stats)
    recipe = plan.checked.recipe
    data = {"recipe": recipe.name, "file": recipe.file, "run_id": result.run_id, "status": result.status,
            "seconds": round(result.seconds, 3), "gpu_hour_price": recipe.options.get("gpu_hour_price"),
            "nodes": rows, "sweeps": sweepreport.sweep_tables(plan, result)}
    _atomic(plan.run_dir / "report.json", json.dumps(data, indent=1, default=str))
    _atomic(plan.run_dir / "report.md", _markdown(data, plan.run_dir))


def _fmt(v: Any) -> str:
    return "" if v is None else (f"{v:g}" if isinstance(v, float) else str(v))


def _markdown(data: dict[str, Any], run_dir: Path) -> str:
    lines = [f"# Run report: {data['recipe']}", "",
             f"Run `{data['run_id']}` — status **{data['status']}** in {data['seconds']:.2f} s.", ""]
    cols = ["node", "type", "state", "seconds", "steps", "seconds_per_step", "images", "images_per_second",
            "seconds_per_image", "peak_gpu_gib", "cost_per_image"]
    cols += sorted({c for r in data["nodes"] for c in r if c.startswith("score:")})
    lines.append("| " + " | ".join(cols) + " |")
    lines.append("|" + "---|" * len(cols))
    for r in data["nodes"]:
        lines.append("| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |")
    lines += sweepreport.markdown(data.get("sweeps") or [], _fmt)
    if data.get("gpu_hour_price") is not None:
        lines += ["", f"Cost estimates use gpu_hour_price = {data['gpu_hour_price']} per GPU hour."]
    art_lines = []
    for r in data["nodes"]:
        for a in r["artifacts"]:
            try:
                rel = os.path.relpath(a, run_dir)
            except ValueError:
                rel = a
            is_img = rel.lower().endswith((".png", ".jpg", ".jpeg", ".webp"))
            art_lines.append(f"- {r['node']}: " + (f"![{rel}]({rel})" if is_img else f"[{rel}]({rel})"))
    if art_lines:
        lines += ["", "## Artifacts", "", *art_lines]
    return "\n".join(lines) + "\n"


def _atomic(path: Path, text: str) -> None:
    tmp = temp_name(path)
    tmp.write_text(text)
    os.replace(tmp, path)
