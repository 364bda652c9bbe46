"""Whole denoising steps as CUDA graphs: a FLUX transformer call recorded once per input signature, then replayed.

With the blocks compiled (:mod:`.fast`) a lone forward still leaves the GPU waiting between kernels while
Python launches the next block, the embedders and the output layers.  Here the whole transformer call is one
graph.  The first call of a signature runs as usual (it compiles the blocks); the second runs on a side stream
with the inputs in buffers of its own and is then recorded into a graph; every later call copies its inputs
into those buffers and replays the graph: the same kernels in the same order, so the output is the ordinary
call's.  On an H200 a lone dev ``go_fast`` forward's GPU idle fell from 14.8 to 4.4 %, a whole image only
0.5 % (while sampling, the host already runs ahead of the GPU; docs/performance.md).

``sample``'s :func:`~.pipestate.prepare` installs it on CUDA with the blocks compiled in a mode without CUDA
graphs of its own, and drops the graphs whenever it changes the pipeline.  A call runs as before (never
recorded) when gradients or autocast are on, when the transformer or a block has hooks or a replaced
``forward`` (offloading, the step cache), with a non-empty ``joint_attention_kwargs`` or
``return_dict=True``, or with an input that is not a tensor, None, bool, int, float or str.  A graph reads
the weights where they were when it was recorded, so graphs are dropped when a module of the transformer gets
a new submodule or parameter (adapters, fp8 layers, fused projections; :mod:`.registrations`), when an
attention processor changes, or when a parameter moved (``.to()``).  A recording that fails leaves that
signature to ordinary calls, with a warning.  ``FLUXKILN_CUDA_GRAPHS=0`` turns the graphs off; the whole-step
call stays installed, since before every call, graphed or not, it fills the rows of the transformer's
precomputed modulation (:mod:`.modulation`), outside any graph.

Context parallelism's hooks (:mod:`.context`: split the inputs, gather the output) are recorded with the
rest, collectives included: every rank records the same call of a signature, so a split image's step is one
graph replay per rank too, where the host would otherwise fall behind GPUs that each do 1/N of the work.

Nothing here imports torch at module level.
"""

from __future__ import annotations

import gc
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fluxkiln.engine import distributed

from . import fast, modulation, registrations

CHANGES = registrations.Watch()  # registrations on graphed transformers (adapters, fp8 layers, fused projections)
MAX_GRAPHS = 4  # signatures (sizes, batches) kept per transformer; the least recently used is dropped
EAGER = "eager"  # a signature whose recording failed


def disabled() -> bool:
    """``FLUXKILN_CUDA_GRAPHS=0`` turns whole-step graphs off."""
    return fast.switched_off("FLUXKILN_CUDA_GRAPHS")


@dataclass
class Stats:
    """What one transformer's graphs did: recorded graphs, replays, calls run as usual, failed recordings."""

    recorded: int = 0
    replayed: int = 0
    ordinary: int = 0
    failed: list[str] = field(default_factory=list)

    def copy(self) -> Stats:
        return Stats(self.recorded, self.replayed, self.ordinary, list(self.failed))

    def since(self, before: Stats) -> str | None:
        """A line for the log about what happened after ``before``, when graphs were recorded or failed then."""
        recorded, failed = self.recorded - before.recorded, self.failed[len(before.failed):]
        if not recorded and not failed:
            return None
        calls = [self.replayed - before.replayed, self.ordinary - before.ordinary]
        line = (f"whole steps as CUDA graphs: {recorded} size(s) recorded; of {sum(calls) + recorded} transformer "
                f"calls {calls[0]} replayed, {calls[1]} run as usual")
        return line + (f"; recording failed ({failed[-1]}), so that size runs without" if failed else "")


