"""``fluxkiln bench --e2e``: what a user pays in a new process, measured from the outside.

A FLUX.1-dev diffusers folder with random weights is saved (or reused, ``--e2e-folder``); then, each in a FRESH
process, stock diffusers (``FluxPipeline.from_pretrained`` + the same images + PNG files) and the real
``fluxkiln run --json`` of a recipe ``load_model -> 3 x sample -> save`` run, the latter with the compile cache
cold (a new cache folder), warm (the same folder again) and, when asked, after ``fluxkiln warmup`` in a new
folder; with ``--e2e-repeats N`` stock and warm run N times in turns, and the targets that compare them take
the medians (one process's imports vary by seconds between runs).  Each row has the process's wall time from
the outside and its phases from the inside (fluxkiln's JSON events; the stock worker's own clock): start-up
(interpreter, imports, plugins), load, each image, each save, exit.  ``--tiny`` does the same on the CPU with the tiny model in seconds (CI runs it).
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .session import PROMPT

SEEDS = (1, 2, 3)


def recipe_text(folder: Path, size: int, steps: int, go_fast: bool = False) -> str:
    """load_model -> one sample node per seed -> one save node each (PNG, like the stock worker)."""
    text = f'[recipe]\nname = "e2e"\n\n[nodes.base]\ntype = "load_model"\nmodel = {json.dumps(str(folder))}\n'
    for i, seed in enumerate(SEEDS, 1):
        text += (f'\n[nodes.img{i}]\ntype = "sample"\nmodel = "@base"\nprompt = {json.dumps(PROMPT)}\n'
                 f'aspect_ratio = "custom"\nwidth = {size}\nheight = {size}\nnum_inference_steps = {steps}\n'
                 f'guidance = 3.0\nseed = {seed}\ngo_fast = {str(go_fast).lower()}\n'
                 f'\n[nodes.save{i}]\ntype = "save"\nimages = "@img{i}"\noutput_format = "png"\n')
    return text


def child_env(cache: Path | None) -> dict[str, str]:
    """The environment of a fresh process: fluxkiln's cache (and with it the compile cache) at ``cache``."""
    env = {k: v for k, v in os.environ.items() if k not in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}
    if cache is not None:
        env["FLUXKILN_CACHE"] = str(cache)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def launch(cmd: list[str], env: dict[str, str], cwd: Path) -> tuple[float, float, str]:
    """Run ``cmd``; (start epoch, wall seconds, stdout).  A failure raises with the end of its output."""
    start, t0 = time.time(), time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} exited {proc.returncode}: {(proc.stdout + proc.stderr)[-2000:]}")
    return start, wall, proc.stdout


def last_json(stdout: str) -> dict[str, Any]:
    return json.loads(stdout.strip().splitlines()[-1])


def phases(events: list[dict[str, Any]], start: float, wall: float) -> dict[str, Any]:
    """A fluxkiln run's phases from its JSON events (epoch times) and its launch time."""
    started = {e["node"]: e["time"] for e in events if e["event"] == "node_started"}
    finished = {e["node"]: e for e in events if e["event"] == "node_finished"}
    run_started = next(e["time"] for e in events if e["event"] == "run_started")
    run_finished = next(e for e in events if e["event"] == "run_finished")
    if run_finished.get("status") != "ok":
        raise RuntimeError(f"fluxkiln run ended {run_finished.get('status')}: {run_finished.get('nodes')}")

    def took(node: str) -> float:
        return round(finished[node]["time"] - started[node], 3)

    imgs = [took(f"img{i}") for i in range(1, len(SEEDS) + 1)]
    saves = [took(f"save{i}") for i in range(1, len(SEEDS) + 1)]
    row = {"wall_s": round(wall, 2), "startup_s": round(run_started - start, 2),
           "load_model_s": took("base"), "to_loaded_s": round(finished["base"]["time"] - start, 2),
           "images_s": imgs, "save_s": saves, "exit_s": round(start + wall - run_finished["time"], 2)}
    row.update(logged(events))
    return finish(row)


def logged(events: list[dict[str, Any]]) -> dict[str, Any]:
    """What the nodes said about themselves: background imports (load_model), precompiled blocks loaded,
    compile time per image and where a first batch's time went."""
    import re

    out: dict[str, Any] = {"compile_s": []}
    for e in events:
        if e["event"] != "node_log":
            continue
        text = str(e.get("message", ""))
        m = re.search(r"imported in the background in ([\d.]+) s \(waited ([\d.]+) s", text)
        if m:
            out.update(background_import_s=float(m.group(1)), import_waited_s=float(m.group(2)))
        m = re.search(r"(\d+) precompiled variant\(s\) \(transformer blocks, VAE decoder\) saved by earlier runs "
                      r"loaded in ([\d.]+) s", text)
        if m:
            out.update(precompiled_variants=int(m.group(1)), precompiled_load_s=float(m.group(2)))
        m = re.search(r"first batch: preparing the pipeline ([\d.]+) s, to the end of its first step ([\d.]+) s .*"
                      r"after its last step ([\d.]+) s", text)
        if m:
            out.setdefault("first_batch_s", []).append({"node": e.get("node"), "prepare": float(m.group(1)),
                                                        "to_first_step_end": float(m.group(2)),
                                                        "after_last_step": float(m.group(3))})
        m = re.search(r"waited ([\d.]+) s for (\d+) block variant\(s\) that helper processes", text)
        if m:
            out.setdefault("ahead_waited_s", []).append({"node": e.get("node"), "s": float(m.group(1)),
                                                         "variants": int(m.group(2))})
        m = re.search(r"torch\.compile: ([\d.]+) s in this call \(Inductor ([\d.]+) s", text)
        if m:
            out["compile_s"].append({"node": e.get("node"), "s": float(m.group(1)), "inductor_s": float(m.group(2))})
    return out


