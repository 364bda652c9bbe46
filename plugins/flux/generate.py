"""Run a FLUX pipeline for one ``sample`` call: several prompts and input images, batched as memory allows.

A call is a list of :class:`Job` values (a prompt, optionally an input image);
each job makes ``n`` images with seeds ``seed .. seed + n - 1``, so a prompt
list and a sweep over prompts make the same pictures.  Jobs of one size go
through the pipeline together, up to :data:`BATCH_PIXELS` pixels per batch; a
batch that runs out of GPU memory is split in two and retried.  Each image
records how long its batch took (``timing``), for reports: in all, per step, and
from the batch's start to the end of its first step (text encoders and the first
step, with any compilation) and from the end of its last step (VAE decode and
conversion to images).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from fluxkiln.engine import Cancelled, RunContext, distributed

from . import fast, modulation, prompt_cache
from .noise import noise_ahead
from .stepcache import step_cache

BATCH_PIXELS = 4 * 1024 * 1024  # pixels per pipeline call (4 images at 1 MP, 16 at 0.25 MP)
MAX_TEXT_TOKENS = {"dev": 512, "schnell": 256}


@dataclass
class Job:
    """One prompt (and input image, for image-to-image) that makes ``n`` images."""

    prompt: str
    prompt_index: int
    size: tuple[int, int]  # generated width, height (multiples of 16)
    init: Any = None  # PIL image, or None for text-to-image
    init_label: str | None = None


@dataclass
class Settings:
    """What every job of a call shares."""

    variant: str
    n: int
    steps: int
    guidance: float | None
    seed: int
    strength: float
    cache_threshold: float = 0.0  # the step cache (lossy); 0 = off
    prompts: prompt_cache.Tally | None = None  # counts what the prompt cache served (None: a throwaway tally)


def steps_run(steps: int, init: Any, strength: float) -> int:
    """How many denoising steps diffusers runs (image-to-image skips the first ones)."""
    if init is None or strength >= 1.0:
        return steps
    return steps - int(max(steps - min(steps * strength, steps), 0))


def batches(jobs: list[Job], n: int) -> list[list[Job]]:
    """Consecutive jobs of one size and kind, at most BATCH_PIXELS worth of images each (at least one job)."""
    out: list[list[Job]] = []
    for job in jobs:
        last = out[-1] if out else None
        fits = last is not None and (len(last) + 1) * n * job.size[0] * job.size[1] <= BATCH_PIXELS
        if last is not None and fits and last[0].size == job.size and (last[0].init is None) == (job.init is None):
            last.append(job)
        else:
            out.append([job])
    return out


class _Progress:
    """Steps over all batches of a call, as one progress bar; checks for cancellation every step."""

    def __init__(self, ctx: RunContext, total: int) -> None:
        self.ctx, self.total, self.done = ctx, total, 0
        self.ends: list[float] = []  # the host's clock at each step's end, in the current batch
        ctx.progress(0, total)

    def callback(self) -> Any:
        def on_step_end(pipe: Any, step: int, timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            from . import parallel

            self.ends.append(time.perf_counter())
            self.ctx.progress(self.done + step + 1, self.total)
            if parallel.every_rank_works(pipe):  # context parallel: the ranks stop at the same step or not at all
                if distributed.any_rank(self.ctx.cancelled):
                    raise Cancelled(f"node '{self.ctx.node}' cancelled")
            else:
                self.ctx.check_cancelled()
            return {}
        return on_step_end


def generate(ctx: RunContext, pipe: Any, jobs: list[Job], s: Settings) -> list[tuple[Job, int, Any, dict[str, Any]]]:
    """(job, output index, PIL image, timing) for every image, in job order."""
    groups = batches(jobs, s.n)
    progress = _Progress(ctx, sum(steps_run(s.steps, g[0].init, s.strength) for g in groups))
    out = []
    for group in groups:
        out += _batch(ctx, pipe, group, s, progress)
    return out


def _batch(ctx: RunContext, pipe: Any, group: list[Job], s: Settings,
           progress: _Progress) -> list[tuple[Job, int, Any, dict[str, Any]]]:
    import torch

    t0 = time.perf_counter()
    progress.ends = []
    try:
        with step_cache(pipe.transformer, s.cache_threshold) as count:
            pics = to_pil(_call(ctx, pipe, group, s, progress))
    except torch.cuda.OutOfMemoryError:
        if len(group) == 1:
            raise
        torch.cuda.empty_cache()
        half = len(group) // 2
        ctx.log(f"out of GPU memory with {len(group) * s.n} images in one batch; retrying in two batches")
        return _batch(ctx, pipe, group[:half], s, progress) + _batch(ctx, pipe, group[half:], s, progress)
    seconds = time.perf_counter() - t0
    steps = steps_run(s.steps, group[0].init, s.strength)
    progress.done += steps
    timing = {"seconds_per_image": round(seconds / len(pics), 4), "seconds_per_step": round(seconds / steps, 4),
              "batch": len(pics), "steps": steps}
    if progress.ends:  # host clock: the GPU may still be working when a step's callback runs
        timing.update(first_step_s=round(progress.ends[0] - t0, 3),
                      after_steps_s=round(t0 + seconds - progress.ends[-1], 3))
    if s.cache_threshold > 0:
        timing.update(count.as_dict())
    peak = _peak_gib()
    if peak is not None:
        timing["peak_gpu_gib"] = peak
    return [(job, j, pics[k * s.n + j], timing) for k, job in enumerate(group) for j in range(s.n)]


def _peak_gib() -> float | None:
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None


def text_tokens(pipe: Any, variant: str) -> int:
    """T5 tokens to pad prompts to: the variant's maximum, or less where the model's tokenizer is shorter
    (mini-flux is trained on 64)."""
    limit = getattr(getattr(pipe, "tokenizer_2", None), "model_max_length", None)
    return min(MAX_TEXT_TOKENS[variant], limit) if isinstance(limit, int) and limit > 0 else MAX_TEXT_TOKENS[variant]


def _call(ctx: RunContext, pipe: Any, group: list[Job], s: Settings, progress: _Progress) -> list[Any]:
    import torch

    w, h = group[0].size
    seeds = [s.seed + j for _ in group for j in range(s.n)]
    generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
    common: dict[str, Any] = dict(
        width=w, height=h, num_inference_steps=s.steps, guidance_scale=s.guidance if s.guidance is not None else 0.0,
        generator=generators, max_sequence_length=text_tokens(pipe, s.variant), output_type="pt")
    run = pipe
    if group[0].init is not None and s.strength < 1.0:
        from PIL import Image

        run = img2img_pipe(pipe)
        # one copy per output, so image j's VAE sampling and noise both come from seed + j
        common.update(image=[job.init.resize((w, h), Image.Resampling.LANCZOS) for job in group for _ in range(s.n)],
                      strength=s.strength)

    def images() -> Any:  # the prompts are encoded (or taken from the cache) in the same attention settings
        # noise drawn ahead for a plain FluxPipeline only (not image-to-image); modulation tables for either
        with noise_ahead(run, (w, h), generators, seeds), modulation.steps(run):
            return run(**common, **_prompt_args(pipe, run, group, s, common["max_sequence_length"]),
                       callback_on_step_end=progress.callback()).images

    # no_grad, not inference_mode: with CPU offload the weights moved under inference_mode would become
    # inference tensors, and later LoRA changes on them fail
    with torch.no_grad():
        if ctx.device != "cuda" or fast.compile_disabled():
            return images()
        try:
            with kernels(ctx.device):
                return images()
        except RuntimeError as exc:  # a cuDNN attention failure: the standard kernels still work
            if "cudnn" not in str(exc).lower():
                raise
            ctx.log(f"cuDNN attention failed ({str(exc).splitlines()[0]}); retrying with the flash kernels",
                    level="warning")
            for g, seed in zip(generators, seeds, strict=True):
                g.manual_seed(seed)
            return images()


def kernels(device: str) -> Any:
    """The attention kernels sampling runs under: cuDNN's first on a GPU with the fast path (the precompiled blocks
    of :mod:`.ahead`'s helpers are traced under the same), nothing special otherwise."""
    import contextlib

    return fast.attention_first_cudnn() if device == "cuda" and not fast.compile_disabled() else contextlib.nullcontext()


