"""The training configuration of mini-flux (the one the shipped weights were trained with, and a micro
preset that runs the same code on a CPU in a minute, for testing the script)."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 20261128
    native: int = 256  # training image side (the pipelines' native size)
    multi_res: float = 0.15  # fraction of batches at a 0.25 MP aspect-ratio size
    # (a) VAE
    vae_seconds: float = 85.0
    vae_batch: int = 48
    vae_lr: float = 1e-3
    vae_kl: float = 1e-6
    # (b) transformer + both text encoders, from scratch
    base_seconds: float = 240.0
    base_batch: int = 256
    base_lr: float = 6e-4
    caption_dropout: float = 0.1
    ema: float = 0.999
    # (c) guidance distillation into the guidance embedding (teacher: classifier-free guidance of (b))
    guide_seconds: float = 80.0
    guide_batch: int = 192
    guide_lr: float = 2e-4
    guide_range: tuple[float, float] = (1.0, 6.0)
    # (d) schnell: few-step trajectory distillation from dev at guidance 3
    schnell_seconds: float = 90.0
    schnell_batch: int = 192
    schnell_lr: float = 2e-4
    schnell_guidance: float = 3.0
    teacher_steps: int = 24  # Euler steps of the dev teacher per trajectory (a multiple of 12)
    student_steps_per_batch: int = 4
    # end
    eval_prompts: int = 64  # held-out prompts sampled and checked at the end (GPU), per variant
    deadline: float = 555.0  # seconds after start by which everything must be written


PRESETS = {
    "full": TrainConfig(),
    "micro": TrainConfig(native=64, vae_seconds=6, vae_batch=4, base_seconds=10, base_batch=4, guide_seconds=6,
                         guide_batch=4, schnell_seconds=6, schnell_batch=4, teacher_steps=12, eval_prompts=2,
                         deadline=300.0),
}


def preset(name: str, **overrides: float) -> TrainConfig:
    """A preset with some fields replaced (``--set name=value`` on the command line)."""
    if name not in PRESETS:
        raise SystemExit(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    known = {f.name: f.type for f in fields(TrainConfig)}
    for key in overrides:
        if key not in known:
            raise SystemExit(f"unknown setting {key!r}; settings: {', '.join(known)}")
    return replace(PRESETS[name], **overrides)
