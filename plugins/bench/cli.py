"""``fluxkiln bench``'s command line: parse the options, run the wanted parts of one session, print the table."""

from __future__ import annotations

import argparse
import os
import re
import shutil
from pathlib import Path

from .generation import CONFIGS as GENERATION_CONFIGS
from .generation import GenerationBench
from .report import render_table, targets
from .sampling import CONFIGS, DEFAULT_CONFIGS, SamplingBench, configs
from .session import BenchSession
from .training import CONFIGS as TRAIN_CONFIGS
from .training import DEFAULT as TRAIN_DEFAULT
from .training import training

HELP = "benchmark sampling and LoRA training (fluxkiln vs stock diffusers/peft) on this machine"


def parse(argv: list[str]) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fluxkiln bench", description=HELP)
    p.add_argument("--random-weights", action="store_true", default=True,
                   help="full-size FLUX.1 shapes with random weights (default; nothing is downloaded)")
    p.add_argument("--tiny", action="store_true", help="the tiny built-in model instead (CPU-sized; for CI)")
    p.add_argument("--only", choices=["sample", "train", "quality"], help="run one part only")
    p.add_argument("--configs", default=",".join(DEFAULT_CONFIGS), help="sampling configurations, comma-separated "
                   "(default: the first three): " + ", ".join(CONFIGS) + "; -cache rows use --cache-threshold, "
                   "-graphs rows compile each block with CUDA graphs of its own (mode reduce-overhead), -nograph rows "
                   "switch whole-step CUDA graphs off")
    p.add_argument("--cache-threshold", type=float, default=0.1, help="the step cache's threshold in -cache rows "
                   "(default 0.1)")
    p.add_argument("--quality", action="store_true", help="also the quality guard on mini-flux: adherence of eager, "
                   "compiled, go_fast and the step cache (--only quality: that alone)")
    p.add_argument("--quality-prompts", type=int, default=None, help="held-out prompts per quality row "
                   "(default 100; tiny 4)")
    p.add_argument("--quality-thresholds", default="0.05,0.1", help="step-cache thresholds of the quality guard")
    p.add_argument("--quality-variants", default="dev,schnell", help="mini-flux variants of the quality guard "
                   "(tiny: dev)")
    p.add_argument("--train-configs", default=",".join(TRAIN_DEFAULT), help="training configurations, "
                   "comma-separated: " + ", ".join(TRAIN_CONFIGS) + " (default: all but the last but one, the "
                   "24 GB-card setup with the fp8 storage of diffusers' layerwise casting)")
    p.add_argument("--card-gib", type=float, default=None, help="the allocator cap of the 24 GB-card rows "
                   "(default 22: what a 24 GB card leaves a process)")
    p.add_argument("--train-profile", action="store_true", help="run each training row once more under "
                   "torch.profiler: GPU busy and idle time per step")
    p.add_argument("--generation", default="", help="also time these, comma-separated: "
                   + ", ".join(GENERATION_CONFIGS) + " (Full HD beside stock; the dev + schnell hybrid)")
    p.add_argument("--no-stock", action="store_true", help="skip the stock diffusers/peft baselines")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per configuration (default 2; tiny 1)")
    p.add_argument("--train-steps", type=int, default=None, help="training steps per configuration (default 8)")
    p.add_argument("--train-resolution", type=int, default=None, help="training resolution (default 1024)")
    p.add_argument("--out", type=Path, default=None, help="write the JSON results here (default bench.json; "
                   "bench-gpus.json with --gpus)")
    p.add_argument("--gpus", type=int, default=None, metavar="N",
                   help="N workers: data-parallel images/s, DDP step time at N x the global batch and context-"
                        "parallel latency, each beside one process in the same run (CPU processes with gloo where "
                        "there is no GPU)")
    p.add_argument("--cp-variants", default="", help="with --gpus: context-parallel variants to time, comma-"
                   "separated (default: one-eager, one-compiled, ulysses-eager, ulysses-compiled, allgather-compiled, "
                   "diffusers-eager, diffusers-compiled; also allgather-eager, ulysses-whole, overlap-eager, "
                   "overlap-compiled, in CUDA-graph mode one-graphs, allgather-graphs, ulysses-graphs, "
                   "overlap-graphs, with whole-step CUDA graphs one-steps, allgather-steps, ulysses-steps, "
                   "overlap-steps; a compiled one may add +noreorder (without Inductor's compute/"
                   "communication reordering, which a split transformer turns on) or +sched (its overlap scheduler "
                   "besides)")
    p.add_argument("--parts", default="", help="with --gpus: which measurements, comma-separated, in this order "
                   "(default: data_parallel, ddp, context_parallel); each is written to --out as soon as it ends")
    p.add_argument("--profile", action="store_true", help="with --gpus: also profile one step of each part with "
                   "torch.profiler (DDP: alone and on every rank; context parallel: one denoising step of each "
                   "variant that ran) and report where its time goes: GPU busy and idle, communication and how much "
                   "of it overlapped compute, kernels, CPU ops, threads, CPU time; a table last, all in --out")
    p.add_argument("--e2e", action="store_true", help="end to end instead: fresh processes of `fluxkiln run` "
                   "(load_model -> 3 images -> save) and of stock diffusers on a saved random-weight model folder, "
                   "compile cache cold and warm (default --out bench-e2e.json)")
    p.add_argument("--e2e-folder", type=Path, default=None, metavar="PATH",
                   help="--e2e: the model folder to reuse, or to write there when missing (kept afterwards)")
    p.add_argument("--e2e-warmup", action="store_true", help="--e2e: also `fluxkiln warmup` the recipe in a new "
                   "cache folder, then run it in a fresh process")
    p.add_argument("--e2e-cache", type=Path, default=None, metavar="DIR",
                   help="--e2e: the fluxkiln cache (and compile cache) of the cold and warm runs; must not exist "
                        "(it is cold); kept afterwards, so a later run with FLUXKILN_CACHE=DIR starts warm")
    p.add_argument("--e2e-depth", default=None, metavar="DOUBLE,SINGLE",
                   help="--e2e: a new folder's transformer with this many double and single blocks instead of "
                        "FLUX.1's 19,38 (each full size: compilation, imports and start-up cost the same; load and "
                        "image times shrink with depth, for stock alike)")
    p.add_argument("--e2e-go-fast", action="store_true", help="--e2e: go_fast = true in the recipe (default "
                   "false: lossless)")
    p.add_argument("--e2e-repeats", type=_at_least_one, default=1, metavar="N",
                   help="--e2e: run stock and the warm-cache fluxkiln process N times in turns; the targets that "
                        "compare them take the medians (default 1)")
    return p


