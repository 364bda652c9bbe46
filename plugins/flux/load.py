"""The ``load_model`` node: a FLUX.1 pipeline from a hub id, a local folder, a single-file
checkpoint or a plugin prefix (``builtin:tiny-flux``), held hot by the residency manager;
optionally sharing another pipeline's text encoders and VAE (``share``)."""

from __future__ import annotations

import contextlib
import gc
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field

from fluxkiln.engine import Model, NodeError, RunContext, node

from . import fast as fastpaths
from . import parallel, precompiled, warm
from .share import adopt, borrowed_names, check_compatible, donor_parts, keep_alive

DEFAULT_BASE = {"dev": "black-forest-labs/FLUX.1-dev", "schnell": "black-forest-labs/FLUX.1-schnell"}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
PREFIX = re.compile(r"^([A-Za-z][\w.-]+):(?![\\/])")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
GUIDANCE_KEYS = ("guidance_in.in_layer.weight", "guidance_embedder.linear_1.weight")


@dataclass(frozen=True)
class Source:
    """Where a pipeline comes from: a diffusers folder, or a transformer file plus a base folder."""

    kind: str  # "folder" | "hub" | "plugin" | "single_file"
    path: Path
    ref: str
    base: Path | None = None

    def stamp(self) -> str:
        """Changes when the files change, so a replaced model is not served from memory."""
        probe = self.path if self.kind == "single_file" else self.path / "model_index.json"
        try:
            st = probe.stat()
            return f"{st.st_size}-{st.st_mtime_ns}"
        except OSError:
            return "?"


def fetch_hint(repo: str) -> str:
    gated = ("FLUX.1-dev is gated: accept its license on huggingface.co and export HF_TOKEN, then "
             if "dev" in repo.lower() else "")
    return (f"{gated}download it once with `hf download {repo}` (older huggingface_hub: "
            f"`huggingface-cli download {repo}`) and rerun; fluxkiln then loads it offline from the cache")


def hub_snapshot(repo: str, *, download: bool = False) -> Path:
    """The local snapshot folder of a hub repo; offline unless ``download``."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo, local_files_only=not download))
    except LocalEntryNotFoundError as exc:
        if download:
            raise _download_failed(repo, exc) from exc
        raise NodeError(f"model '{repo}' is not in the local Hugging Face cache (download = false: fluxkiln did "
                        "not try to download it)", key="model",
                        hint=fetch_hint(repo) + ", or set download = true on this node") from exc
    except Exception as exc:  # noqa: BLE001 - hub client errors (auth, network, offline mode) vary by version
        raise _download_failed(repo, exc) from exc


def _root_cause(exc: BaseException) -> BaseException:
    seen = {id(exc)}
    while (nxt := exc.__cause__ or exc.__context__) is not None and id(nxt) not in seen:
        seen.add(id(nxt))
        exc = nxt
    return exc


def _download_failed(repo: str, exc: BaseException) -> NodeError:
    """download = true and the Hub could not deliver: say that it was tried, and why it failed."""
    cause = _root_cause(exc)
    why = f"{type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}".rstrip(": ")
    text = f"{type(exc).__name__} {exc} {why}".lower()
    if "offline" in text:
        fix = "HF_HUB_OFFLINE is set: unset it (or download on a machine with network), then rerun"
    elif any(w in text for w in ("401", "403", "gated", "unauthorized", "authentication")):
        fix = fetch_hint(repo) + "; the Hub refused access: accept the model's license and export HF_TOKEN"
    elif any(w in text for w in ("404", "not found", "repositorynotfound")):
        fix = "check the hub id (owner/name) on huggingface.co"
    else:
        fix = "check the network connection (and HF_ENDPOINT / proxy settings), then rerun; " + fetch_hint(repo)
    return NodeError(f"download = true: tried to download '{repo}' from the Hugging Face Hub and it failed "
                     f"({why})", key="download", hint=fix)


def resolve_source(ref: str, ctx: RunContext, *, download: bool = False, key: str = "model") -> Source:
    """Turn what a recipe says (prefix ref, path relative to the recipe, or hub id) into a :class:`Source`."""
    ref = ref.strip()
    m = PREFIX.match(ref)
    if m:
        found = ctx.resolve_model(ref)
        if not found:
            raise NodeError(f"no plugin resolves the model reference '{ref}' (prefix '{m.group(1)}:')", key=key,
                            hint="built in: builtin:mini-flux, builtin:mini-flux-schnell, builtin:tiny-flux, "
                                 "builtin:tiny-flux-schnell; `fluxkiln plugins` lists plugins")
        return Source("plugin", Path(found), ref)
    p = Path(ref).expanduser()
    base_dir = ctx.recipe.base_dir if getattr(ctx, "recipe", None) is not None else Path.cwd()
    path = p if p.is_absolute() else base_dir / p
    if path.is_dir():
        return Source("folder", path.resolve(), ref)
    if path.is_file():
        return Source("single_file", path.resolve(), ref)
    if HUB_ID.match(ref) and not ref.startswith("."):
        return Source("hub", hub_snapshot(ref, download=download), ref)
    raise NodeError(f"model '{ref}' not found: no folder or file {path}, and it is not a hub id (owner/name)", key=key,
                    hint="give a diffusers folder or .safetensors file (relative to the recipe), a hub id such as "
                         "black-forest-labs/FLUX.1-dev, or builtin:tiny-flux")


def checkpoint_variant(path: Path) -> str:
    """dev or schnell, from the tensor names of a single-file transformer checkpoint."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise NodeError(f"cannot read checkpoint {path}: {exc}", hint="is it a complete .safetensors file?") from exc
    return "dev" if any(k.endswith(GUIDANCE_KEYS) for k in keys) else "schnell"


