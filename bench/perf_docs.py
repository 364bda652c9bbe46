"""Generate the tables of the documentation's performance page from the committed benchmark results.

    python bench/perf_docs.py   # rewrites the tables in docs/performance.md, generation.md and gpus-many.md

The newest ``bench/*-full.json`` (by its ``date``, then its name) written by ``fluxkiln bench`` supplies
the sampling, training, kernel and target tables; ``bench/watch_overhead.json`` the watch-mode table; the
newest ``bench/*-generation.json`` (``fluxkiln bench --generation``) the Full HD and hybrid tables;
``bench/hybrid_quality.json`` (``bench/hybrid_quality.py``) the hybrid's quality table and the verdict
on when it is worth it, written from its numbers.
The newest ``bench/*-e2e.json`` (``fluxkiln bench --e2e``) supplies the end-to-end tables, the newest
``bench/*-speed.json`` (``fluxkiln bench --only sample`` with the CUDA-graphs and step-cache rows) the speed-path
and engine-phase tables, and the newest ``bench/*-quality.json`` or ``*-speed.json`` with a quality guard
(``fluxkiln bench --quality``, or ``bench/step_cache_quality.py`` on a CPU) the quality-guard table.
Every ``bench/*-gpus-*.json`` (``fluxkiln bench --gpus N``) is a row of the many-GPU table.
Each table sits between ``<!-- bench:NAME:start -->`` and ``<!-- bench:NAME:end -->`` markers in the
page; a test fails when the page and the JSON disagree.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

from fluxkiln.engine.docs import replace_between

HERE = Path(__file__).resolve().parent
PAGE = HERE.parent / "docs" / "performance.md"
GENERATION_PAGE = HERE.parent / "docs" / "generation.md"
GENERATION_TABLES = ("generation-source", "fullhd", "hybrid", "hybrid-quality")
GENERATION_ONLY = ("hybrid-quality",)  # blocks on the generation page only
GPUS_PAGE = HERE.parent / "docs" / "gpus-many.md"
GPUS_TABLES = ("gpus",)
OWN_PAGE_ONLY = GENERATION_ONLY + GPUS_TABLES  # not on the performance page
HYBRID_QUALITY = "hybrid_quality.json"  # written by bench/hybrid_quality.py

SAMPLE_ROWS = {
    "dev-stock": "dev, 28 steps, stock diffusers",
    "dev-lossless": "dev, 28 steps, lossless (`go_fast = false`)",
    "dev-go_fast": "dev, 28 steps, `go_fast` (fp8)",
    "schnell-stock": "schnell, 4 steps, stock diffusers",
    "schnell-go_fast": "schnell, 4 steps, `go_fast` (fp8)",
}
TRAIN_ROWS = {
    "no_ckpt": "no gradient checkpointing",
    "ckpt": "`gradient_checkpointing = true`",
    "ckpt_every_2nd": "checkpointing, `gradient_checkpointing_interval = 2`",
    "fp8_ckpt_24gb": ("24 GB card: `quantize = \"fp8\"`, `offload = \"model\"`, checkpointing, "
                      "allocator capped at 22 GiB"),
}
KERNEL_KINDS = [("gemm", "bf16 GEMM"), ("gemm_fp8", "fp8 GEMM"), ("attention", "attention"),
                ("triton_fused", "fused (Inductor)"), ("other", "other")]


def num(value: float | None, digits: int = 3, unit: str = "") -> str:
    if value is None:
        return "–"
    text = f"{value:.{digits}f}"
    return f"{text.lstrip('-') if float(text) == 0 else text}{unit}"   # no "-0.0"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join([*lines, *("| " + " | ".join(r) + " |" for r in rows)])


def newest_full(bench: Path, kind: str = "full") -> tuple[Path, dict]:
    found = [(json.loads(p.read_text()), p) for p in bench.glob(f"*-{kind}.json")]
    if not found:
        raise SystemExit(f"no {bench}/*-{kind}.json: run `fluxkiln bench --out {bench}/<card>-<date>-{kind}.json`")
    data, path = max(found, key=lambda dp: (dp[0].get("date", ""), dp[1].name))
    return path, data


def newest_with(bench: Path, kinds: tuple[str, ...], key: str) -> tuple[Path, dict]:
    """The newest ``bench/*-KIND.json`` of any of ``kinds`` that has ``key`` (by its date, then its name)."""
    found = [(d, p) for kind in kinds for p in bench.glob(f"*-{kind}.json")
             if key in (d := json.loads(p.read_text()))]
    if not found:
        raise SystemExit(f"no {bench}/*-{{{','.join(kinds)}}}.json with {key!r}")
    data, path = max(found, key=lambda dp: (dp[0].get("date", ""), dp[1].name))
    return path, data


def source(path: Path, d: dict) -> str:
    return (f"**{d['gpu']}**, torch {d['torch']}, diffusers {d['diffusers']}, {d['date']}: one run of "
            f"`fluxkiln bench` (`bench/{path.name}`), FLUX.1 shapes at 1024×1024 with {d['mode'].replace('-', ' ')}, "
            "batch 1, stock diffusers/peft measured in the same process on the same work.")


def sample_table(d: dict) -> str:
    rows = []
    for key, label in SAMPLE_ROWS.items():
        r = d["sample"].get(key)
        if r is None:
            continue
        diffs = [r.get(k) for k in ("block_rel_diff", "transformer_rel_diff", "image_rel_diff")]
        rows.append([label, num(r["s_per_image"]), num(r.get("ratio_to_stock", 1.0), 2), num(r["peak_gib"], 1),
                     num(r.get("compile_warmup_s"), 1, " s"), num(r.get("engine", {}).get("overhead_run_pct"), 1, " %"),
                     "–" if None in diffs else " / ".join(f"{x:.4f}" for x in diffs)])
    return table(["sample", "s/image", "× stock", "peak GiB", "first image: compile", "engine overhead",
                  "Δ block / transformer / image"], rows)


def stages_table(d: dict) -> str:
    keys = ["transformer", "text_encoders", "vae_decode", "to_images", "other"]
    rows = [[SAMPLE_ROWS[k], *(num(d["sample"][k]["stages_s"].get(s)) for s in keys)]
            for k in SAMPLE_ROWS if k in d["sample"] and "stages_s" in d["sample"][k]]
    return table(["seconds per image", "transformer", "text encoders", "VAE decode", "to images", "rest"], rows)


def gpu_step_table(d: dict) -> str:
    rows = []
    for key, label in SAMPLE_ROWS.items():
        step = d["sample"].get(key, {}).get("gpu_step")
        if step:
            by_kind = step["ms_by_kind"]
            rows.append([label, num(step["wall_ms"], 1), *(num(by_kind.get(k), 1) for k, _ in KERNEL_KINDS),
                         num(step["idle_pct"], 1, " %")])
    return table(["one transformer forward, ms", "wall", *(name for _, name in KERNEL_KINDS), "GPU idle"], rows)


def train_table(d: dict) -> str:
    rows = []
    for key, label in TRAIN_ROWS.items():
        r, stock = d["train"].get(key), d["train"].get(f"{key}-stock", {})
        if r is None:
            continue
        rows.append([label, num(r["s_per_step"]), num(stock.get("s_per_step")),
                     f"{num(r['peak_gib'], 1)} ({num(r.get('peak_reserved_gib'), 1)})",
                     "–" if not stock else f"{num(stock['peak_gib'], 1)} ({num(stock.get('peak_reserved_gib'), 1)})"])
    return table(["train_lora, rank 16 on every block linear, 1024²", "s/step", "stock peft s/step",
                  "peak GiB (reserved)", "stock peak GiB (reserved)"], rows)


def kernels_table(d: dict) -> str:
    rows = [[f"`{name}`", num(k["ms"]), num(k["tflops"], 1)] for name, k in d["kernels"].items()
            if isinstance(k, dict) and "ms" in k]  # not the per-shape fp8 table (gemm_fp8_shapes)
    return table(["kernel at FLUX's 1024² shapes", "ms", "TFLOP/s"], rows)


def unit_of(work: str) -> str:
    return " GiB" if "GiB" in work else " %" if "overhead" in work else " s"


def targets_table(d: dict) -> str:
    rows = []
    for t in d["targets"]:
        unit = unit_of(t["work"])
        target = t["target"].replace("<=", "≤").strip()
        rows.append([t["work"], f"{target}{unit}", f"{t['measured']:g}{unit}",
                     t["stock_here"] if t["stock_here"] != "-" else "–", "**yes**" if t["met"] else "**no**"])
    return table(["target", "goal", "measured", "stock, when the goal was set", "met"], rows)


def generation_source(path: Path, d: dict) -> str:
    return (f"**{d['gpu']}**, torch {d['torch']}, diffusers {d['diffusers']}, {d['date']}: "
            f"`fluxkiln bench --generation` (`bench/{path.name}`), FLUX.1 shapes with {d['mode'].replace('-', ' ')}, "
            "median of the timed runs after a warm-up, whole engine runs.")


def fullhd_table(d: dict) -> str:
    g = d["generation"]
    labels = {"fullhd-stock": "stock diffusers `FluxPipeline`, eager bf16 (generates 1920×1088)",
              "fullhd-lossless": "fluxkiln lossless (`go_fast = false`)",
              "fullhd-go_fast": "fluxkiln `go_fast` (fp8 matmuls, lossy)"}
    rows = [[label, num(g[k]["s_per_image"], 2), num(g[k].get("s_per_step")), num(g[k].get("ratio_to_stock", 1.0), 2),
             num(g[k]["peak_gib"], 1)] for k, label in labels.items() if k in g]
    return table(["1920×1080, dev, 28 steps", "s/image", "s/step", "× stock", "peak GiB"], rows)


def hybrid_table(d: dict) -> str:
    g, s = d["generation"], d["sample"]
    rows = [[label, num(r["s_per_image"], 2), num(r.get("ratio_to_dev_28_steps", 1.0), 2), num(r["peak_gib"], 1)]
            for label, r in (("dev alone, 28 steps, lossless", s.get("dev-lossless")),
                             ("hybrid: schnell 4 steps + dev 12 at strength 0.6, lossless", g.get("hybrid")),
                             ("dev alone, 28 steps, `go_fast`", s.get("dev-go_fast")),
                             ("hybrid, `go_fast`", g.get("hybrid-go_fast"))) if r is not None]
    return table(["1024×1024", "s/image", "× dev alone", "peak GiB"], rows)


QUALITY_KEYS = (("score", "score"), ("colour", "colour"), ("shape", "shape"), ("size", "size"),
                ("position", "position"), ("background", "background"), ("count", "count"), ("all", "all right"))


def pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def hybrid_quality_table(q: dict) -> str:
    keys = [(k, name) for k, name in QUALITY_KEYS if any(k in r["mean"] for r in q["paths"].values())]
    rows = [[r["label"], *(pct(r["mean"].get(k)) for k, _ in keys), num(r["cpu_s_per_image"], 2),
             num(r.get("h100_s_per_image"), 2)] for r in q["paths"].values()]
    return table(["path (checker, % right)", *(name for _, name in keys), f"CPU s/image ({q['size']})",
                  "H100 s/image (1024²)"], rows)


def _diff(c: dict) -> str:
    lo, hi = c["ci95"]
    return f"{100 * c['mean']:+.1f} points (95 % interval {100 * lo:+.1f} to {100 * hi:+.1f})"


def _above(c: dict) -> bool:
    return c["ci95"][0] > 0


def _below(c: dict) -> bool:
    return c["ci95"][1] < 0


def hybrid_verdict(q: dict) -> str:
    """When the hybrid is worth it, said from the measured scores and times (nothing typed by hand)."""
    p, c = q["paths"], q["compare"]
    hd, dd, hdr = c["hybrid - dev"], c["dev - draft"], c["hybrid - draft"]
    gpu = [p[k].get("h100_s_per_image") for k in ("hybrid", "dev")]
    ratio = gpu[0] / gpu[1] if None not in gpu else p["hybrid"]["cpu_s_per_image"] / p["dev"]["cpu_s_per_image"]
    on = "on the H100" if None not in gpu else "on the CPU"
    said = (f"Mean checker score, hybrid against dev alone: {_diff(hd)}; dev against the draft: {_diff(dd)}; "
            f"hybrid against the draft: {_diff(hdr)}. The hybrid takes {ratio:.2f}× dev's time {on} "
            f"and {p['hybrid']['cpu_s_per_image'] / p['dev']['cpu_s_per_image']:.2f}× on the CPU.")
    if _above(hdr) and not _above(dd) and not _below(hd):
        verdict = (f"The refinement adds measurable adherence over the draft ({100 * hdr['mean']:+.1f} points) and the "
                   "hybrid is not measurably below dev alone, whose own lead over the draft is within the spread: "
                   f"**worth it** for previews, batches of drafts and picking a seed, at {ratio:.2f}× dev's time; "
                   "these numbers cannot rank it against dev alone.")
    elif not _above(dd):
        verdict = ("Dev alone does not score measurably higher than the schnell draft here, so the refinement has "
                   "nothing to add that the checker can see: with these weights the draft alone is the cheapest "
                   "choice, and these numbers cannot show whether the hybrid is worth it.")
    elif not _below(hd):
        verdict = (f"The hybrid is not measurably worse than dev alone: **it is worth it**, dev's prompt adherence "
                   f"at {ratio:.2f}× the time.")
    elif _above(hdr):
        verdict = (f"The hybrid scores measurably below dev alone and above the draft, with "
                   f"{100 * hdr['mean'] / dd['mean']:.0f} % of dev's gain over the draft at {ratio:.2f}× dev's time: "
                   "worth it where that share of dev's adherence is enough (previews, batches of drafts, picking a "
                   "seed); render with dev alone where prompt adherence is the point.")
    else:
        verdict = ("The refinement adds no measurable adherence over the draft and stays below dev alone: the "
                   "hybrid is not worth it with these weights; use the draft for speed and dev alone for adherence.")
    return f"{said}\n\n**Verdict:** {verdict}"


def hybrid_quality(bench: Path) -> str:
    q = json.loads((bench / HYBRID_QUALITY).read_text())
    source = (f"mini-flux, {q['prompts']} held-out prompts at {q['size']}, seed {q['seed']}, refinement "
              f"{q['refine']['steps']} steps at strength {q['refine']['strength']}: `python bench/hybrid_quality.py` "
              f"(`bench/{HYBRID_QUALITY}`, {q['date']}); CPU: {q['cpu']}, process time of the sample nodes; "
              f"H100: `{q['h100_source']}`, {q['h100_what']}.")
    return "\n\n".join([source, hybrid_quality_table(q), hybrid_verdict(q)])


E2E_ROWS = {"stock": "stock diffusers (`FluxPipeline.from_pretrained`, images, PNG files)",
            "fluxkiln_cold": "`fluxkiln run`, compile cache cold", "fluxkiln_warm": "`fluxkiln run`, compile cache warm",
            "fluxkiln_after_warmup": "`fluxkiln run` after `fluxkiln warmup`"}
SPEED_ROWS = {"schnell-go_fast": "schnell, 4 steps, `go_fast`",
              "schnell-go_fast-nograph": "schnell, 4 steps, `go_fast`, whole-step graphs off",
              "schnell-go_fast-graphs": "schnell, 4 steps, `go_fast`, CUDA graphs per block",
              "dev-go_fast": "dev, 28 steps, `go_fast`",
              "dev-go_fast-nograph": "dev, 28 steps, `go_fast`, whole-step graphs off",
              "dev-go_fast-graphs": "dev, 28 steps, `go_fast`, CUDA graphs per block",
              "dev-go_fast-cache": "dev, 28 steps, `go_fast`, step cache (lossy)",
              "schnell-go_fast-cache": "schnell, 4 steps, `go_fast`, step cache (lossy)"}


def where(d: dict, path: Path, what: str) -> str:
    device = d.get("gpu") or d.get("e2e", {}).get("stock", {}).get("gpu") or d.get("device") or "cpu"
    note = (" The tiny built-in model on a shared CPU: this shows the measurement working, not the speeds that "
            "count (`bench/speed_gpu.sh` measures those on a GPU).") if d.get("mode") == "tiny" else ""
    return f"**{device}**, {d.get('date')}: {what} (`bench/{path.name}`, {d.get('mode', 'mini-flux')}).{note}"


def e2e_source(path: Path, d: dict) -> str:
    e = d["e2e"]
    depth = "FLUX.1-dev's full depth" if e.get("depth") == "full" else \
        f"{e['depth'][0]} double and {e['depth'][1]} single full-size blocks"
    size = "the tiny built-in model" if d.get("mode") == "tiny" else depth
    return where(d, path, f"`fluxkiln bench --e2e`, {e['images']} images of {e['size']}² at {e['steps']} steps, "
                          f"{size}, `go_fast = {str(e.get('go_fast', False)).lower()}`, each row a fresh process")


def e2e_table(d: dict) -> str:
    rows = []
    for key, label in E2E_ROWS.items():
        r = d["e2e"].get(key)
        if r is None:
            continue
        start = r.get("startup_s", (r.get("python_start_s") or 0) + (r.get("import_s") or 0))
        rows.append([label, num(r["wall_s"], 2), num(start, 2), num(r.get("load_model_s", r.get("load_s")), 2),
                     num(r["to_loaded_s"], 2), " / ".join(num(v, 2) for v in r["images_s"]),
                     num(r["first_image_extra_s"], 2), num(r["one_image_process_s"], 2)])
    return table(["process", "wall s", "start-up s", "load s", "start to loaded model s", "images s",
                  "first image over the others s", "one-image process s"], rows)


def e2e_targets_table(d: dict) -> str:
    """The targets judged from the rows themselves (by today's rules: results written before the rows after
    ``fluxkiln warmup`` were judged get them too)."""
    from fluxkiln.plugins.bench.e2e import e2e_targets

    judged = e2e_targets(d["e2e"], judge=d.get("mode") != "tiny")
    rows = [[t["work"] + (f" (medians of {t['medians_of']} runs)" if t.get("medians_of") else ""),
             num(t["target"], 2), num(t["measured"], 2), "–" if t["met"] is None else
             ("**yes**" if t["met"] else "**no**")] for t in judged]
    return table(["end-to-end target", "limit", "measured", "met"], rows)


def speed_table(d: dict) -> str:
    rows = []
    for key, label in SPEED_ROWS.items():
        r = d["sample"].get(key)
        if r is None:
            continue
        skipped = r.get("cache_skipped_steps")
        overhead = None if "cache" in key else r.get("engine", {}).get("overhead_run_pct")  # bare call: no cache
        rows.append([label, num(r["s_per_image"]), num(r.get("first_run_s"), 1), num(overhead, 1, " %"),
                     "–" if skipped is None else f"{skipped} of {skipped + r['cache_computed_steps']}"])
    return table(["sampling path", "s/image", "first run s", "engine overhead", "steps skipped"], rows)


def phases_table(d: dict) -> str:
    key = next((k for k in ("schnell-go_fast", "dev-go_fast") if "phases_ms" in d["sample"].get(k, {}).get(
        "engine", {})), None)
    if key is None:
        return "No engine phases in this run."
    r = d["sample"][key]
    rows = [[name, num(ms, 2)] for name, ms in r["engine"]["phases_ms"].items()]
    return table([f"{SPEED_ROWS[key]}: ms per run", "ms"], rows)


def quality_table(d: dict) -> str:
    from fluxkiln.plugins.bench.quality import attribute_mean

    q = d["quality"]
    rows = []
    for variant in ("dev", "schnell"):
        eager = (q.get(variant) or {}).get("eager", {}).get("adherence", {})
        for name, r in (q.get(variant) or {}).items():
            rd = r.get("random_weight_transformer_rel_diff")
            mean = attribute_mean(r["adherence"])
            rows.append([f"{variant}: {name}", num(r["adherence"]["all"], 1), num(r["delta_points"], 1),
                         num(mean, 1), num(mean - attribute_mean(eager), 1),
                         num(r.get("cpu_s_per_image", r["s_per_image"]), 3),
                         num(r.get("skipped_step_pct"), 1, " %"), "–" if rd is None else f"{rd:.4f}"])
    return table([f"mini-flux, {q['prompts']} held-out prompts", "all attributes right %", "Δ points",
                  "attribute mean %", "Δ points", "s/image" + (" (CPU time)" if q.get("device") == "cpu" else ""),
                  "steps skipped", "random-weight Δ transformer"], rows)


def watch_table(bench: Path) -> str:
    w = json.loads((bench / "watch_overhead.json").read_text())
    rows = [["`sample` node alone", num(w["median_sample_s"], 2, " s"), "–"],
            ["whole rerun (validate, plan, fingerprint, sample, save)", num(w["median_rerun_s"], 2, " s"),
             num(w["rerun_overhead_pct"], 1, " %")],
            ["whole rerun without the PNG encoding of `save`", "–", num(w["overhead_excluding_save_pct"], 1, " %")],
            [f"file write to finished rerun (debounce {w['debounce']} s)", num(w["median_wall_s"], 2, " s"),
             num(w["wall_minus_debounce_overhead_pct"], 1, " %")]]
    return table([f"median of {len(w['edits'])} prompt edits, {w['steps']} steps, {w['megapixels']} MP",
                  "time", "over sampling"], rows)


def _met(ok: bool | None) -> str:
    return "" if ok is None else (" (**met**)" if ok else " (**missed**)")


def gpus_table(bench: Path) -> str:
    """One row per ``fluxkiln bench --gpus N`` result (``bench/*-gpus-*.json``), fewest GPUs first; met or
    missed as the run's own ``targets`` say."""
    rows = []
    for path in sorted(bench.glob("*-gpus-*.json"), key=lambda p: (json.loads(p.read_text())["gpus"], p.name)):
        d = json.loads(path.read_text())
        met = {t["target"]: t["met"] for t in d.get("targets", [])}
        dp, ddp, cp = d.get("data_parallel", {}), d.get("ddp", {}), d.get("context_parallel", {})
        best, stock = cp.get("best") or {}, cp.get("stock_best") or {}
        rows.append([
            f"{d['gpus']} × {d['gpu']}, {d['date']} (`bench/{path.name}`)",
            f"{num(dp.get('speedup'), 2, '×')}: {num(dp.get('one_images_per_s'), 3)} → "
            f"{num(dp.get('many_images_per_s'), 3)} images/s" + _met(met.get("dp_speedup")),
            f"{num(best.get('ratio'), 3, '×')}: {num(best.get('one_s'), 2)} → {num(best.get('s'), 2)} s "
            f"(`{best.get('variant', '–')}`)" + _met(met.get("cp_ratio")),
            f"{num(stock.get('ratio'), 3, '×')} (`{stock.get('variant', '–')}`)",
            f"{num(ddp.get('ratio'), 3, '×')}: {num(ddp.get('one_step_s'), 3)} → {num(ddp.get('many_step_s'), 3)} s "
            f"at global batch {ddp.get('global_batch', '–')}" + _met(met.get("ddp_ratio"))])
    return table(["GPUs", "data parallel: speed-up", "context parallel: time vs one GPU (fastest split)",
                  "stock diffusers CP", "DDP step at N × the global batch vs one GPU"], rows)


def tables(bench: Path) -> dict[str, Callable[[], str]]:
    path, d = newest_full(bench)
    gpath, gd = newest_full(bench, "generation")
    epath, ed = newest_full(bench, "e2e")
    spath, sd = newest_full(bench, "speed")
    qpath, qd = newest_with(bench, ("quality", "speed"), "quality")
    return {"generation-source": lambda: generation_source(gpath, gd), "fullhd": lambda: fullhd_table(gd),
            "hybrid": lambda: hybrid_table(gd), "hybrid-quality": lambda: hybrid_quality(bench),
            "source": lambda: source(path, d), "sample": lambda: sample_table(d), "stages": lambda: stages_table(d),
            "gpu-step": lambda: gpu_step_table(d), "train": lambda: train_table(d),
            "kernels": lambda: kernels_table(d), "targets": lambda: targets_table(d),
            "watch": lambda: watch_table(bench),
            "e2e-source": lambda: e2e_source(epath, ed), "e2e": lambda: e2e_table(ed),
            "e2e-targets": lambda: e2e_targets_table(ed),
            "speed-source": lambda: where(sd, spath, "`fluxkiln bench --only sample`, median of the timed runs"),
            "speed": lambda: speed_table(sd), "phases": lambda: phases_table(sd),
            "quality-source": lambda: where({**qd, "mode": "mini-flux"} if qd.get("mode") == "random-weights" else qd,
                                            qpath, "the quality guard on mini-flux"),
            "quality": lambda: quality_table(qd), "gpus": lambda: gpus_table(bench)}


def render(page: str, bench: Path, names: tuple[str, ...] | None = None) -> str:
    """``page`` with each ``bench:NAME`` block (``names``, or all but the generation page's own) regenerated
    from the JSON in ``bench``."""
    for name, make in tables(bench).items():
        if (name in names) if names is not None else (name not in OWN_PAGE_ONLY):
            page = replace_between(page, f"<!-- bench:{name}:start -->", f"<!-- bench:{name}:end -->", make())
    return page


def main() -> int:
    for page, names in ((PAGE, None), (GENERATION_PAGE, GENERATION_TABLES), (GPUS_PAGE, GPUS_TABLES)):
        text = page.read_text()
        new = render(text, HERE, names)
        if new != text:
            page.write_text(new)
        print("updated" if new != text else "up to date", page)
    return 0


if __name__ == "__main__":
    sys.exit(main())
