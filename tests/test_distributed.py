"""Several processes on CPU with gloo, through the real CLI (`fluxkiln run --gpus 2`): data-parallel sampling
and training equal one process, a dead worker fails the run naming its rank with nothing half-written in the
cache, and SIGINT on one rank stops every rank after a checkpoint."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers.recipes import SQUARE_256, load_tiny, node, recipe_text, sample

pytest.importorskip("torch.distributed")

BUILTIN = Path(os.environ["FLUXKILN_CACHE"]) / "builtin"
DATA = Path(__file__).resolve().parent.parent / "recipes" / "data" / "solid-red"

FOX = {"prompt": "a red fox", "num_inference_steps": 2, **SQUARE_256}
THREE = ["a red fox", "a blue bird", "a green frog"]


def _saved(node_id: str, images: str) -> str:
    return node(node_id, "save", images=images, output_format="png")


def _lora_on_data(**train) -> str:
    """The dataset of :data:`DATA` and a ``train_lora`` node on it and the ``base`` model."""
    return node("data", "dataset", source=str(DATA)) + node("lora", "train_lora", model="@base", dataset="@data",
                                                            **train)


RECIPE = recipe_text(
    "many", load_tiny(),
    sample("images", **FOX, num_outputs=3, seed=7), _saved("saved", "@images"),
    sample("listed", **{**FOX, "prompt": THREE}, num_outputs=2, megapixels="0.25", seed=3),
    _saved("listed_saved", "@listed"),
    sample("swept", **FOX, megapixels="0.25"), "[nodes.swept.sweep]\nseed = [1, 2, 3, 4, 5]\n",
    _saved("swept_saved", "@swept"),
    _lora_on_data(steps=6, batch_size=2, learning_rate=5e-3, resolution=[64], lora_rank=4, optimizer="adamw",
                  save_every=3, save_dtype="float32", seed=11))

TRAIN_ONLY = recipe_text("long", load_tiny(), _lora_on_data(steps=6000, batch_size=1, resolution=[64], lora_rank=4,
                                                            optimizer="adamw", save_every=0))


def _cache(path: Path) -> Path:
    path.mkdir(parents=True)
    BUILTIN.mkdir(parents=True, exist_ok=True)
    (path / "builtin").symlink_to(BUILTIN, target_is_directory=True)
    return path


def _env(cache: Path, tag: str = "") -> dict[str, str]:
    # CPU workers with gloo on any machine: on a GPU host, two workers would ask for two GPUs
    return dict(os.environ, FLUXKILN_CACHE=str(cache), OMP_NUM_THREADS="1", FLUXKILN_TEST_TAG=tag,
                CUDA_VISIBLE_DEVICES="")


def _cli(*args: str, cache: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fluxkiln.engine.cli", *args], env=_env(cache), capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same recipe in one process (batch 2) and in two (batch 1 each: the same global batch of 2)."""
    root = tmp_path_factory.mktemp("many")
    recipe = root / "many.toml"
    recipe.write_text(RECIPE)
    one = _cli("run", str(recipe), "--output", str(root / "one"), cache=_cache(root / "cache1"))
    assert one.returncode == 0, one.stderr[-3000:]
    cache2 = _cache(root / "cache2")
    two = _cli("run", str(recipe), "--gpus", "2", "--json", "--output", str(root / "two"), "--set",
               "nodes.lora.batch_size=1", cache=cache2)
    assert two.returncode == 0, two.stderr[-3000:]
    (root / "two.jsonl").write_text(two.stdout)
    return root, cache2


def _pixels(path: Path):
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).astype(int)


