"""The quality guard on mini-flux: adherence per speed path and the step cache's cost, on the CPU (eager vs the
step cache)."""

from __future__ import annotations

import pytest

from fluxkiln.plugins.bench.quality import QualityGuard, paths_for, render_quality

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_quality_guard_scores_eager_and_the_step_cache_on_mini_flux(monkeypatch):
    from fluxkiln.plugins.bench import quality

    monkeypatch.setattr(quality, "paths_for", lambda device: ["eager", "go_fast"])  # go_fast: fused QKV on a CPU
    logged = []
    sample_rows = {"dev-go_fast": {"transformer_rel_diff": 0.0043, "image_rel_diff": 0.0075}}
    guard = QualityGuard("cpu", prompts=2, thresholds=(1.0,), steps={"dev": 6}, sample_rows=sample_rows,
                         log=logged.append, batch=2)
    result = guard.run(("dev",))
    rows = result["dev"]
    assert list(rows) == ["eager", "go_fast", "go_fast+cache-1"]
    eager, fast, cached = rows["eager"], rows["go_fast"], rows["go_fast+cache-1"]
    assert fast["random_weight_transformer_rel_diff"] == 0.0043  # the sampling guard's Δ beside it
    assert fast["random_weight_image_rel_diff"] == 0.0075 and "random_weight_transformer_rel_diff" not in eager
    for row in rows.values():
        assert set(row["adherence"]) >= {"colour", "shape", "all"} and row["s_per_image"] > 0
        assert row["cpu_s_per_image"] > 0  # CPU time beside wall time on a CPU
    assert eager["delta_points"] == 0.0 and "skipped_step_pct" not in eager
    assert cached["on"] == "go_fast" and cached["cache_threshold"] == 1.0
    assert 0 < cached["skipped_step_pct"] < 100  # the first step always runs; threshold 1 skips later ones
    assert cached["delta_points"] == round(cached["adherence"]["all"] - eager["adherence"]["all"], 1)
    six = [eager["adherence"][k] for k in ("colour", "shape", "size", "position", "background", "count")]
    assert eager["attribute_mean"] == round(sum(six) / 6, 1)
    assert cached["delta_attribute_mean_points"] == round(cached["attribute_mean"] - eager["attribute_mean"], 1)
    assert cached["speedup_vs_eager"] == round(eager["cpu_s_per_image"] / cached["cpu_s_per_image"], 2)
    assert cached["delta_vs_path_points"] == round(cached["adherence"]["all"] - fast["adherence"]["all"], 1)
    assert len(logged) == 3 and result["prompts"] == 2
    table = render_quality(result)
    assert "dev go_fast+cache-1" in table and "quality guard on mini-flux" in table


def test_quality_paths_per_device():
    assert paths_for("cpu") == ["eager"]
    assert paths_for("cuda") == ["eager", "compiled", "go_fast"]