def check_folder(path: Path, ref: str) -> None:
    if not (path / "model_index.json").is_file():
        raise NodeError(f"'{ref}' is not a diffusers pipeline folder ({path} has no model_index.json)",
                        hint="point `model` at a folder saved by diffusers (with transformer/, vae/, text_encoder/ ...) "
                             "or at a single .safetensors transformer file")


def torch_dtype(name: str, device: str) -> Any:
    import torch

    if name == "auto":
        return torch.bfloat16 if device == "cuda" else torch.float32
    return getattr(torch, name)


def pipeline_bytes(pipe: Any) -> int:
    """Parameter and buffer bytes of every module of a pipeline (less what it borrowed from another)."""
    import torch

    total = 0
    borrowed = borrowed_names(pipe)
    for name, comp in pipe.components.items():
        if isinstance(comp, torch.nn.Module) and name not in borrowed:
            total += sum(t.numel() * t.element_size() for t in comp.parameters())
            total += sum(t.numel() * t.element_size() for t in comp.buffers())
    return total


def release_pipeline(pipe: Any) -> None:
    """Free a pipeline's memory (called by the residency manager on eviction)."""
    import torch

    from . import graphed, prompt_cache

    prompt_cache.drop(pipe)
    try:
        pipe.remove_all_hooks()
    except Exception:  # noqa: BLE001 - best effort: hooks may not be installed
        pass
    for name, comp in pipe.components.items():
        if isinstance(comp, torch.nn.Module) and not keep_alive(pipe, name, comp):
            graphed.remove(comp)  # a transformer's CUDA graphs hold memory of their own
            comp.to("meta")
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """Hide the libraries' progress bars and chatter while loading (fluxkiln reports progress itself)."""
    import warnings

    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    bars = dlog.is_progress_bar_enabled(), tlog.is_progress_bar_enabled()
    level, tlevel = dlog.get_verbosity(), tlog.get_verbosity()
    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    dlog.set_verbosity_error()
    tlog.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*multiple adapters.*")
            yield
    finally:
        dlog.set_verbosity(level)
        tlog.set_verbosity(tlevel)
        if bars[0]:
            dlog.enable_progress_bar()
        if bars[1]:
            tlog.enable_progress_bar()


