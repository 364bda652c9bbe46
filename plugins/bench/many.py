"""``fluxkiln bench --gpus N``: data-parallel throughput, DDP step time and context-parallel latency on N workers.

The command starts N workers through the same elastic launcher as ``fluxkiln
run --gpus N``.  In that world every measurement has its one-process baseline
in the same call: rank 0 runs it alone while the other ranks wait at a
barrier, then all N run the parallel version.

- data parallel: ``2 × N`` images (2 per process) through the pipeline with
  the split ``sample`` uses (:func:`~fluxkiln.engine.distributed.run_shard`);
  images/s on N processes vs one.
- DDP: LoRA training steps with the trainer's own loss and gradient sum
  (``flow_loss`` on this rank's slice, ``DataParallel.sync``): one process at
  batch B vs N processes at the global batch N × B.
- context parallel: one image's latency on one GPU vs split over N, for
  fluxkiln's own context parallelism and diffusers' stock Ulysses, eager and
  compiled, side by side (:mod:`.cp_latency`).

Results go to JSON (``--out``, default ``bench-gpus.json``) like the rest of the bench.  With
``--profile`` each part also profiles one step (:mod:`.step_profile`) under ``"profile"``, and a table of
the profiles ends the output.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from fluxkiln.engine import distributed

from .session import PROMPT

TARGETS = {2: {"dp_speedup": 1.9, "cp_ratio": 0.60, "ddp_ratio": 1.1},
           4: {"dp_speedup": 3.7, "cp_ratio": 0.35, "ddp_ratio": 1.1}}


def main_many(args: argparse.Namespace, argv: list[str]) -> int:
    """Launch the workers (from the command line), or measure (inside a launched world)."""
    parts = many_parts(args)  # refused before any worker starts
    if not distributed.from_env().many:
        if args.gpus < 2:
            print("fluxkiln bench: --gpus N needs N >= 2 (the one-process baseline is measured in the same run)")
            return 2
        from fluxkiln.engine.launch import launch_workers

        return launch_workers(args.gpus, ["bench", *argv])
    import signal

    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # workers start with it blocked (see launch)
    world = distributed.init()
    out = args.out or Path("bench-gpus.json")
    try:
        results = Many(args, world).run(parts, lambda r: out.write_text(json.dumps(r, indent=2, default=str)))
    finally:
        distributed.shutdown()
    if world.owner:
        print(render(results))
        if getattr(args, "profile", False):
            from .step_profile import render_profiles

            print(render_profiles(results))
        print(f"results: {out}")
    return 0


PARTS = ("data_parallel", "ddp", "context_parallel")


def many_parts(args: argparse.Namespace) -> list[str]:
    """The measurements ``--parts`` asks for (all three by default), refused by name when unknown."""
    wanted = [p.strip() for p in (getattr(args, "parts", "") or "").split(",") if p.strip()] or list(PARTS)
    bad = [p for p in wanted if p not in PARTS]
    if bad:
        raise SystemExit(f"fluxkiln bench: unknown --parts {', '.join(bad)}; choose from {', '.join(PARTS)}")
    return list(dict.fromkeys(wanted))


class Many:
    """The measurements of one ``bench --gpus N`` run, on every rank."""

    def __init__(self, args: argparse.Namespace, world: distributed.World) -> None:
        import torch

        self.args, self.world = args, world
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.tiny = args.tiny
        self.size = 256 if self.tiny else 1024
        self.steps = 4 if self.tiny else 28
        self.train_res = args.train_resolution or (64 if self.tiny else 1024)
        self.train_steps = args.train_steps or (4 if self.tiny else 8)
        self.profiler = None
        if getattr(args, "profile", False):
            from .step_profile import StepProfiler

            self.profiler = StepProfiler(self.device, world.rank, self._barrier, self._sync)

    def run(self, parts: list[str], save: Any) -> dict[str, Any]:
        """Measure ``parts`` in order; after each, rank 0 hands the results so far to ``save``, so a worker
        lost in a later part (a crashed kernel takes its process with it) leaves the earlier ones on disk."""
        import diffusers
        import torch

        torch.manual_seed(0)
        self.pipe = self._build()
        results: dict[str, Any] = {
            "date": time.strftime("%Y-%m-%d"), "mode": "tiny" if self.tiny else "random-weights",
            "device": self.device, "gpus": self.world.size, "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "gpu": torch.cuda.get_device_name() if self.device == "cuda" else "cpu",
            "size": self.size, "steps": self.steps}
        for part in parts:
            results[part] = getattr(self, part)()
            results["targets"] = targets(results)
            if self.world.owner:
                save(results)
        return results

    def _build(self) -> Any:
        if self.tiny:
            from fluxkiln.plugins.flux.tiny import build_tiny_flux

            pipe = build_tiny_flux("dev").to(self.device)
        else:
            from .models import build_full_size

            pipe = build_full_size(self.device)["dev"]
        pipe.set_progress_bar_config(disable=True)
        return pipe

    # ------------------------------------------------------------------ helpers
    def _sync(self) -> None:
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()

    def _barrier(self) -> None:
        import torch.distributed as dist

        self._sync()
        dist.barrier()

    def _images(self, n: int, seed: int) -> list[Any]:
        import torch

        if n == 0:
            return []
        gens = [torch.Generator("cpu").manual_seed(seed + i) for i in range(n)]
        with torch.no_grad():
            return self.pipe(PROMPT, num_images_per_prompt=n, width=self.size, height=self.size,
                             num_inference_steps=self.steps, guidance_scale=3.5, generator=gens,
                             output_type="pil").images

    def _alone(self, fn: Any) -> float | None:
        """Time ``fn`` on rank 0 alone (the one-process baseline); the others wait."""
        self._barrier()
        seconds = None
        if self.world.owner:
            t0 = time.perf_counter()
            fn()
            self._sync()
            seconds = time.perf_counter() - t0
        self._barrier()
        return seconds

    def _together(self, fn: Any) -> float:
        self._barrier()
        t0 = time.perf_counter()
        fn()
        self._barrier()
        return time.perf_counter() - t0

    # ------------------------------------------------------------------ parts
    def data_parallel(self) -> dict[str, Any]:
        n = 2 * self.world.size
        self._images(1, 0)  # warm-up on every rank
        one = self._alone(lambda: [self._images(2, 2 * i) for i in range(self.world.size)])
        many = self._together(lambda: distributed.run_shard(lambda part: self._images(len(part), part.start), n))
        return {"images": n, "per_process_batch": 2, "one_s": _r(one), "many_s": _r(many),
                "one_images_per_s": _r(n / one) if one else None, "many_images_per_s": _r(n / many),
                "speedup": _r(one / many) if one else None}

    def ddp(self) -> dict[str, Any]:
        from .ddp_steps import DdpSteps

        steps = DdpSteps(self.pipe, self.device, self.train_res)
        per_process = 1
        steps.step(per_process, alone=True)  # warm-up
        self._barrier()
        one = self._alone(lambda: [steps.step(per_process, alone=True) for _ in range(self.train_steps)])
        steps.step(per_process * self.world.size, alone=False)
        many = self._together(lambda: [steps.step(per_process * self.world.size, alone=False)
                                        for _ in range(self.train_steps)])
        profile = None
        if self.profiler is not None:  # after the timed steps, so the profiler never weighs on them
            profile = {"alone": self.profiler.alone("ddp step alone", lambda: steps.step(per_process, alone=True)),
                       "together": self.profiler.together(
                           "ddp step together", lambda: steps.step(per_process * self.world.size, alone=False))}
        steps.close()
        one_step = one / self.train_steps if one else None
        many_step = many / self.train_steps
        out = {"resolution": self.train_res, "rank": steps.rank,
               "lora_parameters": sum(p.numel() for p in steps.params), "per_process_batch": per_process,
               "global_batch": per_process * self.world.size, "steps": self.train_steps,
               "one_step_s": _r(one_step), "many_step_s": _r(many_step),
               "ratio": _r(many_step / one_step) if one_step else None}
        if profile is not None:
            out["profile"] = profile
        return out

    def context_parallel(self) -> dict[str, Any]:
        from .cp_latency import CpLatency

        return CpLatency(self, cp_variants(self.args, self.device)).run()


def cp_variants(args: argparse.Namespace, device: str) -> list[str]:
    """The context-parallel variants to time, in the order they must run (diffusers' last: it stays on)."""
    from .cp_latency import CPU_VARIANTS, EXTRA_VARIANTS, OPTIONS, VARIANTS

    known = VARIANTS + EXTRA_VARIANTS
    wanted = [v for v in (getattr(args, "cp_variants", None) or "").split(",") if v] or \
        list(VARIANTS if device == "cuda" else CPU_VARIANTS)

    def valid(v: str) -> bool:
        base, _, option = v.partition("+")
        return base in known and (not option or (option in OPTIONS and not base.endswith("-eager")))

    bad = [v for v in wanted if not valid(v)]
    if bad:
        raise SystemExit(f"fluxkiln bench: unknown --cp-variants {', '.join(bad)}; choose from {', '.join(known)}, "
                         f"a compiled one may add +{' or +'.join(OPTIONS)}")
    return sorted(dict.fromkeys(wanted), key=lambda v: (v.startswith("diffusers-"), known.index(v.partition("+")[0]),
                                                   v.partition("+")[2]))


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target of the issue beside the measured value (met / missed / not measured)."""
    want = TARGETS.get(results["gpus"])
    if want is None or results["device"] != "cuda":
        return []
    got = {"dp_speedup": results.get("data_parallel", {}).get("speedup"),
           "ddp_ratio": results.get("ddp", {}).get("ratio"),
           "cp_ratio": (results.get("context_parallel", {}).get("best") or {}).get("ratio")}
    rows = []
    for name, goal in want.items():
        value = got[name]
        ok = None if value is None else (value >= goal if name == "dp_speedup" else value <= goal)
        rows.append({"target": name, "goal": goal, "value": value, "met": ok})
    return rows


def render(results: dict[str, Any]) -> str:
    lines = [f"fluxkiln bench --gpus {results['gpus']} ({results['mode']}, {results['gpu']})"]
    if dp := results.get("data_parallel"):
        lines.append(f"  data parallel: {dp['images']} images, {dp['one_images_per_s']} img/s on 1, "
                     f"{dp['many_images_per_s']} img/s on {results['gpus']}: {dp['speedup']}x")
    if ddp := results.get("ddp"):
        lines.append(f"  DDP: {ddp['one_step_s']} s/step at batch {ddp['per_process_batch']} on 1, "
                     f"{ddp['many_step_s']} s/step at global batch {ddp['global_batch']}: {ddp['ratio']}x")
    if cp := results.get("context_parallel"):
        lines += _render_cp(cp)
    return "\n".join(lines)


def _render_cp(cp: dict[str, Any]) -> list[str]:
    lines = [f"  context parallel ({cp['what']}):"]
    for name, v in cp["variants"].items():
        if "skipped" in v:
            lines.append(f"    {name:<20} skipped ({v['skipped']})")
            continue
        ratio = f"  {v['ratio']}x of one GPU" if v.get("ratio") is not None else ""
        diff = f"  max rel. diff {v['max_rel_diff']}" if v.get("max_rel_diff") is not None else ""
        lines.append(f"    {name:<20} {v['s']} s (first {v['first_s']} s){ratio}{diff}")
    if cp.get("best"):
        b = cp["best"]
        lines.append(f"    best split: {b['variant']} {b['s']} s vs one GPU's fastest {b['one_s']} s: {b['ratio']}x")
    return lines
