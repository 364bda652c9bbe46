"""The training configuration of mini-flux: the ``full`` preset (one call of under ten minutes on a machine
of four GPUs, launched with ``torchrun``: the transformer and text encoders from scratch, the shipped VAE
kept) and a ``micro`` preset that runs the same code on a CPU in a minute or two, for testing the script.
Batch sizes are per rank."""

from __future__ import annotations

import json
from dataclasses import dataclass, fields, replace
from typing import Any

from .world import SHAPES, TAUGHT_SHAPES


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 20261128
    init: str = ""  # a mini-flux (dev) pipeline folder to continue from; empty: every module from scratch
    vae_init: str = ""  # take only the VAE from this pipeline folder ("shipped": the shipped mini-flux's)
    native: int = 256  # training image side (the pipelines' native size)
    multi_res: float = 0.1  # fraction of batches at a 0.25 MP aspect-ratio size
    two: float = 0.4  # fraction of training scenes with two objects
    more_shapes: str = ""  # comma-separated shapes of world.TAUGHT_SHAPES the scenes also use (new T5 words)
    shape_weights: str = ""  # e.g. "star:2": a scene's object is that shape twice as often as each other one
    swap_pairs: float = 0.5  # share of native-size scenes paired with their role-swapped twin (drawn together)
    # (a) VAE (0 seconds: keep the VAE of ``init`` / ``vae_init``; more: train it, from there or from scratch)
    vae_seconds: float = 70.0
    vae_batch: int = 48
    vae_lr: float = 1e-3
    vae_kl: float = 1e-6
    vae_part: str = "all"  # "decoder": the encoder stays frozen, so the latents (and a transformer of init) stay valid
    vae_object_weight: float = 0.0  # the pixel loss weighs 1 + this x the object coverage (sharper shapes)
    # data pools for the transformer phases (scenes rendered, VAE-encoded and tokenised in chunks)
    pool_seconds: float = 25.0  # the first fill's time limit
    pool_size: int = 65536  # scenes at the native size
    pool_multi: int = 4096  # per 0.25 MP size, in native-size equivalents (same token count)
    pool_chunk: int = 1024  # scenes rendered and encoded at once
    refresh_share: float = 0.12  # share of the wall clock spent re-rendering pool chunks while training
    refresh_every: int = 5  # base steps between refresh decisions (rank 0's, followed by every rank)
    # (b0) both text encoders alone on the auxiliary role losses (see .roles)
    text_seconds: float = 10.0
    text_batch: int = 512
    text_lr: float = 2e-3
    # (b) transformer + both text encoders, from scratch (text side at text_lr_scale x the rate)
    base_seconds: float = 265.0
    base_batch: int = 256
    base_lr: float = 8e-4
    base_warmup: int = 300
    text_lr_scale: float = 2.0
    aux_weight: float = 0.1  # weight of the auxiliary role losses beside the flow loss
    object_weight: float = 3.0  # flow loss of a latent token weighted 1 + this x its object coverage
    caption_dropout: float = 0.1
    ema: float = 0.999
    check_every: int = 500  # base steps between the logged conditioning checks (true/shuffled/roles swapped)
    check_scenes: int = 128
    # (c) guidance distillation into the guidance embedding (teacher: classifier-free guidance of (b))
    guide_seconds: float = 50.0
    guide_batch: int = 192
    guide_lr: float = 2e-4
    guide_range: tuple[float, float] = (1.0, 6.0)
    distil_ema: float = 0.995
    # (d) schnell: few-step trajectory distillation from dev at guidance 3
    schnell_seconds: float = 60.0
    schnell_batch: int = 256
    schnell_lr: float = 2e-4
    schnell_guidance: float = 3.0
    teacher_steps: int = 12  # Euler steps of the dev teacher per trajectory (a multiple of 12)
    student_steps_per_batch: int = 6
    # end
    cfg_check_scales: tuple[float, ...] = (1.0, 3.0, 5.0)  # the base's adherence with true CFG at these (() : none)
    select_prompts: int = 64  # held-out prompts (another seed than the evaluation's) for EMA-or-raw choices (0: EMA)
    eval_prompts: int = 64  # held-out prompts sampled and checked at the end (GPU), per variant (0: none)
    reserve: float = 25.0  # seconds kept for the choices, saving and the final check
    deadline: float = 520.0  # seconds after start by which everything must be written

    @property
    def shape_words(self) -> tuple[str, ...]:
        """The taught shapes of ``more_shapes``, in order."""
        return tuple(w.strip() for w in self.more_shapes.split(",") if w.strip())

    @property
    def shapes(self) -> tuple[str, ...]:
        """Every shape of the training scenes: mini-flux's four and ``more_shapes``."""
        return SHAPES + self.shape_words

    @property
    def weights_of_shapes(self) -> dict[str, int]:
        """``shape_weights`` read: each named shape's weight (the others weigh 1)."""
        weights: dict[str, int] = {}
        for item in (w.strip() for w in self.shape_weights.split(",") if w.strip()):
            shape, _, weight = (part.strip() for part in item.partition(":"))
            if shape not in self.shapes:
                raise SystemExit(f"shape_weights: {shape!r} is not a shape of the training scenes; choose from "
                                 f"{', '.join(self.shapes)} (more_shapes adds to them)")
            if shape in weights:
                raise SystemExit(f"shape_weights: {shape!r} is named twice; name each shape once")
            if not (weight.isascii() and weight.isdigit() and 1 <= int(weight) <= 10):
                raise SystemExit(f"shape_weights: {item!r} needs a whole number from 1 to 10 after the colon, "
                                 f"e.g. \"star:2\"")
            weights[shape] = int(weight)
        return weights

    @property
    def scene_shapes(self) -> tuple[str, ...]:
        """What a training scene draws its shapes from: ``shapes``, each repeated by its ``shape_weights``."""
        weights = self.weights_of_shapes
        return tuple(s for s in self.shapes for _ in range(weights.get(s, 1)))


