"""Where a warm ``go_fast`` engine run of ``sample`` spends its wall time: the GPU's busy time, the host's time
before its first kernel and after its last, every gap over 0.15 ms between kernels with the CPU operators that
ran in it, and a cProfile of one run.

On the GPU machine, after installing fluxkiln: ``OUT=DIR python bench/sample_timeline.py schnell [dev]`` ->
``DIR/timeline.json``, ``cprofile-*.txt``, ``trace-*.json.gz``.  Full-size random-weight FLUX.1 pipelines (those of
``fluxkiln bench``), 1024², the bench's recipe, five warm runs before the measured ones.
"""

from __future__ import annotations

import argparse
import cProfile
import gzip
import io
import json
import os
import pstats
import sys
import time
from pathlib import Path
from typing import Any

import torch

from fluxkiln.plugins.bench.sampling import SamplingBench
from fluxkiln.plugins.bench.session import BenchSession

GAP_US = 150  # gaps between kernels shorter than this are not listed


def profile_text(pr: cProfile.Profile, order: str, lines: int) -> str:
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats(order).print_stats(lines)
    return s.getvalue()


def busy_and_gaps(kernels: list[tuple[float, float]]) -> tuple[float, list[tuple[float, float]]]:
    """The union of the kernels' intervals (µs) and the gaps between them longer than GAP_US."""
    busy, gaps = 0.0, []
    cur_s, cur_e = kernels[0]
    for s, e in kernels[1:]:
        if s > cur_e:
            busy += cur_e - cur_s
            if s - cur_e > GAP_US:
                gaps.append((cur_e, s))
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    return busy + cur_e - cur_s, gaps


def ops_in(cpu: list[dict[str, Any]], a: float, z: float) -> list[tuple[str, float]]:
    """The CPU operators that overlap (a, z), by overlapped ms, longest first."""
    found: dict[str, float] = {}
    for e in cpu:
        overlap = min(z, e["ts"] + e["dur"]) - max(a, e["ts"])
        if overlap > 20:
            found[e["name"]] = found.get(e["name"], 0) + overlap
    return [(n, round(d / 1e3, 2)) for n, d in sorted(found.items(), key=lambda kv: -kv[1])[:6]]


def timeline(sb: SamplingBench, recipe: Path, out: Path, variant: str) -> dict[str, Any]:
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        sb.engine_run(recipe)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    path = out / f"trace-{variant}.json"
    prof.export_chrome_trace(str(path))
    events = json.loads(path.read_text())["traceEvents"]
    with gzip.open(f"{path}.gz", "wt") as f:
        json.dump(events, f)
    path.unlink()
    kernels = sorted((e["ts"], e["ts"] + e["dur"]) for e in events
                     if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e)
    cpu = [e for e in events if e.get("cat") == "cpu_op" and "dur" in e]
    spans = [(e["ts"], e["ts"] + e.get("dur", 0)) for e in events if e.get("ph") == "X" and "ts" in e]
    start, end = min(s for s, _ in spans), max(e for _, e in spans)
    busy, gaps = busy_and_gaps(kernels)
    listed = [{"at_ms": round((a - start) / 1e3, 2), "ms": round((z - a) / 1e3, 2), "cpu_ops": ops_in(cpu, a, z)}
              for a, z in gaps]
    return {"wall_prof_s": round(wall, 4), "trace_span_ms": round((end - start) / 1e3, 2),
            "before_first_kernel_ms": round((kernels[0][0] - start) / 1e3, 2),
            "after_last_kernel_ms": round((end - max(e for _, e in kernels)) / 1e3, 2),
            "gpu_busy_ms": round(busy / 1e3, 2), "kernels": len(kernels), "gaps": listed,
            "gaps_total_ms": round(sum(g["ms"] for g in listed), 2)}


def main(variants: list[str]) -> None:
    out = Path(os.environ["OUT"])
    os.environ.setdefault("FLUXKILN_COMPILE_VAE", "1")
    args = argparse.Namespace(tiny=False, repeats=2, cache_threshold=0.1, train_steps=None, train_resolution=None,
                              out=out / "bench.json")
    bench = BenchSession(args)
    bench.setup()
    sb = SamplingBench(bench)
    results: dict[str, Any] = {}
    for variant in variants:
        recipe = sb.recipe(variant, True)
        walls = [sb.engine_run(recipe)[0] for _ in range(5)]
        pr = cProfile.Profile()
        pr.enable()
        sb.engine_run(recipe)
        pr.disable()
        (out / f"cprofile-{variant}.txt").write_text(profile_text(pr, "cumulative", 60))
        (out / f"cprofile-tottime-{variant}.txt").write_text(profile_text(pr, "tottime", 40))
        results[variant] = {"warm_walls_s": [round(w, 4) for w in walls], **timeline(sb, recipe, out, variant)}
        (out / "timeline.json").write_text(json.dumps(results, indent=1))
        r = results[variant]
        print(variant, {k: v for k, v in r.items() if k != "gaps"}, flush=True)
        for g in sorted(r["gaps"], key=lambda g: -g["ms"])[:10]:
            print("  gap", g, flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or ["schnell"])
