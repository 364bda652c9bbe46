"""Pipelines during mini-flux's training: load one to continue from, score candidates with the checker
(to keep the EMA or the raw weights), write the finished FluxPipeline folders, and the final check."""

from __future__ import annotations

import copy
import tarfile
from pathlib import Path
from typing import Any

from .config import NAMES, pipeline
from .trainconfig import TrainConfig
from .trainparts import log


def load_modules(folder: Path) -> dict[str, Any]:
    """The modules of a saved mini-flux (dev) pipeline, in float32, to continue training from."""
    import torch
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(str(folder), local_files_only=True, dtype=torch.float32)
    return {k: v for k, v in pipe.components.items() if v is not None}  # no image encoder


def extend_vocabulary(m: dict[str, Any], words: tuple[str, ...]) -> list[str]:
    """Make each of ``words`` one new T5 piece (after every existing one, so no id changes), its embedding row
    started at the mean of the four shape words' rows; returns the words added (none where ``m`` knows them)."""
    import torch

    from .config import knows_word, t5_tokenizer, word_piece
    from .world import SHAPES

    old = m["tokenizer_2"]
    new = [w for w in words if not knows_word(old, w)]
    if not new:
        return []
    tok = t5_tokenizer(tuple(w for w in words if w not in new) + tuple(new))
    if any(tok.convert_tokens_to_ids(p) != i for p, i in old.get_vocab().items()):
        raise SystemExit("more_shapes: the pipeline's T5 vocabulary is not mini-flux's; cannot add words to it")
    encoder = m["text_encoder_2"]
    encoder.resize_token_embeddings(len(tok), mean_resizing=False)
    table = encoder.get_input_embeddings().weight
    rows = [old(w, add_special_tokens=False).input_ids[0] for w in SHAPES]
    with torch.no_grad():
        for w in new:
            table[tok.convert_tokens_to_ids(word_piece(w))] = table[rows].mean(0)
    m["tokenizer_2"] = tok
    return new


def load_vae(source: str) -> Any:
    """The VAE of a saved mini-flux pipeline folder ("shipped": the shipped weights'), in float32."""
    import torch
    from diffusers import AutoencoderKL

    from .weights import model_path

    folder = model_path("dev") if source == "shipped" else Path(source)
    if not (folder / "vae" / "config.json").is_file():
        raise SystemExit(f"vae_init: {folder} has no vae/config.json; give a mini-flux pipeline folder or 'shipped'")
    return AutoencoderKL.from_pretrained(str(folder / "vae"), torch_dtype=torch.float32)


def quick_row(cfg: TrainConfig, m: dict[str, Any], variant: str, guidance: float | None,
              true_cfg: float = 1.0) -> dict[str, float]:
    """The checker's row (percent per attribute) on ``select_prompts`` held-out prompts, sampled in memory at
    the native size (dev 28 steps, schnell 4); ``true_cfg`` > 1: with classifier-free guidance."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from .adherence import eval_prompts, generate, score_images
    from .config import SCHEDULERS

    parts = dict(m, scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULERS[variant]))
    pipe = pipeline(parts)
    pipe.set_progress_bar_config(disable=True)
    prompts = eval_prompts(cfg.select_prompts, seed=99)
    images = generate(pipe, prompts, steps=28 if variant == "dev" else 4, guidance=guidance, width=cfg.native,
                      height=cfg.native, batch=64, true_cfg=true_cfg)
    return score_images(images, prompts)


def quick_score(cfg: TrainConfig, m: dict[str, Any], variant: str, guidance: float | None) -> float:
    """Mean of colour, shape, position and background adherence (percent): :func:`quick_row`'s summary."""
    row = quick_row(cfg, m, variant, guidance)
    return round(sum(row[k] for k in ("colour", "shape", "position", "background")) / 4, 1)


def cfg_check(cfg: TrainConfig, m: dict[str, Any]) -> dict[str, dict[str, float]]:
    """The base model's adherence with classifier-free guidance at each of ``cfg_check_scales`` (the teacher
    guidance distillation copies: if guidance does not raise adherence here, distillation cannot)."""
    rows = {str(float(g)): quick_row(cfg, m, "dev", 1.0, true_cfg=float(g)) for g in cfg.cfg_check_scales}
    log("base with classifier-free guidance: " + "; ".join(f"{g}: {row}" for g, row in rows.items()))
    return rows


def choose(cfg: TrainConfig, name: str, candidates: dict[str, dict[str, Any]], variant: str,
           guidance: float | None, metrics: dict[str, Any]) -> dict[str, Any]:
    """The candidate (a dict of modules replacing ``m``'s) the checker scores higher; recorded in ``metrics``."""
    if cfg.select_prompts <= 0:
        metrics[f"{name}_choice"] = {"kept": "ema", "scores": None}
        return candidates["ema"]
    scores = {label: quick_score(cfg, parts, variant, guidance) for label, parts in candidates.items()}
    best = max(scores, key=lambda k: scores[k])
    metrics[f"{name}_choice"] = {"scores": scores, "kept": best}
    log(f"{name}: {scores} -> keeping the {best} weights")
    return candidates[best]


def save(m: dict[str, Any], transformer: Any, variant: str, work: Path, out: Path) -> Path:
    """Write the FluxPipeline folder (float16 safetensors) and a tar of it; returns the folder."""
    import shutil

    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler

    from .config import SCHEDULERS

    parts = {k: (copy.deepcopy(v).to("cpu", torch.float16) if isinstance(v, torch.nn.Module) else v)
             for k, v in m.items()}
    parts["transformer"] = copy.deepcopy(transformer).to("cpu", torch.float16)
    parts["scheduler"] = FlowMatchEulerDiscreteScheduler(**SCHEDULERS[variant])
    folder = work / NAMES[variant]
    if folder.exists():
        shutil.rmtree(folder)
    pipeline(parts).save_pretrained(folder, safe_serialization=True)
    forget_origin(folder)
    with tarfile.open(out / f"{NAMES[variant]}.tar", "w") as tar:
        tar.add(folder, arcname=NAMES[variant])
    log(f"saved {folder} ({sum(p.stat().st_size for p in folder.rglob('*') if p.is_file()) / 1e6:.1f} MB)")
    return folder


def forget_origin(folder: Path) -> None:
    """Drop ``_name_or_path`` from the components' configs: a pipeline continued from a folder records that
    folder's absolute path there, which must not ship with the weights."""
    import json

    for config in folder.glob("*/config.json"):
        data = json.loads(config.read_text())
        if data.pop("_name_or_path", None) is not None:
            config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def final_check(cfg: TrainConfig, work: Path, device: str) -> dict[str, Any]:
    """Load the written folders with from_pretrained and score held-out prompts with the checker."""
    import torch

    from .adherence import run
    from .weights import load_pipeline

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    variants = ["dev", "schnell", "guidance"] if cfg.eval_prompts >= 16 else ["dev", "schnell"]
    return run(lambda v: load_pipeline(v, work, device, dtype), cfg.eval_prompts, variants, log=log, batch=64,
               size=cfg.native)
