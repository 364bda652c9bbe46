"""The bench's targets and the human-readable table it prints last."""

from __future__ import annotations

from typing import Any

# the targets: (work, result section, row, field, stock here, limit)
TARGETS = [
    ("sample 28 steps, lossless", "sample", "dev-lossless", "s_per_image", "5.27 s", 4.0),
    ("sample 28 steps, go_fast", "sample", "dev-go_fast", "s_per_image", "-", 2.6),
    ("sample schnell 4 steps, go_fast", "sample", "schnell-go_fast", "s_per_image", "0.85 s", 0.45),
    ("train step rank 16, no checkpointing", "train", "no_ckpt", "s_per_step", "0.58 s", 0.45),
    ("train step, gradient checkpointing", "train", "ckpt", "s_per_step", "0.87 s", 0.65),
    ("train at 1024 on a 24 GB card: peak GiB", "train", "fp8_ckpt_24gb", "peak_reserved_gib", "-", 22.0),
    ("one-time compile per shape", "sample", "dev-lossless", "compile_warmup_s", "-", 30.0),
    ("engine overhead (sample node vs bare pipeline)", "sample", "dev-lossless", "engine.overhead_run_pct", "-",
     2.0),
    ("engine overhead, schnell go_fast", "sample", "schnell-go_fast", "engine.overhead_run_pct", "-", 2.0),
]

MET = {True: "yes", False: "NO", None: "n/a"}  # a target met, missed, or not judged (tiny/CPU runs)


