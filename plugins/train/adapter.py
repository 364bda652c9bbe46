"""Put a trainable LoRA adapter on the shared FLUX transformer, and take it off again afterwards.

The base model stays frozen (``requires_grad_(False)`` before the adapter is
added); only the adapter's ``lora_A`` / ``lora_B`` weights train, in float32.
By default every linear layer of the double and single transformer blocks is
targeted (what ai-toolkit and Replicate's trainer do); ``layers_to_optimize_regex``
narrows that.  The pipeline is shared with other nodes (it stays hot in
memory), so any LoRAs ``sample`` left active or fused are switched off first,
and the training adapter is deleted when training ends.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from typing import Any

from fluxkiln.engine import NodeError

ADAPTER = "fluxkiln_train"
BLOCKS = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.\d+\.")


def candidate_layers(transformer: Any) -> list[str]:
    """Names of the linear layers a FLUX LoRA trains (within the transformer blocks).

    A layer that already carries LoRA adapters (``apply_lora`` ran on this resident pipeline) is a PEFT
    wrapper around the linear ``base_layer``: it counts under its own name, so the list is the same
    whatever adapters are loaded.
    """
    import torch

    names = []
    for name, m in transformer.named_modules():
        if not isinstance(m, torch.nn.Linear) or not BLOCKS.match(name) or ".lora_" in name:
            continue
        if ".base_layer" in name and not name.endswith(".base_layer"):
            continue  # inside an fp8 or other wrapper of a wrapped layer
        names.append(name.removesuffix(".base_layer"))
    return names


def select_layers(transformer: Any, regex: str | None) -> list[str]:
    """The layers to train; NodeError if ``regex`` is invalid or matches none of them."""
    layers = candidate_layers(transformer)
    if not regex:
        return layers
    try:
        pattern = re.compile(regex)
    except re.error as exc:
        raise NodeError(f"layers_to_optimize_regex {regex!r} is not a valid regular expression: {exc}",
                        key="layers_to_optimize_regex") from exc
    chosen = [n for n in layers if pattern.search(f"transformer.{n}")]
    if not chosen:
        examples = ", ".join(f"transformer.{n}" for n in layers[:: max(1, len(layers) // 6)][:6])
        raise NodeError(f"layers_to_optimize_regex {regex!r} matches none of the {len(layers)} trainable layers",
                        key="layers_to_optimize_regex",
                        hint=f"it is searched in names such as {examples}; e.g. "
                             "'single_transformer_blocks\\.(7|12)\\.proj_out'")
    return chosen


def guarded(model: Any, what: str) -> contextlib.AbstractContextManager[None]:
    """PEFT errors as a NodeError with a hint, the half-changed pipeline unloaded (see the flux plugin)."""
    try:
        from fluxkiln.plugins.flux.pipestate import adapter_errors
    except ImportError:
        return contextlib.nullcontext()
    return adapter_errors(model, what)


def reset_pipeline_state(pipe: Any, device: str) -> None:
    """Switch off LoRAs, fusions and fused QKV that ``sample`` may have left on the shared pipeline."""
    try:
        from fluxkiln.plugins.flux.pipestate import prepare
    except ImportError:
        return
    prepare(pipe, [], False, device, lambda _a: {})


def forget_pipeline_state(pipe: Any) -> None:
    """Tell the flux plugin the pipeline changed, so the next ``sample`` sets its LoRAs up again."""
    try:
        from fluxkiln.plugins.flux.pipestate import state_of
    except ImportError:
        return
    state_of(pipe).current = None


def attach(pipe: Any, layers: list[str], rank: int, alpha: float, seed: int) -> dict[str, Any]:
    """Add the training adapter; return its trainable parameters by name (requires_grad).

    They have the transformer's dtype (bfloat16 on a GPU: the LoRA branch runs as fast as the base);
    the loop keeps float32 master copies for the optimizer when that is not float32.
    """
    import torch
    from peft import LoraConfig

    transformer = pipe.transformer
    transformer.requires_grad_(False)
    if ADAPTER in (getattr(transformer, "peft_config", None) or {}):
        transformer.delete_adapters(ADAPTER)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=layers, lora_dropout=0.0,
                        init_lora_weights=True)
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*multiple adapters.*")  # LoRAs of apply_lora stay, inactive
        torch.manual_seed(seed)  # lora_A's random init is part of the run's identity
        transformer.add_adapter(config, adapter_name=ADAPTER)
        _reinit_over_fp8(transformer, transformer.dtype)
    transformer.enable_adapters()
    transformer.set_adapter(ADAPTER)
    named = {}
    for name, p in transformer.named_parameters():
        if f".{ADAPTER}." in name and (".lora_A." in name or ".lora_B." in name):
            p.data = p.data.to(transformer.dtype)
            p.requires_grad_(True)
            named[name] = p
        else:
            p.requires_grad_(False)
    return named


def _reinit_over_fp8(transformer: Any, dtype: Any) -> None:
    """Over fp8-stored base weights peft creates the adapter in fp8 (its init rounded away): recreate it in
    the compute dtype."""
    import torch
    from peft.tuners.lora import LoraLayer

    for module in transformer.modules():
        if not isinstance(module, LoraLayer) or ADAPTER not in module.lora_A:
            continue
        if module.get_base_layer().weight.dtype not in (torch.float8_e4m3fn, torch.float8_e5m2):
            continue
        module.lora_A[ADAPTER].to(dtype=dtype)
        module.lora_B[ADAPTER].to(dtype=dtype)
        module.reset_lora_parameters(ADAPTER, True)


def detach(pipe: Any, had_gc: bool) -> None:
    """Remove the training adapter and restore the transformer for inference."""
    transformer = pipe.transformer
    if ADAPTER in (getattr(transformer, "peft_config", None) or {}):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*was active which is now deleted.*")
            transformer.delete_adapters(ADAPTER)
        if not getattr(transformer, "peft_config", None):
            transformer.unload_lora()
        else:  # apply_lora's adapters stay loaded, switched off: the plain base, as before training
            pipe.disable_lora()
    if not had_gc and getattr(transformer, "gradient_checkpointing", False):
        transformer.disable_gradient_checkpointing()
    transformer.requires_grad_(False)
    transformer.eval()
    forget_pipeline_state(pipe)


def export_key(param_name: str) -> str:
    """``transformer_blocks.0.attn.to_q.lora_A.fluxkiln_train.weight`` -> diffusers/PEFT file key."""
    return "transformer." + param_name.replace(f".{ADAPTER}.", ".")