def test_data_parallel_sampling_is_identical_to_one_process(runs):
    root, _ = runs
    logs = [json.loads(line) for line in (root / "two.jsonl").read_text().splitlines() if line.startswith("{")]
    split = [e["message"] for e in logs if e["event"] == "node_log" and e.get("node") == "images"]
    assert "3 item(s) over 2 ranks: 2 on rank 0, 1 on rank 1" in split
    one = sorted((root / "one").glob("saved_*.png"))
    two = sorted((root / "two").glob("saved_*.png"))
    assert len(one) == len(two) == 3  # 3 images split 2 + 1 over the ranks and gathered in order
    for a, b in zip(one, two, strict=True):
        assert a.name == b.name
        pa, pb = _pixels(a), _pixels(b)
        assert pa.std() > 10  # real images, not blanks
        # one process makes the three in one batch, the ranks in batches of 2 and 1: a CPU's matrix products
        # round differently with the batch (the third image has moved one pixel by 1 level with some models'
        # weights), so the stated tolerance is the prompt list's, 1 of 255 on a rare pixel; another seed or a
        # mix-up of images would change most pixels by far more
        diff = abs(pa - pb)
        assert diff.max() <= 1 and diff.mean() < 1e-3, f"{a.name} differs between one and two processes"
    assert not (_pixels(one[0]) == _pixels(one[1])).all()  # each image has its own seed
    assert abs(_pixels(one[0]) - _pixels(two[1])).mean() > 1  # so a swap of two images would be caught


def test_a_prompt_list_is_split_image_by_image_and_gathered_in_order(runs):
    root, _ = runs
    logs = [json.loads(line) for line in (root / "two.jsonl").read_text().splitlines() if line.startswith("{")]
    split = [e["message"] for e in logs if e["event"] == "node_log" and e.get("node") == "listed"]
    assert "6 item(s) over 2 ranks: 3 on rank 0, 3 on rank 1" in split  # the second prompt's images are split
    one = sorted((root / "one").glob("listed_saved*.png"))
    two = sorted((root / "two").glob("listed_saved*.png"))
    assert len(one) == len(two) == 6
    for a, b in zip(one, two, strict=True):
        # the ranks batch other images together than one process does (here 6 in one batch; 3 + 3 split
        # mid-prompt), and float rounding then differs: stated tolerance 1 of 255 on a rare pixel
        diff = abs(_pixels(a) - _pixels(b))
        assert a.name == b.name and diff.max() <= 1 and diff.mean() < 1e-3, a.name


def test_sweep_cells_are_dealt_out_whole_to_the_ranks_and_cached_one_by_one(runs):
    from fluxkiln.engine.cache import DiskCache

    root, cache2 = runs
    logs = [json.loads(line) for line in (root / "two.jsonl").read_text().splitlines() if line.startswith("{")]
    messages = [(e.get("node"), e["message"]) for e in logs if e["event"] == "node_log"]
    # 5 cells over 2 ranks: 4 whole cells (2 each, concurrently); the fifth splits its images like any call
    assert ("swept", "4 cell(s) over 2 ranks, whole cells: 2 on rank 0, 2 on rank 1") in messages
    elsewhere = sorted(node for node, m in messages if m == "made on rank 1")
    assert elsewhere == ["swept[seed=3]", "swept[seed=4]"]
    assert ("swept[seed=5]", "1 item(s) over 2 ranks: 1 on rank 0, 0 on rank 1") in messages
    one = sorted((root / "one").glob("swept_saved*.png"))
    two = sorted((root / "two").glob("swept_saved*.png"))
    assert len(one) == len(two) == 5
    for a, b in zip(one, two, strict=True):  # each cell made by one rank with its own seed: the same pixels
        assert a.name == b.name and (_pixels(a) == _pixels(b)).all(), a.name
    cells = [e for e in DiskCache(cache2).entries() if e.get("type") == "sample" and "swept[" in str(e.get("node"))]
    assert len(cells) == 5  # every cell cached on its own, whichever rank made it


def _losses(path: Path) -> list[float]:
    with path.open() as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


