"""Publish a trained LoRA to the Hugging Face Hub: the LoRA file(s), a model card and its images only.

:func:`plan_upload` decides exactly which files go up (nothing else: no
dataset, captions, checkpoints or run files); :data:`UPLOADER` sends a plan.
Tests replace ``UPLOADER`` to check the plan without a network.  Repositories
are created private unless ``hf_private = false``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import TrainConfig

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
LICENSES = {
    "black-forest-labs/FLUX.1-dev": ("other", "flux-1-dev-non-commercial-license",
                                     "https://huggingface.co/black-forest-labs/FLUX.1-dev/blob/main/LICENSE.md"),
    "black-forest-labs/FLUX.1-schnell": ("apache-2.0", None, None),
}


@dataclass
class UploadPlan:
    """One commit to one repository: path in the repo -> local file."""

    repo_id: str
    private: bool
    files: dict[str, Path] = field(default_factory=dict)
    commit_message: str = "Upload LoRA trained with fluxkiln"


def _q(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)  # a JSON string is a valid YAML scalar


def model_card(repo_id: str, cfg: TrainConfig, base_model: str, meta: dict[str, str], images: list[tuple[str, str]],
               recipe_text: str, has_comfy: bool) -> str:
    """The README.md: YAML header (base model, trigger word, widget) and usage, parameters and recipe."""
    head = ["---", "library_name: diffusers", "pipeline_tag: text-to-image",
            "tags: [text-to-image, flux, lora, diffusers, fluxkiln]"]
    if HUB_ID.match(base_model):
        head.append(f"base_model: {_q(base_model)}")
    lic = LICENSES.get(base_model)
    if lic:
        head.append(f"license: {lic[0]}")
        if lic[1]:
            head += [f"license_name: {lic[1]}", f"license_link: {lic[2]}"]
    if cfg.trigger_word:
        head.append(f"instance_prompt: {_q(cfg.trigger_word)}")
    if images:
        head.append("widget:")
        for prompt, rel in images:
            head += [f"  - text: {_q(prompt)}", "    output:", f"      url: {_q(rel)}"]
    head.append("---")
    name = repo_id.split("/")[-1]
    body = [f"# {name}", "", f"A FLUX.1 LoRA for `{base_model}`, trained with fluxkiln.", ""]
    if cfg.trigger_word:
        body += [f"Trigger word: **`{cfg.trigger_word}`** — put it in your prompt.", ""]
    if images:
        body += ["## Samples", ""] + [f"![{p}]({rel})" for p, rel in images] + [""]
    example = f"a photo of {cfg.trigger_word}" if cfg.trigger_word else "a photo"
    body += ["## Use it with diffusers", "", "```python", "import torch", "from diffusers import FluxPipeline", "",
             f"pipe = FluxPipeline.from_pretrained({_q(base_model)}, torch_dtype=torch.bfloat16).to(\"cuda\")",
             f"pipe.load_lora_weights({_q(repo_id)}, weight_name=\"lora.safetensors\")",
             f"image = pipe({_q(example)}, num_inference_steps=28, guidance_scale=3.5).images[0]", "```", ""]
    if has_comfy:
        body += ["## Use it in ComfyUI", "",
                 "Put `lora_comfyui.safetensors` in `ComfyUI/models/loras/` and add a *LoraLoaderModelOnly* node "
                 "between the FLUX model loader and the sampler.", ""]
    body += ["## Training", "", "| parameter | value |", "|---|---|"]
    body += [f"| {k} | `{v}` |" for k, v in sorted(cfg.public().items())]
    body += [f"| steps trained | `{meta.get('fluxkiln.steps', '')}` |",
             f"| dataset fingerprint | `{meta.get('fluxkiln.dataset_fingerprint', '')}` |", "",
             "## Recipe", "", "```toml", recipe_text.rstrip(), "```", ""]
    return "\n".join(head + [""] + body)


def plan_upload(repo_id: str, private: bool, lora: Path, extra: dict[str, Path], card: Path,
                images: list[tuple[str, Path]]) -> UploadPlan:
    """Exactly what goes up: the LoRA, its ComfyUI copy if made, README.md and the card's images."""
    files = {"lora.safetensors": lora, "README.md": card}
    if "comfyui" in extra:
        files["lora_comfyui.safetensors"] = extra["comfyui"]
    for rel, path in images:
        files[rel] = path
    return UploadPlan(repo_id, private, files)


def hub_upload(plan: UploadPlan, token: str) -> str:
    """Create the repository (private unless asked) and commit the plan's files in one commit."""
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi(token=token)
    repo = api.create_repo(plan.repo_id, private=plan.private, exist_ok=True, repo_type="model")
    ops = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path)) for name, path in plan.files.items()]
    api.create_commit(plan.repo_id, operations=ops, commit_message=plan.commit_message, repo_type="model")
    return str(getattr(repo, "url", None) or f"https://huggingface.co/{plan.repo_id}")


UPLOADER: Callable[[UploadPlan, str], Any] = hub_upload
