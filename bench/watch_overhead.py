"""Benchmark (not a test): the cost of a watch-mode rerun after a prompt edit, against sampling itself.

With the model hot in the watch session, a prompt edit should cost little more
than the `sample` node: re-validation, planning, fingerprinting, the save node
and event delivery are the overhead.  Runs on the tiny model on any CPU:

    python bench/watch_overhead.py [--steps 28] [--megapixels 1] [--edits 5]

Prints a table and writes bench/watch_overhead.json.  The debounce delay (the
quiet time the watcher waits for a burst of saves to end) is reported apart:
it is a setting, not work.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path

RECIPE = """[recipe]
name = "watch-bench"
[nodes.base]
type = "load_model"
model = "builtin:tiny-flux"
[nodes.images]
type = "sample"
model = "@base"
prompt = "{prompt}"
megapixels = "{mp}"
num_inference_steps = {steps}
seed = 1
[nodes.saved]
type = "save"
images = "@images"
output_format = "png"
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--megapixels", default="1", choices=("1", "0.25"))
    ap.add_argument("--edits", type=int, default=5)
    ap.add_argument("--debounce", type=float, default=0.3)
    args = ap.parse_args()

    import os

    tmp = Path(tempfile.mkdtemp(prefix="fluxkiln-watch-bench-"))
    os.environ.setdefault("FLUXKILN_CACHE", str(tmp / "cache"))
    from fluxkiln.engine.watch import WatchSession

    recipe = tmp / "r.toml"
    recipe.write_text(RECIPE.format(prompt="a fox 0", mp=args.megapixels, steps=args.steps))
    said: list[dict] = []
    arrived = threading.Event()

    def say(d: dict) -> None:
        said.append(d)
        if d["event"] == "watch_rerun":
            arrived.set()

    session = WatchSession(recipe, output=str(tmp / "out"), debounce=args.debounce, say=say)
    thread = threading.Thread(target=session.loop, daemon=True)
    thread.start()
    arrived.wait(600)
    rows = []
    for i in range(1, args.edits + 1):
        arrived.clear()
        t0 = time.perf_counter()
        recipe.write_text(RECIPE.format(prompt=f"a fox {i}", mp=args.megapixels, steps=args.steps))
        arrived.wait(600)
        wall = time.perf_counter() - t0
        summary = [d for d in said if d["event"] == "watch_rerun"][-1]
        assert summary["ran"] == ["images", "saved"], summary
        report = json.loads((tmp / "out" / "report.json").read_text())
        node_s = {r["node"]: r.get("seconds", 0.0) for r in report["nodes"]}
        rows.append({"edit": i, "wall": wall, "rerun": summary["seconds"], "sample": node_s["images"],
                     "save": node_s["saved"]})
    session.stop()
    sample = statistics.median(r["sample"] for r in rows)
    rerun = statistics.median(r["rerun"] for r in rows)
    wall = statistics.median(r["wall"] for r in rows)
    result = {"steps": args.steps, "megapixels": args.megapixels, "debounce": args.debounce, "edits": rows,
              "median_sample_s": sample, "median_rerun_s": rerun, "median_wall_s": wall,
              "rerun_overhead_pct": 100 * (rerun - sample) / sample,
              "overhead_excluding_save_pct": 100 * (rerun - sample - statistics.median(r["save"] for r in rows)) / sample,
              "wall_minus_debounce_overhead_pct": 100 * (wall - args.debounce - sample) / sample}
    out = Path(__file__).with_suffix(".json")
    out.write_text(json.dumps(result, indent=1))
    print(f"{'what':<40} {'seconds':>8}")
    print(f"{'sample node (median)':<40} {sample:8.3f}")
    print(f"{'rerun: validate+plan+sample+save':<40} {rerun:8.3f}")
    print(f"{'edit -> rerun done (incl. debounce)':<40} {wall:8.3f}")
    print(f"overhead of the rerun over sampling: {result['rerun_overhead_pct']:.1f}% "
          f"(without the save node: {result['overhead_excluding_save_pct']:.1f}%; "
          f"edit-to-done minus the {args.debounce}s debounce: {result['wall_minus_debounce_overhead_pct']:.1f}%)")


if __name__ == "__main__":
    main()