def test_ddp_training_matches_one_process_with_the_same_global_batch(runs):
    import torch
    from safetensors.torch import load_file

    root, _ = runs
    one, two = _losses(root / "one" / "lora" / "metrics.csv"), _losses(root / "two" / "lora" / "metrics.csv")
    assert len(one) == len(two) == 6
    assert len(set(one)) > 1
    # stated tolerance: relative 1e-4 on each step's loss; every exported weight within 1e-4 absolute, 1/50 of one
    # step's largest update (Adam divides each gradient by its own running size, so where a gradient is near
    # zero the rounding of a summed-over-ranks gradient shows up at up to a few 1e-5 after six steps)
    assert one == pytest.approx(two, rel=1e-4)
    wa = load_file(root / "one" / "lora" / "lora.safetensors")
    wb = load_file(root / "two" / "lora" / "lora.safetensors")
    assert wa.keys() == wb.keys() and wa
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-4), k
    assert any(not torch.allclose(wa[k], torch.zeros_like(wa[k]), atol=1e-3) for k in wa)  # the LoRA did train


def test_resume_with_another_number_of_processes_is_refused(runs):
    from fluxkiln.engine.runner import Engine

    root, cache2 = runs  # the two-process run left its checkpoints in cache2
    result = Engine(cache_dir=cache2).run(root / "many.toml", only=["lora"], output=root / "three",
                                          overrides=["nodes.lora.batch_size=1", "nodes.lora.steps=8"])
    failed = [e.data for e in result.events if e.event == "node_failed"]
    assert result.status == "failed" and failed
    text = failed[0]["error"] + " " + (failed[0].get("hint") or "")
    assert "written by a run with 2 process(es)" in text and "this run has 1" in text and "--gpus 2" in text


def _rank_pid(launcher: int, rank: int) -> int | None:
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            env = (p / "environ").read_bytes().split(b"\0")
            ppid = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == launcher and f"RANK={rank}".encode() in env:
            return int(p.name)
    return None


class _Run:
    """A two-rank training run whose output is read as it comes (threads drain both pipes: nothing blocks)."""

    def __init__(self, tmp_path: Path) -> None:
        import queue
        import threading

        recipe = tmp_path / "train.toml"
        recipe.write_text(TRAIN_ONLY)
        self.cache = _cache(tmp_path / "cache")
        self.proc = subprocess.Popen([sys.executable, "-m", "fluxkiln.engine.cli", "run", str(recipe), "--gpus", "2",
                                      "--json", "--output", str(tmp_path / "out")], env=_env(self.cache),
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.events: list[dict] = []
        self.lines: queue.Queue = queue.Queue()
        self.err: list[str] = []
        threading.Thread(target=self._pump, args=(self.proc.stdout, self.lines.put), daemon=True).start()
        threading.Thread(target=self._pump, args=(self.proc.stderr, self.err.append), daemon=True).start()

    @staticmethod
    def _pump(stream, put) -> None:
        for line in stream:
            put(line)
        put(None)

    def wait_for(self, test, timeout: float = 240) -> dict:
        """The first event (already seen or still to come) for which ``test`` is true."""
        import queue

        for e in self.events:
            if test(e):
                return e
        end = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.1, end - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"timed out; last events: {self.events[-3:]}") from None
            assert line is not None, f"the run ended first: {self.events[-3:]} {''.join(e for e in self.err if e)[-2000:]}"
            if line.startswith("{"):
                self.events.append(json.loads(line))
                if test(self.events[-1]):
                    return self.events[-1]

    def rank_pid(self, rank: int, timeout: float = 120) -> int:
        end = time.monotonic() + timeout
        while (pid := _rank_pid(self.proc.pid, rank)) is None:
            assert time.monotonic() < end and self.proc.poll() is None, f"rank {rank} never started"
            time.sleep(0.005)
        return pid

    def finish(self, timeout: float = 180) -> tuple[int, list[dict], str]:
        code = self.proc.wait(timeout=timeout)
        while (line := self.lines.get(timeout=30)) is not None:
            if line.startswith("{"):
                self.events.append(json.loads(line))
        end = time.monotonic() + 30
        while (not self.err or self.err[-1] is not None) and time.monotonic() < end:
            time.sleep(0.02)  # the stderr pump reaches the end of its pipe
        return code, self.events, "".join(e for e in self.err if e)