def _prompt_args(pipe: Any, run: Any, group: list[Job], s: Settings, tokens: int) -> dict[str, Any]:
    """The group's prompts as cached embeddings (``s.n`` rows per prompt, in order), or as text when the prompt
    cache cannot be used."""
    prompts = [job.prompt for job in group]
    tally = s.prompts if s.prompts is not None else prompt_cache.Tally()
    why = prompt_cache.usable(pipe, run)
    found = None if why else prompt_cache.embeddings(pipe, prompts, tokens, tally)
    if found is None:
        tally.skipped = tally.skipped or why
        return dict(prompt=prompts, num_images_per_prompt=s.n)
    # diffusers repeats only embeddings it computes itself: the images of one prompt are consecutive
    embeds, pooled = (t.repeat_interleave(s.n, dim=0) for t in found)
    return dict(prompt_embeds=embeds, pooled_prompt_embeds=pooled, num_images_per_prompt=1)


def to_pil(images: Any) -> list[Any]:
    """The pipeline's images in [0, 1] (``output_type="pt"``, on its device) as PIL images.

    The same arithmetic as diffusers' ``output_type="pil"`` (float32 × 255, rounded half to even, uint8), done
    where the images are: a GPU then copies a quarter of the bytes and the CPU does no float work (about 50 ms
    less for a 1024² image than converting on the CPU)."""
    import torch
    from PIL import Image

    pixels = (images.float() * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().cpu().numpy()
    return [Image.fromarray(p.squeeze(-1), mode="L") if p.shape[-1] == 1 else Image.fromarray(p) for p in pixels]


def img2img_pipe(pipe: Any) -> Any:
    """The same modules in an image-to-image pipeline (made once per pipeline)."""
    from diffusers import FluxImg2ImgPipeline

    from .load import quiet_loading

    cached = getattr(pipe, "_fluxkiln_img2img", None)
    if cached is None:
        # not from_pipe(), which casts every shared module to float32 unless told a dtype (and would undo fp8
        # storage when told one)
        with quiet_loading():
            cached = FluxImg2ImgPipeline(**pipe.components)
        cached.set_progress_bar_config(disable=True)
        object.__setattr__(pipe, "_fluxkiln_img2img", cached)
    return cached