def signature(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...] | None:
    """The call's tensors' shapes, dtypes and devices and its other values; None when it cannot be graphed."""
    from torch import Tensor

    def describe(v: Any) -> Any:
        if isinstance(v, Tensor):
            return ("T", tuple(v.shape), v.dtype, v.device)
        if v is None or isinstance(v, (bool, int, float, str)):
            return repr(v)
        if isinstance(v, dict) and not v:  # joint_attention_kwargs={}
            return "{}"
        raise TypeError(type(v).__name__)

    if kwargs.get("return_dict", True) is not False:
        return None
    try:
        return tuple(map(describe, args)), tuple((k, describe(v)) for k, v in sorted(kwargs.items()))
    except TypeError:
        return None


@dataclass
class Graph:
    """One recorded call: the graph, its input buffers (in call order) and its output."""

    graph: Any
    inputs: list[Any]
    output: tuple[Any, ...]

    def replay(self, tensors: list[Any]) -> tuple[Any, ...]:
        for buf, t in zip(self.inputs, tensors, strict=True):
            buf.copy_(t)
        self.graph.replay()
        return tuple(o.clone() for o in self.output)


def _tensors(args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Any]:
    from torch import Tensor

    return [v for v in (*args, *(kwargs[k] for k in sorted(kwargs))) if isinstance(v, Tensor)]