def _training_step(e: dict) -> bool:
    return e["event"] == "node_progress" and e.get("node") == "lora" and (e.get("step") or 0) >= 1 \
        and "loss" in (e.get("metrics") or {})


def _train_and_signal(tmp_path: Path, sig: int) -> tuple[subprocess.Popen, list[dict], str, Path]:
    """Train on two ranks; after the first training step send ``sig`` to rank 1; the process, events, stderr, cache."""
    run = _Run(tmp_path)
    run.wait_for(_training_step)
    os.kill(run.rank_pid(1), sig)
    _code, events, err = run.finish()
    return run.proc, events, err, run.cache


def _stopped_with_checkpoint(code: int, events: list[dict], err: str, cache: Path) -> int:
    """The run stopped at a safe point after a checkpoint (exit 130); the step it stopped at."""
    assert code == 130, err[-3000:]
    logs = [e["message"] for e in events if e["event"] == "node_log" and e.get("node") == "lora"]
    stopped = [m for m in logs if m.startswith("stopped at step")]
    assert stopped, (logs, err[-2000:])
    step = int(stopped[0].split()[3].rstrip(";"))
    finished = [e for e in events if e["event"] == "run_finished"]
    assert finished and finished[0]["status"] == "cancelled"
    ckpts = list((cache / "state").glob(f"train_lora-*/checkpoints/*{step:06d}*"))
    assert ckpts, "no checkpoint written at the step where the run stopped"
    return step


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds rank 1 through /proc")
def test_a_dead_worker_fails_the_run_naming_its_rank_and_leaves_the_cache_clean(tmp_path):
    from fluxkiln.engine.cache import DiskCache

    t0 = time.monotonic()
    proc, events, err, cache = _train_and_signal(tmp_path, signal.SIGKILL)
    assert proc.returncode == 1
    assert "worker rank 1" in err and "SIGKILL" in err
    assert not any(e["event"] == "node_finished" and e.get("node") == "lora" for e in events)
    kinds = {e.get("type") for e in DiskCache(cache).entries()}
    assert "train_lora" not in kinds and "dataset" in kinds  # finished work stays cached
    assert not [p for p in (cache / "tmp").glob("*") if not p.name.startswith("trash-")]
    assert not list((cache / "results").rglob("*.tmp"))
    assert time.monotonic() - t0 < 120


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds rank 1 through /proc")
def test_sigint_on_one_rank_checkpoints_and_stops_every_rank(tmp_path):
    proc, events, err, cache = _train_and_signal(tmp_path, signal.SIGINT)
    step = _stopped_with_checkpoint(proc.returncode, events, err, cache)
    assert 1 <= step < 6000


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the ranks through /proc")
def test_sigint_twice_on_every_rank_is_one_ctrl_c_and_still_checkpoints(tmp_path):
    """Ctrl-C under torchrun reaches each worker twice (terminal and launcher): still one stop at a safe point."""
    run = _Run(tmp_path)
    run.wait_for(_training_step)
    ranks = [run.rank_pid(0), run.rank_pid(1)]
    for pid in ranks + ranks:
        os.kill(pid, signal.SIGINT)
    code, events, err = run.finish()
    _stopped_with_checkpoint(code, events, err, run.cache)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="signals")
def test_ctrl_c_on_the_launcher_reaches_every_rank_which_checkpoints_and_stops(tmp_path):
    """The launcher keeps hearing Ctrl-C although it starts its workers with SIGINT blocked."""
    run = _Run(tmp_path)
    run.wait_for(_training_step)
    os.kill(run.proc.pid, signal.SIGINT)
    code, events, err = run.finish()
    _stopped_with_checkpoint(code, events, err, run.cache)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds rank 1 through /proc")
def test_sigint_before_the_workers_are_up_stops_the_run_cleanly(tmp_path):
    """A Ctrl-C on a rank that is still starting (importing, joining the group) is never lost."""
    run = _Run(tmp_path)
    os.kill(run.rank_pid(1), signal.SIGINT)  # as soon as the process exists
    code, events, err = run.finish()
    assert code == 130, err[-3000:]
    assert not any(e["event"] == "node_finished" and e.get("node") == "lora" for e in events)
    finished = [e for e in events if e["event"] == "run_finished"]
    assert not finished or finished[0]["status"] == "cancelled"  # the run never started, or stopped at once
    assert not list((run.cache / "state").glob("train_lora-*/checkpoints/*"))  # no training step ran


