"""Generate the tables of the documentation's performance page from the committed benchmark results.

    python bench/perf_docs.py          # rewrites the tables in docs/performance.md and docs/generation.md

The newest ``bench/*-full.json`` (by its ``date``, then its name) written by ``fluxkiln bench`` supplies
the sampling, training, kernel and target tables; ``bench/watch_overhead.json`` the watch-mode table; the
newest ``bench/*-generation.json`` (``fluxkiln bench --generation``) the Full HD and hybrid tables;
``bench/hybrid_quality.json`` (``bench/hybrid_quality.py``) the hybrid's quality table and the verdict
on when it is worth it, written from its numbers.
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
    rows = [[f"`{name}`", num(k["ms"]), num(k["tflops"], 1)] for name, k in d["kernels"].items()]
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
    where = "on the H100" if None not in gpu else "on the CPU"
    said = (f"Mean checker score, hybrid against dev alone: {_diff(hd)}; dev against the draft: {_diff(dd)}; "
            f"hybrid against the draft: {_diff(hdr)}. The hybrid takes {ratio:.2f}× dev's time {where} "
            f"and {p['hybrid']['cpu_s_per_image'] / p['dev']['cpu_s_per_image']:.2f}× on the CPU.")
    if not _above(dd):
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


def tables(bench: Path) -> dict[str, Callable[[], str]]:
    path, d = newest_full(bench)
    gpath, gd = newest_full(bench, "generation")
    return {"generation-source": lambda: generation_source(gpath, gd), "fullhd": lambda: fullhd_table(gd),
            "hybrid": lambda: hybrid_table(gd), "hybrid-quality": lambda: hybrid_quality(bench),
            "source": lambda: source(path, d), "sample": lambda: sample_table(d), "stages": lambda: stages_table(d),
            "gpu-step": lambda: gpu_step_table(d), "train": lambda: train_table(d),
            "kernels": lambda: kernels_table(d), "targets": lambda: targets_table(d),
            "watch": lambda: watch_table(bench)}


def render(page: str, bench: Path, names: tuple[str, ...] | None = None) -> str:
    """``page`` with each ``bench:NAME`` block (``names``, or all but the generation page's own) regenerated
    from the JSON in ``bench``."""
    for name, make in tables(bench).items():
        if (name in names) if names is not None else (name not in GENERATION_ONLY):
            page = replace_between(page, f"<!-- bench:{name}:start -->", f"<!-- bench:{name}:end -->", make())
    return page


def main() -> int:
    for page, names in ((PAGE, None), (GENERATION_PAGE, GENERATION_TABLES)):
        text = page.read_text()
        new = render(text, HERE, names)
        if new != text:
            page.write_text(new)
        print("updated" if new != text else "up to date", page)
    return 0


if __name__ == "__main__":
    sys.exit(main())