def helpers_of(cache: Path, since: float) -> list[dict[str, Any]]:
    """What the helper processes that compiled block variants for a run started at ``since`` (epoch) said they did:
    their markers under ``<cache>/precompiled/ahead`` written since."""
    out = []
    for path in sorted((cache / "precompiled" / "ahead").glob("*.json")):
        if path.stat().st_mtime < since:
            continue
        with contextlib.suppress(OSError, ValueError):
            info = json.loads(path.read_text())
            out.append({"kind": path.stem.rsplit("-", 1)[-1], "seconds": info.get("seconds"),
                        "note": info.get("note"), "saved": len(info.get("saved", []))})
    return out


def finish(row: dict[str, Any]) -> dict[str, Any]:
    """Derived fields: the first image's extra time over the later ones, and a one-image process's wall time."""
    imgs, saves = row["images_s"], row["save_s"]
    steady = statistics.median(imgs[1:])
    row["steady_image_s"] = round(steady, 3)
    row["first_image_extra_s"] = round(imgs[0] - steady, 3)
    row["one_image_process_s"] = round(row["wall_s"] - sum(imgs[1:]) - sum(saves[1:]), 2)
    return row


class EndToEnd:
    """One ``--e2e`` measurement: the folder, the stock process and the fluxkiln processes."""

    def __init__(self, work: Path, tiny: bool, folder: Path | None, warmup: bool, go_fast: bool,
                 cache: Path | None = None, depth: tuple[int, int] | None = None, repeats: int = 1):
        depth = None if tiny else depth  # the tiny model has its own depth
        self.work, self.tiny, self.warmup, self.go_fast, self.depth = work, tiny, warmup, go_fast, depth
        self.repeats = repeats
        if cache is not None and cache.exists():
            raise ValueError(f"--e2e-cache {cache} exists: the first run must start with a cold cache; give a new "
                             "folder")
        self.cache = (cache or work / "cache-e2e").resolve()
        self.folder = folder or work / "e2e-model"
        self.size, self.steps = (256, 4) if tiny else (1024, 28)
        self.results: dict[str, Any] = {"size": self.size, "steps": self.steps, "images": len(SEEDS),
                                        "go_fast": go_fast, "repeats": repeats,
                                        "depth": "tiny" if tiny else list(depth) if depth else "full"}

    def python(self, *args: str) -> list[str]:
        return [sys.executable, *args]

    def ensure_folder(self) -> None:
        folder = self.folder.resolve()
        if (folder / "model_index.json").is_file():
            self.results["folder"] = {"path": str(folder), "reused": True}
            return
        folder.parent.mkdir(parents=True, exist_ok=True)
        if self.tiny:  # seconds in this process; a full-size folder is built in its own (it holds the GPU)
            from .e2e_worker import save_folder

            self.results["folder"] = {"path": str(folder), "reused": False, **save_folder(folder, True)}
            return
        cmd = self.python("-m", "fluxkiln.plugins.bench.e2e_worker", "save", str(folder)) + (
            ["--tiny"] if self.tiny else []) + ([f"--depth={self.depth[0]},{self.depth[1]}"] if self.depth else [])
        _, wall, out = launch(cmd, child_env(self.work / "cache-save"), self.work)
        self.results["folder"] = {"path": str(folder), "reused": False, "process_s": round(wall, 2), **last_json(out)}

    def stock(self) -> dict[str, Any]:
        cmd = self.python("-m", "fluxkiln.plugins.bench.e2e_worker", "stock", str(self.folder.resolve()),
                          str(self.work / "stock-out"), str(self.size), str(self.steps),
                          ",".join(map(str, SEEDS)))
        start, wall, out = launch(cmd, child_env(self.work / "cache-stock"), self.work)
        row = last_json(out)
        row.update(wall_s=round(wall, 2), to_loaded_s=round(row.pop("loaded_at") - start, 2))
        return finish(row)

    def fluxkiln(self, cache: Path, name: str) -> dict[str, Any]:
        recipe = self.work / f"{name}.toml"
        recipe.write_text(recipe_text(self.folder.resolve(), self.size, self.steps, self.go_fast))
        cmd = self.python("-m", "fluxkiln", "run", str(recipe), "--json", "--force")
        start, wall, out = launch(cmd, child_env(cache), self.work)
        events = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        row = phases(events, start, wall)
        helpers = helpers_of(cache, start)
        if helpers:
            row["ahead_helpers"] = helpers
        return row

    def warmed(self, cache: Path) -> dict[str, Any]:
        """``fluxkiln warmup`` of the recipe in a new cache folder, then a fresh ``fluxkiln run``."""
        recipe = self.work / "e2e-warmup.toml"
        recipe.write_text(recipe_text(self.folder.resolve(), self.size, self.steps, self.go_fast))
        _, wall, _ = launch(self.python("-m", "fluxkiln", "warmup", str(recipe)), child_env(cache), self.work)
        row = self.fluxkiln(cache, "e2e-after-warmup")
        row["warmup_process_s"] = round(wall, 2)
        return row

    def run(self, record: Any) -> dict[str, Any]:
        """Every part; ``record(name, fn)`` runs one part and records a failure without stopping the others."""
        record("e2e-folder", self.ensure_folder)
        parts: list[tuple[str, str, Any]] = [
            ("e2e-stock", "stock", self.stock),
            ("e2e-fluxkiln_cold", "fluxkiln_cold", lambda: self.fluxkiln(self.cache, "e2e-cold")),
            ("e2e-fluxkiln_warm", "fluxkiln_warm", lambda: self.fluxkiln(self.cache, "e2e-warm"))]
        if self.warmup:
            parts.append(("e2e-warmup", "fluxkiln_after_warmup", lambda: self.warmed(self.work / "cache-warmup")))
        for part, key, fn in parts:  # each row is in the results before ``record`` returns (and writes them)
            record(part, lambda key=key, fn=fn: self._keep(key, fn()))
        for i in range(2, self.repeats + 1):  # stock and warm again, in turns: their medians judge the load targets
            record(f"e2e-stock-{i}", lambda: self._keep("stock", self.stock(), again=True))
            record(f"e2e-fluxkiln_warm-{i}", lambda i=i: self._keep(
                "fluxkiln_warm", self.fluxkiln(self.cache, f"e2e-warm-{i}"), again=True))
        self.results["targets"] = e2e_targets(self.results, judge=not self.tiny)
        return self.results

    def _keep(self, name: str, row: dict[str, Any], again: bool = False) -> dict[str, Any]:
        if again:
            self.results.setdefault(f"{name}_again", []).append(row)
        else:
            self.results[name] = row
        print(f"[bench] e2e {name}{' again' if again else ''}: {json.dumps(row)}", flush=True)
        return row


