"""The command line without paper cuts: --force anywhere, numbers for string choices, did-you-mean,
plain progress lines off a terminal, finished bars gone in a terminal, warnings set apart, plugins at 80
columns, download failures that say they tried."""

from __future__ import annotations

import io
import re

import pytest

from clihelp import events, fluxkiln
from fluxkiln.engine.cli_output import ConsoleObserver, progress_text
from fluxkiln.engine.events import Event
from helpers.recipes import DEMO, node

ROOT_RECIPES = __import__("pathlib").Path(__file__).resolve().parent.parent / "recipes"

RECIPE = DEMO + node("s", "slow", text="@b", steps=30, delay=0.1)


@pytest.fixture
def proj(tmp_path):
    (tmp_path / "r.toml").write_text(RECIPE)
    return tmp_path


def _plan(res) -> dict[str, str]:
    return dict(re.findall(r"^(\w+)\s+\w+\s+(?:run\s+\((.*)\)|cached.*)$", res.stdout, re.M))


@pytest.mark.parametrize("args, forced", [
    (["--force", "r.toml"], {"a", "b", "s"}),
    (["r.toml", "--force", "b"], {"b", "s"}),
])
def test_force_alone_or_with_a_node_in_any_position(proj, fresh_cache, args, forced):
    res = fluxkiln("run", *args, "--explain", cwd=proj, cache=fresh_cache)
    assert res.returncode == 0, res.stderr
    reasons = _plan(res)
    assert {n for n, r in reasons.items() if r.startswith("forced")} == forced, res.stdout


@pytest.mark.parametrize("args, expected", [
    (["--force", "r.toml"], ["--force=*", "r.toml"]),
    (["r.toml", "--force"], ["r.toml", "--force=*"]),
    (["--force", "b", "r.toml"], ["--force=b", "r.toml"]),
    (["r.toml", "--force", "b", "--json"], ["r.toml", "--force=b", "--json"]),
    (["--force", "recipes/quickstart"], ["--force=*", "recipes/quickstart"]),
    (["--set", "nodes.a.value=yo", "--force", "r", "--only", "b"], ["--set", "nodes.a.value=yo", "--force=*", "r",
                                                                     "--only", "b"]),
    (["--output", "out", "--force", "b", "r.toml"], ["--output", "out", "--force=b", "r.toml"]),
])
def test_force_words_are_read_as_recipe_or_node(args, expected):
    from fluxkiln.engine.cli import build_parser, normalize_force

    assert normalize_force(args) == expected
    parsed = build_parser().parse_args(["run", *expected])
    assert parsed.recipe == next(a for a in expected if not a.startswith("-") and "=" not in a and a != "out")


def test_force_of_an_unknown_node_lists_the_nodes(proj, fresh_cache):
    res = fluxkiln("run", "--force", "zz", "r.toml", cwd=proj, cache=fresh_cache)
    assert res.returncode == 2 and "no node 'zz'" in res.stderr and "a, b, s" in res.stderr


def test_megapixels_accepts_numbers_and_strings(tmp_path):
    from fluxkiln.engine.registry import Registry
    from fluxkiln.engine.validate import check_file

    registry = Registry.load()
    for value, choice in (("1", "1"), ("0.25", "0.25"), ('"1"', "1"), ('"0.25"', "0.25"), ("1.0", "1")):
        checked = check_file(ROOT_RECIPES / "quickstart.toml", registry, [f"nodes.images.megapixels={value}"])
        assert checked.nodes["images"].params["megapixels"] == choice  # the canonical choice: same fingerprint
    res = fluxkiln("validate", "quickstart.toml", "--set", "nodes.images.megapixels=1", cwd=ROOT_RECIPES)
    assert res.returncode == 0, res.stderr
    recipe = (ROOT_RECIPES / "quickstart.toml").read_text()
    assert "megapixels = 0.25" in recipe  # the recipe itself writes a number
    (tmp_path / "q.toml").write_text(recipe.replace("megapixels = 0.25", "megapixels = 0.5"))
    res = fluxkiln("validate", "q.toml", cwd=tmp_path)
    assert res.returncode == 2 and "expected one of '1', '0.25'" in res.stderr


def test_did_you_mean_for_set_keys_and_a_recipe_without_toml(proj):
    res = fluxkiln("validate", "r.toml", "--set", "nodes.bb.sep=-", "--set", "node.a.value=x", cwd=proj)
    assert res.returncode == 2
    assert "there is no node 'bb' (did you mean 'nodes.b.sep'?)" in res.stderr
    assert "(did you mean 'nodes.a.value=x'?)" in res.stderr
    res = fluxkiln("validate", "r.toml", "--set", "nodes.b.sepp=-", cwd=proj)
    assert res.returncode == 2 and "did you mean 'sep'" in res.stderr
    for cmd in (["run", "r"], ["validate", "r"], ["graph", "r"], ["watch", "r"]):
        res = fluxkiln(*cmd, cwd=proj)
        assert res.returncode == 2 and "recipe file not found: r (did you mean r.toml?)" in res.stderr, cmd


