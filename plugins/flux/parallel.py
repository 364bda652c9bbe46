"""Context parallelism for ``load_model``: the tokens of one image split over several processes.

``load_model``'s ``context_parallel = N`` turns it on for a run of N processes
(``fluxkiln run --gpus N``): every rank holds the whole transformer and
computes 1/N of the image's tokens.  ``context_parallel_mode`` picks how
attention reaches the other ranks' tokens: fluxkiln's own compile-friendly
path (:mod:`.context`: ``ulysses``, ``allgather``, ``overlap`` (all-gather
beside the local attention), or ``auto`` choosing by head count; runs on CPU
with gloo too), or ``diffusers`` — diffusers' stock
``ContextParallelConfig(ulysses_degree=N)``, kept as the baseline (CUDA only).
Every rank then makes the same images, so ``sample`` does not split them
across ranks, and the ranks agree on a cancel at every step.
"""

from __future__ import annotations

from typing import Any

from fluxkiln.engine import NodeError, distributed


def check(degree: int, device: str, mode: str = "auto") -> None:
    """Refuse a context-parallel degree this run cannot use (wrong number of processes, no GPU for diffusers')."""
    if degree == 1:
        return
    size = distributed.current().size
    if size != degree:
        raise NodeError(f"context_parallel = {degree} needs {degree} processes, one per GPU; this run has {size}",
                        key="context_parallel", hint=f"run with fluxkiln run RECIPE --gpus {degree} (or torchrun "
                        f"--nproc-per-node {degree} -m fluxkiln run RECIPE), or set context_parallel = 1")
    if mode == "diffusers" and device != "cuda":
        raise NodeError("context_parallel_mode = \"diffusers\" needs CUDA GPUs: diffusers' context parallelism "
                        "runs on an accelerator, and this machine has none", key="context_parallel_mode",
                        hint='use context_parallel_mode = "auto" (fluxkiln\'s own, which also runs on CPU)')


def enable(pipe: Any, degree: int, mode: str = "auto") -> Any:
    """Split the transformer's tokens over ``degree`` ranks (see the module doc for ``mode``)."""
    if degree > 1:
        if mode == "diffusers":
            from diffusers import ContextParallelConfig

            pipe.transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=degree))
            chosen = "diffusers"
        else:
            from . import context

            try:
                chosen = context.enable(pipe.transformer, degree, mode).mode
            except ValueError as exc:
                raise NodeError(str(exc), key="context_parallel_mode") from exc
        pipe._fluxkiln_context_parallel = degree
        pipe._fluxkiln_context_parallel_mode = chosen
    return pipe


def every_rank_works(pipe: Any) -> bool:
    """True when every rank takes part in each image (context parallel): collectives at every step."""
    return int(getattr(pipe, "_fluxkiln_context_parallel", 1)) > 1 and distributed.current().many


def splits_images(model: Any) -> bool:
    """True when a sample's images go to different ranks (data parallel), False when all ranks share each image."""
    return int(model.info.get("context_parallel", 1)) == 1


def generate_split(ctx: Any, pipe: Any, jobs: list[Any], s: Any, generate: Any) -> list[tuple[Any, int, Any, Any]]:
    """Data parallel: the images of a call (every prompt/input × ``s.n``) split across ranks, in order on rank 0.

    Each rank makes a contiguous share of the images with the same seeds a single process would use
    (image j of a job has seed ``s.seed + j``), so the gathered images are those of a one-process run.
    """
    if not distributed.current().many:
        return generate(ctx, pipe, jobs, s)
    import dataclasses

    units = [(k, j) for k in range(len(jobs)) for j in range(s.n)]
    index = {id(job): k for k, job in enumerate(jobs)}

    def work(part: range) -> list[tuple[int, int, Any, Any]]:
        by_job: dict[int, list[int]] = {}
        for k, j in (units[i] for i in part):
            by_job.setdefault(k, []).append(j)
        portions: dict[tuple[int, int], list[int]] = {}  # (first j, last j + 1) -> jobs with that share
        for k, js in by_job.items():
            portions.setdefault((js[0], js[-1] + 1), []).append(k)
        made = []
        for (j0, j1), ks in portions.items():
            sub = dataclasses.replace(s, n=j1 - j0, seed=s.seed + j0)
            made += [(index[id(job)], j + j0, pic, timing) for job, j, pic, timing in
                     generate(ctx, pipe, [jobs[k] for k in ks], sub)]
        return sorted(made, key=lambda m: (m[0], m[1]))

    return [(jobs[k], j, pic, timing) for k, j, pic, timing in distributed.run_shard(work, len(units), log=ctx.log)]