def _from_pretrained(src: Source, dtype: Any, parts: dict[str, Any] | None = None,
                     device_map: str | None = None) -> Any:
    try:
        with quiet_loading():
            return _load_parts(src, dtype, parts or {}, device_map)
    except NodeError:
        raise
    except Exception as exc:  # noqa: BLE001 - loader errors vary (missing files, bad configs, wrong formats)
        raise NodeError(f"could not load a FLUX pipeline from '{src.ref}' ({src.path}): {type(exc).__name__}: {exc}",
                        hint="check that the folder/file is a complete FLUX.1 diffusers model") from exc


def _load_parts(src: Source, dtype: Any, parts: dict[str, Any], device_map: str | None = None) -> Any:
    """The pipeline from its files; ``device_map`` (a device) makes safetensors load each weight straight onto it
    instead of into CPU memory first."""
    from diffusers import FluxPipeline, FluxTransformer2DModel

    placed = {"device_map": device_map} if device_map else {}
    if src.kind == "single_file":
        transformer = FluxTransformer2DModel.from_single_file(
            str(src.path), config=str(src.base), subfolder="transformer", dtype=dtype, local_files_only=True)
        return FluxPipeline.from_pretrained(str(src.base), transformer=transformer, dtype=dtype, local_files_only=True,
                                            **parts)
    return FluxPipeline.from_pretrained(str(src.path), dtype=dtype, local_files_only=True, **parts, **placed)


def direct_device(device: str, offload: str, parts: dict[str, Any]) -> str | None:
    """Where weights can be loaded straight to: the GPU when the whole pipeline goes there unchanged and no part is
    borrowed; None (CPU first, then moved) otherwise.  ``FLUXKILN_LOAD_DIRECT=0`` turns it off."""
    if fastpaths.switched_off("FLUXKILN_LOAD_DIRECT"):
        return None
    return device if device == "cuda" and offload == "none" and not parts else None


def quantize_fp8(pipe: Any, dtype: Any) -> str:
    """Store the transformer's weights in fp8; returns how.  Needs a GPU of compute capability >= 8.9."""
    import torch

    if not torch.cuda.is_available():
        raise NodeError("quantize = \"fp8\" needs a CUDA GPU; this machine has none", key="quantize",
                        hint='use quantize = "none" on CPU')
    cap = torch.cuda.get_device_capability()
    if cap < (8, 9):
        raise NodeError(f"quantize = \"fp8\" needs a GPU of compute capability 8.9 or newer (Ada, Hopper); "
                        f"this one is {cap[0]}.{cap[1]}", key="quantize", hint='use quantize = "none" or offload = "model"')
    return store_fp8(pipe, dtype)


def store_fp8(pipe: Any, dtype: Any) -> str:
    """Keep the transformer blocks' weights in fp8 (:class:`fp8linear.Fp8StoredLinear`); returns how."""
    from .fp8linear import store_fp8 as store

    return store(pipe.transformer, dtype)


