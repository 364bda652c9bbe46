"""The ``sample`` node: FLUX.1 text-to-image and image-to-image with every input of
Replicate's flux-dev / flux-schnell predictors (same names, ranges and defaults)."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field

from fluxkiln.engine import distributed
from fluxkiln.engine import ImageItem, Images, InputFile, Model, NodeError, RunContext, node

from . import fast, parallel
from .load import get_pipeline
from .lora import adapter_loader
from .pipestate import prepare
from .sizes import ASPECT_RATIOS, CUSTOM_MAX, CUSTOM_MIN, output_size, size_like

DEFAULT_STEPS = {"dev": 28, "schnell": 4}
MAX_STEPS = {"dev": 50, "schnell": 4}
DEFAULT_GUIDANCE = 3.0
MAX_TEXT_TOKENS = {"dev": 512, "schnell": 256}
MAX_INPUT_PIXELS = 40_000_000
AspectRatio = Literal["1:1", "16:9", "21:9", "3:2", "2:3", "4:5", "5:4", "3:4", "4:3", "9:16", "9:21", "custom"]


KNOWN_SCHNELL = ("black-forest-labs/FLUX.1-schnell", "builtin:tiny-flux-schnell")


def _base_ref(recipe: Any, value: Any, depth: int = 0) -> str | None:
    """The literal `model` of the load_model a sample's model link leads to (through apply_lora)."""
    node = recipe.nodes.get(getattr(value, "node", None)) if depth < 16 else None
    if node is None:
        return None
    if node.type == "load_model":
        ref = node.values.get("model")
        return ref if isinstance(ref, str) else None
    return _base_ref(recipe, node.values.get("model"), depth + 1) if node.type == "apply_lora" else None


def recipe_problems(recipe: Any) -> list[Any]:
    """Checks `fluxkiln validate` can make before running: custom sizes, and schnell misuse on known refs."""
    problems = []
    for nid, spec in recipe.nodes.items():
        if spec.type != "sample":
            continue
        v = spec.values
        custom = v.get("aspect_ratio", "1:1") == "custom"
        for key in ("width", "height"):
            if custom and v.get(key) is None and v.get("image") is None:
                problems.append(recipe.problem(f'aspect_ratio = "custom" needs {key}', node=nid, key="aspect_ratio",
                                               hint="set width and height (256 to 1440, rounded to 16)"))
            elif not custom and v.get(key) is not None:
                problems.append(recipe.problem(f'{key} only applies with aspect_ratio = "custom"', node=nid, key=key,
                                               hint='set aspect_ratio = "custom" or remove it'))
        if _base_ref(recipe, v.get("model")) in KNOWN_SCHNELL:
            if v.get("guidance") is not None:
                problems.append(recipe.problem("FLUX.1 [schnell] has no guidance", node=nid, key="guidance",
                                               hint="remove guidance (it only applies to [dev])"))
            steps = v.get("num_inference_steps")
            if isinstance(steps, int) and steps > MAX_STEPS["schnell"]:
                problems.append(recipe.problem(f"FLUX.1 [schnell] takes at most 4 steps, got {steps}", node=nid,
                                               key="num_inference_steps", hint="use 1 to 4"))
    return problems


def _volatile(params: dict[str, Any]) -> str | None:
    return "no seed given (a random seed is drawn each run)" if params.get("seed") is None else None


def check_variant(variant: str, steps: int | None, guidance: float | None) -> tuple[int, float | None]:
    """Apply the variant's defaults and limits; NodeError for schnell misuse."""
    if variant == "schnell" and guidance is not None:
        raise NodeError("FLUX.1 [schnell] has no guidance; remove `guidance` (it only applies to [dev])", key="guidance",
                        hint="schnell is guidance-distilled: it always follows the prompt without a guidance value")
    steps = DEFAULT_STEPS[variant] if steps is None else steps
    if steps > MAX_STEPS[variant]:
        raise NodeError(f"FLUX.1 [{variant}] takes at most {MAX_STEPS[variant]} steps, got num_inference_steps = {steps}",
                        key="num_inference_steps", hint=f"use 1 to {MAX_STEPS[variant]} (default {DEFAULT_STEPS[variant]})")
    return steps, (DEFAULT_GUIDANCE if guidance is None else guidance) if variant == "dev" else None


