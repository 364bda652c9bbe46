"""GPU fast paths for FLUX sampling: block-wise torch.compile with a disk cache, and fp8 linear layers.

* :func:`compile_blocks` compiles each repeated transformer block in place
  (``nn.Module.compile``); blocks of one class share the compiled code, so a
  shape costs two compilations (double and single block: :mod:`.joined` gives the
  first single block the others' input layout), and Inductor's FX graph cache
  under ``cache_root()/inductor`` makes later processes reuse them.
* Each block variant is compiled ahead of time and saved as it first runs (:mod:`.precompiled`); in a later
  process a block (or VAE decoder) call that matches one runs the saved function: no tracing.
* :func:`set_vae_compiled` compiles the VAE decoder the same way (2.4x faster decode), for the latent shapes
  where that pays (:mod:`.patience`).
* With fp8 layers, :func:`fp8_attention_supported` says whether the attention can be fp8 too
  (:mod:`.fp8_attention`, cuDNN's fused fp8 attention; lossy).
* :func:`fp8_apply` swaps the blocks' linear layers for :class:`Fp8Linear`
  (float8 e4m3 weights and activations with row-wise scales, multiplied by
  ``torch._scaled_mm``; lossy).  Each keeps its bf16 layer, so
  :func:`fp8_restore` puts the exact weights back.

Nothing here imports torch at module level (``fluxkiln validate`` stays fast).
"""

from __future__ import annotations

import os
from typing import Any

from . import joined

FP8_MAX = 448.0  # largest float8_e4m3fn value
BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks")
RECOMPILE_LIMIT = 64
GRAPH_MODES = ("reduce-overhead", "max-autotune")  # Inductor modes that record CUDA graphs of their own
STOCK_PROCESSORS = {"FluxAttnProcessor", "FluxAttnProcessor2_0"}  # diffusers' own, which fp8 attention replaces
UNFUSED = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")
_CLASS: list[Any] = []


def switched_off(name: str) -> bool:
    """Whether the environment variable ``name`` (on unless set) says 0, false, no or off."""
    return os.environ.get(name, "1").strip().lower() in ("0", "false", "no", "off")


def compile_disabled() -> bool:
    """``FLUXKILN_COMPILE=0`` turns block compilation off (debugging, or to measure eager sampling)."""
    return switched_off("FLUXKILN_COMPILE")


def vae_compile_disabled() -> bool:
    """``FLUXKILN_COMPILE_VAE=0`` keeps the VAE decoder eager: 20-24 s less compilation per new image size
    (cold cache, H100), 0.05 s more per image.  Unset, it compiles where that pays (:mod:`.patience`)."""
    return compile_disabled() or switched_off("FLUXKILN_COMPILE_VAE")


def setup_compile_cache() -> str:
    """Point Inductor's (and Triton's) caches at ``cache_root()/inductor`` unless the user chose a folder."""
    import torch

    from fluxkiln.engine.paths import cache_root

    folder = cache_root() / "inductor"
    folder.mkdir(parents=True, exist_ok=True)
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR") in (None, _torch_default_cache_dir()):
        # unset, or filled in with torch's default by an import (diffusers' does): not the user's choice
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
    os.environ.setdefault("TRITON_CACHE_DIR", str(folder / "triton"))
    inductor = getattr(torch, "_inductor", None)
    if inductor is not None and hasattr(inductor, "config"):
        inductor.config.fx_graph_cache = True
    dyn = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):  # renamed in torch 2.6; shapes x {bf16, fp8}
        if hasattr(dyn, name) and getattr(dyn, name) < RECOMPILE_LIMIT:
            setattr(dyn, name, RECOMPILE_LIMIT)
    return os.environ["TORCHINDUCTOR_CACHE_DIR"]


def _torch_default_cache_dir() -> str | None:
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    except ImportError:
        return None
    return os.path.abspath(default_cache_dir())


