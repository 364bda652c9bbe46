"""Run the fluxkiln CLI in a subprocess with the text test plugin available."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def cli_env(cache: Path | None = None, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(TESTS) + os.pathsep + env.get("PYTHONPATH", "")
    env["FLUXKILN_PLUGIN_MODULES"] = "helpers.textnodes"
    if cache is not None:
        env["FLUXKILN_CACHE"] = str(cache)
    env.update(extra)
    return env


def fluxkiln(*args: str, cwd: Path, cache: Path | None = None, timeout: float = 120, **extra: str):
    return subprocess.run([sys.executable, "-m", "fluxkiln.engine.cli", *args], cwd=cwd, env=cli_env(cache, **extra),
                          capture_output=True, text=True, timeout=timeout)


def events(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