VAE_PARTS = ("all", "decoder")

PRESETS = {
    "full": TrainConfig(vae_init="shipped", vae_seconds=0.0, pool_seconds=20.0, text_seconds=15.0,
                        base_seconds=310.0, base_lr=1e-3, guide_seconds=40.0, schnell_seconds=50.0, reserve=40.0,
                        deadline=480.0),
    "micro": TrainConfig(native=64, vae_seconds=6, vae_batch=4, pool_seconds=5, pool_size=256, pool_multi=32,
                         pool_chunk=32, text_seconds=4, text_batch=32, base_seconds=10, base_batch=4,
                         base_warmup=20, check_every=20, check_scenes=4, guide_seconds=6, guide_batch=4,
                         schnell_seconds=6, schnell_batch=4, select_prompts=4, eval_prompts=2, deadline=300.0),
}


def preset(name: str, **overrides: float) -> TrainConfig:
    """A preset with some fields replaced (``--set name=value`` on the command line).  Setting ``init`` without
    ``vae_init`` continues with ``init``'s own VAE (the preset's ``vae_init`` is for training from scratch)."""
    if name not in PRESETS:
        raise SystemExit(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    known = [f.name for f in fields(TrainConfig)]
    for key, value in overrides.items():
        if key not in known:
            raise SystemExit(f"unknown setting {key!r}; settings: {', '.join(known)}")
        _check_kind(key, value, getattr(PRESETS[name], key))
    if overrides.get("init") and "vae_init" not in overrides:
        overrides = {**overrides, "vae_init": ""}  # continuing: the VAE of init (its transformer's latents)
    cfg = replace(PRESETS[name], **overrides)
    unknown = [s for s in cfg.shape_words if s not in TAUGHT_SHAPES]
    if unknown:
        raise SystemExit(f"more_shapes: {', '.join(unknown)} cannot be taught; choose from {', '.join(TAUGHT_SHAPES)}")
    if len(set(cfg.shape_words)) < len(cfg.shape_words):
        raise SystemExit(f"more_shapes: {cfg.more_shapes!r} names a shape twice; name each once")
    _ = cfg.weights_of_shapes  # a bad shape_weights stops the run here, before any work
    if cfg.vae_part not in VAE_PARTS:
        raise SystemExit(f"vae_part: {cfg.vae_part!r} is not one of {', '.join(VAE_PARTS)}")
    return cfg


def _check_kind(key: str, value: Any, default: Any) -> None:
    """Refuse a value of another kind than the setting's (``--set`` values are JSON: a string goes in quotes)."""
    if isinstance(default, str) and not isinstance(value, str):
        text = ",".join(map(str, value)) if isinstance(value, list) else value  # a list of shapes: their names
        raise SystemExit(f"{key}: {value!r} is not a string; write it in quotes, e.g. --set {key}='\"{text}\"'")
    if isinstance(default, (int, float)) and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise SystemExit(f"{key}: {value!r} is not a number; e.g. --set {key}={default}")
    if isinstance(default, tuple) and not isinstance(value, (list, tuple)):
        raise SystemExit(f"{key}: {value!r} is not a list; e.g. --set {key}='{json.dumps(list(default))}'")
