"""The ``sample`` node: FLUX.1 text-to-image and image-to-image with every input of
Replicate's flux-dev / flux-schnell predictors (same names, ranges and defaults)."""

from __future__ import annotations

import secrets
import time
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field

from fluxkiln.engine import ImageItem, Images, InputFile, Model, NodeError, RunContext, Text, distributed, node

from . import fast, graphed, parallel, prompt_cache
from .generate import MAX_TEXT_TOKENS, Job, Settings, generate
from .load import get_pipeline
from .lora import adapter_loader
from .pipestate import adapter_errors, prepare
from .sizes import (ASPECT_RATIOS, CUSTOM_MAX, CUSTOM_MIN, TRAINING_PIXELS, centre_crop, plan_size, size_like)

__all__ = ["DEFAULT_GUIDANCE", "MAX_TEXT_TOKENS", "recipe_problems", "sample"]

DEFAULT_STEPS = {"dev": 28, "schnell": 4}
MAX_STEPS = {"dev": 50, "schnell": 4}
DEFAULT_GUIDANCE = 3.0
MAX_INPUT_PIXELS = 40_000_000
MAX_PROMPTS = 1000
AspectRatio = Literal["1:1", "16:9", "21:9", "3:2", "2:3", "4:5", "5:4", "3:4", "4:3", "9:16", "9:21", "custom"]


KNOWN_SCHNELL = ("black-forest-labs/FLUX.1-schnell", "builtin:tiny-flux-schnell", "builtin:mini-flux-schnell")


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
    """Checks `fluxkiln validate` can make before running: custom sizes, and schnell misuse on known refs.

    A swept node is checked cell by cell (each problem reported once, at the swept key's line where it is swept).
    """
    problems: dict[tuple[str, str, str], Any] = {}
    for nid, spec in recipe.nodes.items():
        if spec.type != "sample":
            continue
        swept = spec.sweep if isinstance(spec.sweep, dict) else {}
        for values in spec.cells():
            for key, message, hint in _cell_problems(recipe, values):
                line = spec.sweep_lines.get(key) if key in swept else None
                problems.setdefault((nid, key, message), recipe.problem(message, node=nid, key=key, hint=hint,
                                                                        line=line))
    return list(problems.values())


