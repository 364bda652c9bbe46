"""What limits a benchmark row, measured: where one image's time goes, and what the GPU does in one step.

* :func:`stage_times` splits one pipeline call into text encoding, transformer
  steps, VAE decode, image conversion and the rest, by timing those calls.
* :func:`kernel_breakdown` profiles one callable with ``torch.profiler`` and
  sums the GPU kernel time per kind (communication, bf16 GEMM, fp8 GEMM,
  attention, fused Triton kernels, other), plus the time the GPU sat idle and
  how much of the communication ran while compute kernels ran too
  (:func:`overlap_time`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

STAGES = {"text_encoders": ("encode_prompt",), "vae_decode": ("vae", "decode"),
          "to_images": ("image_processor", "postprocess")}
# substrings of the names of collectives: NCCL's kernels ("ncclDevKernel_AllReduce_Sum_f32_RING_LL",
# "ncclKernel_AllGather_RING_LL_Sum_int8_t"), gloo's worker-thread ranges ("gloo:all_reduce") and the host-side
# ops of c10d ("c10d::allreduce_", "_c10d_functional::all_gather_into_tensor", "...::wait_tensor")
COMM_MARKS = ("nccl", "gloo:", "c10d", "allreduce", "all_reduce", "allgather", "all_gather", "all_to_all",
              "alltoall", "reducescatter", "reduce_scatter", "record_param_comms")
# (category, substrings any of which marks a kernel name), first match wins
KINDS = [
    ("triton_fused", ("triton",)),  # Inductor's kernels, named after the ops they feed (e.g. "_scaled_mm")
    ("communication", COMM_MARKS),  # after Triton: "triton_poi_fused_all_gather_into_tensor_0" is a copy
    ("attention", ("flash", "fmha", "attn", "attention", "sdpa", "mha")),
    ("gemm_fp8", ("f8", "fp8", "e4m3", "_qqtst", "_qq_")),  # cuBLASLt names fp8 kernels "nvjet_..._qqtst_..."
    ("gemm", ("gemm", "xmma", "cutlass", "nvjet", "cublas", "wgmma", "matmul", "_mm_")),
]


def kind_of(kernel: str, kinds: list[tuple[str, tuple[str, ...]]] = KINDS) -> str:
    """The first kind of ``kinds`` one of whose marks is in the name (case-insensitive), else "other"."""
    name = kernel.lower()
    for kind, marks in kinds:
        if any(m in name for m in marks):
            return kind
    return "other"


def is_comm(name: str) -> bool:
    """True for a collective's kernel, range or op (see ``COMM_MARKS``)."""
    return kind_of(name) == "communication"


def merged(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The union of (start, end) intervals as sorted, disjoint intervals."""
    out: list[tuple[float, float]] = []
    for a, b in sorted(spans):
        if b <= a:
            continue
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def overlap_time(one: list[tuple[float, float]], other: list[tuple[float, float]]) -> float:
    """Length of the time covered by both ``one`` and ``other`` (each a list of possibly overlapping intervals):
    e.g. how much of the communication ran while compute ran too."""
    a, b = merged(one), merged(other)
    total, i, j = 0.0, 0, 0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if hi > lo:
            total += hi - lo
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return total


def minus(spans: list[tuple[float, float]], cut: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The parts of ``spans`` (merged) outside every interval of ``cut``."""
    out: list[tuple[float, float]] = []
    holes = merged(cut)
    for a, b in merged(spans):
        for c, d in holes:
            if d <= a or c >= b:
                continue
            if c > a:
                out.append((a, c))
            a = max(a, d)
            if a >= b:
                break
        if a < b:
            out.append((a, b))
    return out


def busy_time(spans: list[tuple[float, float]]) -> float:
    """Length of the union of (start, end) intervals (overlapping kernels on several streams count once)."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(spans):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def summarize_trace(trace: dict[str, Any], wall_ms: float,
                    window: tuple[float, float] | None = None) -> dict[str, Any]:
    """Kernel milliseconds per kind from a Chrome trace, the idle share of ``wall_ms``, and the communication
    kernels' time (union) with the part of it that overlapped compute kernels; only kernels starting within
    ``window`` (trace microseconds) when given."""
    kernels = [e for e in trace.get("traceEvents", []) if e.get("cat") == "kernel" and "dur" in e
               and (window is None or window[0] <= e["ts"] <= window[1])]
    per: dict[str, float] = {}
    top: dict[str, float] = {}
    for e in kernels:
        ms, kind = e["dur"] / 1000, kind_of(e["name"])
        per[kind] = per.get(kind, 0.0) + ms
        top[e["name"]] = top.get(e["name"], 0.0) + ms
    spans = [(e["ts"] / 1000, (e["ts"] + e["dur"]) / 1000, is_comm(e["name"])) for e in kernels]
    busy = busy_time([(a, b) for a, b, _ in spans])
    comm = [(a, b) for a, b, c in spans if c]
    comm_ms = busy_time(comm)
    overlapped = overlap_time(comm, [(a, b) for a, b, c in spans if not c])
    largest = sorted(top.items(), key=lambda kv: -kv[1])[:8]
    return {"wall_ms": round(wall_ms, 2), "kernels": len(kernels), "busy_ms": round(busy, 2),
            "idle_pct": round(100 * max(0.0, 1 - busy / wall_ms), 1) if wall_ms else None,
            "comm_ms": round(comm_ms, 2), "overlapped_ms": round(overlapped, 2),
            "exposed_comm_ms": round(comm_ms - overlapped, 2),
            "ms_by_kind": {k: round(v, 2) for k, v in sorted(per.items(), key=lambda kv: -kv[1])},
            "largest_kernels_ms": {k[:90]: round(v, 2) for k, v in largest}}


def kernel_breakdown(fn: Callable[[], Any], folder: Path) -> dict[str, Any]:
    """Profile one call of ``fn`` on the GPU (after one warm-up call) and summarize its kernels."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) * 1000
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "trace.json"
    prof.export_chrome_trace(str(path))
    return summarize_trace(json.loads(path.read_text()), wall)


def stage_times(pipe: Any, call: Callable[[], Any], sync: Callable[[], None]) -> dict[str, float]:
    """Seconds per stage of one ``call()`` of ``pipe`` (each timed stage is synchronized before and after)."""
    spent: dict[str, float] = {"transformer": 0.0}
    undo: list[Callable[[], None]] = []

    def timed(owner: Any, attr: str, stage: str) -> None:
        original = getattr(owner, attr)

        def wrapper(*a: Any, **kw: Any) -> Any:
            sync()
            t0 = time.perf_counter()
            try:
                return original(*a, **kw)
            finally:
                sync()
                spent[stage] = spent.get(stage, 0.0) + time.perf_counter() - t0

        setattr(owner, attr, wrapper)
        undo.append(lambda: owner.__dict__.pop(attr, None))

    try:
        for stage, path in STAGES.items():
            owner = pipe
            for part in path[:-1]:
                owner = getattr(owner, part)
            timed(owner, path[-1], stage)
        timed(pipe.transformer, "forward", "transformer")
        sync()
        t0 = time.perf_counter()
        call()
        sync()
        total = time.perf_counter() - t0
    finally:
        for fix in undo:
            fix()
    out = {k: round(v, 4) for k, v in spent.items()}
    out["other"] = round(total - sum(spent.values()), 4)
    out["total"] = round(total, 4)
    return out
