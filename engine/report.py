"""The run report: ``report.md`` and ``report.json`` in the run folder after every run.

For each node: what happened, wall time, seconds per step, images per second,
peak GPU memory (where there is a GPU) and the estimated cost per image from
``[recipe] gpu_hour_price``, and the mean of any ``scores`` the images record;
one table per sweep (see :mod:`.sweepreport`); artifacts (images, grids,
LoRAs) are linked, by paths inside the run folder only (a file a node wrote
elsewhere is named).  A node that writes a ``scores.json`` artifact (the
``evaluate`` node) also gets its per-image scores in the report, and where
those images came from a sweep, their per-cell means in that sweep's table.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any
from urllib.parse import quote

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
        scores = _scores(row["artifacts"])
        if scores:
            row["scores"] = scores
        rows.append(row)
    return rows


def _scores(artifacts: list[str]) -> dict[str, Any] | None:
    """The content of a node's ``scores.json`` artifact (metric, mean, per image), if it wrote one."""
    for a in artifacts:
        if Path(a).name == "scores.json":
            try:
                data = json.loads(Path(a).read_text())
            except (OSError, ValueError):
                return None
            return data if isinstance(data, dict) else None
    return None


def _score_lines(rows: list[dict[str, Any]]) -> list[str]:
    lines: list[str] = []
    for r in rows:
        data = r.get("scores")
        if not data:
            continue
        mean = data.get("mean") or {}
        keys = list(mean)
        images = [i for i in data.get("images") or [] if isinstance(i, dict)]
        cells = any(isinstance(i.get("sweep"), dict) for i in images)
        head = ["image", *(["cell"] if cells else []), "prompt", *keys]
        lines += ["", f"### {r['node']}: {data.get('metric')} ({data.get('model')})", "",
                  "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for img in images:
            vals = img.get("scores") or {}
            cell = [str((img.get("sweep") or {}).get("cell", ""))] if cells else []
            first = [str(img.get("name") or img.get("index")), *cell, str(img.get("prompt", ""))]
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in first) + " | "
                         + " | ".join(_fmt(vals.get(k)) for k in keys) + " |")
        lines.append("| **mean** | " + "| " * (len(head) - len(keys) - 1) + " | ".join(_fmt(mean[k]) for k in keys)
                     + " |")
    return ["", "## Scores", *lines] if lines else []


def write_report(plan: Any, result: Any, stats: dict[str, dict[str, Any]]) -> None:
    """Write report.json and report.md into the run folder (atomically)."""
    rows = node_rows(plan, result, stats)
    recipe = plan.checked.recipe
    data = {"recipe": recipe.name, "file": recipe.file, "run_id": result.run_id, "status": result.status,
            "seconds": round(result.seconds, 3), "gpu_hour_price": recipe.options.get("gpu_hour_price"),
            "nodes": rows,
            "sweeps": sweepreport.sweep_tables(plan, result, {r["node"]: r["scores"] for r in rows if r.get("scores")})}
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
    art_lines = [f"- {r['node']}: {_artifact_md(a, run_dir)}" for r in data["nodes"] for a in r["artifacts"]]
    lines += _score_lines(data["nodes"])
    if art_lines:
        lines += ["", "## Artifacts", "", *art_lines]
    return "\n".join(lines) + "\n"


def _artifact_md(path: str, run_dir: Path) -> str:
    """A link for a file inside the run folder; a file elsewhere is named, not linked (links stay inside)."""
    root = run_dir.resolve()
    try:
        rel = Path(path).resolve().relative_to(root).as_posix()
    except (ValueError, OSError):
        return f"`{path}` (outside the run folder)"
    target = quote(rel)
    return f"![{rel}]({target})" if rel.lower().endswith((".png", ".jpg", ".jpeg", ".webp")) else f"[{rel}]({target})"


def _atomic(path: Path, text: str) -> None:
    tmp = temp_name(path)
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
