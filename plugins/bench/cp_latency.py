"""Context-parallel latency for ``fluxkiln bench --gpus N``: one image on one GPU vs split over N, side by side.

One call measures every variant on the same machine, so the numbers decide
which to use: one GPU (rank 0 alone, the others waiting) eager and with the
project's lossless fast path (regionally compiled blocks), then fluxkiln's own
context parallelism (:mod:`fluxkiln.plugins.flux.context`: ``ulysses``,
``allgather`` and, on request, ``overlap``) and diffusers' stock Ulysses (``diffusers``, last: it cannot be
switched off again), each eager and compiled.  What is timed is the
transformer's work for one image: the pipeline's denoising loop
(``output_type="latent"``) with the prompt embeddings given, as the stock
numbers were taken.  Each variant's latents are compared with one GPU's
(``max_rel_diff``): context parallelism is lossless up to float rounding.
With ``--profile`` one denoising step of each variant that ran (the
transformer called with the inputs of the image's first step) is profiled on
rank 0 (:mod:`.step_profile`), under ``"profile"``.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator
from typing import Any
from unittest import mock

VARIANTS = ("one-eager", "one-compiled", "ulysses-eager", "ulysses-compiled", "allgather-compiled",
            "diffusers-eager", "diffusers-compiled")
# on request (--cp-variants); -graphs: compiled blocks in CUDA-graph mode (reduce-overhead), the collectives
# captured with them: is a split image launch-bound once each rank's kernels are small?
# overlap-*: the all-gather of k/v running beside attention to the rank's own tokens (merged by log-sum-exp)
# -steps: compiled blocks and each whole transformer call one CUDA graph (.graphed, the split's hooks and
# exchanges recorded with it), with every step's modulation computed as the image starts (.modulation), as
# ``sample`` runs on a GPU
EXTRA_VARIANTS = ("allgather-eager", "ulysses-whole", "one-graphs", "allgather-graphs", "ulysses-graphs",
                  "overlap-eager", "overlap-compiled", "overlap-graphs", "one-steps", "allgather-steps",
                  "ulysses-steps", "overlap-steps")
# any compiled variant may add one: +noreorder: without Inductor's compute/communication reordering passes, which
# a split transformer turns on (context.REORDER); +sched: Inductor's overlap scheduler besides
OPTIONS = {"noreorder": {}, "sched": {"aten_distributed_optimizations.enable_overlap_scheduling": True}}
CPU_VARIANTS = ("one-eager", "ulysses-eager", "allgather-eager", "overlap-eager", "diffusers-eager")


class CpLatency:
    """The context-parallel measurements of one bench run (every rank runs this; rank 0 keeps the numbers)."""

    def __init__(self, many: Any, variants: list[str]) -> None:
        self.m, self.pipe, self.world = many, many.pipe, many.world
        self.cuda = many.device == "cuda"
        self.variants = variants
        self.reference: Any = None
        self.profiler = many.profiler
        self.profiles: dict[str, Any] = {}
        self.inputs: tuple[tuple[Any, ...], dict[str, Any]] | None = None  # one denoising step's, for --profile
        self._hook: Any = None

    def run(self) -> dict[str, Any]:
        import torch

        import torch.distributed as dist

        with torch.no_grad():
            embeds = self.pipe.encode_prompt(prompt="a lighthouse on a cliff at dusk", prompt_2=None,
                                             max_sequence_length=512 if not self.m.tiny else 32)[:2]
        # rank 0's embeddings everywhere: split ranks must see one prompt (an encoder left in training mode,
        # e.g. with dropout, would give each rank its own)
        self.embeds = [t.contiguous() for t in embeds]
        for t in self.embeds:
            dist.broadcast(t, src=0)
        out: dict[str, Any] = {
            "what": f"one image's denoising loop: {self.m.steps} steps at {self.m.size}x{self.m.size}, prompt "
                    "embeddings given, no VAE decode (the transformer's work)",
            "size": self.m.size, "steps": self.m.steps, "ranks": self.world.size, "variants": {}}
        if self.profiler is not None:
            self._hook = self.pipe.transformer.register_forward_pre_hook(self._capture, with_kwargs=True,
                                                                         prepend=True)  # before a split cuts them
        try:
            for name in self.variants:
                try:
                    out["variants"][name] = self._variant(name)
                except Exception as exc:  # noqa: BLE001 - every rank fails alike (same code, same shapes)
                    out["variants"][name] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
                if self.world.owner:  # as it goes: a run cut short still shows what it measured
                    print(f"context parallel {name}: {json.dumps(out['variants'][name])}", flush=True)
        finally:
            self._unhook()
        out.update(summary(out["variants"]))
        if self.profiler is not None:
            out["profile"] = self.profiles
        return out

    def _capture(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if self.inputs is None:
            self.inputs = (tuple(args), dict(kwargs))

    def _unhook(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def _step(self) -> None:
        """One denoising step's transformer call (the inputs of the image's first step)."""
        import torch

        assert self.inputs is not None, "the step's inputs are captured while the image is made"
        args, kwargs = self.inputs
        with torch.no_grad():
            self.pipe.transformer(*args, **kwargs)

    def _profile(self, name: str, kind: str) -> None:
        assert self.profiler is not None
        if kind == "one":
            got = self.profiler.alone(f"cp {name}", self._step)
        else:  # rank 0's profile: the others take part in the same collectives
            got = (self.profiler.together(f"cp {name}", self._step, every_rank=False) or [None])[0]
        if got is not None:
            self.profiles[name] = got

    # ------------------------------------------------------------------ one variant
    def _variant(self, name: str) -> dict[str, Any]:
        kind, how = name.split("-", 1)
        how, _, option = how.partition("+")
        if option and not self.cuda:
            return {"skipped": "Inductor's options are measured on CUDA GPUs only"}
        with _option(option):
            return self._measure(name, kind, how) | ({"option": option} if option else {})

    def _measure(self, name: str, kind: str, how: str) -> dict[str, Any]:
        if not self.cuda and how != "eager":
            return {"skipped": "compiled variants are measured on CUDA GPUs only"}
        if not self.cuda and kind == "diffusers":
            return {"skipped": "diffusers' context parallelism builds its device mesh on an accelerator: it needs "
                               "CUDA GPUs"}
        if kind == "diffusers" and getattr(self.pipe, "_fluxkiln_context_parallel_mode", None) != "diffusers":
            from fluxkiln.plugins.flux import parallel

            parallel.enable(self.pipe, self.world.size, "diffusers")  # for good: measured last
        off = self._switch_on(kind)
        try:
            self._compile(how)
            run = self.m._alone if kind == "one" else self.m._together
            latents: list[Any] = []
            warm = run(lambda: latents.append(self._image()))  # compiles where compiled
            if self.inputs is not None:  # captured: out of compiled code's way from now on
                self._unhook()
            timed = run(lambda: latents.append(self._image()))
            if self.profiler is not None:
                self._profile(name, kind)
        finally:
            self._compile("eager")
            off()
        res: dict[str, Any] = {"s": _r(timed), "first_s": _r(warm)}
        if self.world.owner and latents:
            if name == "one-eager" or self.reference is None:
                self.reference = latents[-1].float()
            res["max_rel_diff"] = float(f"{_rel_diff(latents[-1].float(), self.reference):.3g}")
        return res

    def _switch_on(self, kind: str) -> Callable[[], None]:
        if kind not in ("ulysses", "allgather", "overlap"):
            return lambda: None
        from fluxkiln.plugins.flux import context

        context.enable(self.pipe.transformer, self.world.size, kind)
        return lambda: context.disable(self.pipe.transformer)

    def _compile(self, how: str) -> None:
        import torch

        from fluxkiln.plugins.flux import fast, modulation

        tr = self.pipe.transformer
        modulation.remove(tr)
        fast.uncompile_blocks(tr)
        if getattr(tr, "_compiled_call_impl", None) is not None:
            tr._compiled_call_impl = None
        torch._dynamo.reset()
        if how == "compiled":
            fast.compile_blocks(tr)
        elif how == "graphs":
            _in_graph_mode(lambda: fast.compile_blocks(tr))
        elif how == "steps":
            from fluxkiln.plugins.flux import graphed

            fast.compile_blocks(tr)
            graphed.install(tr)
            if not modulation.disabled():
                modulation.install(tr)
        elif how == "whole":  # the whole transformer as one graph per rank (hooks and collectives inside)
            fast.setup_compile_cache()
            tr.compile(dynamic=False)

    def _image(self) -> Any:
        import torch

        from fluxkiln.plugins.flux import modulation

        with torch.no_grad(), modulation.steps(self.pipe):
            return self.pipe(prompt_embeds=self.embeds[0], pooled_prompt_embeds=self.embeds[1], width=self.m.size,
                             height=self.m.size, num_inference_steps=self.m.steps, guidance_scale=3.5,
                             generator=torch.Generator("cpu").manual_seed(0), output_type="latent").images


@contextlib.contextmanager
def _option(option: str) -> Iterator[None]:
    """A variant's ``+option`` (:data:`OPTIONS`) in force: Inductor's settings, and ``FLUXKILN_CP_REORDER``."""
    if not option:
        yield
        return
    import torch

    reorder = "0" if option == "noreorder" else os.environ.get("FLUXKILN_CP_REORDER", "1")
    with torch._inductor.config.patch(OPTIONS[option]), mock.patch.dict(os.environ, {"FLUXKILN_CP_REORDER": reorder}):
        yield


def _in_graph_mode(compile_: Callable[[], Any]) -> None:
    """Compile in Inductor's reduce-overhead mode (CUDA graphs); the environment is as it was afterwards."""
    with mock.patch.dict(os.environ, {"FLUXKILN_COMPILE_MODE": "reduce-overhead"}):
        compile_()


