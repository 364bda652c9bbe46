"""The two safety stages: load each model from a local folder and score images with it.

Stage 1 is a CLIP-based Stable Diffusion safety checker (diffusers'
``StableDiffusionSafetyChecker``): an image's CLIP embedding is compared with
17 concept embeddings (and 3 "special care" ones); a concept is hit when the
cosine similarity exceeds that concept's threshold.  Stage 2 is an image
classifier (``AutoModelForImageClassification``) with an NSFW-like label.
A model folder is recognised by its ``config.json``; a pipeline folder with a
``safety_checker/`` (or ``nsfw_classifier/``) subfolder is accepted too.  Both
models are small and run in float32 on every device, so scores are the same on
CPU and GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fluxkiln.engine import NodeError

NSFW_LABELS = ("nsfw", "porn", "hentai", "sexy", "explicit", "unsafe", "nude", "nudity")


@dataclass
class Stage:
    """A loaded safety model and its image processor."""

    kind: str  # "checker" | "classifier"
    model: Any
    processor: Any
    device: str
    nsfw_ids: tuple[int, ...] = ()
    labels: tuple[str, ...] = ()


def checker_scores(model: Any, processor: Any, images: list[Any], adjustment: float,
                   device: str = "cpu") -> list[dict[str, Any]]:
    """Concept scores of the safety checker; an image is flagged when any concept score is > 0.

    score = cosine(image, concept) - concept threshold + adjustment (+0.01 when a
    special-care concept was hit), the convention of the original checker.
    """
    import torch
    import torch.nn.functional as F

    pixels = processor(images=images, return_tensors="pt")["pixel_values"].to(device, dtype=model.dtype)
    with torch.inference_mode():
        pooled = model.vision_model(pixels).pooler_output
        emb = F.normalize(model.visual_projection(pooled).float(), dim=-1)
        special = emb @ F.normalize(model.special_care_embeds.float(), dim=-1).T
        special = special - model.special_care_embeds_weights.float() + adjustment
        hit_special = (special > 0).any(dim=1, keepdim=True)
        concept = emb @ F.normalize(model.concept_embeds.float(), dim=-1).T
        concept = concept - model.concept_embeds_weights.float() + adjustment + 0.01 * hit_special
    out = []
    for i in range(len(images)):
        row = concept[i].cpu()
        out.append({"flagged": bool((row > 0).any()), "score": round(float(row.max()), 4),
                    "concepts": [int(j) for j in torch.nonzero(row > 0).flatten()],
                    "special_care": [int(j) for j in torch.nonzero(special[i].cpu() > 0).flatten()]})
    return out


def classifier_scores(stage: Stage, images: list[Any], threshold: float) -> list[dict[str, Any]]:
    """NSFW probability per image (sum over the NSFW-like labels); flagged when >= ``threshold``."""
    import torch

    batch = stage.processor(images=images, return_tensors="pt")
    pixels = batch["pixel_values"].to(stage.device, dtype=stage.model.dtype)
    with torch.inference_mode():
        logits = stage.model(pixel_values=pixels).logits.float().cpu()
    multi = getattr(stage.model.config, "problem_type", None) == "multi_label_classification"
    probs = torch.sigmoid(logits) if multi else torch.softmax(logits, dim=-1)
    out = []
    for row in probs:
        p = float(row[list(stage.nsfw_ids)].max() if multi else row[list(stage.nsfw_ids)].sum())
        top = int(row.argmax())
        out.append({"flagged": p >= threshold, "nsfw_probability": round(p, 4),
                    "label": stage.labels[top] if top < len(stage.labels) else str(top)})
    return out


def _subfolder(folder: Path, sub: str) -> Path:
    return folder / sub if (folder / sub / "config.json").is_file() else folder


def load_checker(folder: Path, device: str) -> Stage:
    """Load a Stable Diffusion safety checker (and its CLIP image processor) from ``folder``."""
    from fluxkiln.plugins.caption.modelref import quiet_transformers

    with quiet_transformers():
        return _load_checker(folder, device)


def load_classifier(folder: Path, device: str) -> Stage:
    """Load an image classifier with an NSFW-like label (e.g. Falconsai/nsfw_image_detection)."""
    from fluxkiln.plugins.caption.modelref import quiet_transformers

    with quiet_transformers():
        return _load_classifier(folder, device)


def _load_checker(folder: Path, device: str) -> Stage:
    import torch
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import AutoImageProcessor

    from fluxkiln.plugins.caption.modelref import read_config

    model_dir = _subfolder(folder, "safety_checker")
    archs = read_config(model_dir).get("architectures") or []
    if "StableDiffusionSafetyChecker" not in archs:
        raise NodeError(f"{model_dir} is not a Stable Diffusion safety checker (architectures: {archs or 'none'})",
                        key="checker", hint="use CompVis/stable-diffusion-safety-checker, a pipeline folder with "
                        "safety_checker/, or checker = \"none\" to turn stage 1 off")
    model = StableDiffusionSafetyChecker.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    proc_dir = next((d for d in (model_dir, folder / "feature_extractor", model_dir.parent / "feature_extractor")
                     if (d / "preprocessor_config.json").is_file()), None)
    if proc_dir is None:  # the stock checker's preprocessing: CLIP's, at the vision tower's size
        from fluxkiln.plugins.caption.modelref import image_processor_class

        side = int(model.config.vision_config.image_size)
        processor = image_processor_class("clip", "CLIPImageProcessor")(
            size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    else:
        processor = AutoImageProcessor.from_pretrained(proc_dir)
    return Stage("checker", model, processor, device)


def _load_classifier(folder: Path, device: str) -> Stage:
    import torch
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    from fluxkiln.plugins.caption.modelref import read_config

    model_dir = _subfolder(folder, "nsfw_classifier")
    archs = read_config(model_dir).get("architectures") or []
    if not any(a.endswith("ForImageClassification") for a in archs):
        raise NodeError(f"{model_dir} is not an image classifier (architectures: {archs or 'none'})",
                        key="classifier", hint="use e.g. Falconsai/nsfw_image_detection, or classifier = \"none\"")
    model = AutoModelForImageClassification.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    labels = tuple(str(model.config.id2label[i]) for i in range(len(model.config.id2label)))
    nsfw = tuple(i for i, name in enumerate(labels) if name.strip().lower() in NSFW_LABELS)
    if not nsfw:
        raise NodeError(f"classifier {model_dir} has no NSFW-like label (labels: {', '.join(labels)})",
                        key="classifier", hint=f"its labels must include one of: {', '.join(NSFW_LABELS)}")
    return Stage("classifier", model, AutoImageProcessor.from_pretrained(model_dir), device, nsfw, labels)