TYPICAL = ("to_loaded_s", "one_image_process_s", "steady_image_s", "first_image_s")


def typical(r: dict[str, Any], name: str) -> dict[str, Any] | None:
    """A process's row, or with ``--e2e-repeats`` the median of each field in :data:`TYPICAL` over its runs (the
    first image as ``images_s[0]``), with ``runs`` saying how many."""
    rows = [r[name], *r.get(f"{name}_again", [])] if r.get(name) else []
    if len(rows) < 2:
        return r.get(name)
    rows = [dict(row, first_image_s=row["images_s"][0]) for row in rows]
    mid = {k: round(statistics.median(row[k] for row in rows), 3) for k in TYPICAL}
    return {**mid, "images_s": [mid["first_image_s"]], "runs": len(rows)}


def e2e_targets(r: dict[str, Any], judge: bool = True) -> list[dict[str, Any]]:
    """The end-to-end targets with what this run measured (``met`` only when ``judge``: full-size shapes); the
    stock and warm rows' medians where they ran more than once (``--e2e-repeats``)."""
    stock, cold, warm = typical(r, "stock"), r.get("fluxkiln_cold"), typical(r, "fluxkiln_warm")
    warmed = r.get("fluxkiln_after_warmup")  # the compile cache on disk that `fluxkiln warmup` writes
    runs = max((x or {}).get("runs", 1) for x in (stock, warm))
    out = []

    def add(what: str, value: Any, limit: Any, repeated: bool = False) -> None:
        met = None if value is None or limit is None or not judge else value <= limit
        out.append({"work": what, "measured": value, "target": limit, "met": met,
                    **({"medians_of": runs} if repeated and runs > 1 else {})})

    if warm:
        add("first image, compile cache on disk: s (<= steady + 2)", warm["images_s"][0],
            round(warm["steady_image_s"] + 2, 3), repeated=True)
    if cold:
        add("first image, cold compile cache: s", cold["images_s"][0], 20.0)
    if warm and stock:
        add("process start to loaded model: s (<= stock + 1)", warm["to_loaded_s"], round(stock["to_loaded_s"] + 1, 2),
            repeated=True)
        add("whole process, one image: s (<= stock)", warm["one_image_process_s"], stock["one_image_process_s"],
            repeated=True)
    if warmed:
        add("after fluxkiln warmup: first image, s (<= steady + 2)", warmed["images_s"][0],
            round(warmed["steady_image_s"] + 2, 3))
    if warmed and stock:
        add("after fluxkiln warmup: whole process, one image: s (<= stock)", warmed["one_image_process_s"],
            stock["one_image_process_s"], repeated=True)
    return out