def _rel_diff(a: Any, b: Any) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def _r(x: float | None, digits: int = 4) -> float | None:
    return None if x is None else round(x, digits)


def summary(variants: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Each variant's ratio to one GPU in the same mode (``-graphs`` without ``one-graphs``: to one GPU compiled),
    and the best split one against one GPU's fastest."""
    def secs(name: str) -> float | None:
        return variants.get(name, {}).get("s")

    out: dict[str, Any] = {}
    for name, v in variants.items():
        kind, how = name.split("-", 1)
        how = how.partition("+")[0]
        base = secs(f"one-{'compiled' if how == 'whole' else how}") or (secs("one-compiled") if how in
                                                                         ("graphs", "steps") else None)
        if kind != "one" and v.get("s") and base:
            v["ratio"] = _r(v["s"] / base, 3)
    one = min((s for n in variants if n.startswith("one-") and (s := secs(n))), default=None)
    split = [(v["s"], n) for n, v in variants.items() if not n.startswith("one-") and v.get("s")]
    if one and split:
        s, name = min(split)
        out["best"] = {"variant": name, "s": s, "one_s": one, "ratio": _r(s / one, 3)}
    stock = [(v["s"], n) for n, v in variants.items() if n.startswith("diffusers-") and v.get("s")]
    if one and stock:
        s, name = min(stock)
        out["stock_best"] = {"variant": name, "s": s, "one_s": one, "ratio": _r(s / one, 3)}
    return out