def test_bench_gpus_measures_each_part_beside_one_process(tmp_path):
    out = tmp_path / "bench-gpus.json"
    done = _cli("bench", "--gpus", "2", "--tiny", "--train-steps", "2", "--out", str(out),
                cache=_cache(tmp_path / "cache"))
    assert done.returncode == 0, done.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["gpus"] == 2 and res["mode"] == "tiny" and res["device"] == "cpu"
    dp, ddp = res["data_parallel"], res["ddp"]
    assert dp["images"] == 4 and dp["one_s"] > 0 and dp["many_s"] > 0 and dp["speedup"] > 0
    assert ddp["global_batch"] == 2 and ddp["per_process_batch"] == 1 and ddp["one_step_s"] > 0 and ddp["ratio"] > 0
    cp = res["context_parallel"]["variants"]
    assert list(cp) == ["one-eager", "ulysses-eager", "allgather-eager", "overlap-eager", "diffusers-eager"]
    for name in ("ulysses-eager", "allgather-eager", "overlap-eager"):  # fluxkiln's own runs on CPU with gloo
        assert cp[name]["s"] > 0 and cp[name]["ratio"] > 0 and cp[name]["max_rel_diff"] < 1e-3, cp[name]
    assert "needs CUDA GPUs" in cp["diffusers-eager"]["skipped"]
    assert res["context_parallel"]["best"]["variant"] in ("ulysses-eager", "allgather-eager", "overlap-eager")
    assert "fluxkiln bench --gpus 2 (tiny, cpu)" in done.stdout and "ulysses-eager" in done.stdout


def test_bench_gpus_parts_measures_only_those_and_refuses_unknown_ones(tmp_path):
    out = tmp_path / "ddp.json"
    done = _cli("bench", "--gpus", "2", "--tiny", "--train-steps", "1", "--parts", "ddp", "--out", str(out),
                cache=_cache(tmp_path / "cache"))
    assert done.returncode == 0, done.stderr[-3000:]
    res = json.loads(out.read_text())
    assert "ddp" in res and "data_parallel" not in res and "context_parallel" not in res
    assert res["ddp"]["steps"] == 1 and "DDP:" in done.stdout and "data parallel" not in done.stdout
    bad = _cli("bench", "--gpus", "2", "--tiny", "--parts", "ddp,pipeline", cache=_cache(tmp_path / "c2"))
    assert bad.returncode != 0 and "unknown --parts pipeline" in bad.stdout + bad.stderr
    assert "data_parallel, ddp, context_parallel" in bad.stdout + bad.stderr


TORCH_ABORT = "terminate called without an active exception"