def compile_seconds() -> dict[str, float]:
    """Seconds torch.compile has spent in this process so far: in all (``entire_frame_compile``, and the variants
    compiled ahead of time) and in Inductor (code generation, or loading it from the cache), how many variants
    it saved precompiled (``saved``), and how many it waited for while another process compiled them (``waited``,
    ``waited_s``: :mod:`.ahead`'s helpers); empty where torch does not say."""
    try:
        from torch._dynamo.utils import calculate_time_spent

        spent = calculate_time_spent()
    except (ImportError, AttributeError, RuntimeError):
        return {}
    from . import precompiled

    ready = precompiled.stats()
    return {"compile": float(spent.get("entire_frame_compile", 0.0)) + precompiled.ahead_seconds(),
            "inductor": float(spent.get("inductor_compile", 0.0)), "saved": float(len(ready["saved"])),
            "waited": float(ready["waited"]), "waited_s": float(ready["waited_s"])}


def blocks(transformer: Any) -> list[Any]:
    """The repeated blocks (double-stream then single-stream) of a FLUX transformer."""
    out = []
    for name in BLOCK_LISTS:
        out.extend(getattr(transformer, name, None) or [])
    return out


REPLAYABLE_HOOKS = "_fluxkiln_replayable_hooks"  # a module's hook ids whose work a recorded CUDA graph may hold


def plain_inference(torch: Any, module: Any) -> bool:
    """Whether a call of ``module`` now is plain inference, which a precompiled function or a recorded CUDA graph
    can stand in for: gradients and autocast off, no forward hooks on it but those listed in its
    :data:`REPLAYABLE_HOOKS` (tensor work only, the same at every call of a signature: context parallelism's),
    and its class's own ``forward`` (diffusers' hooks, the step cache's among them, replace the instance's:
    a function compiled from the class's would skip them)."""
    replayable = getattr(module, REPLAYABLE_HOOKS, ())
    hooked = "forward" in vars(module) or any(
        h not in replayable for h in (*module._forward_hooks, *module._forward_pre_hooks))
    return not (torch.is_grad_enabled() or hooked or torch.is_autocast_enabled("cuda")
                or torch.is_autocast_enabled("cpu"))


def is_compiled(transformer: Any) -> bool:
    return any(getattr(b, "_compiled_call_impl", None) is not None for b in blocks(transformer))


def compile_mode() -> str | None:
    """``FLUXKILN_COMPILE_MODE``: Inductor's mode for the blocks (e.g. ``reduce-overhead`` for CUDA graphs,
    ``max-autotune-no-cudagraphs``); unset = Inductor's default."""
    return os.environ.get("FLUXKILN_COMPILE_MODE", "").strip() or None


def compile_blocks(transformer: Any, backend: str = "inductor", saved: bool = True) -> int:
    """Compile every block in place (static shapes, Inductor's default mode unless :func:`compile_mode` says
    otherwise), through precompiled variants (served, or compiled ahead and saved) unless ``saved`` is False
    (training: they serve inference only); returns how many were newly compiled."""
    if backend == "inductor":
        setup_compile_cache()
    mode = compile_mode() if backend == "inductor" else None
    todo = [b for b in blocks(transformer) if getattr(b, "_compiled_call_impl", None) is None]
    variants = _saved_variants(_device_type(transformer), backend, mode) if todo and saved else None
    for block in todo:
        block._compiled_call_impl = _compiled_call(block, backend, mode, variants)
    joined.install(list(getattr(transformer, "single_transformer_blocks", None) or []))
    if mode in GRAPH_MODES and getattr(transformer, "_fk_graph_steps", None) is None:
        transformer._fk_graph_steps = transformer.register_forward_pre_hook(_new_graph_step)
    return len(todo)


