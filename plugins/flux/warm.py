"""A cheaper start for recipes that use FLUX: as a run starts (``prepare_run``, never on ``validate``), import
torch, diffusers and transformers in a background thread, and ask the kernel to read the local model files of
``load_model`` nodes ahead (``posix_fadvise(WILLNEED)``), so that importing and reading from disk overlap with the
engine's own start (planning, run folder) and with each other.  ``load_model`` waits for the imports
(:func:`wait_imports`) before its own, and logs what the background saved.

Inductor's pool of compile worker processes is left to torch, which starts it at the first compiled graph:
started here as soon as the imports were done, its sixteen worker processes importing torch competed with the
load for the CPU: on an H200 the load took 7 s longer and the first image of a process came 1.6 s (cold) to
3.7 s (warm compile cache) later, for 3.6 s less of Inductor's own time (docs/performance.md).

``FLUXKILN_PREWARM=0`` turns it all off.  Nothing here imports torch at module level.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

from . import fast

FLUX_NODE_TYPES = frozenset({"load_model", "sample", "apply_lora", "train_lora"})
MODULES = ("torch", "diffusers", "transformers")
_state: dict[str, Any] = {}
_lock = threading.Lock()


def enabled() -> bool:
    return not fast.switched_off("FLUXKILN_PREWARM")


def _import_all() -> None:
    t0 = time.perf_counter()
    try:
        import torch  # noqa: F401
        from diffusers import AutoencoderKL, FluxPipeline, FluxTransformer2DModel  # noqa: F401
        from transformers import CLIPTextModel, T5EncoderModel  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - the node's own import reports a missing or broken package
        _state["error"] = f"{type(exc).__name__}: {exc}"
    _state["import_s"] = time.perf_counter() - t0


def _read_ahead(files: list[Path]) -> None:
    advise = getattr(os, "posix_fadvise", None)
    if advise is None:
        return
    for path in files:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            advise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass
        finally:
            os.close(fd)
    _state["read_ahead_files"] = len(files)


def model_files(recipe: Any) -> list[Path]:
    """The weight files of the local folders or files the recipe's load_model nodes name."""
    files: list[Path] = []
    for spec in recipe.nodes.values():
        ref = spec.values.get("model") if spec.type == "load_model" else None
        if not isinstance(ref, str) or (":" in ref.split("/")[0]):
            continue
        path = Path(ref).expanduser()
        if not path.is_absolute():
            path = Path(recipe.base_dir) / path
        if path.is_file() and path.suffix == ".safetensors":
            files.append(path)
        elif path.is_dir():
            files += sorted(path.glob("*/*.safetensors")) + sorted(path.glob("*.safetensors"))
    return files


def start(recipe: Any) -> bool:
    """Start the background imports (once per process) and read-ahead for a recipe with FLUX nodes."""
    if not enabled() or not any(spec.type in FLUX_NODE_TYPES for spec in recipe.nodes.values()):
        return False
    files = model_files(recipe)
    if files:
        threading.Thread(target=_read_ahead, args=(files,), name="fluxkiln-read-ahead", daemon=True).start()
    with _lock:
        if "thread" not in _state and not all(m in sys.modules for m in MODULES):
            _state["started"] = time.perf_counter()
            _state["thread"] = thread = threading.Thread(target=_import_all, name="fluxkiln-imports", daemon=True)
            thread.start()
    return True


def bytecode_missing(module: str = "torch") -> str | None:
    """Why every process compiles ``module``'s Python sources again — it has no bytecode and Python will not write
    any (``PYTHONDONTWRITEBYTECODE``, a read-only install) — with the fix; None where that is not so.  On an H200
    host set up that way, compiling torch's sources took 8.5 s of every process's 13.4 s of imports."""
    import importlib.util

    spec = importlib.util.find_spec(module)
    origin = getattr(spec, "origin", None) or ""
    if not origin.endswith(".py") or os.path.exists(importlib.util.cache_from_source(origin)):
        return None
    folder = os.path.dirname(origin)
    if sys.dont_write_bytecode:
        why = "PYTHONDONTWRITEBYTECODE is set"
    elif not os.access(folder, os.W_OK):
        why = f"{folder} is read-only"
    else:
        return None  # this process writes it
    return (f"{module} has no compiled Python bytecode and Python does not write it here ({why}), so every process "
            f"compiles its sources again, seconds of every start: `python -m compileall -q "
            f"{os.path.dirname(folder)}` once removes that cost")


def wait_imports() -> dict[str, float] | None:
    """Wait for the background imports, if any were started and are not yet waited for: (seconds they took,
    seconds waited now); None otherwise."""
    with _lock:
        thread = _state.pop("thread", None)
    if thread is None:
        return None
    t0 = time.perf_counter()
    thread.join()
    return {"import_s": round(_state.get("import_s", 0.0), 2), "waited_s": round(time.perf_counter() - t0, 2)}
