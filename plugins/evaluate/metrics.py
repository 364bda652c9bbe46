"""The scores behind the ``evaluate`` node: mini-flux's pixel checker, and CLIP score with a CLIP model."""

from __future__ import annotations

from typing import Any

from fluxkiln.engine import NodeError


def mini_scores(image: Any, prompt: str, aliases: dict[str, str]) -> dict[str, float | None]:
    """Each attribute right (1) or wrong (0) or unsaid (None), as fractions over the prompt's objects; ``score``
    is the fraction of checked attributes that are right, ``all`` whether every one is."""
    from fluxkiln.plugins.miniflux.checker import check

    scores = check(image, prompt, aliases).scores
    said = [v for k, v in scores.items() if k not in ("all",) and v is not None]
    return {"score": round(sum(said) / len(said), 4) if said else 0.0, **scores}


def load_clip(folder: str) -> tuple[Any, Any]:
    """(CLIPModel, CLIPProcessor) from a local folder (a hub snapshot or a saved model)."""
    from transformers import CLIPModel, CLIPProcessor

    from fluxkiln.plugins.flux.load import quiet_loading

    try:
        with quiet_loading():
            model = CLIPModel.from_pretrained(folder, local_files_only=True).eval()
            processor = CLIPProcessor.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise NodeError(f"could not load a CLIP model from {folder}: {type(exc).__name__}: {exc}", key="clip_model",
                        hint="give a CLIP model folder (config.json, weights, tokenizer and preprocessor files) "
                             "or the hub id of one in the local cache") from exc
    return model, processor


def clip_scores(model: Any, processor: Any, images: list[Any], prompts: list[str], batch: int = 16) -> list[float]:
    """CLIP score of each image against its prompt: 100 x max(cosine similarity of the embeddings, 0)."""
    import torch

    device = next(model.parameters()).device
    out: list[float] = []
    for start in range(0, len(images), batch):
        pics = [im.convert("RGB") for im in images[start:start + batch]]
        texts = prompts[start:start + batch]
        inputs = processor(text=texts, images=pics, return_tensors="pt", padding=True, truncation=True,
                           max_length=processor.tokenizer.model_max_length)
        with torch.no_grad():
            img = model.get_image_features(pixel_values=inputs["pixel_values"].to(device))
            txt = model.get_text_features(input_ids=inputs["input_ids"].to(device),
                                          attention_mask=inputs["attention_mask"].to(device))
        img = _features(img)
        txt = _features(txt)
        cos = torch.nn.functional.cosine_similarity(img.float(), txt.float(), dim=-1)
        out += [round(100 * max(float(c), 0.0), 4) for c in cos]
    return out


def _features(value: Any) -> Any:
    """The embedding tensor (newer transformers may return an output object instead of a tensor)."""
    for name in ("pooler_output", "image_embeds", "text_embeds"):
        if not hasattr(value, "shape") and getattr(value, name, None) is not None:
            return getattr(value, name)
    return value
