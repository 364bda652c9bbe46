"""bench/pytest_live_report.py (the GPU suite's pytest plugin): each failure is written with its traceback as it
ends, and torch's structured-trace DEBUG records stay out of the captured logs while other records stay in."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from helpers import ROOT

FAILING = '''
import logging

def test_fails():
    trace = logging.getLogger("torch.__trace")  # as torch 2.11 left it: DEBUG, reaching the root logger
    trace.setLevel(logging.DEBUG)
    trace.propagate = True
    trace.debug("structured trace %d", 4242)  # the message is not in the source listing
    logging.getLogger("fluxkiln.test").warning("a warning worth reading: %d", 1717)
    assert 1 == 2
'''


def _bench_env() -> dict[str, str]:
    """This environment with bench/ (where the plugin lives) first on PYTHONPATH."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "bench"), os.environ.get("PYTHONPATH", "")])}


def _pytest(tmp_path, *args: str) -> subprocess.CompletedProcess:
    (tmp_path / "test_failing.py").write_text(FAILING)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
                           "--rootdir", str(tmp_path), "test_failing.py", *args], cwd=tmp_path, env=_bench_env(),
                          capture_output=True, text=True, timeout=120)


def test_failures_are_written_as_they_end_without_torch_trace_records(tmp_path):
    out = tmp_path / "report"
    done = _pytest(tmp_path, "-p", "pytest_live_report", f"--live-report={out}")
    assert done.returncode == 1, done.stdout + done.stderr
    [row] = [json.loads(line) for line in (out / "gpu-tests.jsonl").read_text().splitlines()]
    assert row["nodeid"] == "test_failing.py::test_fails" and row["outcome"] == "failed"
    assert "assert 1 == 2" in row["traceback"] and "a warning worth reading: 1717" in row["traceback"]
    assert "structured trace 4242" not in row["traceback"] and "structured trace 4242" not in done.stdout
    assert "a warning worth reading: 1717" in done.stdout
    assert (out / "gpu-failed.txt").read_text() == "test_failing.py::test_fails\n"
    plain = _pytest(tmp_path)  # without the plugin pytest shows them
    assert "structured trace 4242" in plain.stdout


def test_the_gpu_suite_options_keep_pyproject_toml_and_its_testpaths(tmp_path):
    """An option's value given as a separate argument ("--live-report /tmp/x") is taken for a path when pytest
    looks for its rootdir and configfile: pyproject.toml's testpaths went unread and plugins/example/tests was
    collected beside tests/ (two conftest modules, two test_sweep.py)."""
    script = 'source <(sed -n "/^common=(/,/)$/p" bench/gpu_suite.sh); printf "%s\\n" "${common[@]}"'
    opts = subprocess.run(["bash", "-c", script], cwd=ROOT, env={**os.environ, "OUT": str(tmp_path / "out")},
                          capture_output=True, text=True, check=True).stdout.split("\n")
    assert f"--live-report={tmp_path / 'out'}" in opts
    i = opts.index("--timeout")
    del opts[i:i + 2]  # pytest-timeout, which the GPU machine has, is not needed to collect
    done = subprocess.run([sys.executable, "-m", "pytest", *[o for o in opts if o and o != "-v"], "--collect-only",
                           "-q", "-p", "no:randomly"], cwd=ROOT, env=_bench_env(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    ids = [line for line in done.stdout.splitlines() if "::" in line]
    assert ids and all(line.startswith("tests/") for line in ids), [i for i in ids if not i.startswith("tests/")][:3]