def _at_least_one(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return n


def main_e2e(args: argparse.Namespace) -> int:
    """``--e2e``: the end-to-end processes only, their JSON and a summary."""
    import json
    import tempfile
    import time

    from .e2e import EndToEnd
    from .report import render_e2e

    work = Path(tempfile.mkdtemp(prefix="fluxkiln-e2e-"))
    out = args.out or Path("bench-e2e.json")
    results: dict = {"date": time.strftime("%Y-%m-%d"), "mode": "tiny" if args.tiny else "random-weights",
                     "errors": []}

    out.parent.mkdir(parents=True, exist_ok=True)

    def record(part: str, fn):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - record one part's failure, measure the rest
            results["errors"].append({"part": part, "error": f"{type(exc).__name__}: {exc}"})
            print(f"[bench] {part} FAILED: {type(exc).__name__}: {exc}", flush=True)
            return None
        finally:
            out.write_text(json.dumps(results, indent=2))  # as it goes: a run cut short keeps what it measured

    depth = tuple(int(n) for n in args.e2e_depth.split(",")) if args.e2e_depth else None
    e2e = EndToEnd(work, args.tiny, args.e2e_folder, args.e2e_warmup, args.e2e_go_fast, args.e2e_cache, depth,
                   args.e2e_repeats)
    results["e2e"] = e2e.results
    try:
        e2e.run(record)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out.write_text(json.dumps(results, indent=2))
    print(render_e2e(results))
    print(f"results: {out}")
    return 1 if results["errors"] else 0


def quality(bench: BenchSession) -> None:
    """The quality guard on mini-flux (fewer prompts and steps with --tiny)."""
    from .quality import QualityGuard, render_quality

    args = bench.args
    thresholds = tuple(float(t) for t in args.quality_thresholds.split(",") if t.strip())
    guard = QualityGuard(bench.device, prompts=args.quality_prompts or (4 if bench.tiny else 100),
                         thresholds=thresholds, steps={"dev": 8} if bench.tiny else None,
                         sample_rows=bench.results.get("sample"), batch=4 if bench.tiny else 8)
    variants = ("dev",) if bench.tiny else tuple(configs(args, "quality_variants"))
    for variant in variants:  # saved after each variant: a run cut short keeps what it measured
        bench.results["quality"] = {**bench.results.get("quality", {}), **guard.run((variant,))}
        bench.save()
    print(render_quality(bench.results["quality"]), flush=True)


def main(argv: list[str]) -> int:
    parser = parse(argv)
    args = parser.parse_args(argv)
    for flag, given, known in (("--configs", configs(args), CONFIGS),
                               ("--train-configs", configs(args, "train_configs"), TRAIN_CONFIGS),
                               ("--generation", configs(args, "generation"), GENERATION_CONFIGS),
                               ("--quality-variants", configs(args, "quality_variants"), ("dev", "schnell"))):
        bad = [c for c in given if c not in known]
        if bad:
            parser.error(f"unknown {flag} {', '.join(bad)}; choose from {', '.join(known)}")
    if {"fp8_ckpt_24gb", "fp8_ckpt_24gb_layerwise"} <= set(configs(args, "train_configs")):
        parser.error("--train-configs: fp8_ckpt_24gb and fp8_ckpt_24gb_layerwise need a run each (diffusers' "
                     "layerwise casting cannot be taken off a model again)")
    if args.profile and args.gpus is None:
        parser.error("--profile profiles the steps of a multi-process run: use it with --gpus N")
    if args.e2e:
        if args.e2e_depth and not re.fullmatch(r"\d+,\d+", args.e2e_depth):
            parser.error(f"--e2e-depth {args.e2e_depth!r}: give DOUBLE,SINGLE block counts, e.g. 5,10")
        if args.e2e_cache is not None and args.e2e_cache.exists():
            parser.error(f"--e2e-cache {args.e2e_cache} exists: the first run needs a cold cache; give a new folder")
        return main_e2e(args)  # fresh `fluxkiln run` processes: the decoder compiles as users' runs do
    # the steady state of a long session: the VAE decoder compiled from the first image, not after PATIENCE
    os.environ.setdefault("FLUXKILN_COMPILE_VAE", "1")
    if args.gpus is not None:
        from .many import main_many

        return main_many(args, argv)
    bench = BenchSession(args)
    try:
        bench.setup(build=args.only != "quality")
        if args.only in (None, "sample"):
            SamplingBench(bench).run()
            GenerationBench(bench).run(configs(args, "generation"))
        if args.only in (None, "train"):
            bench.guarded("training", training, bench, configs(args, "train_configs"))
        if args.quality or args.only == "quality":
            bench.guarded("quality", quality, bench)
        bench.results["targets"] = targets(bench.results)
        bench.save()
        print(render_table(bench.results))
        print(f"results: {bench.out}")
    finally:
        shutil.rmtree(bench.work, ignore_errors=True)
    return 1 if bench.results["errors"] else 0