def _field(row: dict[str, Any], path: str) -> Any:
    for part in path.split("."):
        row = row.get(part) if isinstance(row, dict) else None
    return row


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The targets with what this run measured (only meaningful with full-size shapes on an H100)."""
    out = []
    for work, section, row, field, stock, limit in TARGETS:
        value = _field(results.get(section, {}).get(row, {}), field)
        met = None if value is None or results.get("mode") == "tiny" else value <= limit
        out.append({"work": work, "stock_here": stock, "target": f"<= {limit:g}", "measured": value, "met": met})
    return out


def _fmt(v: Any, spec: str = ".3f") -> str:
    return "-" if v is None else format(v, spec) if isinstance(v, float) else str(v)


# the tables of render_table: (heading, field (a dotted path into the row), format, column width)
Column = tuple[str, str, str, int]
SAMPLE_COLUMNS: list[Column] = [
    ("s/image", "s_per_image", ".3f", 9), ("s/step", "s_per_step", ".4f", 9), ("peak GiB", "peak_gib", ".1f", 10),
    ("compile s", "compile_warmup_s", ".1f", 10), ("x stock", "ratio_to_stock", ".3f", 9),
    ("Δ block", "block_rel_diff", ".4f", 9), ("Δ transf.", "transformer_rel_diff", ".4f", 11),
    ("Δ image", "image_rel_diff", ".4f", 9), ("overhead %", "engine.overhead_run_pct", ".1f", 11)]
GENERATION_COLUMNS: list[Column] = [
    ("s/image", "s_per_image", ".3f", 9), ("s/step", "s_per_step", ".4f", 9), ("peak GiB", "peak_gib", ".1f", 10),
    ("x stock", "ratio_to_stock", ".3f", 9), ("x dev 28", "ratio_to_dev_28_steps", ".3f", 10)]
TRAIN_COLUMNS: list[Column] = [
    ("s/step", "s_per_step", ".4f", 9), ("peak GiB", "peak_gib", ".1f", 10),
    ("reserved", "peak_reserved_gib", ".1f", 10), ("x stock", "ratio_to_stock", ".3f", 9)]


def _table(title: str, width: int, columns: list[Column], rows: dict[str, dict[str, Any]]) -> list[str]:
    """A heading line, a rule, then one line per row: its name, then each column's field formatted (``-`` if absent);
    a skipped row says why at the end."""
    head = f"{title:<{width}}" + "".join(f"{label:>{w}}" for label, _, _, w in columns)
    lines = [head, "-" * len(head)]
    for name, r in rows.items():
        cells = "".join(f"{_fmt(_field(r, field), spec):>{w}}" for _, field, spec, w in columns)
        lines.append(f"{name:<{width}}{cells}" + (f"  skipped: {r['skipped']}" if r.get("skipped") else ""))
    return lines


def render_table(results: dict[str, Any]) -> str:
    """The human-readable summary printed last."""
    lines = [f"fluxkiln bench — {results.get('gpu', '?')}, torch {results.get('torch', '?')}, "
             f"diffusers {results.get('diffusers', '?')}, {results.get('mode')}, {results.get('date')}", ""]
    lines += _table("sample", 24, SAMPLE_COLUMNS, results.get("sample", {}))
    if results.get("generation"):
        lines += ["", *_table("generation", 18, GENERATION_COLUMNS, results["generation"])]
    if results.get("train"):
        lines += ["", *_table("train", 18, TRAIN_COLUMNS, results["train"])]
    steps = {n: r["gpu_step"] for n, r in results.get("sample", {}).items() if r.get("gpu_step")}
    if steps:
        lines += ["", "one transformer forward, GPU kernel ms by kind (idle = GPU waiting)"]
        for name, g in steps.items():
            kinds = ", ".join(f"{k} {v:.1f}" for k, v in g["ms_by_kind"].items())
            lines.append(f"{name:<24}{g['wall_ms']:>8.1f} ms  idle {g['idle_pct']}%  {kinds}")
    if results.get("targets"):
        lines += ["", f"{'target':<48}{'stock':>8}{'target':>9}{'measured':>10}  met"]
        for t in results["targets"]:
            lines.append(f"{t['work']:<48}{t['stock_here']:>8}{t['target']:>9}{_fmt(t['measured']):>10}  "
                         f"{MET[t['met']]}")
    return "\n".join(lines + _errors(results))


def render_e2e(results: dict[str, Any]) -> str:
    """The end-to-end summary: one row per fresh process, then the targets."""
    e2e = results.get("e2e", {})
    head = f"{'process':<22}{'wall s':>8}{'start s':>9}{'load s':>8}{'to loaded':>11}{'images s':>22}{'1-image s':>11}"
    lines = [f"fluxkiln bench --e2e — {e2e.get('size')}², {e2e.get('steps')} steps, {results.get('mode')}, "
             f"folder {e2e.get('folder', {}).get('path')}", "", head, "-" * len(head)]
    rows = [(name, e2e.get(name)) for name in ("stock", "fluxkiln_cold", "fluxkiln_warm", "fluxkiln_after_warmup")]
    rows += [(f"{name} ({i})", r) for name in ("stock", "fluxkiln_warm")
             for i, r in enumerate(e2e.get(f"{name}_again", []), 2)]
    for name, r in rows:
        if not r:
            continue
        start = r.get("startup_s", (r.get("python_start_s") or 0) + (r.get("import_s") or 0))
        load = r.get("load_model_s", r.get("load_s"))
        imgs = " / ".join(f"{v:.2f}" for v in r["images_s"])
        lines.append(f"{name:<22}{_fmt(r['wall_s'], '.2f'):>8}{_fmt(start, '.2f'):>9}{_fmt(load, '.2f'):>8}"
                     f"{_fmt(r['to_loaded_s'], '.2f'):>11}{imgs:>22}{_fmt(r['one_image_process_s'], '.2f'):>11}")
    if e2e.get("targets"):
        lines += ["", f"{'target':<58}{'measured':>10}{'limit':>8}  met"]
        for t in e2e["targets"]:
            median = f"  (medians of {t['medians_of']} runs)" if t.get("medians_of") else ""
            lines.append(f"{t['work']:<58}{_fmt(t['measured']):>10}{_fmt(t['target']):>8}  {MET[t['met']]}{median}")
    return "\n".join(lines + _errors(results))


def _errors(results: dict[str, Any]) -> list[str]:
    """One line per part of the bench that failed."""
    return [f"error in {e['part']}: {e['error']}" for e in results.get("errors", [])]
