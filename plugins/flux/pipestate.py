"""Put a shared, resident FLUX pipeline into the state one ``sample`` call needs.

Several Model values (the plain base, the same base with LoRAs) share one
resident pipeline, so before generating, ``sample`` makes sure exactly its
model's adapters are loaded (each file once per pipeline), active at its
scales, fused or not, and that the speed settings match — changing only what
differs.  Every change is undone exactly: fused LoRAs are taken out again by
restoring a copy of the weights kept in CPU memory (not by subtracting, which
would leave rounding errors in the base weights), fused QKV, fp8 layers and
compiled blocks are swapped back; so a node sees the same model in any order.
An unexpected PEFT error while changing adapters unloads the pipeline (the next
run loads it afresh) and says so, rather than leaving a half-changed model.

On a CUDA GPU ``sample`` asks for the lossless defaults (each repeated
transformer block and the VAE decoder compiled, fused QKV projections, whole
transformer calls replayed as CUDA graphs, see graphed.py, with every step's
modulation computed as a call starts, see modulation.py) and
``go_fast`` adds fp8 matmuls (see fast.py) and, where cuDNN offers it, fp8 attention
(fp8_attention.py); on CPU ``go_fast`` fuses the QKV
projections only.  Training asks for none of it (exact bf16 weights; ``train_lora``
compiles the blocks itself, with its adapter in them).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from fluxkiln.engine import NodeError

from . import fast as fastpaths
from . import graphed, modulation, precompiled, prompt_cache

MAX_LOADED = 8  # adapters kept loaded per pipeline before unused ones are deleted


@dataclass
class PipeState:
    """What fluxkiln has done to one pipeline object."""

    loaded: list[str] = field(default_factory=list)  # adapter names, oldest first
    fused: tuple | None = None  # (name, scale) pairs merged into the weights
    qkv_fused: bool = False
    vae_compiled: bool = False
    compiled: bool = False
    fp8: bool = False
    fp8_attention: bool = False
    modulation: bool = False
    current: tuple | None = None
    originals: list[tuple[Any, Any]] | None = None  # (base layer, its weight before fusing) on the CPU


_STATES: weakref.WeakKeyDictionary[Any, PipeState] = weakref.WeakKeyDictionary()


def _from_peft(exc: BaseException) -> bool:
    tb = exc.__traceback__
    while tb is not None:
        name = tb.tb_frame.f_code.co_filename.replace("\\", "/")
        if "/peft/" in name or "/diffusers/loaders/" in name:
            return True
        tb = tb.tb_next
    return type(exc).__module__.startswith("peft")


@contextlib.contextmanager
def adapter_errors(model: Any, what: str) -> Iterator[None]:
    """Turn a PEFT/diffusers adapter error into a NodeError with a hint, and unload the pipeline it may have
    left half-changed (``model.residency`` loads it afresh on the next run)."""
    try:
        yield
    except NodeError:
        raise
    except Exception as exc:
        if not _from_peft(exc) or "out of memory" in str(exc).lower():  # OOM keeps its own message and hint
            raise
        residency, key = getattr(model, "residency", None), getattr(model, "key", None)
        if residency is not None and key is not None:
            residency.evict(key)
        raise NodeError(f"{what} failed in the LoRA library: {type(exc).__name__}: {exc}",
                        hint="the model was unloaded so that nothing half-changed is reused: run again and it is "
                             "loaded afresh; if this keeps happening, report it with the recipe") from exc


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
    _swaps_off(pipe, st)
    if st.qkv_fused:
        pipe.transformer.unfuse_qkv_projections()
        st.qkv_fused = False
    if st.fused is not None:
        prompt_cache.weights_edited()  # unfusing without an exact copy leaves rounding errors torch cannot see
        pipe.unfuse_lora(components=_components(pipe))
        _restore_originals(st)
        st.fused = None
    st.current = None


def _lora_layers(pipe: Any, names: list[str]) -> list[Any]:
    """The base layers that the adapters ``names`` touch (PEFT LoRA layers in the loadable components)."""
    from peft.tuners.lora import LoraLayer

    found = []
    for comp in _components(pipe):
        for module in getattr(pipe, comp).modules():
            if isinstance(module, LoraLayer) and any(n in module.lora_A for n in names):
                found.append(module.get_base_layer())
    return found


def _free_ram() -> int:
    import psutil  # an accelerate dependency

    return int(psutil.virtual_memory().available)


def _keep_originals(pipe: Any, st: PipeState, names: list[str], log: Callable[..., None] | None) -> None:
    """Copy the weights a fuse will change to CPU memory, so unfusing restores them bit for bit."""
    layers = _lora_layers(pipe, names)
    nbytes = sum(m.weight.numel() * m.weight.element_size() for m in layers)
    if nbytes > _free_ram() // 2:
        st.originals = None
        if log:
            log(f"fuse: not enough free memory for an exact copy of the {nbytes / 2**30:.1f} GiB of weights the "
                "LoRAs change; unfusing later subtracts them again (equal to within rounding)", level="warning")
        return
    st.originals = [(m, m.weight.detach().to("cpu", copy=True)) for m in layers]


def _restore_originals(st: PipeState) -> None:
    import torch

    with torch.no_grad():
        for module, weight in st.originals or []:
            module.weight.copy_(weight)
    st.originals = None


def _prune(pipe: Any, st: PipeState, keep: set[str]) -> None:
    spare = [n for n in st.loaded if n not in keep]
    drop = spare[: max(0, len(st.loaded) - MAX_LOADED)]
    if drop:
        pipe.delete_adapters(drop)
        st.loaded = [n for n in st.loaded if n not in drop]


def can_merge(pipe: Any) -> bool:
    """LoRAs can be merged into real weights only: not into fp8 storage or sequentially offloaded ones."""
    return not getattr(pipe, "_fluxkiln_fp8", None) and getattr(pipe, "_fluxkiln_offload", "none") != "sequential"


@dataclass(frozen=True)
class Plan:
    """The speed settings one ``sample`` call gets."""

    qkv: bool
    vae_compile: bool
    compile: bool
    fp8: bool
    fp8_skipped: str = ""
    fp8_attention: bool = False
    fp8_attention_skipped: str = ""
    fp8_attention_min_tokens: int = 0  # part of the plan: a new threshold swaps the processors again
    modulation: bool = False  # every step's modulation computed as a call starts (modulation.py)


def plan(pipe: Any, scales: dict[str, float], fuse: bool, go_fast: bool, device: str, fast: bool) -> Plan:
    """What to switch on: GPU lossless defaults when ``fast``, plus fp8 with ``go_fast``; CPU as before."""
    gpu = fast and device == "cuda"
    merged = not scales or fuse  # no unfused adapter layers in the way
    offload = getattr(pipe, "_fluxkiln_offload", "none")
    qkv = (go_fast or gpu) and merged and _can_fuse_qkv(pipe)
    compile_ = gpu and offload == "none" and not getattr(pipe, "_fluxkiln_fp8", None) and not fastpaths.compile_disabled()
    fp8, why = False, ""
    if gpu and go_fast:
        ok, why = fastpaths.fp8_supported()
        if ok and not merged:
            why = "LoRA adapters are active unfused (set fuse = true on apply_lora to merge them)"
        elif ok and not can_merge(pipe):
            why = "the weights are already stored in fp8 or offloaded layer by layer"
        elif ok and offload != "none":
            why = f'offload = "{offload}" (fp8 layers stay on the GPU)'
        fp8 = ok and not why
    vae_compile = gpu and offload == "none" and not fastpaths.vae_compile_disabled()
    attention, attention_why = fastpaths.fp8_attention_supported(pipe.transformer) if fp8 else (False, "")
    least = 0
    if attention:
        from .fp8_attention import min_tokens

        least = min_tokens()
    # its rows are filled by graphed.py's whole-step calls, installed where the blocks record no graphs themselves
    tabled = compile_ and fastpaths.compile_mode() not in fastpaths.GRAPH_MODES and not modulation.disabled()
    return Plan(qkv, vae_compile, compile_, fp8, "" if fp8 or not (gpu and go_fast) else why, attention,
                attention_why, least, tabled)


def prepare(pipe: Any, adapters: list[dict[str, Any]], go_fast: bool, device: str,
            loader: Any, *, fast: bool = False, log: Callable[..., None] | None = None) -> Plan:
    """Bring ``pipe`` to the adapters/fusion/speed state asked for; returns the speed settings.

    ``loader(adapter) -> state dict`` reads and converts an adapter's file when
    it is not loaded on this pipeline yet (e.g. after the base was evicted and
    reloaded).  ``fast`` (what ``sample`` passes) enables the GPU defaults;
    without it the transformer runs eagerly with its exact weights (training).
    """
    st = state_of(pipe)
    scales = wanted_scales(adapters)
    fuse = bool(scales) and any(a.get("fuse") for a in adapters) and can_merge(pipe)
    signature = tuple(sorted(scales.items()))
    want = plan(pipe, scales, fuse, go_fast, device, fast)
    desired = (signature, fuse, want)
    if st.current == desired:
        return want
    graphed.reset(pipe.transformer)  # recorded graphs hold the layers and scales they were recorded with
    _swaps_off(pipe, st)  # before any change to the linear layers (adapters, fusions)
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
            _keep_originals(pipe, st, list(scales), log)
            prompt_cache.weights_edited()  # merged in place (`.data +=`), unseen by version counters
            pipe.fuse_lora(components=_components(pipe), lora_scale=1.0, adapter_names=list(scales))
            st.fused = signature
    elif not scales and st.loaded:
        pipe.disable_lora()
    if want.qkv and not st.qkv_fused:
        pipe.transformer.fuse_qkv_projections()
        st.qkv_fused = True
    if st.vae_compiled != want.vae_compile:
        fastpaths.set_vae_compiled(pipe.vae, want.vae_compile)
        st.vae_compiled = want.vae_compile
    if want.fp8:
        n = fastpaths.fp8_apply(pipe.transformer)
        st.fp8 = True
        if log:
            log(f"go_fast: {n} transformer linear layers in fp8 (row-wise scaled weights and activations)")
        st.fp8_attention = _fp8_attention(pipe, want, log)
    elif want.fp8_skipped and log:
        log(f"go_fast: fp8 skipped: {want.fp8_skipped}; using the lossless fast path", level="warning")
    _compile_state(pipe, st, want.compile, log)
    if want.modulation and graphed.stats(pipe.transformer) is not None:
        n = modulation.install(pipe.transformer)
        st.modulation = n > 0
        if log and n:
            log(f"modulation: {n} AdaLayerNorm linears computed for every step at once as a call starts")
    st.current = desired
    return want


def _fp8_attention(pipe: Any, want: Plan, log: Callable[..., None] | None) -> bool:
    """Switch the blocks' attention to fp8 where the plan says so; whether it did."""
    if want.fp8_attention:
        from . import fp8_attention

        n = fp8_attention.apply(pipe.transformer, want.fp8_attention_min_tokens)
        if log:
            log(f"go_fast: attention in fp8 in {n} blocks (cuDNN; per-tensor scaled queries, keys and values)")
    elif log:
        log(f"go_fast: attention stays in bf16: {want.fp8_attention_skipped}")
    return want.fp8_attention


