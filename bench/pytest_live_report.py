"""A pytest plugin for bench/gpu_suite.sh: each test's outcome is written the moment it ends, with its traceback.

pytest prints tracebacks (and writes ``--junitxml``) only once the whole session ends, so a call cut short by
its time limit used to leave names of failed tests and nothing else.  With ``--live-report DIR`` this plugin
appends, in the process that collects the results (the xdist controller, or pytest itself without xdist):

* ``DIR/gpu-tests.jsonl``: one JSON object per finished phase that failed or was skipped and per finished test
  call (``nodeid``, ``when``, ``outcome``, ``seconds``, and for a failure ``traceback``, the ``--tb`` text with
  the test's captured output);
* ``DIR/gpu-failed.txt``: the node id of every failed or errored test, once, ready for
  ``bash bench/gpu_suite.sh --failed DIR/gpu-failed.txt``.

Each line is flushed as it is written, so whatever the call left behind is complete up to the last test.

It also keeps torch's structured-trace records (logger ``torch.__trace``, empty DEBUG lines, hundreds per compile)
out of the captured logs: torch 2.11 on the GPU machine lets them reach the root logger, where pytest captured
thousands of them into each failure's report.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

_STATE: dict[str, Any] = {}
TRACE_LOGGER = "torch.__trace"


class _NoTorchTrace(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.name != TRACE_LOGGER


def pytest_addoption(parser: Any) -> None:
    parser.addoption("--live-report", default=None, metavar="DIR",
                     help="append each test's outcome (and traceback) to DIR/gpu-tests.jsonl as it ends")


@pytest.hookimpl(trylast=True)  # after pytest's logging plugin made its handlers
def pytest_configure(config: Any) -> None:
    logs = config.pluginmanager.get_plugin("logging-plugin")
    for name in ("caplog_handler", "report_handler"):
        handler = getattr(logs, name, None)
        if handler is not None:
            handler.addFilter(_NoTorchTrace())
    folder = config.getoption("--live-report")
    if not folder or hasattr(config, "workerinput"):  # an xdist worker: its controller writes
        return
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    _STATE.update(log=(out / "gpu-tests.jsonl").open("a", encoding="utf-8"),
                  failed=(out / "gpu-failed.txt").open("a", encoding="utf-8"), seen=set())


def pytest_runtest_logreport(report: Any) -> None:
    log = _STATE.get("log")
    if log is None or (report.when != "call" and report.passed):
        return
    row = {"nodeid": report.nodeid, "when": report.when, "outcome": report.outcome,
           "seconds": round(report.duration, 2)}
    if report.failed:
        sections = "\n".join(f"--- {name} ---\n{text}" for name, text in report.sections)
        row["traceback"] = report.longreprtext + ("\n" + sections if sections else "")
        if report.nodeid not in _STATE["seen"]:
            _STATE["seen"].add(report.nodeid)
            _STATE["failed"].write(report.nodeid + "\n")
            _STATE["failed"].flush()
    elif report.skipped and isinstance(report.longrepr, tuple):
        row["reason"] = str(report.longrepr[2])
    log.write(json.dumps(row) + "\n")
    log.flush()


def pytest_unconfigure(config: Any) -> None:
    for key in ("log", "failed"):
        handle = _STATE.pop(key, None)
        if handle is not None:
            handle.close()
