"""Shared test setup: an isolated cache for the whole session, no network."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

_SESSION_CACHE = Path(tempfile.mkdtemp(prefix="fluxkiln-test-cache-"))
os.environ.setdefault("FLUXKILN_CACHE", str(_SESSION_CACHE))
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_configure(config):
    # pytest-timeout (the GPU machine's suite, bench/gpu_suite.sh) reads this marker; elsewhere it is a label
    config.addinivalue_line("markers", "timeout(seconds): a per-test limit above the GPU suite's --timeout")


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    """A cache folder of this test's own (the tiny built-in models are shared)."""
    cache = tmp_path / "cache"
    (cache).mkdir()
    builtin = _SESSION_CACHE / "builtin"
    builtin.mkdir(parents=True, exist_ok=True)
    (cache / "builtin").symlink_to(builtin, target_is_directory=True)
    monkeypatch.setenv("FLUXKILN_CACHE", str(cache))
    return cache


@pytest.fixture(scope="module")
def one_torch_thread():
    """The tiny models gain little from threads, and on a shared 2-core machine OpenMP threads that
    compete with other processes slow them down several times: use one, restore after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
