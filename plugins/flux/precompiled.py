"""Ahead-of-time compiled transformer blocks (and VAE decoder), saved as the first process compiles them, so that
every later process's first image skips torch.compile's tracing.

Inductor's caches already keep the generated code between processes, but every new process still traces each
block with Dynamo and looks its graphs up again before the first image (4.0 s of 6.4 s on an H200 for a first
1024² image).  torch's ``aot_compile`` packages the traced and compiled function, with its guards, into one file
that loads without tracing:

* :class:`Dispatch` is what :func:`fluxkiln.plugins.flux.fast.compile_blocks` installs on each block (and
  ``set_vae_compiled`` on the VAE decoder): a call that matches a saved variant — the block's class and structure
  and the shapes, strides, dtypes and devices of its inputs — runs the precompiled function; a servable call with
  none compiles its variant with :func:`compile_ahead` (the compilation the process would pay anyway) and saves
  it into ``<cache>/precompiled/<environment>/``; anything else runs the module's ordinary ``torch.compile``.
* :func:`start_preload` deserializes the :data:`PRELOAD` most recently used saved files in a background thread
  (``load_model`` starts it before the weights load); :func:`table` waits for it, and a call whose variant was
  left out loads it then (:func:`load_saved`).
* :class:`Recording` marks ``fluxkiln warmup``'s run, which compiles what a recipe needs before it is used.
* A variant is compiled under its file lock (:func:`obtain`): a process that needs one another process is
  compiling — the helpers :mod:`.ahead` starts while a run loads its model, or a second run — waits for its file
  and loads it.

Only inference calls are served (gradients off, no autocast), for blocks without hooks or LoRA adapters, in
Inductor's default mode; training, Inductor's CUDA-graph modes and adapters keep ordinary compilation.  Each
block's first call of a variant runs the artifact's full guard check (parameters' and inputs' tensor properties,
grad mode, the attribute values it was traced with); later calls compare a cheap signature, including the block's
module types and attention processors, so a block changed after its check (fp8 layers swapped in, adapters
injected) falls back. The guards torch cannot serialize (global state, function identity) are covered by the
folder's key (torch, diffusers and Python versions, a hash of this plugin's code and the device) and by the
variant's (the attention processors' classes, backends and tags, and diffusers' default attention backend).
``FLUXKILN_PRECOMPILE=0`` turns all of this off.

Nothing here imports torch at module level.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import fast, registrations
from .variantkeys import call_signature, folder, folder_of, variant_key

PRELOAD = 4  # the most recently used variants, loaded in the background as a model loads; others on demand
WAIT_LIMIT_S = 300.0  # the longest wait for another process compiling a variant (then it is compiled here too)
_state: dict[str, Any] = {}
_lock = threading.Lock()


def enabled() -> bool:
    """``FLUXKILN_PRECOMPILE=0`` turns precompiled blocks off (recording and loading)."""
    return not fast.switched_off("FLUXKILN_PRECOMPILE")


NEEDS = ("a torch whose torch.compile gives compiled functions `aot_compile` and that loads them with "
         "torch.compiler.load_compiled_function (torch 2.11 does with its enable_aot_compile switch, which fluxkiln "
         "turns on while saving; 2.13 by default)")


def _probe(x: Any) -> Any:
    return x


@functools.cache
def supported() -> bool:
    """Whether this torch can precompile: ``torch.compile`` gives functions an ``aot_compile`` (with
    ``enable_aot_compile`` on, as saving sets it) and ``torch.compiler.load_compiled_function`` loads what it
    saves.  Checked once per process: compiling a function is lazy, so this traces nothing."""
    try:
        import torch
        from torch._dynamo import aot_compile  # noqa: F401
    except ImportError:
        return False
    try:
        with _aot_compile_on(torch):
            compiled = torch.compile(_probe, fullgraph=True, dynamic=False)
    except RuntimeError:  # a torch whose Dynamo does not run on this Python
        return False
    return hasattr(compiled, "aot_compile") and hasattr(torch.compiler, "load_compiled_function")


def unavailable() -> str | None:
    """Why nothing is precompiled in this process (None when it is): switched off, or this torch cannot."""
    if not enabled():
        return "FLUXKILN_PRECOMPILE=0 switches precompiling off"
    if not supported():
        import torch

        return f"torch {torch.__version__} cannot precompile: it needs {NEEDS}"
    return None


def _has_adapters(block: Any) -> bool:
    """Whether the block holds LoRA adapters (peft layers): their scales are not in the saved guards."""
    return any(type(m).__module__.startswith("peft.") for m in block.modules())


# ------------------------------------------------------------------ compiling ahead and saving
@dataclass
class Recording:
    """``fluxkiln warmup``'s run (``with Recording() as rec``): while active the VAE decoder compiles from its first
    decode, and ``rec.saved`` / ``rec.failed`` collect the variants compiled ahead and saved meanwhile."""

    saved: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def __enter__(self) -> Recording:
        _state["recording"] = self
        return self

    def __exit__(self, *exc: object) -> None:
        _state.pop("recording", None)


def _guard_filter(entries: list[Any]) -> list[bool]:
    """Keep the guards torch can save; the others (globals, function identity) are in the folder's key."""
    from torch._dynamo.guards import CheckFunctionManager

    bad = set(getattr(CheckFunctionManager, "UNSUPPORTED_SERIALIZATION_GUARD_TYPES", ("ID_MATCH",)))
    return [not (g.is_global or ({g.guard_type, *(getattr(g, "derived_guard_types", None) or ())} & bad))
            for g in entries]