def _saved_variants(device: str, backend: str, mode: str | None) -> dict[str, Any] | None:
    """The precompiled variants to serve, and to add to as new ones compile (Inductor's default mode only); None
    where nothing is precompiled (another backend or mode, ``FLUXKILN_PRECOMPILE=0``, a torch that cannot)."""
    from . import precompiled

    if backend != "inductor" or mode is not None or precompiled.unavailable() is not None:
        return None
    return precompiled.table(device)


def _compiled_call(module: Any, backend: str, mode: str | None, variants: dict[str, Any] | None) -> Any:
    """What ``module.compile(...)`` would install, through :class:`.precompiled.Dispatch` (which serves saved
    variants and compiles new ones ahead of time) when ``variants`` is given (see :func:`_saved_variants`)."""
    import torch

    from . import precompiled

    regular = torch.compile(module._call_impl, backend=backend, dynamic=False, **({"mode": mode} if mode else {}))
    return regular if variants is None else precompiled.Dispatch(module, regular, variants, ahead=True)


def _device_type(transformer: Any) -> str:
    try:
        return next(transformer.parameters()).device.type
    except StopIteration:
        return "cpu"


def _new_graph_step(_module: Any, _args: Any) -> None:
    """Each transformer call (a denoising step) begins a new generation of CUDA graphs: the blocks' graphs
    replay in order within a step, and no output of the previous step is read again (the transformer's own
    output layers are eager), so its buffers may be reused."""
    import torch

    torch.compiler.cudagraph_mark_step_begin()


def uncompile_blocks(transformer: Any) -> int:
    """Run the blocks eagerly again (the compiled code stays cached for a later :func:`compile_blocks`)."""
    n = 0
    for block in blocks(transformer):
        if getattr(block, "_compiled_call_impl", None) is not None:
            block._compiled_call_impl = None
            n += 1
    if (handle := getattr(transformer, "_fk_graph_steps", None)) is not None:
        handle.remove()
        transformer._fk_graph_steps = None
    return n


def set_vae_compiled(vae: Any, on: bool) -> None:
    """Compile the VAE decoder in place (or run it eagerly again).

    Measured on an H100 at 1024² (``bench/vae_decode.py``): 0.090 s eager, 0.038 s compiled, and 0.142 s in
    channels-last memory format (which fluxkiln used before)."""
    from . import patience, variantkeys

    decoder = vae.decoder
    wait = patience.patience()
    if on and wait is not None and getattr(decoder, "_compiled_call_impl", None) is None:
        setup_compile_cache()
        device = _device_type(decoder)
        compiled = _compiled_call(decoder, "inductor", None, _saved_variants(device, "inductor", None))
        decoder._compiled_call_impl = compiled if wait == 0 else \
            patience.Patience(decoder, compiled, decoder._call_impl, wait, variantkeys.folder(device) / "compiled")
    elif not on:
        decoder._compiled_call_impl = None


def attention_first_cudnn() -> Any:
    """Prefer cuDNN's fused attention (fastest on Hopper for inference), then flash, then memory-efficient.

    Inference only: cuDNN attention failed in the backward pass on these GPUs (training restricts SDPA to
    flash and memory-efficient).  A no-op context where torch cannot set backend priorities.
    """
    import contextlib

    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                 SDPBackend.MATH]
        return sdpa_kernel(order, set_priority=True)
    except (ImportError, AttributeError, TypeError):
        return contextlib.nullcontext()


def fp8_supported() -> tuple[bool, str]:
    """Whether fp8 matmuls can run here, and why not."""
    import torch

    if not torch.cuda.is_available():
        return False, "no CUDA GPU"
    if not hasattr(torch, "_scaled_mm") or not hasattr(torch, "float8_e4m3fn"):
        return False, f"torch {torch.__version__} has no fp8 matmul"
    cap = torch.cuda.get_device_capability()
    if cap < (8, 9):
        return False, f"GPU compute capability {cap[0]}.{cap[1]} < 8.9"
    return True, ""


