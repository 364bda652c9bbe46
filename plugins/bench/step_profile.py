"""``fluxkiln bench --gpus N --profile``: one step under ``torch.profiler``, alone or on every rank, summarized.

:class:`StepProfiler` runs a step once to warm up, then once more under the profiler, on rank 0 alone
(the others wait at a barrier) or on every rank together (each summarizes its own trace; rank 0 gathers
them).  :func:`summarize` turns one Chrome trace into numbers:

- device (CUDA only; ``null`` on a CPU run, which has no kernels): GPU busy ms (union of kernels), idle
  % of the wall time, ms by kernel kind, kernel count, the communication kernels' ms and how much of it
  overlapped compute kernels (NCCL kernels also count the time a rank waits for the others);
- host (every run): CPU-op count and self ms by kind, the time inside collectives (gloo runs them on
  worker threads; c10d's ops on the main thread) and how much of it the process computed through,
  the phases the step marks with ``record_function("phase:NAME")`` (host ms, and device ms on CUDA),
  CPU time over wall time, context switches, thread settings (:mod:`.hostfacts`) and the SM clock.

:func:`render_profiles` prints the table that ends a ``--profile`` run.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fluxkiln.engine import distributed

from .hostfacts import SmClock, Usage, thread_facts
from .profile import COMM_MARKS, is_comm, kind_of, merged, minus, overlap_time, summarize_trace

WINDOW = "fluxkiln.profiled_step"
PHASE = "phase:"
# (kind, substrings of a CPU op's name), first match wins
OP_KINDS = [
    ("communication", COMM_MARKS),
    ("rng", ("randn", "normal_", "uniform_", "aten::rand", "bernoulli", "randint")),
    ("gemm", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear",
              "_scaled_mm")),
    ("attention", ("attention", "sdpa", "flash")),
    ("copy", ("copy_", "aten::to", "aten::cat", "aten::clone", "contiguous", "aten::stack")),
    ("optimizer", ("optimizer", "_foreach_", "adam")),
    ("autograd", ("backward", "autograd", "accumulategrad")),
]
DEVICE_FIELDS = ("busy_ms", "idle_pct", "kernels", "ms_by_kind", "comm_ms", "overlapped_ms", "exposed_comm_ms",
                 "largest_kernels_ms")


def op_kind(name: str) -> str:
    return kind_of(name, OP_KINDS)


def self_times(events: list[dict[str, Any]]) -> list[tuple[str, float]]:
    """(name, self µs) of each event: its duration less that of the events nested directly in it on its
    thread (a parent's time spent in its children is counted once, in the children)."""
    out: list[tuple[str, float]] = []
    by_tid: dict[Any, list[dict[str, Any]]] = {}
    for e in events:
        by_tid.setdefault(e.get("tid"), []).append(e)
    for evs in by_tid.values():
        stack: list[list[Any]] = []  # [end, name, self]
        for e in sorted(evs, key=lambda e: (e["ts"], -e["dur"])):
            end = e["ts"] + e["dur"]
            while stack and stack[-1][0] <= e["ts"]:
                _, name, own = stack.pop()
                out.append((name, own))
            if stack:
                stack[-1][2] -= e["dur"]
            stack.append([end, e["name"], e["dur"]])
        out += [(name, own) for _, name, own in stack]
    return out


def _inside(e: dict[str, Any], window: tuple[float, float] | None) -> bool:
    return "dur" in e and (window is None or window[0] <= e["ts"] <= window[1])


def host_summary(trace: dict[str, Any], window: tuple[float, float] | None) -> dict[str, Any]:
    """The host's side of one trace: CPU ops, collectives on the host and their overlap, the marked phases."""
    events = [e for e in trace.get("traceEvents", []) if _inside(e, window)]
    ops = [e for e in events if e.get("cat") == "cpu_op"]
    per: dict[str, float] = {}
    top: dict[str, float] = {}
    for name, own in self_times(ops):
        per[op_kind(name)] = per.get(op_kind(name), 0.0) + own / 1000
        top[name] = top.get(name, 0.0) + own / 1000
    comm_events = [e for e in events if e.get("cat") in ("cpu_op", "user_annotation") and is_comm(e["name"])]
    comm = [(e["ts"] / 1000, (e["ts"] + e["dur"]) / 1000) for e in comm_events]
    compute: list[tuple[float, float]] = []
    for tid in {e.get("tid") for e in ops}:  # each thread's ops outside the collectives on that thread
        mine = [(e["ts"] / 1000, (e["ts"] + e["dur"]) / 1000) for e in ops if e.get("tid") == tid
                and not is_comm(e["name"])]
        cut = [(e["ts"] / 1000, (e["ts"] + e["dur"]) / 1000) for e in comm_events if e.get("tid") == tid]
        compute += minus(mine, cut)
    comm_ms = sum(b - a for a, b in merged(comm))
    overlapped = overlap_time(comm, compute)
    return {"ops": len(ops), "op_self_ms_by_kind": _rounded(per),
            "largest_ops_ms": {k[:90]: v for k, v in list(_rounded(top).items())[:8]},
            "comm_ms": round(comm_ms, 2), "overlapped_ms": round(overlapped, 2),
            "exposed_comm_ms": round(comm_ms - overlapped, 2), "phases_ms": _phases(events)}


def _rounded(ms: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 2) for k, v in sorted(ms.items(), key=lambda kv: -kv[1])}