def _swaps_off(pipe: Any, st: PipeState) -> None:
    """Put back every layer and processor the fast paths swapped in (precomputed modulation, fp8)."""
    modulation.remove(pipe.transformer)
    st.modulation = False
    if st.fp8 or fastpaths.has_fp8(pipe.transformer):
        fastpaths.fp8_restore(pipe.transformer)
    if getattr(pipe.transformer, "_fluxkiln_fp8_attention", None) is not None:
        from . import fp8_attention

        fp8_attention.restore(pipe.transformer)
    st.fp8 = st.fp8_attention = False


def _compile_state(pipe: Any, st: PipeState, on: bool, log: Callable[..., None] | None) -> None:
    if on and not fastpaths.is_compiled(pipe.transformer):
        fastpaths.compile_blocks(pipe.transformer)
        if log:
            ready = precompiled.stats()
            loaded = (f"; {ready['loaded']} precompiled variant(s) (transformer blocks, VAE decoder) saved "
                      f"by earlier runs loaded in {ready['load_s']} s") if ready["loaded"] else ""
            log("transformer blocks compiled (torch.compile, cached on disk; the first image of a size pays "
                "the compilation)" + loaded)
    elif not on and fastpaths.is_compiled(pipe.transformer):
        fastpaths.uncompile_blocks(pipe.transformer)
    if on and fastpaths.compile_mode() not in fastpaths.GRAPH_MODES:
        graphed.install(pipe.transformer)  # whole steps as CUDA graphs, where the blocks record none themselves
    else:
        graphed.remove(pipe.transformer)
    st.compiled = on


def _can_fuse_qkv(pipe: Any) -> bool:
    """Fused QKV needs real weights in a compute dtype: not fp8 storage, not sequential offload (meta weights)."""
    return can_merge(pipe)
