"""Training checkpoints: written atomically, found again after a crash, pruned only when safe.

A checkpoint is a folder ``ckpt-000250/`` holding the trainable LoRA weights
and the EMA copy (``weights.safetensors``, float32, so a resume is exact), the
optimizer, LR scheduler and RNG states (``state.pt``, read back with
``torch.load(weights_only=True)``: it holds only tensors and plain values) and
``meta.json`` (step, data-order cursor, loss history, and the size and sha256
of the other two files).  It is built in a hidden temporary folder, every file
fsynced, ``meta.json`` last, then renamed into place in one step; older
checkpoints are pruned only after that.  A folder whose meta.json is missing or
whose files do not match it is never used.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fluxkiln.engine.paths import fsync_dir

NAME = re.compile(r"^ckpt-(\d{6,})$")
WEIGHTS, STATE, META = "weights.safetensors", "state.pt", "meta.json"


@dataclass
class Checkpoint:
    """A complete checkpoint read back from disk."""

    path: Path
    step: int
    tensors: dict[str, Any] = field(default_factory=dict)  # "param/<name>" and "ema/<name>"
    state: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


def _write_file(path: Path, data: bytes) -> None:
    """Write bytes and force them to disk."""
    with open(path, "xb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def rng_state() -> dict[str, Any]:
    """Global RNG states (torch CPU/CUDA, python ``random``, numpy) as plain values."""
    import numpy as np
    import torch

    py = random.getstate()
    npst = np.random.get_state()
    out: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [npst[0], torch.from_numpy(np.asarray(npst[1]).astype("int64")), int(npst[2]), int(npst[3]),
                  float(npst[4])],
    }
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(st: dict[str, Any]) -> None:
    import numpy as np
    import torch

    torch.set_rng_state(st["torch"])
    py = st["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npst = st["numpy"]
    np.random.set_state((npst[0], npst[1].numpy().astype("uint32"), npst[2], npst[3], npst[4]))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


Log = Callable[[str], Any]


def _quiet(_message: str) -> None:
    return None


def save(root: Path, step: int, tensors: dict[str, Any], state: dict[str, Any], meta: dict[str, Any],
         keep_last: int, log: Log = _quiet) -> Path:
    """Write checkpoint ``step`` under ``root`` atomically, then prune to the newest ``keep_last``.

    A folder of this step that is already complete and verified is kept; one that is not (torn,
    or corrupt with the right sizes) is logged and replaced.
    """
    import torch
    from safetensors.torch import save as st_save

    final = root / f"ckpt-{step:06d}"
    if final.is_dir():
        _, why = check(final, verify=True)
        if why is None:
            return final  # the same step is already safely on disk
        log(f"checkpoint {final.name} is unusable ({why}): writing it again")
    tmp = root / f".ckpt-{step:06d}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        weights = st_save({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()})
        buf = io.BytesIO()
        torch.save(state, buf)
        blob = buf.getvalue()
        _write_file(tmp / WEIGHTS, weights)
        _write_file(tmp / STATE, blob)
        files = {WEIGHTS: [len(weights), _sha(weights)], STATE: [len(blob), _sha(blob)]}
        _write_file(tmp / META, json.dumps({**meta, "step": step, "files": files, "complete": True}).encode())
        fsync_dir(tmp)
        if final.exists():  # an incomplete or corrupt folder of this step: set it aside
            shutil.rmtree(final)
        os.rename(tmp, final)
        fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    prune(root, keep_last)
    return final


def check(folder: Path, verify: bool = False) -> tuple[dict[str, Any] | None, str | None]:
    """(meta, None) for a complete checkpoint folder, else (None, why it is unusable).

    Sizes are always compared with ``meta.json``; ``verify`` also compares sha256 sums."""
    try:
        meta = json.loads((folder / META).read_text())
    except FileNotFoundError:
        return None, f"{META} is missing (the write was interrupted)"
    except (OSError, ValueError) as exc:
        return None, f"{META} cannot be read ({exc})"
    if not isinstance(meta, dict) or not meta.get("complete") or not isinstance(meta.get("files"), dict):
        return None, f"{META} does not mark it complete"
    try:
        for name, (size, sha) in meta["files"].items():
            f = folder / name
            if f.stat().st_size != size:
                return None, f"{name} has {f.stat().st_size} bytes, {META} says {size} (torn write)"
            if verify and _sha(f.read_bytes()) != sha:
                return None, f"{name} does not match the sha256 in {META} (corrupt file)"
    except FileNotFoundError as exc:
        return None, f"{Path(exc.filename or '?').name} is missing"
    except (OSError, ValueError, TypeError) as exc:
        return None, f"cannot be checked ({exc})"
    return meta, None


def complete(root: Path, log: Log = _quiet) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``root``, newest first (by step); incomplete ones are logged."""
    found = []
    if not root.is_dir():
        return found
    for p in root.iterdir():
        m = NAME.match(p.name)
        if not (m and p.is_dir()):
            continue
        _, why = check(p)
        if why is None:
            found.append((int(m.group(1)), p))
        else:
            log(f"checkpoint {p.name} skipped: {why}")
    return sorted(found, reverse=True)


def prune(root: Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` complete checkpoints, and leftover temporary folders."""
    for _, p in complete(root)[max(1, keep_last):]:
        shutil.rmtree(p, ignore_errors=True)
    clean_temporaries(root)


def discard_all(root: Path) -> int:
    """Delete every checkpoint under ``root`` (a run from scratch); returns how many complete ones there were."""
    found = complete(root)
    for _, p in found:
        shutil.rmtree(p, ignore_errors=True)
    if root.is_dir():
        for p in root.glob("ckpt-*"):
            shutil.rmtree(p, ignore_errors=True)
    clean_temporaries(root)
    return len(found)


def clean_temporaries(root: Path) -> None:
    if root.is_dir():
        for p in root.glob(".ckpt-*.tmp-*"):
            shutil.rmtree(p, ignore_errors=True)


def load_latest(root: Path, max_step: int, log: Log = _quiet) -> Checkpoint | None:
    """The newest complete, verified checkpoint at or before ``max_step`` (None: start fresh).

    Every checkpoint passed over for being torn or corrupt is logged with the reason."""
    import torch
    from safetensors.torch import load_file

    for step, p in complete(root, log):
        if step > max_step:
            continue
        meta, why = check(p, verify=True)
        if meta is None:
            log(f"checkpoint {p.name} skipped: {why}")
            continue
        try:
            tensors = load_file(str(p / WEIGHTS))
            state = torch.load(p / STATE, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unreadable checkpoint falls back to an older one
            log(f"checkpoint {p.name} skipped: it cannot be loaded ({type(exc).__name__}: {exc})")
            continue
        return Checkpoint(p, step, tensors, state, meta)
    return None