def compile_ahead(block: Any, out: Path, key: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any | None:
    """Compile one variant ahead of time (the block's forward for these inputs), save it in ``out`` (its device's
    folder) for later processes, and return it.  None where torch cannot compile it so: the caller compiles as usual.
    Where torch cannot compile or package it, the reason goes to a ``<key>.failed`` file beside the saved ones,
    so that no later process tries again; a variant that compiled but could not be written (a full or read-only
    cache) is still returned, and a later process tries to save it again."""
    import torch

    failed = out / f"{key}.failed"
    if failed.exists():
        return None
    t0 = time.perf_counter()
    try:
        with torch.no_grad(), _aot_compile_on(torch):
            compiled = torch.compile(type(block).forward, fullgraph=True, dynamic=False,
                                     options={"guard_filter_fn": _guard_filter})
            fn = compiled.aot_compile(((block, *args), kwargs))
    except Exception as exc:  # noqa: BLE001 - a variant torch cannot compile whole keeps ordinary compilation
        _give_up(key, exc, failed, "it is compiled as usual", time.perf_counter() - t0)
        return None
    fn.disable_guard_check()  # checked by Dispatch, once per block and variant
    partial = out / f".{key}.{os.getpid()}.partial"  # another process may save the same variant meanwhile
    try:
        out.mkdir(parents=True, exist_ok=True)
        fn.save_compiled_function(str(partial))
        os.replace(partial, out / f"{key}.bin")
    except OSError as exc:
        with contextlib.suppress(OSError):
            partial.unlink(missing_ok=True)
        _note("failed", _reason(key, exc), time.perf_counter() - t0)
        warnings.warn(f"precompile: {_reason(key, exc)}; not saved, so a later process compiles it again",
                      RuntimeWarning, stacklevel=3)
        return fn
    except Exception as exc:  # noqa: BLE001 - torch cannot package it (pickling): used here, not saved
        with contextlib.suppress(OSError):
            partial.unlink(missing_ok=True)
        _give_up(key, exc, failed, "it is used in this process only", time.perf_counter() - t0)
        return fn
    _note("saved", key, time.perf_counter() - t0)
    return fn


def obtain(block: Any, where: Path, key: str, args: tuple[Any, ...], kwargs: dict[str, Any],
           variants: dict[str, Any]) -> Any | None:
    """A variant with no saved file, compiled ahead here while holding its lock (``<key>.lock``, an OS file lock:
    :func:`fluxkiln.engine.locks.hold`).  While another process holds it — a helper of :mod:`.ahead`, another
    run — this waits (at most :data:`WAIT_LIMIT_S`), then loads the file that process saved instead of compiling
    the variant too.  A cache folder that takes no lock, or a holder that never finishes, compiles without it."""
    from fluxkiln.engine import locks

    t0 = time.perf_counter()
    waiting: list[str] = []
    with contextlib.ExitStack() as held:
        with contextlib.suppress(OSError):  # TimeoutError included
            held.enter_context(locks.hold(where / f"{key}.lock", f"block variant {key}", on_wait=waiting.append,
                                          timeout_s=WAIT_LIMIT_S))
        if waiting:
            with _lock:
                _state["waited"] = _state.get("waited", 0) + 1
                _state["waited_s"] = _state.get("waited_s", 0.0) + time.perf_counter() - t0
        fn = load_saved(where, key, variants)  # saved by the process that held the lock, or just before
        return fn if fn is not None else compile_ahead(block, where, key, args, kwargs)


def _reason(key: str, exc: BaseException) -> str:
    return f"{key}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def _give_up(key: str, exc: BaseException, failed: Path, then: str, seconds: float) -> None:
    """Note and warn that a variant cannot be precompiled, and leave the reason in its ``.failed`` file."""
    why = _reason(key, exc)
    _note("failed", why, seconds)
    warnings.warn(f"precompile: {why}; {then} (delete {failed} to try again)", RuntimeWarning, stacklevel=4)
    with contextlib.suppress(OSError):
        failed.parent.mkdir(parents=True, exist_ok=True)
        failed.write_text(why + "\n")


def _note(kind: str, what: str, seconds: float) -> None:
    """Count a variant compiled ahead (``saved``) or not (``failed``) in this process, and in warmup's recording."""
    with _lock:
        _state.setdefault(kind, []).append(what)
        _state["ahead_s"] = _state.get("ahead_s", 0.0) + seconds
    rec = _state.get("recording")
    if rec is not None:
        getattr(rec, kind).append(what)
        rec.seconds += seconds


def ahead_seconds() -> float:
    """Seconds this process has spent compiling variants ahead of time (torch.compile's own counters miss them)."""
    return float(_state.get("ahead_s", 0.0))


def _aot_compile_on(torch: Any) -> Any:
    """torch attaches ``aot_compile`` to compiled functions only with ``enable_aot_compile`` on (off by default
    before torch 2.13): on while saving."""
    if hasattr(torch._dynamo.config, "enable_aot_compile"):
        return torch._dynamo.config.patch(enable_aot_compile=True)
    return contextlib.nullcontext()


# ------------------------------------------------------------------ loading
def _load_one(path: Path) -> Any:
    import torch

    with path.open("rb") as f:
        fn = torch.compiler.load_compiled_function(f)
    fn.disable_guard_check()  # checked by Dispatch, once per block and variant
    return fn


def _load_all(where: Path) -> None:
    t0 = time.perf_counter()
    found: dict[str, Any] = {}
    errors: list[str] = []
    files = sorted(where.glob("*.bin"), key=lambda p: p.stat().st_mtime, reverse=True)[:PRELOAD]
    for path in files:
        try:
            found[path.stem] = _load_one(path)
        except Exception as exc:  # noqa: BLE001 - a stale or broken file: compile as usual
            errors.append(f"{path.name}: {type(exc).__name__}")
    with _lock:
        if _state.get("folder") == where:  # not replaced meanwhile by a load for another device
            _state.update(table=found, loaded=len(found), load_errors=errors,
                          load_s=round(time.perf_counter() - t0, 2))


def load_saved(where: Path, key: str, variants: dict[str, Any]) -> Any | None:
    """A saved variant in ``where`` that the background load left out (it loads only the most recently used),
    loaded now and added to ``variants``; None where there is no such file or it cannot be loaded."""
    path = where / f"{key}.bin"
    if not path.is_file():
        return None
    try:
        fn = _load_one(path)
    except Exception as exc:  # noqa: BLE001 - a stale or broken file: compile as usual
        with _lock:
            _state.setdefault("load_errors", []).append(f"{path.name}: {type(exc).__name__}")
        return None
    variants[key] = fn
    with _lock:
        _state["loaded"] = _state.get("loaded", 0) + 1
    return fn


def used(where: Path, key: str) -> None:
    """Mark a saved variant in ``where`` as just used, so that the next process loads it in the background."""
    with _lock:
        _state.setdefault("used", set()).add(str(where / f"{key}.bin"))
    with contextlib.suppress(OSError):
        os.utime(where / f"{key}.bin")


def start_preload(device: str) -> bool:
    """Begin loading this environment's saved variants in a background thread (once per process).

    Loading a variant looks its kernels up in Inductor's and Triton's caches (and compiles those it misses), so
    the caches are pointed at fluxkiln's folder first, as compiling would.  Before that, torch's default folders
    missed every kernel the compiling run had left: on a CPU two small variants then took 39 s to load instead
    of 2 s (their C++ kernels built again); on an H200, 3.7-4.0 s beside the weights' load, against 2.1-2.6 s
    for a process that had set the caches up first."""
    if unavailable() is not None:
        return False
    fast.setup_compile_cache()
    where = folder(device)
    with _lock:
        if _state.get("folder") == where:
            return True
        _state["folder"] = where
        _state.pop("table", None)
        _state["thread"] = thread = threading.Thread(target=_load_all, args=(where,), name="fluxkiln-precompiled",
                                                     daemon=True)
        thread.start()
    return True


def table(device: str) -> dict[str, Any]:
    """The saved variants for ``device`` (waits for the background load; loads now if none was started)."""
    if unavailable() is not None:
        return {}
    start_preload(device)
    thread = _state.get("thread")
    if thread is not None:
        thread.join()
    return _state.get("table", {})


def stats() -> dict[str, Any]:
    """What loading found: files, seconds, errors (for logs and the bench)."""
    return {"loaded": _state.get("loaded", 0), "load_s": _state.get("load_s"),
            "errors": list(_state.get("load_errors", [])), "call_errors": list(_state.get("call_errors", [])),
            "saved": list(_state.get("saved", [])), "failed": list(_state.get("failed", [])),
            "ahead_s": round(ahead_seconds(), 2), "waited": _state.get("waited", 0),
            "waited_s": round(_state.get("waited_s", 0.0), 2), "used": sorted(_state.get("used", ()))}


def forget() -> None:
    """Drop what was loaded (tests; a later table() loads the folder again)."""
    with _lock:
        for k in ("folder", "table", "thread", "loaded", "load_errors", "load_s"):
            _state.pop(k, None)


# ------------------------------------------------------------------ calling
CHANGES = registrations.Watch()  # registrations on served blocks (adapters, fp8 layers, fused projections)


class Dispatch:
    """A block's compiled call: the precompiled function of a matching variant, else ordinary torch.compile.

    With ``ahead`` (what :func:`fluxkiln.plugins.flux.fast.compile_blocks` installs), a servable call with no saved
    variant compiles one ahead of time (:func:`compile_ahead`) and adds it to ``variants``, which blocks of one
    class share: the process pays the compilation it would have paid anyway, and later processes load it.
    The first call of each signature runs the full check (structure, adapters, the artifact's guards); later
    calls of that signature reuse its answer while nothing was registered on any module since (fp8 layers,
    fused projections and adapters are new submodules), the attention processors are the same objects, and
    the parameters keep their dtype and device."""

    def __init__(self, block: Any, regular: Callable[..., Any], variants: dict[str, Any], ahead: bool = False) -> None:
        import torch

        from diffusers.models.attention_dispatch import _AttentionBackendRegistry

        CHANGES.watch(block.modules())
        self.block, self.regular, self.variants, self.ahead, self.torch = block, regular, variants, ahead, torch
        self.registry = _AttentionBackendRegistry
        self.checked: dict[tuple[Any, ...], tuple[tuple[Any, ...], Any]] = {}
        self.attention: list[Any] = []
        self.param = next(block.parameters(), None)
        self.served = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        fn = self._pick(args, kwargs)
        if fn is None:
            return self.regular(*args, **kwargs)
        try:
            out = fn(self.block, *args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - an experimental torch API: never let it fail an image
            self.variants, self.checked, self.ahead = {}, {}, False  # for good: neither served nor compiled ahead
            _state.setdefault("call_errors", []).append(f"{type(self.block).__name__}: {type(exc).__name__}: {exc}")
            warnings.warn(f"precompiled {type(self.block).__name__} failed ({type(exc).__name__}: {exc}); "
                          "compiling it as usual", RuntimeWarning, stacklevel=2)
            return self.regular(*args, **kwargs)
        self.served += 1
        return out

    def _state(self) -> tuple[Any, ...]:
        p = self.param
        return (CHANGES.count, tuple((m.processor, getattr(m.processor, "_attention_backend", None))
                                      for m in self.attention),
                None if p is None else (p.dtype, p.device), self.registry._active_backend)

    def _pick(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if not (self.variants or self.ahead) or not fast.plain_inference(self.torch, self.block):
            return None
        sig = call_signature(args, kwargs)
        if sig is None:
            return None
        seen = self.checked.get(sig)
        if seen is not None and seen[0] == self._state():
            return seen[1]
        return self._check(sig, args, kwargs)

    def _check(self, sig: tuple[Any, ...], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        block = self.block
        self.attention = [m for m in block.modules() if getattr(m, "processor", None) is not None]
        self.param = next(block.parameters(), None)
        fn = None
        if not _has_adapters(block):  # hooks were ruled out by _pick
            key, where = variant_key(block, sig), folder_of(block)
            fn = self.variants.get(key)
            if fn is None:
                fn = load_saved(where, key, self.variants)
            if fn is None and self.ahead:
                fn = obtain(block, where, key, args, kwargs, self.variants)
                if fn is not None:
                    self.variants[key] = fn
            if fn is not None and not fn.guard_check(block, *args, **kwargs):
                fn = None
            if fn is not None:
                used(where, key)
        self.checked[sig] = (self._state(), fn)
        return fn


def recording() -> bool:
    """Whether ``fluxkiln warmup``'s :class:`Recording` is active (the VAE decoder then compiles at once)."""
    return _state.get("recording") is not None
