"""``fluxkiln bench --quality``: what each speed path costs in prompt adherence, measured on mini-flux (our own
trained small FLUX) with its pixel checker (:mod:`fluxkiln.plugins.miniflux.adherence`).

Per variant the same held-out prompts and seeds go through eager (bf16 on a GPU, float32 on a CPU), then — on a
GPU — the compiled lossless path and ``go_fast`` (fp8), then the step cache at each threshold on top of the last
path.  Each row has the adherence scores, Δ (points against eager; against the path under it for step-cache
rows), seconds per image and, for the step cache, the share of steps skipped.  Beside them stands the
random-weight Δ the sampling guard measured on full-size shapes in the same bench run, where there is one.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

DEFAULT_PROMPTS = 100
DEFAULT_THRESHOLDS = (0.05, 0.1)
STEPS = {"dev": 28, "schnell": 4}
GUIDANCE = {"dev": 3.0, "schnell": None}
GUARD_ROWS = {("dev", "compiled"): "dev-lossless", ("dev", "go_fast"): "dev-go_fast",
              ("schnell", "go_fast"): "schnell-go_fast"}


ATTRIBUTES = ("colour", "shape", "size", "position", "background", "count")


def attribute_mean(adherence: dict[str, float]) -> float:
    """The mean of the per-attribute scores (more sensitive than ``all`` while every image misses something)."""
    vals = [adherence[k] for k in ATTRIBUTES if adherence.get(k) == adherence.get(k) and k in adherence]
    return round(math.fsum(vals) / len(vals), 1) if vals else float("nan")  # fsum: the same on every Python


def paths_for(device: str) -> list[str]:
    """The speed paths measured here before the step cache: eager, plus compiled and go_fast on a GPU."""
    return ["eager", "compiled", "go_fast"] if device == "cuda" else ["eager"]


class QualityGuard:
    """Adherence of mini-flux per speed path; ``sample_rows`` are the sampling part's results (random weights)."""

    def __init__(self, device: str, prompts: int = DEFAULT_PROMPTS, thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS,
                 steps: dict[str, int] | None = None, sample_rows: dict[str, Any] | None = None,
                 log: Callable[[str], None] = print, batch: int = 8):
        from fluxkiln.plugins.miniflux.adherence import eval_prompts

        self.device, self.thresholds, self.log, self.batch = device, thresholds, log, batch
        self.steps = {**STEPS, **(steps or {})}
        self.prompts = eval_prompts(prompts)
        self.sample_rows = sample_rows or {}

    def load(self, variant: str) -> Any:
        import torch

        from fluxkiln.plugins.miniflux.weights import load_pipeline

        dtype = torch.bfloat16 if self.device == "cuda" else torch.float32
        return load_pipeline(variant, device=self.device, dtype=dtype)

    def set_path(self, pipe: Any, path: str) -> None:
        """Put the pipeline into a speed path exactly as ``sample`` does (pipestate.prepare)."""
        from fluxkiln.plugins.flux.pipestate import prepare

        prepare(pipe, [], path == "go_fast", self.device, lambda _a: {}, fast=path != "eager")

    def score(self, pipe: Any, variant: str, threshold: float = 0.0) -> dict[str, Any]:
        """Adherence of one path (on a GPU after one warm-up batch, so compilation is not timed)."""
        from fluxkiln.plugins.flux.stepcache import step_cache
        from fluxkiln.plugins.miniflux.adherence import generate, score_images

        kw = dict(steps=self.steps[variant], guidance=GUIDANCE[variant], batch=self.batch)
        if self.device == "cuda":  # compile (and warm up the GPU) outside the timed run
            with step_cache(pipe.transformer, threshold):
                generate(pipe, self.prompts[:self.batch], **kw)
        with step_cache(pipe.transformer, threshold) as count:
            t0, c0 = time.perf_counter(), time.process_time()
            images = generate(pipe, self.prompts, **kw)
            seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        row: dict[str, Any] = {"adherence": score_images(images, self.prompts),
                               "s_per_image": round(seconds / len(images), 4)}
        if self.device == "cpu":  # CPU time: steadier than wall time on a shared machine
            row["cpu_s_per_image"] = round(cpu / len(images), 4)
        if threshold > 0:
            total = count.computed + count.skipped
            row.update(cache_threshold=threshold, skipped_step_pct=round(100 * count.skipped / max(total, 1), 1))
        return row

    def variant(self, variant: str) -> dict[str, Any]:
        pipe = self.load(variant)
        rows: dict[str, Any] = {}
        last = "eager"
        for path in paths_for(self.device):
            self.set_path(pipe, path)
            rows[path] = self.score(pipe, variant)
            last = path
            self.log(f"[bench] quality {variant} {path}: {rows[path]}")
        for t in self.thresholds:
            name = f"{last}+cache-{t:g}"
            rows[name] = self.score(pipe, variant, t)
            rows[name]["on"] = last
            self.log(f"[bench] quality {variant} {name}: {rows[name]}")
        self.set_path(pipe, "eager")
        eager = rows["eager"]["adherence"]["all"]
        eager_mean = attribute_mean(rows["eager"]["adherence"])
        for name, row in rows.items():
            base = rows[row["on"]]["adherence"]["all"] if "on" in row else eager
            row["delta_points"] = round(row["adherence"]["all"] - eager, 1)
            row["delta_vs_path_points"] = round(row["adherence"]["all"] - base, 1)
            row["attribute_mean"] = attribute_mean(row["adherence"])
            row["delta_attribute_mean_points"] = round(row["attribute_mean"] - eager_mean, 1)
            guard = self.sample_rows.get(GUARD_ROWS.get((variant, name), ""), {})
            if "transformer_rel_diff" in guard:
                row["random_weight_transformer_rel_diff"] = guard["transformer_rel_diff"]
                row["random_weight_image_rel_diff"] = guard.get("image_rel_diff")
            if name != "eager":
                clock = "cpu_s_per_image" if "cpu_s_per_image" in row else "s_per_image"
                row["speedup_vs_eager"] = round(rows["eager"][clock] / row[clock], 2)
        return rows

    def run(self, variants: tuple[str, ...] = ("dev", "schnell")) -> dict[str, Any]:
        out: dict[str, Any] = {"prompts": len(self.prompts), "device": self.device, "steps": self.steps,
                               "target": "each path within 1 adherence point of eager"}
        for v in variants:
            out[v] = self.variant(v)
        return out


def render_quality(q: dict[str, Any]) -> str:
    """The quality rows as a table."""
    head = (f"{'mini-flux adherence':<30}{'all %':>8}{'Δ pts':>8}{'attr. %':>9}{'Δ pts':>8}{'s/image':>9}"
            f"{'skipped %':>10}{'rand Δ transf.':>16}")
    lines = [f"quality guard on mini-flux: {q.get('prompts')} held-out prompts, {q.get('device')}", head,
             "-" * len(head)]
    for variant in ("dev", "schnell"):
        for name, r in (q.get(variant) or {}).items():
            rd = r.get("random_weight_transformer_rel_diff")
            lines.append(f"{variant + ' ' + name:<30}{r['adherence']['all']:>8.1f}{r['delta_points']:>8.1f}"
                         f"{r['attribute_mean']:>9.1f}{r['delta_attribute_mean_points']:>8.1f}"
                         f"{r['s_per_image']:>9.4f}{r.get('skipped_step_pct', '-')!s:>10}"
                         f"{'-' if rd is None else format(rd, '.4f'):>16}")
    return "\n".join(lines)