def _rebuild(args: tuple[Any, ...], kwargs: dict[str, Any], new: list[Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``args`` and ``kwargs`` with their tensors replaced, in :func:`_tensors`' order, by ``new``."""
    from torch import Tensor

    it = iter(new)
    args2 = tuple(next(it) if isinstance(v, Tensor) else v for v in args)
    kwargs2 = {k: next(it) if isinstance(kwargs[k], Tensor) else kwargs[k] for k in sorted(kwargs)}
    return args2, kwargs2


class WholeStep:
    """The transformer's call: replays a recorded graph where one fits, records one on a signature's second
    call, and otherwise calls the transformer as usual (``module._call_impl``)."""

    def __init__(self, module: Any, recorder: Callable[..., Graph] | None = None) -> None:
        import torch

        CHANGES.watch(module.modules())
        self.module, self.torch = module, torch
        self.record_graph = recorder or record
        self.graphs: OrderedDict[tuple[Any, ...], Graph | str] = OrderedDict()
        self.calls: dict[tuple[Any, ...], int] = {}
        self.stats = Stats()
        self.state: tuple[Any, ...] | None = None

    def reset(self) -> None:
        """Drop every graph (the next calls of each signature run as usual, then record again)."""
        self.graphs.clear()
        self.calls.clear()
        self.state = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        modulation.fill(self.module, args, kwargs)  # outside the graph: the rows its Tabled layers read
        key = self._key(args, kwargs)
        if key is None:
            self.stats.ordinary += 1
            return self.module._call_impl(*args, **kwargs)
        found = self.graphs.get(key)
        if isinstance(found, Graph):
            self.graphs.move_to_end(key)
            self.stats.replayed += 1
            return found.replay(_tensors(args, kwargs))
        self.calls[key] = seen = self.calls.get(key, 0) + 1
        if found == EAGER or seen < 2:
            self.stats.ordinary += 1
            return self.module._call_impl(*args, **kwargs)
        return self._record(key, args, kwargs)

    def _key(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...] | None:
        module = self.module
        if disabled() or not fast.plain_inference(self.torch, module) \
                or getattr(module, "is_cache_enabled", False):
            return None
        sig = signature(args, kwargs)
        if sig is None:
            return None
        state = self._state()
        if state is None:
            return None
        if state != self.state:
            self.reset()
            self.state = state
        return sig

    def _state(self) -> tuple[Any, ...] | None:
        """What the graphs depend on besides their inputs; None when a block has hooks (then nothing is graphed)."""
        parts = []
        for block in fast.blocks(self.module):
            if block._forward_hooks or block._forward_pre_hooks or "forward" in vars(block):
                return None
            parts.append(id(getattr(getattr(block, "attn", None), "processor", None)))
        params = [p for p in (next(m.parameters(), None) for m in self.module.children()) if p is not None]
        return (CHANGES.count, tuple(parts), tuple((p.data_ptr(), p.dtype) for p in params))

    def _record(self, key: tuple[Any, ...], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Run this call on the recording's own input buffers, then record it; returns this call's output.
        A context-parallel transformer's ranks agree: if one could not record, none keeps its graph (their
        replays and its ordinary calls would wait for each other's collectives forever)."""
        buffers = [t.clone() for t in _tensors(args, kwargs)]
        a2, k2 = _rebuild(args, kwargs, buffers)
        split = getattr(self.module, "_fluxkiln_context", None)
        error: Exception | None = None
        try:
            out, graph = self.record_graph(self.module._call_impl, a2, k2, buffers)
        except Exception as exc:  # noqa: BLE001 - a graph is an optimisation: the call itself must not fail
            error = exc
        if split is not None and not split.agree(error is None):
            error = error or RuntimeError("another rank of the context-parallel group could not record its part")
        if error is not None:
            self.graphs[key] = EAGER
            self.stats.failed.append(f"{type(error).__name__}: {error}")
            warnings.warn(f"recording the transformer call as a CUDA graph failed ({type(error).__name__}: {error}); "
                          "this size runs without it", RuntimeWarning, stacklevel=3)
            self.stats.ordinary += 1
            return self.module._call_impl(*args, **kwargs)
        self.graphs[key] = graph
        while sum(isinstance(g, Graph) for g in self.graphs.values()) > MAX_GRAPHS:
            self.graphs.pop(next(k for k, g in self.graphs.items() if isinstance(g, Graph)))
        self.stats.recorded += 1
        if split is not None:
            _WITH_COLLECTIVES.add(self)
            distributed.before_shutdown(release_collective_graphs)
        return out


_WITH_COLLECTIVES: weakref.WeakSet[WholeStep] = weakref.WeakSet()  # steps whose graphs recorded collectives


def release_collective_graphs() -> None:
    """Free every graph that recorded collectives: NCCL cannot destroy a communicator that a live CUDA graph
    still holds, so the process group is left only after this (:func:`fluxkiln.engine.distributed.shutdown`)."""
    for step in list(_WITH_COLLECTIVES):
        step.reset()
    _WITH_COLLECTIVES.clear()
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def record(call: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
           buffers: list[Any]) -> tuple[Any, Graph]:
    """Run ``call`` once on a side stream (this call's output; it also sets up the libraries' per-stream state),
    then record it into a CUDA graph on that stream."""
    import torch

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        out = call(*args, **kwargs)
    torch.cuda.current_stream().wait_stream(stream)
    if not (isinstance(out, tuple) and all(isinstance(o, torch.Tensor) for o in out)):
        raise TypeError(f"the call returned {type(out).__name__}, not a tuple of tensors")
    result = tuple(o.clone() for o in out)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):
        static = call(*args, **kwargs)
    return result, Graph(graph, buffers, tuple(static))


def install(transformer: Any) -> WholeStep | None:
    """Route the transformer's calls through :class:`WholeStep` (once); None where another compiled call is
    installed.  With graphs switched off it is installed all the same and calls the transformer as usual (after
    filling its precomputed modulation)."""
    current = getattr(transformer, "_compiled_call_impl", None)
    if isinstance(current, WholeStep):
        return current
    if current is not None:
        return None
    transformer._compiled_call_impl = step = WholeStep(transformer)
    return step


def remove(transformer: Any) -> None:
    """Call the transformer as usual again (its graphs are freed)."""
    if isinstance(getattr(transformer, "_compiled_call_impl", None), WholeStep):
        transformer._compiled_call_impl.reset()
        transformer._compiled_call_impl = None


def reset(transformer: Any) -> None:
    """Drop the transformer's graphs (prepare calls this whenever it changes the pipeline)."""
    if isinstance(getattr(transformer, "_compiled_call_impl", None), WholeStep):
        transformer._compiled_call_impl.reset()


def stats(transformer: Any) -> Stats | None:
    step = getattr(transformer, "_compiled_call_impl", None)
    return step.stats if isinstance(step, WholeStep) else None