def fp8_attention_supported(transformer: Any) -> tuple[bool, str]:
    """Whether go_fast can compute ``transformer``'s attention in fp8 (:mod:`.fp8_attention`), and why not:
    ``FLUXKILN_FP8_ATTENTION=0`` keeps it in bf16; other attention processors than diffusers' own (fluxkiln's
    context parallelism's), and diffusers' own with its context parallelism on, stay as they are."""
    if switched_off("FLUXKILN_FP8_ATTENTION"):
        return False, "FLUXKILN_FP8_ATTENTION=0"
    from . import fp8_attention

    if not fp8_attention.active(transformer):
        processors = transformer.attn_processors.values()
        foreign = {type(p).__name__ for p in processors} - STOCK_PROCESSORS
        if foreign:
            return False, f"the blocks have other attention processors ({', '.join(sorted(foreign))})"
        if any(getattr(p, "_parallel_config", None) is not None for p in processors):
            return False, "diffusers' context parallelism attends across the GPUs"
    return fp8_attention.supported()


def fp8_linear_class() -> Any:
    """The :class:`~fluxkiln.plugins.flux.fp8linear.Fp8Linear` class (imported on first use, so importing this
    module does not import torch)."""
    if not _CLASS:
        from .fp8linear import Fp8Linear

        _CLASS.append(Fp8Linear)
    return _CLASS[0]


def _fp8_candidates(transformer: Any) -> list[tuple[Any, str, Any]]:
    """(parent, attribute, linear) of the block linears worth fp8: token-wise ones with sizes % 16 == 0.

    A layer that carries LoRA adapters (fp8 only runs with them merged or switched off) gets its base linear
    swapped, so the same layers compute in fp8 whether or not adapters were ever loaded on the pipeline."""
    import torch

    found = []
    for block in blocks(transformer):
        for name, module in block.named_modules():
            parts = name.split(".")
            if not isinstance(module, torch.nn.Linear) or "original" in parts or any(
                    "norm" in p or "lora_" in p for p in parts):
                continue
            if module.in_features % 16 or module.out_features % 16 or module.weight.dtype not in (
                    torch.bfloat16, torch.float16, torch.float32):
                continue
            parent_name, _, attr = name.rpartition(".")
            parent = block.get_submodule(parent_name) if parent_name else block
            owner, role = _owner(block, parent_name, attr)
            if getattr(owner, "fused_projections", False) and role in UNFUSED:
                continue  # replaced by to_qkv / to_added_qkv while the projections are fused
            found.append((parent, attr, module))
    return found


def _owner(block: Any, parent_name: str, attr: str) -> tuple[Any, str]:
    """The module that uses a linear and the linear's role there (a LoRA wrapper's base layer: the wrapper's)."""
    if attr != "base_layer":
        return (block.get_submodule(parent_name) if parent_name else block), attr
    grand, _, role = parent_name.rpartition(".")
    return (block.get_submodule(grand) if grand else block), role


def fp8_apply(transformer: Any) -> int:
    """Swap the block linears for :class:`Fp8Linear` (idempotent); returns how many were swapped."""
    import torch

    cls = fp8_linear_class()
    todo = _fp8_candidates(transformer)
    with torch.no_grad():
        for parent, attr, linear in todo:
            setattr(parent, attr, cls(linear))
    return len(todo)


def fp8_restore(transformer: Any) -> int:
    """Put every swapped bf16 linear back; returns how many."""
    cls = fp8_linear_class() if _CLASS else None
    if cls is None:
        return 0
    n = 0
    for block in blocks(transformer):
        for name, module in list(block.named_modules()):
            if isinstance(module, cls):
                parent_name, _, attr = name.rpartition(".")
                setattr(block.get_submodule(parent_name) if parent_name else block, attr, module.original)
                n += 1
    return n


def has_fp8(transformer: Any) -> bool:
    return bool(_CLASS) and any(isinstance(m, _CLASS[0]) for b in blocks(transformer) for m in b.modules())
