"""Smoke test of the real ``fluxkiln tui`` in a pseudo-terminal (tmux): open the quickstart, press ctrl+r,
read the screen until every node shows done, then quit with ctrl+q and time how long the process takes
to end.  Skipped where tmux is not installed."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NODES = ("base", "images", "checked", "saved")

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")


class Tmux:
    """One private tmux server (its own socket) running one command in a window of a fixed size."""

    def __init__(self, name: str) -> None:
        self.base = ["tmux", "-L", name]

    def start(self, command: str, cwd: Path, width: int, height: int) -> None:
        subprocess.run(self.base + ["-f", "/dev/null", "new-session", "-d", "-s", "fk", "-x", str(width),
                                    "-y", str(height), "-c", str(cwd), command], check=True)

    def keys(self, *keys: str) -> None:
        subprocess.run(self.base + ["send-keys", "-t", "fk", *keys], check=True)

    def screen(self) -> str:
        res = subprocess.run(self.base + ["capture-pane", "-p", "-t", "fk"], capture_output=True, text=True)
        return res.stdout

    def wait_for(self, cond, timeout: float, what: str) -> str:
        deadline = time.monotonic() + timeout
        while True:
            shown = self.screen()
            if cond(shown):
                return shown
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; the screen:\n{shown}")
            time.sleep(0.05)

    def kill(self) -> None:
        subprocess.run(self.base + ["kill-server"], capture_output=True)


def all_done(shown: str) -> bool:
    rows = {line for line in shown.splitlines() if "✓ done" in line}
    return all(any(f" {node} " in row for row in rows) for node in NODES)


def test_real_tui_in_tmux_runs_the_quickstart_until_every_node_is_done_and_quits_fast(tmp_path, fresh_cache):
    (tmp_path / "recipes").mkdir()
    shutil.copy(ROOT / "recipes" / "quickstart.toml", tmp_path / "recipes" / "quickstart.toml")
    cli = " ".join(shlex.quote(a) for a in (sys.executable, "-m", "fluxkiln.engine.cli", "tui",
                                             "recipes/quickstart.toml"))
    command = f"env -u COLUMNS -u LINES FLUXKILN_CACHE={shlex.quote(str(fresh_cache))} {cli}; echo EXIT=$?; sleep 30"
    tmux = Tmux(f"fluxkiln-test-{tmp_path.name}")
    tmux.start(command, tmp_path, 120, 40)
    try:
        tmux.wait_for(lambda s: "✓ valid" in s and "no cached result" in s, 60, "the validated recipe")
        tmux.keys("C-r")
        # the images' previews and the run's end reach different widgets, in no fixed order on screen: wait for both
        tmux.wait_for(lambda s: all_done(s) and "run: ok" in s and "Images (2)" in s, 240,
                      "every node to show done and both images in the Images tab")
        start = time.monotonic()
        tmux.keys("C-q")
        shown = tmux.wait_for(lambda s: "EXIT=" in s, 20, "the process to end")
        took = time.monotonic() - start
        print(f"quit took {took:.2f} s")
        assert "EXIT=0" in shown
        assert took < 2.0, f"quitting took {took:.2f} s"  # about 0.3 s on an idle machine
    finally:
        tmux.kill()
