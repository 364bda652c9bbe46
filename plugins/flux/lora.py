"""The ``apply_lora`` node: attach LoRA files (any supported key format) to a FLUX Model
without reloading the base pipeline."""

from __future__ import annotations

import dataclasses
import hashlib
import re
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field

from fluxkiln.engine import InputFile, Lora, Model, NodeError, RunContext, node

from .load import get_pipeline
from .lora_keys import Converted, to_peft
from .pipestate import adapter_errors, can_merge, load_adapter

HUB_FILE = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*/.+\.safetensors$")
def _looks_like_hub_file(value: str) -> bool:
    """owner/repo/file.safetensors: a file in the local Hugging Face cache, resolved when the node runs."""
    return bool(HUB_FILE.match(value))


LoraSource = Annotated[Lora | str, InputFile(optional_prefixes=("hf:",), accept=_looks_like_hub_file),
                       Field(description="a `lora` link, a .safetensors file (relative to the recipe) or a hub file "
                             "owner/repo/file.safetensors (or hf:owner/repo/file.safetensors) from the local cache")]
Scale = Annotated[float, Field(ge=-1.0, le=3.0, description="strength of the LoRA (-1 to 3)")]


def _hub_file(spec: str, key: str) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    owner, repo, filename = spec.split("/", 2)
    try:
        return Path(hf_hub_download(f"{owner}/{repo}", filename, local_files_only=True))
    except LocalEntryNotFoundError as exc:
        raise NodeError(f"LoRA '{spec}' is not a local file and not in the local Hugging Face cache", key=key,
                        hint=f"download it once with `hf download {owner}/{repo} {filename}`, or fix the path") from exc
    except Exception as exc:  # noqa: BLE001 - hub client errors vary by version
        raise NodeError(f"LoRA '{spec}': cannot read it from the Hugging Face cache: {exc}", key=key) from exc


def lora_path(value: Lora | str, ctx: RunContext, key: str) -> Path:
    """The local .safetensors file a `lora` value names (link, path, or cached hub file)."""
    if isinstance(value, Lora):
        path = Path(value.path)
    else:
        spec = str(value).strip()
        base_dir = ctx.recipe.base_dir if getattr(ctx, "recipe", None) is not None else Path.cwd()
        if spec.startswith("hf:"):
            path = _hub_file(spec[3:], key)
        else:
            p = Path(spec).expanduser()
            path = p if p.is_absolute() else base_dir / p
            if not path.is_file():
                rel = _relative(p, base_dir)
                if rel and HUB_FILE.match(rel) and not path.parent.exists():
                    path = _hub_file(rel, key)
    if not path.is_file():
        raise NodeError(f"LoRA file not found: {path}", key=key,
                        hint="check the path (relative to the recipe file) or link a train_lora node")
    if path.suffix.lower() != ".safetensors":
        raise NodeError(f"LoRA {path.name}: only .safetensors files are loaded (pickle files can run code)", key=key,
                        hint="convert it to .safetensors")
    return path


def _relative(p: Path, base_dir: Path) -> str | None:
    if not p.is_absolute():
        return p.as_posix()
    try:
        return p.relative_to(base_dir).as_posix()
    except ValueError:
        return None


def adapter_name(path: Path) -> str:
    """A stable adapter name for a file's current content (path, size, mtime)."""
    st = path.stat()
    raw = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    return "lora_" + hashlib.sha1(raw.encode()).hexdigest()[:12]


