"""Where mini-flux's shipped weights live, and how ``builtin:mini-flux`` refs resolve to them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .config import BUILTIN_REFS, NAMES

WEIGHTS = Path(__file__).parent / "weights"


def model_path(variant: str = "dev", root: Path | None = None) -> Path:
    """The FluxPipeline folder of a mini-flux variant ("dev" or "schnell")."""
    if variant not in NAMES:
        raise ValueError(f"unknown mini-flux variant {variant!r}; use 'dev' or 'schnell'")
    return (root or WEIGHTS) / NAMES[variant]


def resolve_builtin(ref: str) -> str | None:
    """``builtin:mini-flux`` / ``builtin:mini-flux-schnell`` -> folder path; None for other refs."""
    variant = BUILTIN_REFS.get(ref.strip())
    if variant is None:
        return None
    path = model_path(variant)
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(f"the mini-flux weights are missing from {path}; reinstall fluxkiln or retrain "
                                "them with `python -m fluxkiln.plugins.miniflux.train`")
    return str(path)


def load_pipeline(variant: str = "dev", root: Path | None = None, device: str = "cpu", dtype: Any = None) -> Any:
    """A FluxPipeline of mini-flux loaded with ``from_pretrained`` (float32 on CPU)."""
    return load_folder(model_path(variant, root), device, dtype)


def load_folder(folder: Path, device: str = "cpu", dtype: Any = None) -> Any:
    """The FluxPipeline saved in ``folder``, loaded with ``from_pretrained`` (float32 unless ``dtype``)."""
    import torch
    from diffusers import FluxPipeline

    from fluxkiln.plugins.flux.load import quiet_loading

    with quiet_loading():
        pipe = FluxPipeline.from_pretrained(str(folder), local_files_only=True, dtype=dtype or torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