def read_image(value: Images | str) -> tuple[Any, str]:
    """The input image (RGB) and a label for it; NodeError for unreadable or oversized files."""
    if isinstance(value, Images) or isinstance(value, list):
        if not value:
            raise NodeError("`image` is linked to a node that produced no images", key="image")
        item = value[0]
        return item.image.convert("RGB"), item.name or "linked image"
    from PIL import Image

    path = Path(value)
    try:
        with Image.open(path) as im:
            if im.width * im.height > MAX_INPUT_PIXELS:
                raise NodeError(f"image {path.name} is {im.width}x{im.height} pixels, over the "
                                f"{MAX_INPUT_PIXELS // 1_000_000} MP limit", key="image", hint="downscale it first")
            im.load()
            return im.convert("RGB"), path.name
    except NodeError:
        raise
    except Image.DecompressionBombError as exc:
        raise NodeError(f"image {path.name} is too large to decode safely: {exc}", key="image",
                        hint="downscale it first") from exc
    except (OSError, ValueError, SyntaxError) as exc:
        raise NodeError(f"cannot read image {path}: {exc}", key="image",
                        hint="give a PNG, JPEG or WebP file (relative to the recipe)") from exc


def _callback(ctx: RunContext, total: int) -> Any:
    def on_step_end(pipe: Any, step: int, timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        ctx.progress(step + 1, total)
        ctx.check_cancelled()
        return {}
    return on_step_end


def _img2img_pipe(pipe: Any) -> Any:
    from diffusers import FluxImg2ImgPipeline

    from .load import quiet_loading

    cached = getattr(pipe, "_fluxkiln_img2img", None)
    if cached is None:
        # the same modules in an img2img pipeline; not from_pipe(), which casts every shared module to
        # float32 unless told a dtype (and would undo fp8 storage when told one)
        with quiet_loading():
            cached = FluxImg2ImgPipeline(**pipe.components)
        cached.set_progress_bar_config(disable=True)
        object.__setattr__(pipe, "_fluxkiln_img2img", cached)
    return cached


def _generate(ctx: RunContext, pipe: Any, variant: str, prompt: str, n: int, width: int, height: int, steps: int,
              guidance: float | None, seed: int, init: Any, strength: float) -> list[Any]:
    if n == 0:  # this rank's share of a data-parallel sample is empty
        return []
    import torch

    generators = [torch.Generator("cpu").manual_seed(seed + i) for i in range(n)]
    common = dict(prompt=prompt, num_images_per_prompt=n, width=width, height=height, num_inference_steps=steps,
                  guidance_scale=guidance if guidance is not None else 0.0, generator=generators,
                  max_sequence_length=MAX_TEXT_TOKENS[variant], output_type="pil")
    if init is not None and strength < 1.0:
        from PIL import Image

        total = steps - int(max(steps - min(steps * strength, steps), 0))  # the steps diffusers will run
        resized = init.resize((width, height), Image.Resampling.LANCZOS)
        run = _img2img_pipe(pipe)
        # one copy per output, so image i's VAE sampling and noise both come from seed + i
        common.update(image=[resized] * n, strength=strength)
    else:
        total, run = steps, pipe
    ctx.progress(0, total)
    # no_grad, not inference_mode: with CPU offload the weights moved under inference_mode would become
    # inference tensors, and later LoRA changes on them fail
    with torch.no_grad():
        if ctx.device != "cuda" or fast.compile_disabled():
            return run(**common, callback_on_step_end=_callback(ctx, total)).images
        try:
            with fast.attention_first_cudnn():
                return run(**common, callback_on_step_end=_callback(ctx, total)).images
        except RuntimeError as exc:  # a cuDNN attention failure: the standard kernels still work
            if "cudnn" not in str(exc).lower():
                raise
            ctx.log(f"cuDNN attention failed ({str(exc).splitlines()[0]}); retrying with the flash kernels")
            for g, i in zip(generators, range(n), strict=True):
                g.manual_seed(seed + i)
            return run(**common, callback_on_step_end=_callback(ctx, total)).images


@distributed.parallel
@node("sample", version="1", volatile=_volatile, category="flux")
def sample(
    ctx: RunContext,
    model: Annotated[Model, Field(description="a FLUX model (load_model or apply_lora)")],
    prompt: Annotated[str, Field(description="text prompt")] = "",
    aspect_ratio: Annotated[AspectRatio, Field(description="output aspect ratio (1 MP sizes: 1:1 1024x1024, "
                                               "16:9 1344x768 ...); custom uses width and height")] = "1:1",
    width: Annotated[int | None, Field(ge=CUSTOM_MIN, le=CUSTOM_MAX, description="custom aspect ratio only: "
                                       "width in pixels, rounded to a multiple of 16")] = None,
    height: Annotated[int | None, Field(ge=CUSTOM_MIN, le=CUSTOM_MAX, description="custom aspect ratio only: "
                                        "height in pixels, rounded to a multiple of 16")] = None,
    megapixels: Annotated[Literal["1", "0.25"], Field(description="approximate megapixels; 0.25 halves both "
                                                      "sides")] = "1",
    num_outputs: Annotated[int, Field(ge=1, le=4, description="images to generate (one batch)")] = 1,
    num_inference_steps: Annotated[int | None, Field(ge=1, le=50, description="denoising steps; default dev 28, "
                                                     "schnell 4 (schnell allows at most 4)")] = None,
    guidance: Annotated[float | None, Field(ge=0.0, le=10.0, description="guidance (dev only; default 3); "
                                            "schnell has none")] = None,
    seed: Annotated[int | None, Field(ge=0, le=2**32 - 1, description="random seed; random when unset. Image i "
                                      "uses seed + i")] = None,
    image: Annotated[Images | str | None, InputFile(),
                     Field(description="input image for image-to-image (a file relative to the recipe, or an "
                           "`images` link: its first image); the output takes its aspect ratio")] = None,
    prompt_strength: Annotated[float, Field(ge=0.0, le=1.0, description="image-to-image: 0 keeps the input, "
                                            "1 ignores it")] = 0.8,
    go_fast: Annotated[bool, Field(description="GPU: fp8 matmuls in the transformer blocks (row-wise scaled "
                                   "weights and activations, compute capability >= 8.9; slightly lossy, not with "
                                   "unfused LoRAs) on top of the always-on lossless path (compiled blocks, fused "
                                   "QKV, compiled VAE decoder); false restores the exact bf16 weights. CPU: fused QKV "
                                   "projections only")] = True,
) -> Images:
    """Generate images with FLUX.1 [dev] or [schnell] (text-to-image or image-to-image).

    Inputs follow Replicate's flux-dev / flux-schnell predictors.  Their
    `disable_safety_checker` is the `safety_check` node and `output_format` /
    `output_quality` belong to the `save` node.  Every image records its seed;
    image i of a batch uses seed + i, so each one is reproducible on its own.
    """
    if model.kind != "flux":
        raise NodeError(f"sample needs a FLUX model, got a '{model.kind}' model", key="model")
    variant = model.info.get("variant", "dev")
    steps, guide = check_variant(variant, num_inference_steps, guidance)
    init, init_label = read_image(image) if image is not None else (None, None)
    try:
        w, h = size_like(init.size, megapixels) if init is not None else output_size(aspect_ratio, megapixels, width, height)
    except ValueError as exc:
        raise NodeError(str(exc), key="aspect_ratio", hint="use one of " + ", ".join(ASPECT_RATIOS) + " or custom") from exc
    seed = secrets.randbelow(2**32) if seed is None else seed
    meta = {"model": model.ref, "variant": variant, "prompt": prompt, "aspect_ratio": aspect_ratio,
            "megapixels": megapixels, "width": w, "height": h, "num_outputs": num_outputs,
            "num_inference_steps": steps, "guidance": guide, "go_fast": go_fast,
            "loras": [{"file": Path(a["path"]).name, "scale": a["scale"]} for a in model.adapters]}
    if init is not None:
        meta.update(image=init_label, prompt_strength=prompt_strength)
    if init is not None and prompt_strength == 0.0:
        from PIL import Image

        ctx.log("prompt_strength = 0: returning the input image unchanged (resized)")
        pics = [init.resize((w, h), Image.Resampling.LANCZOS) for _ in range(num_outputs)]
    else:
        pipe = get_pipeline(model)
        prepare(pipe, model.adapters, go_fast, ctx.device, adapter_loader(pipe, ctx.log), fast=True, log=ctx.log)
        if parallel.splits_images(model):  # several ranks: each makes its share of the images, seed + i for image i
            pics = distributed.run_shard(
                lambda part: _generate(ctx, pipe, variant, prompt, len(part), w, h, steps, guide, seed + part.start,
                                       init, prompt_strength), num_outputs, log=ctx.log)
        else:  # context parallel: every rank computes its part of every image's tokens
            pics = _generate(ctx, pipe, variant, prompt, num_outputs, w, h, steps, guide, seed, init, prompt_strength)
    return Images(ImageItem(image=pic, seed=seed + i, prompt=prompt, name=f"{ctx.node}-{seed + i}",
                            meta={**meta, "seed": seed + i, "base_seed": seed, "index": i})
                  for i, pic in enumerate(pics))