def read_lora(path: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - safetensors raises several error types for bad files
        raise NodeError(f"cannot read LoRA {path}: {exc}", hint="is it a complete .safetensors file?") from exc


def _layers(pipe: Any) -> dict[str, Any]:
    table: dict[str, Any] = {}
    for comp in ("transformer", "text_encoder"):
        module = getattr(pipe, comp, None)
        if module is None:
            continue
        for name, m in module.named_modules():
            if hasattr(m, "in_features") and ".lora_" not in name and not name.endswith("base_layer"):
                table[f"{comp}.{name}"] = m
    return table


def _clip_layout(conv: Any, pipe: Any) -> None:
    """CLIP LoRAs name their layers ``text_encoder.text_model.encoder...``; transformers 5's CLIPTextModel has no
    ``text_model`` level (``text_encoder.encoder...``): rename them to the installed layout."""
    encoder = getattr(pipe, "text_encoder", None)
    if encoder is None or hasattr(encoder, "text_model"):
        return
    prefix = "text_encoder.text_model."
    conv.state_dict = {("text_encoder." + k[len(prefix):]) if k.startswith(prefix) else k: v
                       for k, v in conv.state_dict.items()}


def convert_checked(state_dict: dict[str, Any], pipe: Any, label: str, log: Any = None) -> Converted:
    """Convert to diffusers/PEFT keys and check them against the pipeline's layers (NodeError if unusable)."""
    conv = to_peft(state_dict)
    _clip_layout(conv, pipe)
    found = ", ".join(list(state_dict)[:3]) or "no tensors at all"
    if conv.unsupported:
        raise NodeError(f"LoRA {label} holds weights of a kind fluxkiln cannot load (LoKr/LoHa/DoRA/OFT), "
                        f"e.g. {conv.unsupported[0]}", hint="export it as a plain LoRA (lora_A/lora_B or lora_down/lora_up)")
    layers = _layers(pipe)
    modules = conv.modules()
    matched = [m for m in modules if m in layers]
    if not matched:
        raise NodeError(f"LoRA {label} matches no layer of this FLUX model; it looks like a LoRA for another "
                        f"architecture (keys found: {found})",
                        hint="use a FLUX.1 LoRA (diffusers, kohya/ComfyUI or ai-toolkit keys)")
    wrong = []
    for m in matched:
        a, b = conv.state_dict[m + ".lora_A.weight"], conv.state_dict[m + ".lora_B.weight"]
        layer = layers[m]
        if a.shape[1] != layer.in_features or b.shape[0] != layer.out_features:
            wrong.append(f"{m} (LoRA {b.shape[0]}x{a.shape[1]}, layer {layer.out_features}x{layer.in_features})")
    if wrong:
        raise NodeError(f"LoRA {label} was made for a model with other layer sizes: {'; '.join(wrong[:3])}",
                        hint="use a LoRA trained for this FLUX model")
    skipped = [m for m in modules if m not in layers] + conv.unknown
    if skipped and log:
        log(f"LoRA {label}: {len(skipped)} of its layers/keys were not loaded, e.g. {', '.join(skipped[:3])}",
            level="warning")
    conv.state_dict = {k: v for k, v in conv.state_dict.items() if k.rsplit(".lora_", 1)[0] in layers}
    return conv


def adapter_loader(pipe: Any, log: Any = None) -> Any:
    """``prepare``'s callback: read and convert one adapter's file."""
    def load(adapter: dict[str, Any]) -> dict[str, Any]:
        path = Path(adapter["path"])
        if not path.is_file() or adapter_name(path) != adapter["name"]:
            raise NodeError(f"LoRA file {path} changed or vanished since apply_lora ran",
                            hint="rerun the recipe so apply_lora reads it again")
        return convert_checked(read_lora(path), pipe, path.name, log).state_dict
    return load


def _adapter(value: Lora | str, scale: float, fuse: bool, ctx: RunContext, key: str, pipe: Any) -> dict[str, Any]:
    path = lora_path(value, ctx, key)
    name = adapter_name(path)
    conv = convert_checked(read_lora(path), pipe, path.name, ctx.log)
    load_adapter(pipe, name, conv.state_dict)
    label = str(value.path) if isinstance(value, Lora) else str(value)
    ctx.log(f"LoRA {path.name}: {len(conv.modules())} layers ({conv.source_format} keys), scale {scale}")
    return {"name": name, "path": str(path), "scale": float(scale), "fuse": fuse, "source": label,
            "format": conv.source_format}


@node("apply_lora", version="1", cache="memory", category="flux")
def apply_lora(
    ctx: RunContext,
    model: Annotated[Model, Field(description="the FLUX model to add LoRAs to (load_model or apply_lora)")],
    lora: LoraSource,
    lora_scale: Scale = 1.0,
    extra_lora: Annotated[Lora | str | None, InputFile(optional_prefixes=("hf:",), accept=_looks_like_hub_file),
                          Field(description="a second LoRA, same kinds as `lora`")] = None,
    extra_lora_scale: Scale = 1.0,
    fuse: Annotated[bool, Field(description="merge the LoRAs into the weights (faster sampling; "
                                "applies to all LoRAs on this model)")] = False,
) -> Model:
    """Attach one or two LoRAs to a FLUX model, without reloading the base.

    Reads diffusers/PEFT, kohya/ComfyUI (``lora_unet_*`` with alpha) and
    ai-toolkit key formats.  The result shares the resident pipeline of
    ``model``; ``sample`` activates exactly this model's LoRAs at their scales.
    Chain apply_lora nodes to stack more than two.
    """
    if model.kind != "flux":
        raise NodeError(f"apply_lora needs a FLUX model, got a '{model.kind}' model", key="model")
    pipe = get_pipeline(model)
    adapters = list(model.adapters)
    with adapter_errors(model, "loading the LoRA"):
        adapters.append(_adapter(lora, lora_scale, fuse, ctx, "lora", pipe))
        if extra_lora is not None:
            adapters.append(_adapter(extra_lora, extra_lora_scale, fuse, ctx, "extra_lora", pipe))
    if fuse:
        adapters = [{**a, "fuse": True} for a in adapters]
        if not can_merge(pipe):
            ctx.log("fuse = true ignored: LoRAs cannot be merged into fp8 or sequentially offloaded weights",
                    level="warning")
    return dataclasses.replace(model, adapters=adapters, info=dict(model.info))
