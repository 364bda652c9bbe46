"""The command line: run, --only, --set, --json, failures, Ctrl-C, graph, nodes, plugins, fast startup."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from clihelp import cli_env, events, fluxkiln
from helpers.recipes import CONCAT_AA, node, recipe_text

RECIPE = recipe_text("demo", '[vars]\nword = "hi"\n', node("a", "const", value="${word}"), CONCAT_AA,
                     node("other", "const", value="zz"))


@pytest.fixture
def proj(tmp_path):
    (tmp_path / "r.toml").write_text(RECIPE)
    return tmp_path


def test_run_json_event_stream(proj, fresh_cache):
    res = fluxkiln("run", "r.toml", "--json", cwd=proj, cache=fresh_cache)
    assert res.returncode == 0, res.stderr
    evs = events(res.stdout)
    assert all(set(e) >= {"event", "run_id", "time"} for e in evs)
    names = [e["event"] for e in evs]
    assert names[0] == "run_started" and names[-1] == "run_finished"
    started = [e for e in evs if e["event"] == "node_started"]
    assert [e["node"] for e in started] == ["a", "b", "other"]
    assert all(e["reason"] == "no cached result" and e["type"] for e in started)
    fin_b = next(e for e in evs if e["event"] == "node_finished" and e["node"] == "b")
    out = proj / "runs" / "demo" / "b" / "out.txt"
    assert fin_b["artifacts"] == [str(out)] and out.read_text() == "hi+hi"
    assert evs[-1]["status"] == "ok" and evs[-1]["nodes"] == {"a": "ran", "b": "ran", "other": "ran"}
    assert (proj / "runs" / "demo" / "report.md").exists() and (proj / "runs" / "demo" / "recipe.toml").exists()


def test_only_runs_node_and_ancestors(proj, fresh_cache):
    res = fluxkiln("run", "r.toml", "--json", "--only", "b", cwd=proj, cache=fresh_cache)
    assert res.returncode == 0, res.stderr
    assert events(res.stdout)[-1]["nodes"] == {"a": "ran", "b": "ran"}


def test_set_overrides_value(proj, fresh_cache):
    res = fluxkiln("run", "r.toml", "--json", "--set", "vars.word=\"yo\"", "--set", "nodes.b.sep=-",
                   cwd=proj, cache=fresh_cache)
    assert res.returncode == 0, res.stderr
    assert (proj / "runs" / "demo" / "b" / "out.txt").read_text() == "yo-yo"


def test_output_option(proj, fresh_cache, tmp_path):
    res = fluxkiln("run", "r.toml", "--output", str(tmp_path / "elsewhere"), cwd=proj, cache=fresh_cache)
    assert res.returncode == 0 and (tmp_path / "elsewhere" / "b" / "out.txt").exists()


def test_failing_node_exit_1_keeps_finished_outputs(proj, fresh_cache):
    (proj / "f.toml").write_text(RECIPE + node("bad", "boom", text="@b", message="the flux capacitor broke")
                                 + node("after", "concat", left="@bad"))
    res = fluxkiln("run", "f.toml", "--json", cwd=proj, cache=fresh_cache)
    assert res.returncode == 1
    evs = events(res.stdout)
    failed = next(e for e in evs if e["event"] == "node_failed")
    assert failed["node"] == "bad" and failed["type"] == "boom" and failed["error"] == "the flux capacitor broke"
    assert failed["hint"] == "try again" and failed["plugin"] == "helpers.textnodes" and failed["inputs"] == {"text": "Text"}
    assert evs[-1]["status"] == "failed"
    assert evs[-1]["nodes"] == {"a": "ran", "b": "ran", "other": "ran", "bad": "failed", "after": "skipped"}
    assert (proj / "runs" / "demo" / "b" / "out.txt").read_text() == "hi+hi"
    human = fluxkiln("run", "f.toml", cwd=proj, cache=fresh_cache)
    assert human.returncode == 1 and "bad (boom, plugin helpers.textnodes) failed" in human.stderr
    assert "hint: try again" in human.stderr
    # finished nodes were cached: the rerun only retries the failed node
    assert events(fluxkiln("run", "f.toml", "--json", cwd=proj, cache=fresh_cache).stdout)[-1]["nodes"]["b"] == "cached"


def test_ctrl_c_stops_at_safe_point_exit_130(proj, fresh_cache):
    (proj / "s.toml").write_text(RECIPE + node("slow", "slow", text="@b", steps=400))
    proc = subprocess.Popen([sys.executable, "-m", "fluxkiln.engine.cli", "run", "s.toml", "--json"], cwd=proj,
                            env=cli_env(fresh_cache), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    deadline = time.time() + 60
    while time.time() < deadline:
        line = proc.stdout.readline()
        lines.append(line)
        if '"node_progress"' in line:
            break
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    evs = events("".join(lines) + out)
    assert any(e["event"] == "node_cancelled" and e["node"] == "slow" for e in evs)
    assert evs[-1]["status"] == "cancelled" and evs[-1]["nodes"]["b"] == "ran"
    assert (proj / "runs" / "demo" / "b" / "out.txt").exists()


def test_validate_exit_codes_and_all_errors(proj):
    res = fluxkiln("validate", "r.toml", cwd=proj)
    assert res.returncode == 0 and "valid" in res.stdout
    (proj / "bad.toml").write_text('[recipe]\nname="b"\n[nodes.a]\ntype="const"\nrepeat=0\nvaleu=1\n')
    res = fluxkiln("validate", "bad.toml", cwd=proj)
    assert res.returncode == 2
    assert "bad.toml:5: node 'a' key 'repeat': invalid value 0" in res.stderr
    assert "bad.toml:6: node 'a' key 'valeu': unknown parameter 'valeu'" in res.stderr
    res = fluxkiln("validate", "bad.toml", "--json", cwd=proj)
    assert res.returncode == 2 and {p["key"] for p in json.loads(res.stdout)} == {"repeat", "valeu"}
    assert fluxkiln("validate", "nope.toml", cwd=proj).returncode == 2
    assert fluxkiln("run", "bad.toml", cwd=proj).returncode == 2


def test_usage_error_exit_2(proj):
    assert fluxkiln("run", cwd=proj).returncode == 2
    res = fluxkiln("run", "r.toml", "--only", "nope", cwd=proj)
    assert res.returncode == 2 and "no node 'nope'" in res.stderr


def test_graph_formats(proj):
    text = fluxkiln("graph", "r.toml", cwd=proj).stdout
    assert "b (concat)  <- left=@a, right=@a" in text
    mer = fluxkiln("graph", "r.toml", "--format", "mermaid", cwd=proj).stdout
    assert mer.startswith("flowchart TD") and "n_a -->|left| n_b" in mer
    dot = fluxkiln("graph", "r.toml", "--format", "dot", cwd=proj).stdout
    assert dot.startswith("digraph") and '"a" -> "b" [label="left"]' in dot


def test_nodes_and_plugins_listing(proj):
    res = fluxkiln("nodes", cwd=proj)
    assert res.returncode == 0 and "const" in res.stdout and "Produce a constant text." in res.stdout
    doc = json.loads(fluxkiln("nodes", "const", "--json", cwd=proj).stdout)
    rep = next(k for k in doc["keys"] if k["name"] == "repeat")
    assert rep["default"] == 1 and rep["doc"] == "times" and "from 1 to 10" in rep["accepts"]
    assert "one of 'a', 'b'" in fluxkiln("nodes", "const", cwd=proj).stdout
    res = fluxkiln("nodes", "conts", cwd=proj)
    assert res.returncode == 2 and "did you mean const" in res.stderr
    plugins = json.loads(fluxkiln("plugins", "--json", cwd=proj).stdout)
    by = {p["name"]: p for p in plugins}
    assert by["helpers.textnodes"]["node_types"] == ["const", "concat", "read_file", "boom", "slow"]
    assert by["fluxkiln.plugins.ports"]["port_types"][:2] == ["images", "model"]
    assert all(p["error"] is None for p in plugins), plugins


NO_HEAVY = "import sys; {code}; bad = sorted(m for m in ('torch', 'diffusers', 'textual', 'transformers') if m in sys.modules); assert not bad, bad"


@pytest.mark.parametrize("code", [
    "import fluxkiln.engine",
    "from fluxkiln.engine.cli import main; main(['validate', 'r.toml'])",
    "from fluxkiln.engine.cli import main\ntry:\n main(['--help'])\nexcept SystemExit: pass",
    "from fluxkiln.engine.cli import main; main(['nodes'])",
])
def test_engine_and_fast_commands_do_not_import_heavy_modules(proj, code):
    src = NO_HEAVY.format(code=code) if "\n" not in code else code + "\n" + NO_HEAVY.format(code="pass")
    res = subprocess.run([sys.executable, "-c", src], cwd=proj, env=cli_env(), capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
