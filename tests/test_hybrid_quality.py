"""The hybrid's quality benchmark (bench/hybrid_quality.py) and the docs text written from its JSON
(bench/perf_docs.py): a short real run on mini-flux, the paired intervals, and the verdict following the numbers."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def hq():
    return load("hybrid_quality")


@pytest.fixture(scope="module")
def docs():
    return load("perf_docs")


@pytest.mark.usefixtures("one_torch_thread")
def test_the_recipe_runs_on_mini_flux_and_each_path_gets_scores_and_cpu_seconds(hq):
    prompts = ["a large red circle at the top left on a blue background", "a small green square on a white background"]
    fast = ("nodes.draft.num_inference_steps=1", "vars.refine_steps=2", "nodes.dev_only.num_inference_steps=2")
    paths, size, seconds = hq.measure(prompts, 1, fast)
    assert size == "512x512" and seconds > 0 and list(paths) == ["draft", "hybrid", "dev"]
    for row in paths.values():
        assert len(row["scores"]) == 2 and set(row["mean"]) >= {"score", "colour", "shape", "position", "background"}
        assert row["cpu_s_per_image"] > 0 and row["wall_s_per_image"] > 0
    assert paths["hybrid"]["cpu_s_per_image"] > paths["draft"]["cpu_s_per_image"]  # draft + refinement
    data = {"paths": {k: {**v, "h100_s_per_image": None} for k, v in paths.items()},
            "compare": {"hybrid - dev": hq.paired(paths["hybrid"]["scores"], paths["dev"]["scores"])}}
    printed = hq.table(data)
    assert "dev 28 steps" in printed and "score hybrid - dev:" in printed


def test_paired_difference_and_interval(hq):
    c = hq.paired([1.0, 1.0, 0.5, 0.5], [0.5, 0.5, 0.5, 0.5])
    assert c["mean"] == 0.25 and c["n"] == 4
    assert c["ci95"] == [pytest.approx(0.25 - 1.96 * 0.288675 / 2, abs=1e-4), pytest.approx(0.25 + 0.2829, abs=1e-4)]
    assert hq.paired([0.5, 0.5], [0.5, 0.5])["ci95"] == [0.0, 0.0]


def test_h100_seconds_come_from_the_newest_generation_bench(hq, tmp_path):
    for name, date, hybrid in (("a-generation.json", "2026-01-01", 9.0), ("b-generation.json", "2026-02-01", 2.0)):
        (tmp_path / name).write_text(json.dumps({"date": date, "generation": {"hybrid": {"s_per_image": hybrid}},
                                                 "sample": {"dev-lossless": {"s_per_image": 4.0}}}))
    source, secs = hq.h100_seconds(tmp_path)
    assert source == "bench/b-generation.json" and secs == {"draft": None, "hybrid": 2.0, "dev": 4.0}
    assert hq.h100_seconds(tmp_path / "none") == (None, {"draft": None, "hybrid": None, "dev": None})


def quality(draft: float, hybrid: float, dev: float, spread: float = 0.02, dev_spread: float | None = None) -> dict:
    """A hybrid_quality.json with the given mean scores and paired intervals of +-spread (+-dev_spread for dev
    against the draft and the hybrid against dev, whose images come from other sampling chains)."""
    def row(label: str, score: float, cpu: float, h100: float | None) -> dict:
        return {"label": label, "mean": {"score": score, "colour": score}, "cpu_s_per_image": cpu,
                "h100_s_per_image": h100}

    def diff(a: float, b: float, wide: bool = False) -> dict:
        half = dev_spread if wide and dev_spread is not None else spread
        return {"mean": a - b, "ci95": [a - b - half, a - b + half], "n": 32}

    return {"date": "2026-11-28", "prompts": 32, "size": "512x512", "seed": 1, "refine": {"steps": 12, "strength": 0.6},
            "cpu": "x86_64, 1 torch thread(s)", "h100_source": "bench/h.json", "h100_what": "1024x1024",
            "paths": {"draft": row("draft", draft, 1.5, None), "hybrid": row("hybrid", hybrid, 3.5, 2.0),
                      "dev": row("dev", dev, 5.5, 4.0)},
            "compare": {"hybrid - dev": diff(hybrid, dev, True), "dev - draft": diff(dev, draft, True),
                        "hybrid - draft": diff(hybrid, draft)}}


@pytest.mark.parametrize(("scores", "says"), [
    ((0.50, 0.90, 0.91), "**it is worth it**, dev's prompt adherence at 0.50× the time"),
    ((0.50, 0.70, 0.90), "measurably below dev alone and above the draft, with 50 % of dev's gain over the draft "
                         "at 0.50× dev's time"),
    ((0.50, 0.50, 0.90), "the hybrid is not worth it with these weights"),
    ((0.50, 0.51, 0.51), "Dev alone does not score measurably higher than the schnell draft"),
    ((0.70, 0.73, 0.75, 0.02, 0.08), "The refinement adds measurable adherence over the draft (+3.0 points)"),
])
def test_the_verdict_follows_the_numbers(docs, scores, says):
    q = quality(*scores)
    text = docs.hybrid_verdict(q)
    assert says in text
    hd = q["compare"]["hybrid - dev"]
    assert f"{100 * hd['mean']:+.1f} points" in text and "0.50× dev's time on the H100" in text


def test_the_quality_block_shows_each_path_and_where_the_numbers_come_from(docs, tmp_path):
    (tmp_path / "hybrid_quality.json").write_text(json.dumps(quality(0.5, 0.7, 0.9)))
    block = docs.hybrid_quality(tmp_path)
    assert "32 held-out prompts at 512x512" in block and "`bench/h.json`" in block
    assert "| hybrid | 70.0 | 70.0 | 3.50 | 2.00 |" in block and "| draft | 50.0 | 50.0 | 1.50 | – |" in block
