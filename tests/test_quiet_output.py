"""Third-party notices that say nothing to a fluxkiln user stay out of its output."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is not None,
                    reason="transformers only gives the notice where torchvision is missing")
def test_no_torchvision_fallback_notice_once_the_plugins_are_loaded():
    code = "from transformers import CLIPImageProcessor, SiglipImageProcessor\n"
    bare = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "requires torchvision" in bare.stderr  # the notice exists without fluxkiln's plugins ...
    quiet = subprocess.run([sys.executable, "-c", "import fluxkiln.plugins\n" + code], capture_output=True,
                           text=True, timeout=120)
    assert quiet.returncode == 0, quiet.stderr
    assert "requires torchvision" not in quiet.stderr  # ... and not with them