def test_bench_gpus_profile_says_where_each_ranks_step_goes(tmp_path):
    """--profile on CPU with gloo: every profile has the host's numbers, none of a GPU's; the launcher gave each
    worker its share of the CPUs as intra-op threads (OMP_NUM_THREADS not set here)."""
    from fluxkiln.engine.launch import usable_cpus
    from fluxkiln.plugins.bench.step_profile import DEVICE_FIELDS

    out = tmp_path / "profile.json"
    env = _env(_cache(tmp_path / "cache"))
    del env["OMP_NUM_THREADS"]
    cmd = [sys.executable, "-m", "fluxkiln.engine.cli", "bench", "--gpus", "2", "--tiny", "--train-steps", "1",
           "--parts", "ddp,context_parallel", "--cp-variants", "one-eager,allgather-eager", "--profile", "--out",
           str(out)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    if done.returncode != 0 and TORCH_ABORT in done.stderr:
        # a CPU worker once aborted in a loaded test run right after its profiles, with this message of torch's
        # C++ runtime (a std::thread left joinable; no fluxkiln code is C++), and the launcher reported it
        # rightly.  One more try, for that abort only: any other failure, or the abort twice, still fails.
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    res = json.loads(out.read_text())
    alone, together = res["ddp"]["profile"]["alone"], res["ddp"]["profile"]["together"]
    cp = res["context_parallel"]["profile"]
    assert alone["rank"] == 0 and [p["rank"] for p in together] == [0, 1] and list(cp) == ["one-eager",
                                                                                          "allgather-eager"]
    threads = max(1, usable_cpus() // 2)
    for p in [alone, *together, *cp.values()]:
        assert p["device"] == "cpu" and p["wall_ms"] > 0 and p["sm_clock_mhz"] is None, p
        assert all(p[key] is None for key in DEVICE_FIELDS), p  # no kernels on a CPU run: nothing made up
        assert p["host"]["ops"] > 100 and p["cpu_ms"] > 0 and p["cpu_per_wall"] > 0
        assert p["threads"]["OMP_NUM_THREADS"] == str(threads) and p["threads"]["intra_op"] == threads
    for p in [alone, *together]:
        phases = p["host"]["phases_ms"]
        assert set(phases) == {"forward", "backward", "loss_item", "sync", "optimizer"}
        assert phases["forward"]["host"] > 0 and phases["backward"]["host"] > 0 and phases["sync"]["device"] is None
    assert alone["host"]["comm_ms"] == 0 and cp["one-eager"]["host"]["comm_ms"] == 0  # a world of one
    assert all(p["host"]["comm_ms"] > 0 for p in together)  # the gradients' all-reduce, on gloo's thread
    assert together[0]["host"]["phases_ms"]["sync"]["host"] > 0
    assert res["ddp"]["lora_parameters"] > 1000
    assert cp["allgather-eager"]["host"]["comm_ms"] > 0
    table = done.stdout[done.stdout.index("profile (one step each"):]
    assert "ddp step alone" in table and "cp allgather-eager" in table and "* no GPU kernels" in table
    bad = _cli("bench", "--tiny", "--profile", cache=_cache(tmp_path / "c2"))
    assert bad.returncode == 2 and "use it with --gpus N" in bad.stderr


def _wait_for(proc: subprocess.Popen, events: list[dict], what: str, count: int, timeout: float = 150) -> None:
    assert proc.stdout is not None
    end = time.monotonic() + timeout
    while sum(e["event"] == what for e in events) < count:
        assert time.monotonic() < end, f"no {what} #{count}: {events[-3:]}"
        line = proc.stdout.readline()
        assert line, f"watch ended early: {events[-3:]}"
        if line.startswith("{"):
            events.append(json.loads(line))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="signals")
def test_watch_keeps_the_workers_and_their_models_hot_between_reruns(tmp_path):
    recipe = tmp_path / "w.toml"
    body = RECIPE.split("[nodes.listed]")[0].replace('name = "many"', 'name = "w"')
    recipe.write_text(body)
    proc = subprocess.Popen([sys.executable, "-m", "fluxkiln.engine.cli", "watch", str(recipe), "--gpus", "2", "--json",
                             "--output", str(tmp_path / "out")], env=_env(_cache(tmp_path / "cache")),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    events: list[dict] = []
    try:
        _wait_for(proc, events, "watch_waiting", 1)
        worker = _rank_pid(proc.pid, 1)
        assert worker is not None
        recipe.write_text(body.replace("seed = 7", "seed = 8"))
        _wait_for(proc, events, "watch_waiting", 2)
        reruns = [e for e in events if e["event"] == "watch_rerun"]
        assert [r["status"] for r in reruns] == ["ok", "ok"]
        assert "base" in reruns[1]["cached"] and "images" in reruns[1]["ran"]  # the model stayed loaded
        splits = [e for e in events if e["event"] == "node_log" and "over 2 ranks" in e.get("message", "")]
        assert len(splits) == 2  # both runs split their images over the same two ranks
        assert _rank_pid(proc.pid, 1) == worker  # the same worker process served both runs
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)
    assert proc.returncode == 130
