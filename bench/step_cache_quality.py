"""The step cache's quality cost on mini-flux, on a CPU: adherence (the ``evaluate`` node's mini metric, i.e. mini-
flux's pixel checker) of dev at 28 steps without the cache and at each threshold, over held-out prompts, with the
seconds per image and the share of steps skipped.

    python bench/step_cache_quality.py [--prompts 32] [--thresholds 0.05,0.1,0.2] [--out bench/cpu-DATE-quality.json]

The GPU side (compiled and go_fast paths, step cache on top of go_fast) is ``fluxkiln bench --quality``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    import torch

    from fluxkiln.plugins.bench.quality import QualityGuard, render_quality

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--thresholds", default="0.05,0.1,0.2")
    p.add_argument("--variants", default="dev")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: steadier timings on a busy machine)")
    p.add_argument("--out", type=Path, default=HERE / f"cpu-{time.strftime('%Y-%m-%d')}-quality.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    guard = QualityGuard("cpu", prompts=args.prompts, thresholds=tuple(float(t) for t in args.thresholds.split(",")))
    result = guard.run(tuple(v.strip() for v in args.variants.split(",") if v.strip()))
    out = {"date": time.strftime("%Y-%m-%d"), "mode": "mini-flux, CPU", "device": "cpu", "torch": torch.__version__,
           "threads": args.threads, "seconds": round(time.perf_counter() - t0, 1), "quality": result}
    args.out.write_text(json.dumps(out, indent=2))
    print(render_quality(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
