"""Build the tiny built-in safety models, whose verdicts a test can steer by an image's colour.

``builtin:tiny-safety`` is one folder with both stages: ``safety_checker/`` (a
diffusers ``StableDiffusionSafetyChecker``, i.e. a CLIP vision tower with
concept embeddings) plus ``feature_extractor/``, and ``nsfw_classifier/`` (a
transformers ``ViTForImageClassification`` with labels ``normal`` / ``nsfw``).
``builtin:tiny-safety-checker`` and ``builtin:tiny-nsfw-classifier`` name the two
stages alone.  Both are real model classes with tiny sizes whose weights are
*designed*, not random, so that the verdicts are exact and documented
(pixel values below are 0-255, averaged over the centre of the image):

* **stage 1, checker** flags an image when its *redness* R - (G+B)/2 is above
  about 159 (the colour (255, 96, 96)): red ``#ff0000`` and rose ``#ff0080``
  are flagged; yellow ``#ffff00``, magenta ``#ff00ff``, grey, blue and noise pass.
* **stage 2, classifier** says ``nsfw`` when R - B is above about 191 (the
  colour (255, 0, 64)): red and yellow are ``nsfw``; rose, magenta, grey, blue
  and noise are ``normal``.

So with both stages on, red is unsafe, rose is flagged by the checker but
cleared by the classifier, and yellow never reaches the classifier.

How: the vision transformer's patch embedding measures the colour feature,
its single attention layer has zero queries and keys (uniform attention), so
the class token receives the mean feature over all patches, and the final
layers turn that mean into a monotonic score; a calibration image of the
threshold colour sets the concept threshold (checker) or logit bias
(classifier) so that exactly the colours past it are flagged.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

VERSION = "v1"  # bump when the design changes, so stale builds are not reused
HIDDEN, SIZE, PATCH = 8, 32, 16
CHECKER_EDGE = (255, 96, 96)  # redness R-(G+B)/2 = 159
CLASSIFIER_EDGE = (255, 0, 64)  # R-B = 191
CLASSIFIER_GAIN = 400.0
HALF = dict(image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])


def _design_encoder(root: Any, rgb_weights: tuple[float, float, float]) -> None:
    """Weights that put the patch-mean of a colour feature into the class token's slot 4."""
    import torch
    from torch import nn

    with torch.no_grad():
        for p in root.parameters():
            p.zero_()
        for m in root.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.fill_(1.0)
        conv = next(m for m in root.modules() if isinstance(m, nn.Conv2d))
        for c, w in enumerate(rgb_weights):
            conv.weight[0, c] = w / (PATCH * PATCH)
            conv.weight[1, c] = -w / (PATCH * PATCH)
        for name, p in root.named_parameters():
            if "position" in name:  # constant slots 2/3 keep every token's LayerNorm well-defined
                p.view(-1, HIDDEN)[:, 2] = 1.0
                p.view(-1, HIDDEN)[:, 3] = -1.0
        for name, m in root.named_modules():
            if isinstance(m, nn.Linear) and name.endswith(("v_proj", "attention.value", ".value")):
                m.weight[4, 0] = 1.0
            elif isinstance(m, nn.Linear) and name.endswith(("out_proj", "o_proj", "attention.output.dense")):
                m.weight[4, 4] = 1.0


def _solid(rgb: tuple[int, int, int]) -> Any:
    from PIL import Image

    return Image.new("RGB", (SIZE, SIZE), rgb)


def _vision(cfg_cls: Any) -> Any:
    return cfg_cls(hidden_size=HIDDEN, intermediate_size=16, num_hidden_layers=1, num_attention_heads=1,
                   image_size=SIZE, patch_size=PATCH)


def _save_checker(out: Path) -> None:
    import torch
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPVisionConfig

    from fluxkiln.plugins.caption.modelref import image_processor_class

    from .models import checker_scores

    vision = _vision(CLIPVisionConfig)
    config = CLIPConfig(vision_config=vision.to_dict(), projection_dim=2)
    model = StableDiffusionSafetyChecker(config).eval()
    _design_encoder(model.vision_model, (1.0, -0.5, -0.5))
    processor = image_processor_class("clip", "CLIPImageProcessor")(
        size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE}, **HALF)
    with torch.no_grad():
        model.visual_projection.weight.zero_()
        model.visual_projection.weight[0, 4] = 1.0
        model.visual_projection.weight[1, 2] = 1.0
        model.concept_embeds.copy_(torch.tensor([1.0, 0.0]).expand(17, 2))
        model.special_care_embeds.copy_(torch.tensor([1.0, 0.0]).expand(3, 2))
        model.special_care_embeds_weights.fill_(2.0)  # out of reach: no special-care concept
        model.concept_embeds_weights.zero_()
        edge = checker_scores(model, processor, [_solid(CHECKER_EDGE)], 0.0)[0]["score"]
        model.concept_embeds_weights.fill_(edge)
    model.save_pretrained(out / "safety_checker")
    processor.save_pretrained(out / "safety_checker")  # like the CompVis repo
    processor.save_pretrained(out / "feature_extractor")  # like a diffusers pipeline folder


def _save_classifier(out: Path) -> None:
    import torch
    from transformers import ViTConfig, ViTForImageClassification

    from fluxkiln.plugins.caption.modelref import image_processor_class

    config = _vision(ViTConfig)
    config.id2label, config.label2id = {0: "normal", 1: "nsfw"}, {"normal": 0, "nsfw": 1}
    model = ViTForImageClassification(config).eval()
    _design_encoder(model.vit, (1.0, 0.0, -1.0))
    processor = image_processor_class("vit", "ViTImageProcessor")(size={"height": SIZE, "width": SIZE}, **HALF)
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.zero_()
        model.classifier.weight[1, 4] = 1.0
        edge = model(**processor(images=[_solid(CLASSIFIER_EDGE)], return_tensors="pt")).logits[0, 1].item()
        model.classifier.weight[1, 4] = CLASSIFIER_GAIN
        model.classifier.bias[1] = -CLASSIFIER_GAIN * edge
    model.save_pretrained(out / "nsfw_classifier")
    processor.save_pretrained(out / "nsfw_classifier")


def _save_both(out: Path) -> None:
    _save_checker(out)
    _save_classifier(out)


BUILDERS: dict[str, Callable[[Path], None]] = {"tiny-safety": _save_both}
BUILTIN_REFS = {
    "builtin:tiny-safety": ("tiny-safety", ""),
    "builtin:tiny-safety-checker": ("tiny-safety", "safety_checker"),
    "builtin:tiny-nsfw-classifier": ("tiny-safety", "nsfw_classifier"),
}


def tiny_safety_path(ref: str) -> Path:
    """The folder for built-in safety reference ``ref``, built on first use."""
    if ref not in BUILTIN_REFS:
        raise ValueError(f"unknown tiny safety model {ref!r}; known: {', '.join(BUILTIN_REFS)}")
    import torch

    from fluxkiln.engine.paths import build_once
    from fluxkiln.plugins.caption.modelref import quiet_transformers

    name, sub = BUILTIN_REFS[ref]

    def build(folder: Path) -> None:
        with torch.random.fork_rng(devices=[]), quiet_transformers():
            torch.manual_seed(0)
            BUILDERS[name](folder)

    final = build_once(f"{name}-{VERSION}", "nsfw_classifier/config.json", build)
    return final / sub if sub else final