def test_progress_off_a_terminal_is_plain_lines_a_few_seconds_apart(proj, fresh_cache):
    res = fluxkiln("run", "r.toml", cwd=proj, cache=fresh_cache, FLUXKILN_PROGRESS_EVERY="1")
    assert res.returncode == 0, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("  s: ")]
    # 30 steps of 0.1 s: one line at the start, then at most one a second
    assert 2 <= len(lines) <= 5, res.stderr
    assert re.fullmatch(r"  s: 1/30 \(3%\) · \S+ (it/s|s/it) · ETA 0:00:0\d · loss=1", lines[0]), lines[0]
    assert all(re.search(r"\d+/30 \(\d+%\) · .* · ETA \d:\d\d:\d\d", ln) for ln in lines)
    assert "\x1b[" not in res.stderr  # no terminal control codes in a log file


def test_progress_lines_are_throttled_per_node():
    clock = {"t": 0.0}
    out = io.StringIO()
    from rich.console import Console

    obs = ConsoleObserver(Console(file=out, width=100), live=False, every=5.0, now=lambda: clock["t"])
    for step in range(1, 101):
        clock["t"] = step * 0.25  # 4 steps a second for 25 s
        for name in ("x", "y"):
            obs.on_event(Event("node_progress", "r", name, "t", {"step": step, "total": 100, "rate": 4.0,
                                                                   "eta": (100 - step) / 4}))
    lines = out.getvalue().splitlines()
    assert len([ln for ln in lines if ln.startswith("  x: ")]) == 5  # at 0.25 s, 5.25, 10.25, 15.25, 20.25
    assert len([ln for ln in lines if ln.startswith("  y: ")]) == 5


def test_finished_bars_are_not_redrawn_in_a_terminal():
    from rich.console import Console

    out = io.StringIO()
    obs = ConsoleObserver(Console(file=out, width=100, force_terminal=True), live=True)

    def ev(name, node, **data):
        obs.on_event(Event(name, "r", node, "t", data))

    ev("node_started", "images", reason="no cached result")
    for step in range(3):
        ev("node_progress", "images", step=step, total=4)
    ev("node_finished", "images", seconds=1.0)
    assert obs._progress is None  # the live display ended with the last bar
    ev("node_progress", "saved", step=0, total=1)
    ev("node_cached", "saved", source="disk")
    ev("node_progress", "saved", step=0, total=1)  # a late report of an ended node draws nothing
    ev("node_progress", "images", step=4, total=4)
    assert obs._progress is None
    tail = out.getvalue().split("✓ saved")[-1]
    assert "saved" not in tail and "images" not in tail and "-:--:--" not in tail


def test_progress_text_uses_the_engines_rate_and_eta():
    text = progress_text({"step": 61, "total": 90, "rate": 0.98, "eta": 29.6, "resumed_from": 60,
                          "metrics": {"loss": 0.1234567}})
    assert text == "61/90 (67%) · 1.02 s/it · ETA 0:00:30 · resumed at 60 · loss=0.1235"


def test_warnings_look_different_from_info_lines():
    from rich.console import Console

    out = io.StringIO()
    obs = ConsoleObserver(Console(file=out, width=200), live=False)
    obs.on_event(Event("node_log", "r", "styled", "apply_lora", {"level": "info", "message": "LoRA x: 3 layers"}))
    obs.on_event(Event("node_log", "r", "styled", "apply_lora", {"level": "warning", "message": "fuse ignored"}))
    info, warning = out.getvalue().splitlines()
    assert info == "  styled: LoRA x: 3 layers"
    assert warning == "  ⚠ styled warning: fuse ignored"


def test_plugins_listing_fits_80_columns(proj):
    res = fluxkiln("plugins", cwd=proj, COLUMNS="80")
    assert res.returncode == 0, res.stderr
    assert all(len(ln) <= 80 for ln in res.stdout.splitlines())
    for name in ("fluxkiln.plugins.flux", "fluxkiln.plugins.caption", "helpers.textnodes"):
        assert name in res.stdout  # never cut
    assert "train_lora" in res.stdout and "…" not in res.stdout


def test_download_true_without_network_says_it_tried_and_why(tmp_path, fresh_cache):
    body = '[recipe]\nname = "dl"\n[nodes.base]\ntype = "load_model"\nmodel = "someone/not-cached-flux"\n'
    (tmp_path / "on.toml").write_text(body + "download = true\n")
    (tmp_path / "off.toml").write_text(body + "download = false\n")
    env = dict(HF_HUB_OFFLINE="0", HF_ENDPOINT="http://127.0.0.1:9", HF_HUB_CACHE=str(tmp_path / "hub"))
    on = fluxkiln("run", "on.toml", "--json", cwd=tmp_path, cache=fresh_cache, **env)
    off = fluxkiln("run", "off.toml", "--json", cwd=tmp_path, cache=fresh_cache, **env)
    tried = next(e for e in events(on.stdout) if e["event"] == "node_failed")
    offline = next(e for e in events(off.stdout) if e["event"] == "node_failed")
    assert on.returncode == 1 and off.returncode == 1
    assert "tried to download 'someone/not-cached-flux'" in tried["error"] and "Connection" in tried["error"]
    assert "network" in tried["hint"] and tried["key"] == "download"
    assert "did not try to download it" in offline["error"] and "download = true" in offline["hint"]
    assert tried["error"] != offline["error"]
    off_env = fluxkiln("run", "on.toml", "--json", cwd=tmp_path, cache=fresh_cache,
                       HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "hub"))
    failed = next(e for e in events(off_env.stdout) if e["event"] == "node_failed")
    assert "tried to download" in failed["error"] and "HF_HUB_OFFLINE" in failed["hint"]
