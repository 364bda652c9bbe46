"""The run report: report.md and report.json with timings, throughput and cost per image."""

from __future__ import annotations

import json

import torch

from fluxkiln.engine.runner import Engine

RECIPE = """[recipe]
name = "rep"
gpu_hour_price = 3.6

[nodes.base]
type = "load_model"
model = "builtin:tiny-flux-schnell"

[nodes.images]
type = "sample"
model = "@base"
prompt = "a fox"
megapixels = "0.25"
num_outputs = 2
num_inference_steps = 3
seed = 5

[nodes.saved]
type = "save"
images = "@images"
output_format = "png"
"""


def test_report_has_times_throughput_cost_and_links(tmp_path, fresh_cache):
    (tmp_path / "r.toml").write_text(RECIPE)
    result = Engine().run(tmp_path / "r.toml", output=tmp_path / "out")
    assert result.ok
    data = json.loads((tmp_path / "out" / "report.json").read_text())
    assert data["status"] == "ok" and data["gpu_hour_price"] == 3.6
    rows = {r["node"]: r for r in data["nodes"]}
    s = rows["images"]
    assert s["state"] == "ran" and s["images"] == 2 and s["steps"] == 3
    assert abs(s["seconds_per_step"] - s["seconds"] / 3) < 1e-3
    assert abs(s["images_per_second"] * s["seconds"] / 2 - 1) < 0.02  # seconds are rounded to ms
    assert abs(s["cost_per_image"] - 3.6 * s["seconds"] / 3600 / 2) < 1e-6
    if torch.cuda.is_available():
        assert s["peak_gpu_gib"] > 0
    else:
        assert "peak_gpu_gib" not in s  # no GPU here: not made up
    assert "images" not in rows["saved"]  # saving produces no new images
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| images | sample | ran |" in md and "![saved_0.png](saved_0.png)" in md
    assert "gpu_hour_price = 3.6" in md
    again = Engine().run(tmp_path / "r.toml", output=tmp_path / "out")
    rows = {r["node"]: r for r in json.loads((tmp_path / "out" / "report.json").read_text())["nodes"]}
    assert again.ok and rows["images"]["state"] == "cached" and rows["images"]["reason"] == "disk"