def build_pipeline(src: Source, dtype_name: str, device: str, offload: str, quantize: str,
                   share: Model | None = None) -> Any:
    """Load and place a pipeline as configured (the residency loader); ``share``: borrow its encoders and VAE."""
    dtype = torch_dtype(dtype_name, device)
    parts: dict[str, Any] = {}
    if share is not None:
        donor = get_pipeline(share)
        parts = donor_parts(donor, dtype, offload)
        check_compatible(_vae_config(src), donor, src.ref)
    direct = direct_device(device, offload, parts)
    try:
        pipe = _from_pretrained(src, dtype, parts, direct)
    except NodeError:
        if direct is None:
            raise
        pipe = _from_pretrained(src, dtype, parts)  # loading straight to the device failed: through CPU memory
    if parts:
        adopt(pipe, parts)
    if quantize == "fp8":
        pipe._fluxkiln_fp8 = quantize_fp8(pipe, dtype)
    if offload == "model":
        pipe.enable_model_cpu_offload()
    elif offload == "sequential":
        pipe.enable_sequential_cpu_offload()
    else:
        pipe.to(device)
    pipe._fluxkiln_offload = offload
    pipe._fluxkiln_dtype = dtype
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _vae_config(src: Source) -> dict[str, Any]:
    import json

    folder = src.base if src.kind == "single_file" and src.base else src.path
    try:
        return json.loads((Path(folder) / "vae" / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise NodeError(f"`share`: cannot read the VAE configuration of '{src.ref}': {exc}", key="share") from exc


def model_key(src: Source, dtype: str, offload: str, quantize: str, device: str) -> str:
    """The residency key of a pipeline loaded from ``src`` as configured (``fluxkiln bench`` uses it too)."""
    return f"flux|{src.kind}|{src.path}|{src.base}|{src.stamp()}|{dtype}|{offload}|{quantize}|{device}"


def get_pipeline(model: Model) -> Any:
    """The live pipeline of a Model, reloading it (with size and release) if residency evicted it."""
    if model.residency is None or model.loader is None:
        raise NodeError(f"model '{model.ref}' is not a loaded FLUX model", hint="link `model` to a load_model node")
    return model.residency.get(model.key, model.loader, size=pipeline_bytes, release=release_pipeline,
                               kind="inference")


def local_model_signature(params: dict[str, Any], node_dir: Path, recipe_dir: Path | None = None) -> dict[str, str]:
    """A cheap signature (names, sizes, mtimes) of a local model folder or file, so editing it reloads the model."""
    ref = str(params.get("model") or "")
    if ":" in ref.split("/")[0] and not Path(ref).exists():
        return {}
    path = Path(ref).expanduser()
    if not path.is_absolute() and recipe_dir is not None:
        path = Path(recipe_dir) / path
    if not path.exists():
        return {}
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    rows = [f"{p.relative_to(path) if path.is_dir() else p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}"
            for p in files]
    import hashlib

    return {"model files": hashlib.sha256("\n".join(rows).encode()).hexdigest()}


@node("load_model", version="1", cache="memory", category="flux", extra_fingerprint=local_model_signature)
def load_model(
    ctx: RunContext,
    model: Annotated[str, Field(min_length=1, description="hub id (from the local cache), diffusers folder or "
                                "single-file .safetensors (relative to the recipe), or builtin:tiny-flux")],
    base: Annotated[str | None, Field(description="single-file checkpoints only: folder or hub id for the rest of "
                                      "the pipeline; default black-forest-labs/FLUX.1-dev or -schnell to match")] = None,
    dtype: Annotated[Literal["auto", "bfloat16", "float16", "float32"],
                     Field(description="weights dtype; auto = bfloat16 on GPU, float32 on CPU")] = "auto",
    offload: Annotated[Literal["none", "model", "sequential"],
                       Field(description="GPU only: keep models in CPU memory and move each to the GPU when used "
                             "(model) or layer by layer (sequential, slowest, least memory)")] = "none",
    quantize: Annotated[Literal["none", "fp8"],
                        Field(description="fp8 transformer weights (GPU of compute capability >= 8.9)")] = "none",
    download: Annotated[bool, Field(description="allow downloading a hub id missing from the cache "
                                    "(network; HF_TOKEN for gated repos); off = offline")] = False,
    share: Annotated[Model | None, Field(description="another load_model whose text encoders, tokenizers and VAE "
                                         "this model uses instead of loading its own (one copy in memory; "
                                         "FLUX.1 dev and schnell have the same ones)")] = None,
    context_parallel: Annotated[int, Field(ge=1, le=64, description="split each image's tokens over this many GPUs "
                                           "(context parallelism, for one image's latency); needs as many "
                                           "processes (--gpus N); 1 = off")] = 1,
    context_parallel_mode: Annotated[Literal["auto", "ulysses", "allgather", "overlap", "diffusers"], Field(
        description="how the ranks exchange tokens in attention: auto = allgather (fluxkiln's own, compile-"
                    "friendly, also on CPU; the fastest measured); ulysses = one all-to-all each way (the attention "
                    "heads (24) must divide by context_parallel); "
                    "overlap = allgather whose exchange runs beside attention to the rank's own tokens "
                    "(merged exactly by log-sum-exp); "
                    "diffusers = diffusers' stock Ulysses (CUDA only, the baseline)")] = "auto",
) -> Model:
    """Load a FLUX.1 [dev] or [schnell] pipeline and keep it hot in memory.

    The variant is detected from the transformer (guidance embedding = dev) and
    exposed as ``info["variant"]``; ``sample`` uses it for defaults and checks.
    """
    waited = warm.wait_imports()  # before anything here imports torch (ctx.device does)
    if waited is not None:
        ctx.log(f"torch and diffusers imported in the background in {waited['import_s']:.1f} s "
                f"(waited {waited['waited_s']:.1f} s for them here)")
    if (slow := warm.bytecode_missing()) is not None:
        ctx.log(slow, level="warning")
    device = ctx.device
    if offload != "none" and device != "cuda":
        raise NodeError(f"offload = \"{offload}\" needs a CUDA GPU; this machine has none", key="offload",
                        hint='use offload = "none" on CPU')
    if quantize == "fp8" and device != "cuda":
        raise NodeError("quantize = \"fp8\" needs a CUDA GPU; this machine has none", key="quantize",
                        hint='use quantize = "none" on CPU')
    if quantize == "fp8" and offload == "sequential":
        raise NodeError('quantize = "fp8" does not combine with offload = "sequential"', key="quantize",
                        hint='use offload = "model" with fp8 (fp8 already halves the transformer\'s memory)')
    parallel.check(context_parallel, device, context_parallel_mode)
    src = resolve_source(model, ctx, download=download)
    if src.kind == "single_file":
        if src.path.suffix.lower() in PICKLE_SUFFIXES:
            raise NodeError(f"{src.path.name}: pickle checkpoints can run code and are refused", key="model",
                            hint="convert it to .safetensors")
        base_src = resolve_source(base or DEFAULT_BASE[checkpoint_variant(src.path)], ctx, download=download, key="base")
        check_folder(base_src.path, base_src.ref)
        src = Source("single_file", src.path, src.ref, base_src.path)
    else:
        if base:
            raise NodeError("`base` only applies when `model` is a single .safetensors file", key="base",
                            hint="remove `base`")
        check_folder(src.path, src.ref)
    key = model_key(src, dtype, offload, quantize, device)
    if share is not None:
        if share.kind != "flux":
            raise NodeError(f"`share` needs a FLUX model, got a '{share.kind}' model", key="share")
        key += f"|share={share.key}"
    if context_parallel > 1:
        key += f"|cp{context_parallel}-{context_parallel_mode}"

    def loader() -> Any:
        return parallel.enable(build_pipeline(src, dtype, device, offload, quantize, share), context_parallel,
                               context_parallel_mode)

    out = Model(ref=model, kind="flux", key=key, loader=loader, residency=ctx.models)
    if key not in ctx.models:
        ctx.log(f"loading FLUX pipeline '{model}' from {src.path}")
        if device == "cuda" and not fastpaths.compile_disabled():
            precompiled.start_preload(device)  # the saved blocks load while the weights do
    pipe = get_pipeline(out)
    variant = "dev" if pipe.transformer.config.guidance_embeds else "schnell"
    out.info = {"variant": variant, "source": src.kind, "path": str(src.path),
                "dtype": str(pipe.transformer.dtype).replace("torch.", ""),
                "offload": offload, "quantize": quantize, "device": device, "context_parallel": context_parallel}
    if context_parallel > 1:
        out.info["context_parallel_mode"] = getattr(pipe, "_fluxkiln_context_parallel_mode", context_parallel_mode)
        ctx.log(f"context parallel: each image's tokens split over {context_parallel} ranks "
                f"({out.info['context_parallel_mode']} attention)")
    if src.base:
        out.info["base"] = str(src.base)
    if share is not None:
        out.info["shares_with"] = share.ref
        ctx.log(f"text encoders, tokenizers and VAE shared with '{share.ref}' (one copy in memory)")
    how = getattr(pipe, "_fluxkiln_fp8", None)
    if how:
        out.info["quantize_method"] = how
        ctx.log(f"transformer weights in fp8 via {how}")
    return out
