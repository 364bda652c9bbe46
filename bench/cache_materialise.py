"""Benchmark (not a test): what the result cache stores per image, and how fast a cached run fills a new folder.

Runs sample -> safety_check -> save on the tiny built-in FLUX model (any CPU, no
download) at 1 MP (1024x1024), with ``save``'s defaults (webp, quality 80):

1. **Cache bytes per image**: one image through the three nodes in a fresh
   cache; every stored file counted once, however many hard links it has.
   Compared with one raw image (width x height x 3 bytes) and with what the
   entries would take if nothing were shared.
2. **Materialisation**: a 4-image run, then the same recipe into a new folder
   (``--output``): everything is cached, and the 4 images and the safety
   report are put into the new folder.  Timed as the whole cached run and as
   the file placement alone, as fluxkiln does it (files of 16 KiB and more as
   hard links) and with copies only (as on a file system without hard links,
   or with the cache on another disk).

    python bench/cache_materialise.py [--steps 4] [--repeats 5]

Prints a summary and writes bench/cache_materialise.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

RECIPE = """[recipe]
name = "cache-bench"
[nodes.base]
type = "load_model"
model = "builtin:tiny-flux-schnell"
[nodes.images]
type = "sample"
model = "@base"
prompt = "a lighthouse on a cliff at dusk, photograph"
aspect_ratio = "1:1"
megapixels = "1"
num_inference_steps = {steps}
num_outputs = {n}
seed = 42
[nodes.checked]
type = "safety_check"
images = "@images"
checker = "builtin:tiny-safety"
classifier = "builtin:tiny-safety"
policy = "flag"
[nodes.saved]
type = "save"
images = "@checked"
"""


def stored_bytes(cache: Path) -> int:
    """Bytes of the result cache on disk: each file once (hard links share their bytes)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for sub in ("results", "blobs"):
        for p in (cache / sub).rglob("*"):
            st = p.lstat()
            if p.is_file() and (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return total


def measure_bytes(tmp: Path, steps: int) -> dict:
    from fluxkiln.engine import cacheadmin
    from fluxkiln.engine.runner import Engine

    cache = tmp / "cache-bytes"
    recipe = tmp / "one.toml"
    recipe.write_text(RECIPE.format(steps=steps, n=1))
    result = Engine(cache_dir=cache).run(recipe, output=tmp / "run-bytes")
    assert result.ok, [e.data for e in result.events if e.event == "node_failed"]
    image = result.outputs["saved"]["output"][0].image
    raw = image.width * image.height * 3
    entries = cacheadmin.scan(Engine(cache_dir=cache).disk)
    stored = stored_bytes(cache)
    webp = next(iter((tmp / "run-bytes").glob("saved_0.*")))
    return {"width": image.width, "height": image.height, "raw_image_bytes": raw,
            "cache_bytes_per_image": stored, "ratio_to_raw": round(stored / raw, 4),
            "target_ratio": 1.2, "met": stored <= 1.2 * raw,
            "bytes_if_nothing_were_shared": sum(e.size + e.manifest_bytes for e in entries),
            "saved_file": webp.name, "saved_file_bytes": webp.stat().st_size,
            "by_node_type": cacheadmin.summary(entries)["by_type"]}


def _timed_put_files(engine) -> list[float]:
    """Wrap the engine's file placement so each call's seconds are recorded."""
    times: list[float] = []
    inner = engine.caches.put_files

    def put_files(plan, np_):
        t0 = time.perf_counter()
        inner(plan, np_)
        times.append(time.perf_counter() - t0)

    engine.caches.put_files = put_files
    return times


def measure_materialise(tmp: Path, steps: int, repeats: int) -> dict:
    from fluxkiln.engine.runner import Engine

    cache = tmp / "cache-mat"
    recipe = tmp / "four.toml"
    recipe.write_text(RECIPE.format(steps=steps, n=4))
    t0 = time.perf_counter()
    first = Engine(cache_dir=cache).run(recipe, output=tmp / "first")
    cold = time.perf_counter() - t0
    assert first.ok, [e.data for e in first.events if e.event == "node_failed"]
    out: dict = {"images": 4, "first_run_seconds": round(cold, 3)}
    for mode in ("hard links", "copies only"):
        runs, places = [], []
        for i in range(repeats):
            engine = Engine(cache_dir=cache)  # a new process's engine: results come from the disk cache
            times = _timed_put_files(engine)
            real_link = os.link
            if mode == "copies only":
                os.link = _no_link
            try:
                t0 = time.perf_counter()
                res = engine.run(recipe, output=tmp / f"new-{mode[0]}{i}")
                runs.append(time.perf_counter() - t0)
            finally:
                os.link = real_link
            assert res.ok and set(res.nodes.values()) == {"cached"}, res.nodes
            assert len(list((tmp / f"new-{mode[0]}{i}").glob("saved_*.webp"))) == 4
            places.append(sum(times))
        out[mode] = {"cached_run_seconds_median": round(statistics.median(runs), 4),
                     "cached_run_seconds_per_image": round(statistics.median(runs) / 4, 4),
                     "placing_files_seconds_median": round(statistics.median(places), 5),
                     "placing_files_seconds_per_image": round(statistics.median(places) / 4, 5),
                     "runs": [round(r, 4) for r in runs]}
    out["target_seconds_per_image"] = 0.1
    out["met"] = all(out[m]["cached_run_seconds_per_image"] <= 0.1 for m in ("hard links", "copies only"))
    return out


def _no_link(src, dst, *args, **kwargs):
    raise OSError(18, "Invalid cross-device link (benchmark: copies)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=4, help="sampling steps (the content barely matters here)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(Path(__file__).with_suffix(".json")))
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="fluxkiln-cache-bench-"))
    os.environ.setdefault("FLUXKILN_CACHE", str(tmp / "cache"))  # the tiny models are built here once
    data = {"machine": {"platform": platform.platform(), "python": platform.python_version(),
                        "cpus": os.cpu_count()},
            "date": time.strftime("%Y-%m-%d"), "steps": args.steps,
            "bytes": measure_bytes(tmp, args.steps),
            "materialise": measure_materialise(tmp, args.steps, args.repeats)}
    Path(args.out).write_text(json.dumps(data, indent=1) + "\n")
    b, m = data["bytes"], data["materialise"]
    print(f"cache bytes per {b['width']}x{b['height']} image through sample -> safety_check -> save: "
          f"{b['cache_bytes_per_image']} ({b['ratio_to_raw']:.3f}x one raw image of {b['raw_image_bytes']}; "
          f"{b['bytes_if_nothing_were_shared']} if nothing were shared)")
    for mode in ("hard links", "copies only"):
        r = m[mode]
        print(f"cached 4-image run into a new folder ({mode}): {r['cached_run_seconds_per_image']:.4f} s per image "
              f"(whole run {r['cached_run_seconds_median']:.3f} s; placing the files "
              f"{r['placing_files_seconds_per_image'] * 1000:.2f} ms per image)")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
