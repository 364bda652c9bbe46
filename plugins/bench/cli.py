"""``fluxkiln bench``'s command line: parse the options, run the wanted parts of one session, print the table."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from .generation import CONFIGS as GENERATION_CONFIGS
from .generation import GenerationBench
from .report import render_table, targets
from .sampling import CONFIGS, SamplingBench, configs
from .session import BenchSession
from .training import CONFIGS as TRAIN_CONFIGS
from .training import training

HELP = "benchmark sampling and LoRA training (fluxkiln vs stock diffusers/peft) on this machine"


def parse(argv: list[str]) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fluxkiln bench", description=HELP)
    p.add_argument("--random-weights", action="store_true", default=True,
                   help="full-size FLUX.1 shapes with random weights (default; nothing is downloaded)")
    p.add_argument("--tiny", action="store_true", help="the tiny built-in model instead (CPU-sized; for CI)")
    p.add_argument("--only", choices=["sample", "train"], help="run one part only")
    p.add_argument("--configs", default=",".join(CONFIGS), help="sampling configurations, comma-separated: "
                   + ", ".join(CONFIGS))
    p.add_argument("--train-configs", default=",".join(TRAIN_CONFIGS), help="training configurations, "
                   "comma-separated: " + ", ".join(TRAIN_CONFIGS))
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
                   "diffusers-eager, diffusers-compiled; also allgather-eager, ulysses-whole)")
    return p


def main(argv: list[str]) -> int:
    parser = parse(argv)
    args = parser.parse_args(argv)
    for flag, given, known in (("--configs", configs(args), CONFIGS),
                               ("--train-configs", configs(args, "train_configs"), TRAIN_CONFIGS),
                               ("--generation", configs(args, "generation"), GENERATION_CONFIGS)):
        bad = [c for c in given if c not in known]
        if bad:
            parser.error(f"unknown {flag} {', '.join(bad)}; choose from {', '.join(known)}")
    if args.gpus is not None:
        from .many import main_many

        return main_many(args, argv)
    bench = BenchSession(args)
    try:
        bench.setup()
        if args.only in (None, "sample"):
            SamplingBench(bench).run()
            GenerationBench(bench).run(configs(args, "generation"))
        if args.only in (None, "train"):
            bench.guarded("training", training, bench, configs(args, "train_configs"))
        bench.results["targets"] = targets(bench.results)
        bench.save()
        print(render_table(bench.results))
        print(f"results: {bench.out}")
    finally:
        shutil.rmtree(bench.work, ignore_errors=True)
    return 1 if bench.results["errors"] else 0
