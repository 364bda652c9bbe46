"""Load a captioning model from a local folder and caption batches of images with it.

The model family is chosen from the folder's ``config.json`` (``model_type`` and
``architectures``), never from its name: BLIP (``BlipForConditionalGeneration``),
Florence-2 (transformers' native ``Florence2ForConditionalGeneration``) and any
other model transformers' ``AutoModelForImageTextToText`` can load (LLaVA,
Qwen2-VL, SmolVLM, BLIP-2, ...).  Remote code is never run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fluxkiln.engine import NodeError

FLORENCE_TASKS = ("<CAPTION>", "<DETAILED_CAPTION>", "<MORE_DETAILED_CAPTION>", "<OCR>")
DEFAULT_PROMPTS = {"blip": None, "florence2": "<DETAILED_CAPTION>",
                   "generic": "Describe this image in one detailed sentence for use as a training caption."}


@dataclass
class Captioner:
    """A loaded captioning model: family, model, processor, device and dtype."""

    family: str  # "blip" | "florence2" | "generic"
    model: Any
    processor: Any
    device: str
    dtype: Any
    model_type: str = ""

    def default_prompt(self) -> str | None:
        return DEFAULT_PROMPTS[self.family]

    def caption(self, images: list[Any], prompt: str | None, max_new_tokens: int) -> list[str]:
        """Captions for a batch of RGB PIL images (raw model text, stripped)."""
        import torch

        with torch.inference_mode():
            if self.family == "blip":
                return self._blip(images, prompt, max_new_tokens)
            if self.family == "florence2":
                return self._florence2(images, prompt or DEFAULT_PROMPTS["florence2"], max_new_tokens)
            return self._generic(images, prompt or DEFAULT_PROMPTS["generic"], max_new_tokens)

    def _to_device(self, batch: Any) -> dict[str, Any]:
        import torch

        out = {}
        for k, v in batch.items():
            if isinstance(v, torch.Tensor):
                v = v.to(self.device, dtype=self.dtype) if v.is_floating_point() else v.to(self.device)
            out[k] = v
        return out

    def _decode(self, ids: Any) -> list[str]:
        return [t.strip() for t in self.processor.batch_decode(ids, skip_special_tokens=True)]

    def _blip(self, images: list[Any], prompt: str | None, max_new_tokens: int) -> list[str]:
        kwargs: dict[str, Any] = {"images": images, "return_tensors": "pt"}
        if prompt:
            kwargs.update(text=[prompt] * len(images), padding=True)
        batch = self._to_device(self.processor(**kwargs))
        ids = self.model.generate(**batch, max_new_tokens=max_new_tokens)
        return self._decode(ids)

    def _florence2(self, images: list[Any], prompt: str, max_new_tokens: int) -> list[str]:
        batch = self._to_device(self.processor(images=images, text=[prompt] * len(images), return_tensors="pt",
                                               padding=True))
        ids = self.model.generate(**batch, max_new_tokens=max_new_tokens, num_beams=1, do_sample=False)
        return self._decode(ids)

    def _generic(self, images: list[Any], prompt: str, max_new_tokens: int) -> list[str]:
        text = prompt
        if getattr(self.processor, "chat_template", None):
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
            text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        tok = getattr(self.processor, "tokenizer", None)
        if tok is not None and not self.model.config.is_encoder_decoder:
            tok.padding_side = "left"  # decoder-only models continue the prompt at the right end
        batch = self._to_device(self.processor(images=images, text=[text] * len(images), return_tensors="pt",
                                               padding=True))
        ids = self.model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
        prompt_ids = batch.get("input_ids")
        if prompt_ids is not None and ids.shape[1] > prompt_ids.shape[1] and \
                bool((ids[:, :prompt_ids.shape[1]] == prompt_ids).all()):
            ids = ids[:, prompt_ids.shape[1]:]  # decoder-only: drop the echoed prompt
        return self._decode(ids)


def family_of(config: dict[str, Any], folder: Path) -> str:
    """Which captioning code drives a model, from its raw config.json (not its name)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    model_type = str(config.get("model_type", ""))
    archs = list(config.get("architectures") or [])
    if model_type == "blip":
        if archs and "BlipForConditionalGeneration" not in archs:
            raise NodeError(f"{folder} is a BLIP {archs[0]}, not a captioner",
                            hint="use a BLIP captioning model, e.g. Salesforce/blip-image-captioning-large")
        return "blip"
    if model_type == "florence2":
        vision_type = (config.get("vision_config") or {}).get("model_type")
        if config.get("auto_map") or vision_type not in (None, "florence_vision"):
            raise NodeError(f"{folder} is an original remote-code Florence-2 checkpoint; fluxkiln never runs "
                            "code shipped with a model", hint="use the converted checkpoints that load natively: "
                            "florence-community/Florence-2-large or florence-community/Florence-2-base")
        return "florence2"
    if model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        return "generic"
    raise NodeError(f"{folder} holds a {model_type or 'model without model_type'!s} "
                    f"({', '.join(archs) or 'no architectures listed'}), which is not an image captioner",
                    hint="use a BLIP, Florence-2 or image-text-to-text model (see `fluxkiln nodes caption`)")


def load_captioner(folder: Path, device: str) -> Captioner:
    """Load the captioner in ``folder`` with the class its config names, onto ``device``."""
    from .modelref import quiet_transformers

    with quiet_transformers():
        return _load_captioner(folder, device)


def _load_captioner(folder: Path, device: str) -> Captioner:
    import torch
    from transformers import (
        AutoModelForImageTextToText,
        AutoProcessor,
        BlipForConditionalGeneration,
        Florence2ForConditionalGeneration,
    )

    from .modelref import pick_dtype, read_config

    config = read_config(folder)
    family = family_of(config, folder)
    cls = {"blip": BlipForConditionalGeneration, "florence2": Florence2ForConditionalGeneration}.get(
        family, AutoModelForImageTextToText)
    dtype = pick_dtype(device)
    try:
        processor = AutoProcessor.from_pretrained(folder)
        model = cls.from_pretrained(folder, dtype=dtype)
    except (OSError, ValueError, KeyError) as exc:
        raise NodeError(f"could not load the captioner in {folder}: {exc}",
                        hint="check that the folder is a complete model download (config, weights, processor)") \
            from exc
    model.to(device).eval()
    if dtype != torch.float32 and device == "cpu":
        model.float()
    return Captioner(family, model, processor, device, dtype, str(config.get("model_type", "")))
