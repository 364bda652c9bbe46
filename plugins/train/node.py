"""The ``train_lora`` node: every input of Replicate's FLUX LoRA trainer plus ai-toolkit's core features."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field

from fluxkiln.engine import Dataset, InputFile, Lora, Model, NodeError, RunContext, Secret, Text, distributed, node

from .config import NOT_IN_STATE, TrainConfig

Res = Annotated[int, Field(ge=16, le=4096)]
Optimizer = Literal["auto", "adamw", "adam", "adamw8bit", "adam8bit", "lion", "lion8bit", "prodigy", "adafactor",
                    "adagrad", "sgd"]
ClassWord = Annotated[str, Field(min_length=1, max_length=200)]
ClassWords = Annotated[list[ClassWord], Field(min_length=1, max_length=64)]
ExportFormat = Literal["diffusers", "peft", "comfyui", "kohya"]


@distributed.parallel
@node("train_lora", version="1", outputs={"lora": Lora, "captions": Text}, category="training")
def train_lora(
    ctx: RunContext,
    model: Model,
    dataset: Dataset | None = None,
    trigger_word: Annotated[str, Field(description="word that stands for the concept; put first in captions that "
                                       "lack it, and replaces [trigger] in captions and sample prompts")] = "TOK",
    steps: Annotated[int, Field(ge=3, le=6000,
                                description="training steps; raising it later continues the run")] = 1000,
    resume: Annotated[Literal["auto", "always", "never"], Field(
        description="continue from the newest checkpoint of this configuration (an interrupted run, or more "
                    "steps): auto = yes, except when the node is forced (--force), which trains from scratch; "
                    "always = also when forced; never = always from scratch")] = "auto",
    learning_rate: Annotated[float, Field(gt=0, description="learning rate")] = 4e-4,
    batch_size: Annotated[int, Field(ge=1, le=64, description="images per step (same bucket size)")] = 1,
    resolution: Annotated[list[Res], Field(
        min_length=1, description="training resolutions; each image is used at each one, in an aspect-ratio "
                                  "bucket, never upscaled")] = [512, 768, 1024],  # noqa: B006
    lora_rank: Annotated[int, Field(ge=1, le=128, description="LoRA rank: capacity (and file size)")] = 16,
    lora_alpha: Annotated[float | None, Field(gt=0, description="LoRA alpha; default = lora_rank")] = None,
    caption_dropout_rate: Annotated[float, Field(ge=0.0, le=1.0, description="share of steps trained with an empty "
                                                 "caption")] = 0.05,
    optimizer: Annotated[Optimizer, Field(
        description="auto = adamw8bit on an NVIDIA GPU with bitsandbytes, else adamw; the 8-bit ones need "
                    "bitsandbytes and a GPU; prodigy needs prodigyopt")] = "auto",
    lr_scheduler: Annotated[Literal["constant", "constant_with_warmup", "linear", "cosine"],
                            Field(description="learning-rate schedule")] = "constant",
    lr_warmup_steps: Annotated[int, Field(ge=0, le=6000, description="steps of linear warm-up")] = 0,
    max_grad_norm: Annotated[float, Field(ge=0.0, description="clip the gradient norm to this (0 = off)")] = 1.0,
    cache_latents: Annotated[bool, Field(description="encode every image once and keep the latents in memory")] = True,
    cache_latents_to_disk: Annotated[bool, Field(
        description="keep the latents in files instead (large datasets)")] = False,
    cache_text_embeddings: Annotated[bool, Field(description="encode each caption once; the text encoders then "
                                                 "stay idle")] = True,
    layers_to_optimize_regex: Annotated[str | None, Field(
        description="train only layers whose name (e.g. transformer.single_transformer_blocks.7.proj_out) "
                    "matches")] = None,
    gradient_checkpointing: Annotated[bool, Field(description="recompute activations in the backward pass: "
                                                  "much less memory, one more forward pass per step")] = False,
    gradient_checkpointing_interval: Annotated[int, Field(
        ge=1, le=57, description="with gradient_checkpointing, recompute every N-th transformer block only "
                                 "(1 = all: least memory; 2 = half: faster, more memory)")] = 1,
    timestep_sampling: Annotated[Literal["sigmoid", "linear", "shift", "flux_shift"],
                                 Field(description="how noise levels are drawn")] = "sigmoid",
    mask_path: Annotated[str | None, InputFile(), Field(
        description="a folder of loss masks, one per dataset image with the image's file name (any image type): "
                    "white parts train at full weight, black ones at mask_min_value (kohya's and ai-toolkit's "
                    "masked loss)")] = None,
    mask_min_value: Annotated[float, Field(ge=0.0, lt=1.0, description="the loss weight of a mask's black parts "
                                           "(needs mask_path; 0 = they do not train)")] = 0.1,
    preservation_class: Annotated[ClassWord | ClassWords | None, Field(description=(
        "what the concept is a kind of (\"person\", \"dog\"), or a list of such words: each step also reads the "
        "batch with the trigger word replaced by it (from a list: one drawn for each image, a word listed twice "
        "twice as often) and keeps the LoRA's "
        "prediction there at the base model's, so prompts without the trigger change less (ai-toolkit's "
        "differential output preservation; about twice the time a step)"))] = None,
    preservation_weight: Annotated[float, Field(gt=0, le=100, description="weight of the preservation term "
                                                "beside the training loss (needs preservation_class)")] = 1.0,
    preservation_every: Annotated[int, Field(ge=1, le=1000, description="with preservation_class, add the "
                                             "preservation term every N-th step only (1 = every step; 4 = a "
                                             "quarter of its time, and a lighter pull)")] = 1,
    ema: Annotated[bool, Field(description="export an exponential moving average of the weights")] = True,
    ema_decay: Annotated[float, Field(ge=0.0, lt=1.0, description="EMA decay")] = 0.99,
    seed: Annotated[int, Field(ge=0, le=2**32 - 1, description="seed of the LoRA init, noise and data order")] = 42,
    save_every: Annotated[int, Field(ge=0, le=6000,
                                     description="checkpoint every N steps (0 = only at the end)")] = 250,
    keep_last: Annotated[int, Field(ge=1, le=100, description="checkpoints kept")] = 3,
    sample_every: Annotated[int, Field(ge=0, le=6000, description="sample the prompts every N steps and at the end "
                                       "(0 = off)")] = 0,
    sample_prompts: Annotated[list[str], Field(description="prompts sampled during training; [trigger] is "
                                               "replaced by trigger_word")] = [],  # noqa: B006
    sample_steps: Annotated[int, Field(ge=1, le=50, description="denoising steps of the samples")] = 28,
    sample_guidance: Annotated[float, Field(ge=0.0, le=10.0, description="guidance of the samples (dev)")] = 3.5,
    sample_resolution: Annotated[int | None, Field(ge=16, le=2048, description="sample size; default the largest "
                                                   "resolution")] = None,
    sample_seed: Annotated[int, Field(ge=0, le=2**32 - 1, description="seed of the samples")] = 42,
    max_sequence_length: Annotated[int, Field(ge=1, le=512, description="T5 tokens per caption")] = 512,
    use_pretrained_lora: Annotated[str | None, InputFile(),
                                   Field(description="skip training and use this .safetensors LoRA instead")] = None,
    export_formats: Annotated[list[ExportFormat], Field(
        description="diffusers/peft is always written; comfyui/kohya adds "
                    "lora_comfyui.safetensors")] = ["diffusers", "comfyui"],  # noqa: B006
    save_dtype: Annotated[Literal["bfloat16", "float16", "float32"], Field(description="dtype of the exported "
                                                                           "LoRA")] = "bfloat16",
    wandb_api_key: Annotated[str | None, Secret(), Field(description="W&B key as \"$ENV_VAR\" (default "
                                                         "WANDB_API_KEY); logging is on when a key is found")] = None,
    wandb_project: Annotated[str, Field(description="W&B project")] = "flux_train_replicate",
    wandb_run: Annotated[str | None, Field(description="W&B run name")] = None,
    wandb_entity: Annotated[str | None, Field(description="W&B entity (user or team)")] = None,
    wandb_sample_interval: Annotated[int, Field(ge=0, le=6000, description="log samples to W&B every N steps")] = 100,
    wandb_save_interval: Annotated[int, Field(ge=0, le=6000, description="log the LoRA to W&B every N steps")] = 100,
    hf_repo_id: Annotated[str | None, Field(description="upload the LoRA and a model card to this Hub repo")] = None,
    hf_token: Annotated[str | None, Secret(), Field(description="Hub token as \"$ENV_VAR\" (default HF_TOKEN)")] = None,
    hf_private: Annotated[bool, Field(description="create the Hub repo private")] = True,
) -> dict:
    """Train a FLUX.1 LoRA on a dataset (Replicate's trainer inputs plus ai-toolkit's features).

    Outputs ``lora`` (``lora.safetensors`` with diffusers/PEFT keys and
    metadata, plus ``lora_comfyui.safetensors`` for ComfyUI/kohya) and
    ``captions`` (the captions trained on).  Writes ``metrics.csv``,
    ``loss.png`` and samples into the run folder.  Checkpoints are kept per
    configuration: a rerun after an interruption resumes where it stopped,
    and raising ``steps`` continues a finished run.  Forcing the node
    (``--force lora``) trains from scratch unless ``resume = "always"``.
    """
    params = dict(locals())
    cfg = TrainConfig(**{k: v for k, v in params.items() if k in TrainConfig.__dataclass_fields__})
    wandb_key = wandb_api_key or os.environ.get("WANDB_API_KEY") or None
    token = hf_token or os.environ.get("HF_TOKEN") or None
    if model.kind != "flux":
        raise NodeError(f"train_lora needs a FLUX model, got a '{model.kind}' model", key="model")
    if model.adapters:
        raise NodeError("train_lora trains on a base model, but `model` carries LoRAs from apply_lora "
                        f"({', '.join(Path(a['path']).name for a in model.adapters)}); they would not be used",
                        key="model", hint="link `model` to the load_model node (apply the LoRAs after training)")
    _check_preservation(cfg)
    _needs_switch(cfg, "mask_min_value", "mask_path", "there are no masks",
                  "set mask_path to a folder of masks named like the images, or drop mask_min_value")
    if hf_repo_id and not token:
        raise NodeError("hf_repo_id is set but no Hugging Face token was found", key="hf_token",
                        hint='export HF_TOKEN=... or set hf_token = "$MY_TOKEN_VAR"')
    from .run import Job

    job = Job(ctx, cfg, model, dataset, secrets=[wandb_key, token])
    if use_pretrained_lora:
        result = job.pretrained(Path(use_pretrained_lora))
    else:
        with ctx.using_state(*NOT_IN_STATE) as state_dir:  # one run at a time resumes one training state
            result = job.train(state_dir, wandb_key,
                               dict(project=wandb_project, run_name=wandb_run, entity=wandb_entity,
                                    sample_interval=wandb_sample_interval, save_interval=wandb_save_interval))
    if not distributed.current().owner:  # another rank of a data-parallel run: rank 0 exports and publishes
        return {"lora": Lora(path=Path(os.devnull)), "captions": Text("")}
    lora, captions = job.export(result)
    if hf_repo_id:
        job.publish(hf_repo_id, hf_private, token, lora, result)
    return {"lora": lora, "captions": captions}


def _check_preservation(cfg: TrainConfig) -> None:
    """The preservation settings make sense together (a trigger to replace, class words that are not it)."""
    classes, trigger = cfg.preservation_classes, cfg.trigger_word.strip()
    if classes and not trigger:
        raise NodeError("preservation_class replaces the trigger word in each caption, but trigger_word is empty",
                        key="preservation_class", hint="set trigger_word, or leave preservation_class out")
    if any(c.strip() == trigger for c in classes):
        raise NodeError(f"preservation_class names the trigger word itself ({trigger!r}): the term would pull the "
                        "LoRA back everywhere", key="preservation_class",
                        hint='name what the concept is a kind of, e.g. preservation_class = "person"')
    for key in ("preservation_weight", "preservation_every"):
        _needs_switch(cfg, key, "preservation_class", "there is no preservation term",
                      f'set preservation_class (e.g. "person") or drop {key}')


def _needs_switch(cfg: TrainConfig, key: str, switch: str, missing: str, hint: str) -> None:
    """``key`` changed from its default means nothing unless ``switch`` is set: say so, naming both."""
    if getattr(cfg, key) != TrainConfig.__dataclass_fields__[key].default and getattr(cfg, switch) is None:
        raise NodeError(f"{key} is set but {switch} is not: {missing}", key=key, hint=hint)