def _cell_problems(recipe: Any, v: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(key, message, hint) for one set of sample values."""
    found = []
    custom = v.get("aspect_ratio", "1:1") == "custom"
    for key in ("width", "height"):
        if custom and v.get(key) is None and v.get("image") is None:
            found.append(("aspect_ratio", f'aspect_ratio = "custom" needs {key}',
                          f"set width and height ({CUSTOM_MIN} to {CUSTOM_MAX}, rounded to 16)"))
        elif not custom and v.get(key) is not None:
            found.append((key, f'{key} only applies with aspect_ratio = "custom"',
                          'set aspect_ratio = "custom" or remove it'))
    if _base_ref(recipe, v.get("model")) in KNOWN_SCHNELL:
        if v.get("guidance") is not None:
            found.append(("guidance", "FLUX.1 [schnell] has no guidance", "remove guidance (it only applies to [dev])"))
        steps = v.get("num_inference_steps")
        if isinstance(steps, int) and steps > MAX_STEPS["schnell"]:
            found.append(("num_inference_steps", f"FLUX.1 [schnell] takes at most 4 steps, got {steps}", "use 1 to 4"))
    return found


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
    if isinstance(value, list):
        return read_images(value)[0][:2]
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


def read_images(value: Images | str) -> list[tuple[Any, str, str | None]]:
    """(RGB image, label, its prompt) of every input image: a file, or each image of an ``images`` link."""
    if not isinstance(value, list):
        return [(*read_image(value), None)]
    if not value:
        raise NodeError("`image` is linked to a node that produced no images", key="image")
    return [(item.image.convert("RGB"), item.name or "linked image", item.prompt) for item in value]


def prompt_list(prompt: str | list[str]) -> list[str]:
    """The prompts of a call: one string, or a list (literal or linked)."""
    prompts = [prompt] if isinstance(prompt, str) else [str(p) for p in prompt]
    if not prompts:
        raise NodeError("`prompt` is an empty list", key="prompt", hint="give a prompt, or a list of at least one")
    if len(prompts) > MAX_PROMPTS:
        raise NodeError(f"{len(prompts)} prompts, more than {MAX_PROMPTS} in one sample node", key="prompt",
                        hint="split them over several sample nodes")
    return prompts


def make_jobs(prompts: list[str], inputs: list[tuple[Any, str, str | None]] | None,
              size_of: Any) -> list[Job]:
    """Text-to-image: one job per prompt.  Image-to-image: one per input image (each with its own prompt
    when ``prompt`` is left empty, the one prompt, or the prompt at its position), or one per prompt for a
    single input image."""
    if not inputs:
        return [Job(p, i, size_of(None)) for i, p in enumerate(prompts)]
    if len(inputs) == 1:
        img, label, _ = inputs[0]
        return [Job(p, i, size_of(img), img, label) for i, p in enumerate(prompts)]
    if len(prompts) == len(inputs):
        chosen = prompts
    elif len(prompts) == 1:
        chosen = [prompts[0] or (own or "") for _, _, own in inputs]
    else:
        raise NodeError(f"{len(inputs)} input images and {len(prompts)} prompts", key="prompt",
                        hint="give one prompt (or none: each image keeps its own), or one prompt per input image")
    return [Job(p, i, size_of(img), img, label) for i, (p, (img, label, _)) in enumerate(zip(chosen, inputs, strict=True))]


def scaled_adapters(adapters: list[dict[str, Any]], lora_scale: float | None) -> list[dict[str, Any]]:
    """The model's LoRAs with every scale multiplied by ``lora_scale`` (unchanged when it is None)."""
    if lora_scale is None:
        return list(adapters)
    return [{**a, "scale": float(a["scale"]) * lora_scale} for a in adapters]


@distributed.parallel
@distributed.whole_cells(lambda inputs: parallel.splits_images(inputs["model"]))  # a sweep: one rank per cell
@node("sample", version="2", volatile=_volatile, category="flux")
def sample(
    ctx: RunContext,
    model: Annotated[Model, Field(description="a FLUX model (load_model or apply_lora)")],
    prompt: Annotated[str | list[str] | list[Text], Field(
        description="text prompt, a list of prompts, or a link to a text or list-of-text (prompts) output; "
                    "num_outputs images per prompt")] = "",
    aspect_ratio: Annotated[AspectRatio, Field(description="output aspect ratio (1 MP sizes: 1:1 1024x1024, "
                                               "16:9 1344x768 ...); custom uses width and height")] = "1:1",
    width: Annotated[int | None, Field(ge=CUSTOM_MIN, le=CUSTOM_MAX, description="custom aspect ratio only: "
                                       "width in pixels, rounded to a multiple of 16 (at most about 4 MP)")] = None,
    height: Annotated[int | None, Field(ge=CUSTOM_MIN, le=CUSTOM_MAX, description="custom aspect ratio only: "
                                        "height in pixels, rounded to a multiple of 16 (at most about 4 MP)")] = None,
    megapixels: Annotated[Literal["1", "0.25", "2"], Field(
        description="approximate megapixels; 0.25 halves both sides; 2 is Full HD at 16:9 (1920x1080) and "
                    "9:16, about 2 MP at other ratios")] = "1",
    num_outputs: Annotated[int, Field(ge=1, le=4, description="images to generate per prompt")] = 1,
    num_inference_steps: Annotated[int | None, Field(ge=1, le=50, description="denoising steps; default dev 28, "
                                                     "schnell 4 (schnell allows at most 4)")] = None,
    guidance: Annotated[float | None, Field(ge=0.0, le=10.0, description="guidance (dev only; default 3); "
                                            "schnell has none")] = None,
    seed: Annotated[int | None, Field(ge=0, le=2**32 - 1, description="random seed; random when unset. Image i "
                                      "of every prompt uses seed + i")] = None,
    image: Annotated[Images | str | None, InputFile(),
                     Field(description="input image for image-to-image (a file relative to the recipe, or an "
                           "`images` link: each of its images is refined, with its own prompt when `prompt` is "
                           "empty); the output takes its aspect ratio")] = None,
    prompt_strength: Annotated[float, Field(ge=0.0, le=1.0, description="image-to-image: 0 keeps the input, "
                                            "1 ignores it")] = 0.8,
    lora_scale: Annotated[float | None, Field(ge=-1.0, le=3.0, description="multiplies the scale of every LoRA "
                                              "of the model (1 = as apply_lora set them); unset = 1")] = None,
    go_fast: Annotated[bool, Field(description="GPU: fp8 matmuls in the transformer blocks (row-wise scaled "
                                   "weights and activations, compute capability >= 8.9; slightly lossy, not with "
                                   "unfused LoRAs), and fp8 attention from about 1024x1024 on Hopper GPUs with "
                                   "nvidia-cudnn-frontend installed, on top of the always-on lossless path "
                                   "(compiled blocks, fused QKV, compiled VAE decoder); false restores the exact "
                                   "bf16 weights. CPU: fused QKV projections only")] = True,
    cache_threshold: Annotated[float, Field(ge=0.0, le=1.0, description="step cache, lossy, off at 0: a step "
                                            "whose first transformer block's output changed by less than this "
                                            "(relative) since the last full step skips the other blocks and "
                                            "reuses their last change; higher skips more steps and costs more quality "
                                            "(e.g. 0.05 to 0.1)")] = 0.0,
) -> Images:
    """Generate images with FLUX.1 [dev] or [schnell] (text-to-image or image-to-image).

    Inputs follow Replicate's flux-dev / flux-schnell predictors.  Their
    `disable_safety_checker` is the `safety_check` node and `output_format` /
    `output_quality` belong to the `save` node.  `prompt` may be a list:
    every prompt gets `num_outputs` images, batched as memory allows.  Every
    image records its prompt and seed; image i of every prompt uses seed + i,
    so each one is reproducible on its own.  Sizes go beyond Replicate's 1440
    cap, to 2048 per side; above about 2 MP (FLUX.1's training resolution) a
    warning is logged.
    """
    if model.kind != "flux":
        raise NodeError(f"sample needs a FLUX model, got a '{model.kind}' model", key="model")
    variant = model.info.get("variant", "dev")
    steps, guide = check_variant(variant, num_inference_steps, guidance)
    prompts = prompt_list(prompt)
    inputs = read_images(image) if image is not None else None
    try:
        gen, final = plan_size(aspect_ratio, megapixels, width, height)
    except ValueError as exc:
        raise NodeError(str(exc), key="aspect_ratio", hint="use one of " + ", ".join(ASPECT_RATIOS) + " or custom") from exc
    jobs = make_jobs(prompts, inputs, lambda img: size_like(img.size, megapixels) if img is not None else gen)
    _warn_size(ctx, jobs, model)
    seed = secrets.randbelow(2**32) if seed is None else seed
    adapters = scaled_adapters(model.adapters, lora_scale)
    if lora_scale is not None and not adapters:
        ctx.log("lora_scale has no effect: the model has no LoRA", level="warning")
    meta = {"model": model.ref, "variant": variant, "aspect_ratio": aspect_ratio, "megapixels": megapixels,
            "num_outputs": num_outputs, "num_inference_steps": steps, "guidance": guide, "go_fast": go_fast,
            "loras": [{"file": Path(a["path"]).name, "scale": a["scale"]} for a in adapters]}
    if lora_scale is not None:
        meta["lora_scale"] = lora_scale
    if cache_threshold > 0:
        meta["cache_threshold"] = cache_threshold
    tally = prompt_cache.Tally()
    made = _make(ctx, model, adapters, jobs, Settings(variant, num_outputs, steps, guide, seed, prompt_strength,
                                                      cache_threshold, tally), go_fast, image is not None)
    if (line := tally.message()) is not None:
        ctx.log(line)
    out = Images()
    for k, (job, j, pic, timing) in enumerate(made):
        size = final if job.init is None else job.size
        item_meta = {**meta, "prompt": job.prompt, "width": size[0], "height": size[1], "seed": seed + j,
                     "base_seed": seed, "index": k, "prompt_index": job.prompt_index, "timing": timing,
                     "node": ctx.node, "node_type": ctx.type}
        if job.init is not None:
            item_meta.update(image=job.init_label, prompt_strength=prompt_strength)
        out.append(ImageItem(image=centre_crop(pic, size), seed=seed + j, prompt=job.prompt,
                             name=image_name(ctx.node, seed + j, job.prompt_index, len(jobs)), meta=item_meta))
    return out


def image_name(node: str, seed: int, job: int, jobs: int) -> str:
    """``<node>-<seed>``; with several prompts or input images, whose images share seeds, ``<node>-<n>-<seed>``
    (``n`` the prompt's or input image's place, from 1), so every image of a node has a name of its own."""
    return f"{node}-{seed}" if jobs == 1 else f"{node}-{job + 1}-{seed}"


def _make(ctx: RunContext, model: Model, adapters: list[dict[str, Any]], jobs: list[Job], s: Settings,
          go_fast: bool, img2img: bool) -> list[tuple[Job, int, Any, dict[str, Any]]]:
    if img2img and s.strength == 0.0:
        from PIL import Image

        ctx.log("prompt_strength = 0: returning the input image unchanged (resized)")
        return [(job, j, job.init.resize(job.size, Image.Resampling.LANCZOS), {}) for job in jobs for j in range(s.n)]
    pipe = get_pipeline(model)
    t0 = time.perf_counter()
    with adapter_errors(model, "setting up this model's LoRAs"):
        prepare(pipe, adapters, go_fast, ctx.device, adapter_loader(pipe, ctx.log), fast=True, log=ctx.log)
    prepared = time.perf_counter() - t0
    before = fast.compile_seconds() if ctx.device == "cuda" else {}
    graphs = graphed.stats(pipe.transformer)  # None where no whole-step graphs are installed
    graphs_before = graphs.copy() if graphs else None
    if parallel.splits_images(model):  # several ranks: each makes its share of the images
        made = parallel.generate_split(ctx, pipe, jobs, s, generate)
    else:
        made = generate(ctx, pipe, jobs, s)  # context parallel: every rank works on every image
    _log_compile(ctx, before, prepared, made[0][3] if made else {})
    if graphs and graphs_before and (line := graphs.since(graphs_before)):
        ctx.log(line)
    return made


def _log_compile(ctx: RunContext, before: dict[str, float], prepared: float, timing: dict[str, Any]) -> None:
    """Say how long torch.compile took in this call (the first image of a size in a process pays it), and where
    the first batch's time went."""
    after = fast.compile_seconds() if before else {}
    spent = {k: after[k] - before.get(k, 0.0) for k in after}
    if spent.get("compile", 0.0) >= 0.5:
        saved = int(spent.get("saved", 0))
        ctx.log(f"torch.compile: {spent['compile']:.1f} s in this call (Inductor {spent['inductor']:.1f} s; "
                "from the compile cache where it was warm)" + (
                    f"; {saved} variant(s) saved precompiled for later processes" if saved else ""))
    if spent.get("waited", 0.0) >= 1:
        ctx.log(f"waited {spent['waited_s']:.1f} s for {int(spent['waited'])} block variant(s) that helper processes "
                "compiled while the model loaded (loaded, not compiled here)")
    slow_start = timing.get("first_step_s", 0.0) > 3 * timing.get("seconds_per_step", 0.0)
    if before and "first_step_s" in timing and (spent.get("compile", 0.0) >= 0.5 or slow_start):
        total = timing["seconds_per_image"] * timing["batch"]
        ctx.log(f"first batch: preparing the pipeline {prepared:.2f} s, to the end of its first step "
                f"{timing['first_step_s']:.2f} s (text encoders, the step and any compilation), after its last "
                f"step {timing['after_steps_s']:.2f} s (VAE decode, images), of {total:.2f} s")


def _warn_size(ctx: RunContext, jobs: list[Job], model: Model) -> None:
    limit = int(model.info.get("training_pixels") or TRAINING_PIXELS)
    w, h = max((job.size for job in jobs), key=lambda wh: wh[0] * wh[1])
    if w * h > limit:
        ctx.log(f"{w}x{h} ({w * h / 1e6:.1f} MP) is above the model's training resolution (about "
                f"{limit / 1e6:.1f} MP): expect repeated subjects or broken composition; sample at up to 2 MP and "
                "upscale instead if it shows", level="warning")