def _phases(events: list[dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """Milliseconds of each ``phase:NAME`` range on the host and, where the trace has them, on the GPU."""
    out: dict[str, dict[str, float | None]] = {}
    for e in events:
        if not e["name"].startswith(PHASE) or e.get("cat") not in ("user_annotation", "gpu_user_annotation"):
            continue
        row = out.setdefault(e["name"][len(PHASE):], {"host": 0.0, "device": None})
        if e["cat"] == "user_annotation":
            row["host"] = round((row["host"] or 0.0) + e["dur"] / 1000, 2)
        else:
            row["device"] = round((row["device"] or 0.0) + e["dur"] / 1000, 2)
    return out


def summarize(trace: dict[str, Any], wall_ms: float, cuda: bool) -> dict[str, Any]:
    """Device and host numbers of one profiled step (device fields ``None`` without CUDA)."""
    marks = [e for e in trace.get("traceEvents", []) if e.get("name") == WINDOW and e.get("cat") == "user_annotation"]
    window = (marks[0]["ts"], marks[0]["ts"] + marks[0]["dur"]) if marks else None
    device = summarize_trace(trace, wall_ms, window) if cuda else {}
    out: dict[str, Any] = {"wall_ms": round(wall_ms, 2)}
    out.update({k: device.get(k) for k in DEVICE_FIELDS})
    out["host"] = host_summary(trace, window)
    return out


@dataclass
class StepProfiler:
    """Profiles steps of one bench run; ``barrier`` and ``sync`` are the run's (every rank calls the same)."""

    device: str
    rank: int
    barrier: Callable[[], None]
    sync: Callable[[], None]

    def alone(self, what: str, fn: Callable[[], Any]) -> dict[str, Any] | None:
        """``fn`` profiled on rank 0 alone (the one-process baseline) while the others wait; None elsewhere."""
        self.barrier()
        out = self._profiled(what, fn, self.sync) if self.rank == 0 else None
        self.barrier()
        return out

    def together(self, what: str, fn: Callable[[], Any], every_rank: bool = True) -> list[dict[str, Any]] | None:
        """``fn`` on every rank at once, profiled on each (or on rank 0 only); the summaries on rank 0."""
        if every_rank or self.rank == 0:
            mine = self._profiled(what, fn, self.barrier)
        else:
            fn()
            self.barrier()
            fn()
            self.sync()
            mine = None
        gathered = distributed.gather(mine)
        return None if gathered is None else [p for p in gathered if p is not None]

    def _profiled(self, what: str, fn: Callable[[], Any], align: Callable[[], None]) -> dict[str, Any]:
        from torch.profiler import ProfilerActivity, profile, record_function

        cuda = self.device == "cuda"
        fn()  # warm-up (the step was timed before; this one is for the profiler's own start)
        self.sync()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities) as prof:
            align()
            clock = SmClock().start() if cuda else None
            usage = Usage().start()
            t0 = time.perf_counter()
            with record_function(WINDOW):
                fn()
                self.sync()
            wall = time.perf_counter() - t0
            host = usage.stop(wall)
            clocks = clock.stop() if clock is not None else None
        with tempfile.TemporaryDirectory(prefix="fluxkiln-profile-") as tmp:
            path = Path(tmp) / "trace.json"
            prof.export_chrome_trace(str(path))
            trace = json.loads(path.read_text())
        out = {"what": what, "rank": self.rank, "device": self.device}
        out.update(summarize(trace, wall * 1000, cuda))
        out.update(host)
        out["threads"] = thread_facts()
        out["sm_clock_mhz"] = clocks
        return out


def _cell(value: float | None, digits: int | None = 1) -> str:
    """A number for the table: ``digits`` decimals (None: a count), "-" where unknown."""
    if value is None:
        return "-"
    return str(int(value)) if digits is None else f"{float(value):.{digits}f}"


def profile_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Every profile of a ``--profile`` run, in the order of the table."""
    rows: list[dict[str, Any]] = []
    ddp = (results.get("ddp") or {}).get("profile") or {}
    if ddp.get("alone"):
        rows.append(ddp["alone"])
    rows += ddp.get("together") or []
    rows += list(((results.get("context_parallel") or {}).get("profile") or {}).values())
    return rows


def render_profiles(results: dict[str, Any]) -> str:
    """The table printed last: one line per profiled step and rank (comm from the host where no kernels)."""
    rows = profile_rows(results)
    if not rows:
        return ""
    head = ("rank", "what", "wall ms", "busy ms", "idle %", "comm ms", "overlap ms", "kernels", "ops", "threads",
            "cpu/wall", "SM MHz")
    lines, host_comm = [], False
    for p in rows:
        comm, over = p.get("comm_ms"), p.get("overlapped_ms")
        mark = ""
        if comm is None:
            comm, over, mark, host_comm = p["host"]["comm_ms"], p["host"]["overlapped_ms"], "*", True
        clock = p.get("sm_clock_mhz") or {}
        lines.append((str(p["rank"]), p["what"], _cell(p["wall_ms"]), _cell(p.get("busy_ms")),
                      _cell(p.get("idle_pct")), _cell(comm) + mark, _cell(over) + mark,
                      _cell(p.get("kernels"), None), _cell(p["host"]["ops"], None),
                      _cell(p["threads"]["intra_op"], None), _cell(p.get("cpu_per_wall"), 2),
                      _cell(clock.get("mean"), 0)))
    widths = [max(len(r[i]) for r in (head, *lines)) for i in range(len(head))]
    fmt = "  ".join("{:<%d}" % w if i == 1 else "{:>%d}" % w for i, w in enumerate(widths))
    out = ["profile (one step each; see --out for kinds, phases and host facts):", "  " + fmt.format(*head)]
    out += ["  " + fmt.format(*r) for r in lines]
    if host_comm:
        out.append("  * no GPU kernels: comm is the host's time inside collectives, overlap the part of it the "
                   "process computed through")
    return "\n".join(out)
