"""Write what training produced: the LoRA file(s) with metadata, captions, metrics CSV and loss curve.

The main file uses diffusers/PEFT keys (``transformer.<module>.lora_A.weight``),
the format ``FluxPipeline.load_lora_weights`` and ``apply_lora`` read without
guessing.  When ``lora_alpha`` differs from the rank, ``alpha / rank`` is baked
into ``lora_A`` so every loader (which assumes alpha = rank for these keys)
applies the trained strength.  The ComfyUI/kohya copy (``lora_unet_*`` keys
with alpha tensors) comes from the flux plugin's key converter.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from fluxkiln.engine import NodeError
from fluxkiln.engine.paths import temp_name

from .config import TrainConfig, scrub
from .plot import loss_curve

DTYPES = {"float16": "float16", "bfloat16": "bfloat16", "float32": "float32"}


def rank_of(weights: dict[str, Any]) -> int:
    ranks = {v.shape[0] for k, v in weights.items() if k.endswith(".lora_A.weight")}
    return max(ranks) if ranks else 0


def fold_alpha(weights: dict[str, Any], rank: int, alpha: float) -> dict[str, Any]:
    """Bake ``alpha / rank`` into lora_A so the file means the same to loaders that assume alpha = rank."""
    if rank <= 0 or alpha == rank:
        return dict(weights)
    scale = alpha / rank
    return {k: (v * scale if k.endswith(".lora_A.weight") else v) for k, v in weights.items()}


def metadata(cfg: TrainConfig, model: Any, fingerprint: str, recipe_text: str, steps: int, rank: int,
             optimizer: str, layers: int, secrets: list[str | None]) -> dict[str, str]:
    """The ``fluxkiln.*`` metadata written into every exported file (strings only, secrets scrubbed)."""
    meta = {
        "fluxkiln.base_model": model.ref,
        "fluxkiln.variant": str(model.info.get("variant", "")),
        "fluxkiln.trigger_word": cfg.trigger_word,
        "fluxkiln.rank": str(rank),
        "fluxkiln.alpha": f"{cfg.alpha:g}",
        "fluxkiln.alpha_baked_in": "true" if cfg.alpha != rank else "false",
        "fluxkiln.steps": str(steps),
        "fluxkiln.dataset_fingerprint": fingerprint,
        "fluxkiln.optimizer": optimizer,
        "fluxkiln.layers": str(layers),
        "fluxkiln.params": json.dumps(cfg.public(), sort_keys=True),
        "fluxkiln.recipe": recipe_text,
    }
    return {k: scrub(v, secrets) for k, v in meta.items()}


def _save(weights: dict[str, Any], path: Path, meta: dict[str, str], dtype: str) -> Path:
    import torch
    from safetensors.torch import save_file

    dt = getattr(torch, DTYPES[dtype])
    tmp = temp_name(path)
    save_file({k: v.detach().to("cpu", dt).contiguous() for k, v in weights.items()}, str(tmp),
              metadata={"format": "pt", **meta})
    tmp.replace(path)
    return path


def write_lora(out_dir: Path, weights: dict[str, Any], cfg: TrainConfig,
               meta: dict[str, str]) -> tuple[Path, dict[str, Path]]:
    """Write ``lora.safetensors`` (diffusers/PEFT) and, if asked, ``lora_comfyui.safetensors``."""
    rank = rank_of(weights)
    folded = fold_alpha(weights, rank, cfg.alpha)
    main = _save(folded, out_dir / "lora.safetensors", meta, cfg.save_dtype)
    extra: dict[str, Path] = {}
    if cfg.wants("comfyui"):
        try:
            from fluxkiln.plugins.flux.lora_keys import peft_to_kohya
        except ImportError as exc:
            raise NodeError("the ComfyUI/kohya export needs the flux plugin's key converter",
                            key="export_formats", hint='use export_formats = ["diffusers"]') from exc
        kohya = peft_to_kohya(folded, float(rank))
        kmeta = {**meta, "ss_network_dim": str(rank), "ss_network_alpha": str(rank),
                 "ss_base_model_version": "flux1", "ss_network_module": "networks.lora_flux"}
        extra["comfyui"] = _save(kohya, out_dir / "lora_comfyui.safetensors", kmeta, cfg.save_dtype)
    return main, extra


def write_captions(out_dir: Path, items: list[Any], cfg: TrainConfig) -> tuple[Path, str]:
    """``captions.jsonl`` (image name, caption as given, caption trained on) and a text summary."""
    path = out_dir / "captions.jsonl"
    lines, text = [], []
    for it in items:
        used = cfg.caption(it.caption)
        lines.append(json.dumps({"name": it.name, "caption": it.caption, "trained_caption": used}, ensure_ascii=False))
        text.append(f"{it.name}: {used}")
    path.write_text("\n".join(lines) + ("\n" if lines else ""), encoding="utf-8")
    return path, "\n".join(text)


def write_metrics(out_dir: Path, history: list[list[float]]) -> tuple[Path, Path]:
    """``metrics.csv`` (step, loss, lr, seconds) and ``loss.png``."""
    csv_path = out_dir / "metrics.csv"
    with open(csv_path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["step", "loss", "lr", "seconds"])
        for row in history:
            w.writerow([int(row[0]), f"{row[1]:.6g}", f"{row[2]:.6g}", f"{row[3]:.3f}"])
    png = loss_curve([int(r[0]) for r in history], [float(r[1]) for r in history], out_dir / "loss.png")
    return csv_path, png


def read_pretrained(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """Load a LoRA file given as ``use_pretrained_lora`` into diffusers/PEFT keys (alpha baked in)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            file_meta = dict(f.metadata() or {})
            sd = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # noqa: BLE001 - safetensors raises several error types for bad files
        raise NodeError(f"cannot read use_pretrained_lora {path.name}: {exc}", key="use_pretrained_lora",
                        hint="give a complete .safetensors LoRA file") from exc
    from fluxkiln.plugins.flux.lora_keys import to_peft

    conv = to_peft(sd)
    if conv.unsupported or not conv.state_dict:
        raise NodeError(f"use_pretrained_lora {path.name} is not a FLUX LoRA fluxkiln can read "
                        f"(keys such as {', '.join(list(sd)[:3]) or 'none'})", key="use_pretrained_lora",
                        hint="give a FLUX LoRA with diffusers, kohya/ComfyUI or ai-toolkit keys")
    weights = {k: v for k, v in conv.state_dict.items() if k.startswith("transformer.")}
    return weights, file_meta
