"""What names a precompiled block variant and the folder it is saved in: the environment the files depend on
(versions, this plugin's code, the device), a block's structure and a call's signature.  Used by
:mod:`.precompiled`, which saves and loads the variants, and by :mod:`.ahead`, whose markers name the code too.

Nothing here imports torch at module level.
"""

from __future__ import annotations

import functools
import hashlib
import json
import sys
from pathlib import Path
from typing import Any


def _type_name(obj: Any) -> str:
    t = type(obj)
    return f"{t.__module__}.{t.__qualname__}"


@functools.cache
def code_hash(where: Path = Path(__file__).parent) -> str:
    """A hash of the Python files in ``where`` (this plugin's: the attention processors, fp8 layers and wrappers a
    saved block was traced through), so a saved block never outlives the code it was compiled from."""
    h = hashlib.sha256()
    for path in sorted(where.glob("*.py")):
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def environment(device: str) -> dict[str, str]:
    """What the saved files depend on besides the block itself: versions, this plugin's code and the device."""
    import diffusers
    import torch

    env = {"torch": torch.__version__, "diffusers": diffusers.__version__, "python": sys.version.split()[0],
           "fluxkiln": code_hash(), "device": device}
    if device.startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
    return env


def folder(device: str) -> Path:
    """``<cache>/precompiled/<hash of the environment>``: the files this process may load."""
    from fluxkiln.engine.paths import cache_root

    env = environment(device)
    key = hashlib.sha256(json.dumps(env, sort_keys=True).encode()).hexdigest()[:16]
    return cache_root() / "precompiled" / key


def _attention_default() -> str:
    """diffusers' process-wide default attention backend (a global the saved guards leave out)."""
    try:
        from diffusers.models.attention_dispatch import _AttentionBackendRegistry
    except ImportError:
        return ""
    return str(getattr(_AttentionBackendRegistry, "_active_backend", ""))


def folder_of(block: Any) -> Path:
    """The saved variants' folder for the device the block's weights are on."""
    param = next(block.parameters(), None)
    return folder(param.device.type if param is not None else "cpu")


def structure(block: Any) -> tuple[str, ...]:
    """The block's module types and attention processors (and their attention backends, and a processor's
    ``precompile_tag`` where it has one), in order, and diffusers' default attention backend."""
    out = [_attention_default()]
    for m in block.modules():
        out.append(_type_name(m))
        proc = getattr(m, "processor", None)
        if proc is not None:
            out.append(f"{_type_name(proc)}/{getattr(proc, '_attention_backend', None)}")
            if getattr(proc, "precompile_tag", None):  # what its traced code depends on beyond its class
                out.append(str(proc.precompile_tag))
    return tuple(out)


def call_signature(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...] | None:
    """A hashable description of a call: its tensors' shapes, strides, dtypes, devices and ``requires_grad``, the
    other values' reprs, through tuples, lists and dicts with string keys (a pipeline passes its blocks
    ``joint_attention_kwargs={}``); None if a value cannot be described (then the call is not served)."""
    from torch import Tensor as tensor

    def describe(v: Any) -> Any:
        if isinstance(v, tensor):
            return (v.shape, v.stride(), v.dtype, v.device, v.requires_grad)
        if isinstance(v, (tuple, list)):
            return (type(v).__name__, *map(describe, v))
        if isinstance(v, dict) and all(isinstance(k, str) for k in v):  # joint_attention_kwargs ({} from pipelines)
            return ("dict", *((k, describe(x)) for k, x in sorted(v.items())))
        if v is None or isinstance(v, (bool, int, float, str)):
            return repr(v)
        raise TypeError(type(v).__name__)

    try:
        return (describe(args), tuple((k, describe(v)) for k, v in sorted(kwargs.items())))
    except TypeError:
        return None


def variant_key(block: Any, sig: tuple[Any, ...]) -> str:
    """The name a variant's file has: a hash of the block's structure and the call's signature."""
    text = repr((structure(block), sig))
    return f"{type(block).__name__}-{hashlib.sha256(text.encode()).hexdigest()[:20]}"
