"""Sample images during training (progress previews), and the message for a GPU out of memory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .config import TrainConfig


def sample_size(cfg: TrainConfig) -> int:
    size = cfg.sample_resolution or max(cfg.resolution)
    return max(16, size // 16 * 16)


def take_samples(ctx: Any, pipe: Any, cfg: TrainConfig, step: int, out_dir: Path) -> list[tuple[str, Path, Any]]:
    """Generate one image per sample prompt with the adapter as trained so far; save and report each."""
    import torch

    size = sample_size(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    made = []
    was_training = pipe.transformer.training
    pipe.transformer.eval()
    try:
        for i, raw in enumerate(cfg.sample_prompts):
            prompt = cfg.with_trigger(raw)
            gen = torch.Generator("cpu").manual_seed(cfg.sample_seed)
            with torch.random.fork_rng(devices=[]), torch.no_grad():
                kwargs: dict[str, Any] = dict(prompt=prompt, height=size, width=size, generator=gen,
                                              num_inference_steps=cfg.sample_steps,
                                              max_sequence_length=cfg.max_sequence_length)
                if pipe.transformer.config.guidance_embeds:
                    kwargs["guidance_scale"] = cfg.sample_guidance
                img = pipe(**kwargs).images[0]
            path = out_dir / f"step-{step:06d}-{i:02d}.png"
            img.save(path)
            ctx.artifact(path)
            ctx.progress(step, cfg.steps, preview=img, preview_path=path,
                         message=f"sample {i + 1}/{len(cfg.sample_prompts)} at step {step}: {prompt}")
            made.append((prompt, path, img))
    finally:
        pipe.transformer.train(was_training)
    return made


def oom_hint(cfg: TrainConfig, info: dict[str, Any]) -> str:
    """Settings that lower training memory, most effective first, leaving out those already in use."""
    tips = []
    if not cfg.gradient_checkpointing:
        tips.append("gradient_checkpointing = true (about half the activation memory)")
    elif cfg.gradient_checkpointing_interval > 1:
        tips.append(f"gradient_checkpointing_interval = 1 (now {cfg.gradient_checkpointing_interval})")
    if info.get("quantize", "none") == "none":
        tips.append('quantize = "fp8" on the load_model node')
    if info.get("offload", "none") == "none":
        tips.append('offload = "model" on the load_model node (with quantize = "fp8" and gradient_checkpointing, '
                    "1024² training fits a 24 GB card)")
    if max(cfg.resolution) > 512:
        tips.append(f"resolution = [512] (now {cfg.resolution})")
    if cfg.batch_size > 1:
        tips.append("batch_size = 1")
    if cfg.lora_rank > 16:
        tips.append(f"lora_rank = 16 (now {cfg.lora_rank})")
    if cfg.optimizer not in ("adamw8bit", "adam8bit", "lion8bit", "auto"):
        tips.append('optimizer = "adamw8bit"')
    if not cfg.cache_text_embeddings:
        tips.append("cache_text_embeddings = true")
    if cfg.sample_prompts:
        tips.append("fewer or smaller samples (sample_resolution = 512)")
    return "try " + "; ".join(tips) if tips else "use a GPU with more memory"
