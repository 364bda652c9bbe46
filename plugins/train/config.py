"""The training configuration: the train_lora node's parameters as one checked value.

Also says which parameters do not change the trained weights (so checkpoints
survive changing them: ``steps`` continues a run) and scrubs secret values out
of any text that leaves the node.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

OPTIMIZERS = ("auto", "adamw", "adam", "adamw8bit", "adam8bit", "lion", "lion8bit", "prodigy", "adafactor",
              "adagrad", "sgd")
TIMESTEP_SAMPLING = ("sigmoid", "linear", "shift", "flux_shift")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine")
EXPORT_FORMATS = ("diffusers", "peft", "comfyui", "kohya")

# Parameters that do not change the weights a step produces: checkpoints are shared across them.
NOT_IN_STATE = (
    "steps", "resume", "save_every", "keep_last", "sample_every", "sample_prompts", "sample_steps", "sample_guidance",
    "sample_resolution", "sample_seed", "export_formats", "save_dtype", "cache_latents", "cache_latents_to_disk",
    "cache_text_embeddings", "gradient_checkpointing", "gradient_checkpointing_interval",
    "use_pretrained_lora",
    "wandb_project", "wandb_run", "wandb_entity", "wandb_sample_interval", "wandb_save_interval",
    "hf_repo_id", "hf_private",
)
TRIGGER_PLACEHOLDER = "[trigger]"


@dataclass
class TrainConfig:
    """Everything the training loop needs to know (secrets excluded)."""

    trigger_word: str = "TOK"
    steps: int = 1000
    resume: str = "auto"
    learning_rate: float = 4e-4
    batch_size: int = 1
    resolution: list[int] = field(default_factory=lambda: [512, 768, 1024])
    lora_rank: int = 16
    lora_alpha: float | None = None
    caption_dropout_rate: float = 0.05
    optimizer: str = "auto"
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    max_grad_norm: float = 1.0
    cache_latents: bool = True
    cache_latents_to_disk: bool = False
    cache_text_embeddings: bool = True
    layers_to_optimize_regex: str | None = None
    gradient_checkpointing: bool = False
    gradient_checkpointing_interval: int = 1
    timestep_sampling: str = "sigmoid"
    mask_path: str | None = None
    mask_min_value: float = 0.1
    preservation_class: str | list[str] | None = None
    preservation_weight: float = 1.0
    preservation_every: int = 1
    ema: bool = True
    ema_decay: float = 0.99
    seed: int = 42
    save_every: int = 250
    keep_last: int = 3
    sample_every: int = 0
    sample_prompts: list[str] = field(default_factory=list)
    sample_steps: int = 28
    sample_guidance: float = 3.5
    sample_resolution: int | None = None
    sample_seed: int = 42
    max_sequence_length: int = 512
    export_formats: list[str] = field(default_factory=lambda: ["diffusers", "comfyui"])
    save_dtype: str = "bfloat16"

    @property
    def alpha(self) -> float:
        return float(self.lora_rank if self.lora_alpha is None else self.lora_alpha)

    def with_trigger(self, text: str) -> str:
        """Substitute ``[trigger]`` in a sample prompt."""
        return text.replace(TRIGGER_PLACEHOLDER, self.trigger_word)

    def caption(self, caption: str | None) -> str:
        """The caption trained on: ``[trigger]`` replaced; the trigger word put first when absent."""
        text = (caption or "").strip()
        trig = self.trigger_word.strip()
        if not trig:
            return text.replace(TRIGGER_PLACEHOLDER, "").strip()
        if TRIGGER_PLACEHOLDER in text:
            return text.replace(TRIGGER_PLACEHOLDER, trig)
        if self._trigger().search(text):
            return text
        return f"{trig}, {text}" if text else trig

    @property
    def preservation_classes(self) -> list[str]:
        """The class words of the preservation term (``preservation_class`` as a list; empty when off)."""
        if self.preservation_class is None:
            return []
        return [self.preservation_class] if isinstance(self.preservation_class, str) else list(self.preservation_class)

    def preserved(self, caption: str, word: str) -> str:
        """A trained caption with the trigger word replaced by the class ``word`` (what the preservation term
        keeps at the base model's prediction)."""
        return self._trigger().sub(lambda _m: word, caption)

    def _trigger(self) -> re.Pattern[str]:
        """The trigger word as a whole word (not inside a longer one)."""
        return re.compile(rf"(?<!\w){re.escape(self.trigger_word.strip())}(?!\w)")

    def sample_at(self, step: int, wandb_interval: int | None) -> bool:
        if not self.sample_prompts:
            return False
        if self.sample_every and step % self.sample_every == 0:
            return True
        return bool(wandb_interval) and step % int(wandb_interval) == 0

    def wants(self, fmt: str) -> bool:
        aliases = {"comfyui": ("comfyui", "kohya"), "diffusers": ("diffusers", "peft")}
        return any(f in self.export_formats for f in aliases.get(fmt, (fmt,)))

    def public(self) -> dict[str, Any]:
        return asdict(self)


def scrub(text: str, secrets: list[str | None]) -> str:
    """Replace every secret value found in ``text`` (defence in depth: secrets are never put there)."""
    for s in secrets:
        if s and len(s) >= 4:
            text = text.replace(s, "***")
    return text
