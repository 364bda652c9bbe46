"""Turn a model reference from a recipe into a local folder, the one way every model is loaded.

A reference is ``builtin:<name>`` (resolved through the ``resolve_model`` plugin
hook), a local folder (absolute, or relative to the recipe file), or a Hugging
Face hub id (``org/name``), looked up in the local hub cache only: nothing is
ever downloaded.  A hub id that is not cached fails with a message saying how
to fetch it once.  Also holds the small helpers both the caption and the safety
plugins use to put a loaded model under the engine's model residency.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fluxkiln.engine import NodeError

HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def fetch_hint(repo_id: str) -> str:
    """How to put a hub model into the local cache once, for offline use."""
    return (f"fetch it once with `huggingface-cli download {repo_id}` (or `hf download {repo_id}`) on a machine "
            "with network access; fluxkiln then loads it offline from the Hugging Face cache "
            "(HF_HOME / HF_HUB_CACHE), or give a local folder instead")


def resolve_ref(ctx: Any, ref: str, *, key: str, what: str) -> Path:
    """The local folder holding model ``ref``; raise NodeError saying how to fix a bad reference."""
    ref = ref.strip()
    if ref.startswith("builtin:"):
        found = ctx.resolve_model(ref)
        if not found:
            raise NodeError(f"unknown built-in {what} {ref!r}", key=key,
                            hint="built-in models: builtin:tiny-captioner, builtin:tiny-florence2, "
                                 "builtin:tiny-vlm, builtin:tiny-safety")
        return Path(found)
    if ":" in ref.split("/")[0] and not Path(ref).exists():
        found = ctx.resolve_model(ref)
        if found:
            return Path(found)
    path = Path(ref).expanduser()
    if not path.is_absolute() and getattr(ctx, "recipe", None) is not None and ctx.recipe.path is not None:
        path = ctx.recipe.base_dir / path
    if path.is_dir():
        return path.resolve()
    if path.exists():
        raise NodeError(f"{what} {ref!r} is a file; a model folder (with config.json) or a hub id is needed", key=key)
    if HUB_ID.match(ref):
        return _hub_snapshot(ref, key=key, what=what, looked_at=path)
    raise NodeError(f"{what} {ref!r} not found: it is neither a folder (looked at {path}) nor a hub id "
                    "like 'org/name'", key=key, hint="paths are relative to the recipe file")


def _hub_snapshot(repo_id: str, *, key: str, what: str, looked_at: Path) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError) as exc:
        raise NodeError(f"{what} {repo_id!r} is not in the local Hugging Face cache ({type(exc).__name__}) "
                        f"and there is no folder {looked_at}",
                        key=key, hint=fetch_hint(repo_id)) from exc


def read_config(folder: Path) -> dict[str, Any]:
    """The raw ``config.json`` of a model folder."""
    import json

    cfg = folder / "config.json"
    if not cfg.is_file():
        raise NodeError(f"{folder} has no config.json, so it is not a transformers/diffusers model folder",
                        hint="give the folder that holds config.json and the weights")
    try:
        return json.loads(cfg.read_text())
    except ValueError as exc:
        raise NodeError(f"{cfg} is not valid JSON: {exc}") from exc


def module_bytes(value: Any) -> int:
    """Bytes held by the parameters and buffers of every torch module in ``value`` (for residency)."""
    import torch

    seen: set[int] = set()
    total = 0
    modules = [v for v in vars(value).values() if isinstance(v, torch.nn.Module)] if not isinstance(
        value, torch.nn.Module) else [value]
    for m in modules:
        for t in list(m.parameters()) + list(m.buffers()):
            if id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
    return total


def release_modules(value: Any) -> None:
    """Drop a resident model's weights and give cached GPU memory back."""
    import gc

    import torch

    for name, v in list(vars(value).items()):
        if isinstance(v, torch.nn.Module):
            setattr(value, name, None)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def pick_dtype(device: str) -> Any:
    """float32 on CPU; bfloat16 on a GPU that supports it, else float16."""
    import torch

    if device != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' progress bars and backend warnings for a block (our own events say enough)."""
    from transformers.utils import logging as tlog

    level, bar = tlog.get_verbosity(), tlog.is_progress_bar_enabled()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        tlog.set_verbosity(level)
        if bar:
            tlog.enable_progress_bar()


def image_processor_class(model: str, name: str) -> Any:
    """transformers' PIL-backed image processor ``<name>Pil`` where it exists (no torchvision needed), else ``name``."""
    import importlib

    try:
        module = importlib.import_module(f"transformers.models.{model}.image_processing_pil_{model}")
        return getattr(module, f"{name}Pil")
    except (ImportError, AttributeError):
        return getattr(importlib.import_module("transformers"), name)
