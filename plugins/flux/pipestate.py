"""Put a shared, resident FLUX pipeline into the state one ``sample`` call needs.

Several Model values (the plain base, the same base with LoRAs) share one
resident pipeline, so before generating, ``sample`` makes sure exactly its
model's adapters are loaded (each file once per pipeline), active at its
scales, fused or not, and that the lossless ``go_fast`` settings (fused QKV
projections, channels-last VAE on GPU) match — changing only what differs.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

MAX_LOADED = 8  # adapters kept loaded per pipeline before unused ones are deleted


@dataclass
class PipeState:
    """What fluxkiln has done to one pipeline object."""

    loaded: list[str] = field(default_factory=list)  # adapter names, oldest first
    fused: tuple | None = None  # (name, scale) pairs merged into the weights
    qkv_fused: bool = False
    channels_last: bool = False
    current: tuple | None = None


_STATES: weakref.WeakKeyDictionary[Any, PipeState] = weakref.WeakKeyDictionary()


def state_of(pipe: Any) -> PipeState:
    st = _STATES.get(pipe)
    if st is None:
        st = _STATES[pipe] = PipeState()
    return st


def wanted_scales(adapters: list[dict[str, Any]]) -> dict[str, float]:
    """Adapter name -> total scale (the same file given twice adds up)."""
    out: dict[str, float] = {}
    for a in adapters:
        out[a["name"]] = out.get(a["name"], 0.0) + float(a["scale"])
    return out


def _components(pipe: Any) -> list[str]:
    return [c for c, names in pipe.get_list_adapters().items() if names]


def load_adapter(pipe: Any, name: str, state_dict: dict[str, Any]) -> None:
    """Load a converted (diffusers/PEFT) LoRA state dict under ``name`` unless it is loaded already."""
    st = state_of(pipe)
    if name in st.loaded:
        return
    _unfuse_all(pipe, st)
    from .load import quiet_loading

    with quiet_loading():  # "no LoRA keys for CLIPTextModel" is expected for transformer-only LoRAs
        pipe.load_lora_weights(state_dict, adapter_name=name)
    if getattr(pipe, "_fluxkiln_fp8", None):
        _lora_in_compute_dtype(pipe, name, state_dict)
    st.loaded.append(name)
    st.current = None


def _lora_in_compute_dtype(pipe: Any, name: str, state_dict: dict[str, Any]) -> None:
    """With fp8 weight storage, peft creates the LoRA layers in fp8 too (unusable for matmuls and lossy):
    put this adapter's weights back, from the file's values, in the compute dtype."""
    import torch

    dtype = getattr(pipe, "_fluxkiln_dtype", torch.bfloat16)
    params = dict(pipe.transformer.named_parameters())
    for key, value in state_dict.items():
        module, _, rest = key.removeprefix("transformer.").rpartition(".lora_")
        param = params.get(f"{module}.lora_{rest.split('.')[0]}.{name}.weight")
        if key.startswith("transformer.") and param is not None:
            param.data = value.to(device=param.device, dtype=dtype)


def _unfuse_all(pipe: Any, st: PipeState) -> None:
    if st.qkv_fused:
        pipe.transformer.unfuse_qkv_projections()
        st.qkv_fused = False
    if st.fused is not None:
        pipe.unfuse_lora(components=_components(pipe))
        st.fused = None
    st.current = None


def _prune(pipe: Any, st: PipeState, keep: set[str]) -> None:
    spare = [n for n in st.loaded if n not in keep]
    drop = spare[: max(0, len(st.loaded) - MAX_LOADED)]
    if drop:
        pipe.delete_adapters(drop)
        st.loaded = [n for n in st.loaded if n not in drop]


def can_merge(pipe: Any) -> bool:
    """LoRAs can be merged into real weights only: not into fp8 storage or sequentially offloaded ones."""
    return not getattr(pipe, "_fluxkiln_fp8", None) and getattr(pipe, "_fluxkiln_offload", "none") != "sequential"


def prepare(pipe: Any, adapters: list[dict[str, Any]], go_fast: bool, device: str,
            loader: Any) -> None:
    """Bring ``pipe`` to the adapters/fusion/go_fast state asked for.

    ``loader(adapter) -> state dict`` reads and converts an adapter's file when
    it is not loaded on this pipeline yet (e.g. after the base was evicted and
    reloaded).
    """
    st = state_of(pipe)
    scales = wanted_scales(adapters)
    fuse = bool(scales) and any(a.get("fuse") for a in adapters) and can_merge(pipe)
    signature = tuple(sorted(scales.items()))
    desired = (signature, fuse, go_fast)
    if st.current == desired:
        return
    if st.qkv_fused or (st.fused is not None and (not fuse or st.fused != signature)):
        _unfuse_all(pipe, st)
    for a in adapters:
        if a["name"] not in st.loaded:
            load_adapter(pipe, a["name"], loader(a))
    _prune(pipe, st, set(scales))
    if scales and st.fused is None:
        pipe.enable_lora()
        pipe.set_adapters(list(scales), adapter_weights=list(scales.values()))
        if fuse:
            pipe.fuse_lora(components=_components(pipe), lora_scale=1.0, adapter_names=list(scales))
            st.fused = signature
    elif not scales and st.loaded:
        pipe.disable_lora()
    if go_fast and (not scales or fuse) and not st.qkv_fused and _can_fuse_qkv(pipe):
        pipe.transformer.fuse_qkv_projections()
        st.qkv_fused = True
    _vae_layout(pipe, st, go_fast and device == "cuda")
    st.current = desired


def _can_fuse_qkv(pipe: Any) -> bool:
    """Fused QKV needs real weights in a compute dtype: not fp8 storage, not sequential offload (meta weights)."""
    return can_merge(pipe)


def _vae_layout(pipe: Any, st: PipeState, channels_last: bool) -> None:
    if st.channels_last == channels_last:
        return
    import torch

    fmt = torch.channels_last if channels_last else torch.contiguous_format
    pipe.vae.to(memory_format=fmt)
    st.channels_last = channels_last
