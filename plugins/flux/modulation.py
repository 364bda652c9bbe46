"""Every step's modulation at once: a FLUX transformer's AdaLayerNorm linears computed for all the steps of a
sampling call in one batched pass as the call starts, then looked up step by step.

Each FLUX step multiplies one vector per image (its timestep's, guidance's and pooled prompt's embedding) by the
modulation weights of every block — each block's shift, scale and gate, and the output norm's: 95 matrices and
6.5 GB of bf16 weights in FLUX.1-dev — so each step reads all those weights to make one row per image.  A
sampling call's timesteps are known before its first step (the scheduler's), and so are its guidance and pooled
prompt: computing every step's rows together reads the weights once a call instead of once a step.  On an H200,
dev ``go_fast`` at 28 steps took 2.558 s an image with it against 2.650 s without (docs/performance.md).  The same
layers compute the same products, in batches of another size (so not bit for bit the per-step results: the GEMMs
may sum in another order).

* :func:`install` puts a :class:`~.tabled.Tabled` in place of each modulation linear; its forward returns its
  ``rows`` buffer, one row per image, which each call fills first.
* :func:`fill` runs before every call of the transformer (:class:`.graphed.WholeStep` calls it, outside any
  recorded graph): inside :func:`steps` it builds the call's table at its first step and copies a step's rows
  into the buffers in one kernel, finding the step on the GPU (no synchronisation); elsewhere it computes this
  call's rows alone, as the blocks would have.
* :func:`steps` arms the table for one pipeline call (``sample``'s and the quality guard's): its scheduler's
  timesteps are the table's steps.  A call whose timesteps do not match the scheduler's (checked at the table's
  first step) or whose pooled prompt changes between steps (true classifier-free guidance) gets rows computed
  call by call instead.

The rows' buffers are kept per batch size (a recorded graph reads them where they were), and each Tabled's is
its own contiguous tensor, the layout a transformer of any depth gives it (a helper's one-block transformer and
the run's compile the same block variant).  ``FLUXKILN_MODULATION_TABLE=0`` leaves the linears as they are.

Nothing here imports torch at module level.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from . import fast

ATTR = "_fluxkiln_modulation"


def disabled() -> bool:
    """``FLUXKILN_MODULATION_TABLE=0`` keeps each step's modulation in its block."""
    return fast.switched_off("FLUXKILN_MODULATION_TABLE")


@dataclass
class Stats:
    """What the tables did: tables built, calls served from one, calls whose rows were computed alone."""

    built: int = 0
    looked_up: int = 0
    computed: int = 0


@dataclass
class Table:
    """One sampling call's rows: ``rows[step]`` holds every Tabled's rows for that step, slot after slot."""

    key: tuple[Any, ...]  # what it was built from (see _table)
    timesteps: Any  # each step's timestep as the pipeline passes it to the transformer
    rows: Any  # (steps, batch * total width)


@dataclass
class State:
    """One transformer's modulation: its Tabled modules in call order, their row buffers and its current table."""

    tabled: list[Any]
    widths: list[int]
    buffers: dict[int, Any] = field(default_factory=dict)  # batch size -> one flat tensor, slot after slot
    batch: int | None = None  # the batch size the Tabled buffers are views of
    pipe: Any = None  # weakref to the armed pipeline (inside steps())
    table: Table | None = None
    unstable: Any = None  # weakref to a schedule whose calls are computed alone
    missed: Any = None  # on the device: whether a call served from the table found no row of its own
    stats: Stats = field(default_factory=Stats)

    @property
    def total(self) -> int:
        return sum(self.widths)


def _norms(transformer: Any) -> list[Any]:
    """The norms that modulate with the transformer's embedding, in call order."""
    found = []
    for block in getattr(transformer, "transformer_blocks", None) or []:
        found += [getattr(block, "norm1", None), getattr(block, "norm1_context", None)]
    for block in getattr(transformer, "single_transformer_blocks", None) or []:
        found.append(getattr(block, "norm", None))
    found.append(getattr(transformer, "norm_out", None))
    return [n for n in found if n is not None and hasattr(n, "linear") and getattr(n, "emb", None) is None]


def install(transformer: Any) -> int:
    """Put a Tabled in place of each modulation linear (once); returns how many there are."""
    from .tabled import Tabled

    st = getattr(transformer, ATTR, None)
    if st is not None:
        return len(st.tabled)
    norms = _norms(transformer)
    if not norms or not all(hasattr(n.linear, "out_features") for n in norms):
        return 0
    for norm in norms:
        norm.linear = Tabled(norm.linear)
    tabled = [n.linear for n in norms]
    setattr(transformer, ATTR, State(tabled, [t.out_features for t in tabled]))
    return len(tabled)


def remove(transformer: Any) -> int:
    """Put the linears back; returns how many."""
    st = getattr(transformer, ATTR, None)
    if st is None:
        return 0
    for norm in _norms(transformer):
        if norm.linear in st.tabled:
            norm.linear = norm.linear.original
    setattr(transformer, ATTR, None)
    return len(st.tabled)


def active(transformer: Any) -> bool:
    return getattr(transformer, ATTR, None) is not None


def stats(transformer: Any) -> Stats | None:
    st = getattr(transformer, ATTR, None)
    return st.stats if st is not None else None


@contextlib.contextmanager
def steps(pipe: Any) -> Iterator[None]:
    """Serve ``pipe``'s calls inside this block from tables of its scheduler's steps.

    Raises RuntimeError at the end when a call served from a table had a timestep the table does not list (its
    rows were another step's): checked once, as the block ends, so no step waits for the GPU."""
    st = getattr(getattr(pipe, "transformer", None), ATTR, None)
    if st is None:
        yield
        return
    st.pipe, st.table, st.unstable, st.missed = weakref.ref(pipe), None, None, None
    try:
        yield
        missed = st.missed is not None and bool(st.missed)
    finally:
        st.pipe, st.table, st.unstable, st.missed = None, None, None, None  # the table's memory is freed with it
    if missed:
        raise RuntimeError("a transformer call inside a sampling call had a timestep its scheduler does not list, "
                           "so its precomputed modulation was another step's: set FLUXKILN_MODULATION_TABLE=0 to "
                           "compute it step by step, and report this with the pipeline used")


_FORWARD_ARGS = ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "img_ids", "txt_ids",
                 "guidance")


def forward_inputs(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any, Any, Any]:
    """(hidden_states, timestep, guidance, pooled_projections) of a FluxTransformer2DModel call."""
    given = dict(zip(_FORWARD_ARGS, args, strict=False)) | kwargs
    return given.get("hidden_states"), given.get("timestep"), given.get("guidance"), given.get("pooled_projections")


def fill(transformer: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Write this call's modulation rows into the Tabled buffers (nothing when none are installed)."""
    st = getattr(transformer, ATTR, None)
    if st is None:
        return
    hidden, timestep, guidance, pooled = forward_inputs(args, kwargs)
    if hidden is None or timestep is None or pooled is None:
        raise TypeError("a transformer with precomputed modulation needs hidden_states, timestep and "
                        "pooled_projections in each call")
    import torch

    flat = _buffer(st, int(pooled.shape[0]))
    table = _table(st, transformer, hidden, timestep, guidance, pooled)
    with torch.no_grad():
        if table is None:
            st.stats.computed += 1
            temb = _embedding(transformer, hidden.dtype, timestep, guidance, pooled)
            for out, view in zip(_products(st, temb), _slots(st, flat, 1), strict=True):
                view.copy_(out.view(view.shape))
            return
        st.stats.looked_up += 1
        hit = table.timesteps == timestep.reshape(-1)[:1]
        torch.index_select(table.rows, 0, hit.to(torch.int32).argmax().view(1), out=flat.view(1, -1))
        missed = ~hit.any()
        st.missed = missed if st.missed is None else st.missed | missed


def _buffer(st: State, batch: int) -> Any:
    """The flat row buffer for ``batch`` images, with every Tabled's ``rows`` a view of its part."""
    flat = st.buffers.get(batch)
    first = st.tabled[0]
    if flat is not None and st.batch == batch and first.rows.data_ptr() == flat.data_ptr():
        return flat
    weight = next(first.original.parameters())
    if flat is None or flat.device != weight.device or flat.dtype != weight.dtype:
        import torch

        if flat is not None:  # moved or cast since: every batch size's buffer is stale
            st.buffers.clear()
        flat = st.buffers[batch] = torch.zeros(batch * st.total, dtype=weight.dtype, device=weight.device)
    for tabled, view in zip(st.tabled, _slots(st, flat, 1), strict=True):
        tabled._buffers["rows"] = view[0]  # not setattr: a registration would drop the recorded graphs
    st.batch = batch
    return flat


def _slots(st: State, flat: Any, steps: int) -> Iterator[Any]:
    """Each Tabled's part of ``flat`` (``(steps, batch * total)`` values) as a ``(steps, batch, width)`` view."""
    rows = flat.view(steps, -1)
    batch = rows.shape[1] // st.total
    start = 0
    for width in st.widths:
        yield rows[:, start:start + batch * width].view(steps, batch, width)
        start += batch * width


def _embedding(transformer: Any, dtype: Any, timestep: Any, guidance: Any, pooled: Any) -> Any:
    """The transformer's ``temb`` for these inputs, as its forward computes it."""
    timestep = timestep.to(dtype) * 1000
    if guidance is None:
        return transformer.time_text_embed(timestep, pooled)
    return transformer.time_text_embed(timestep, guidance.to(dtype) * 1000, pooled)


def _products(st: State, temb: Any) -> Iterator[Any]:
    """Each Tabled's linear applied to ``silu(temb)``, as its norm applies it."""
    import torch

    x = torch.nn.functional.silu(temb)
    for tabled in st.tabled:
        yield tabled.original(x)


def _ref(t: Any) -> tuple[Any, int] | None:
    """A tensor as a key part: a weak reference (a new tensor at a dead one's address is not the same) and its
    version (written in place since is not the same either)."""
    return None if t is None else (weakref.ref(t), t._version)


def _same(key: tuple[Any, ...], now: tuple[Any, ...]) -> bool:
    def part(p: Any) -> Any:
        if isinstance(p, tuple) and p and isinstance(p[0], weakref.ref):
            return ("gone",) if p[0]() is None else (id(p[0]()), p[1])
        return p

    return all(part(a) == part(b) for a, b in zip(key, now, strict=True))


def _table(st: State, transformer: Any, hidden: Any, timestep: Any, guidance: Any, pooled: Any) -> Table | None:
    """The armed call's table for these inputs, built at its first step; None to compute this call alone."""
    pipe = st.pipe() if st.pipe is not None else None
    schedule = getattr(getattr(pipe, "scheduler", None), "timesteps", None)
    if schedule is None or not hasattr(schedule, "shape") or schedule.ndim != 1:
        return None
    if st.unstable is not None and st.unstable() is schedule:
        return None
    key = (_ref(schedule), _ref(guidance), _ref(pooled), int(pooled.shape[0]), hidden.dtype, timestep.dtype)
    if st.table is not None and _same(st.table.key, key):
        return st.table
    schedule_ref = st.table.key[0][0] if st.table is not None else None
    if schedule_ref is not None and schedule_ref() is schedule:  # same steps, another prompt: true CFG's passes
        st.unstable, st.table = weakref.ref(schedule), None
        return None
    st.table = None
    table = _build(st, transformer, key, schedule, hidden, timestep, guidance, pooled)
    if table is None:
        st.unstable = weakref.ref(schedule)
    st.table = table
    return table


def _build(st: State, transformer: Any, key: tuple[Any, ...], schedule: Any, hidden: Any, timestep: Any,
           guidance: Any, pooled: Any) -> Table | None:
    """Every step's rows for this batch; None when this call's timestep is not one of the schedule's as the
    pipeline passes them (``t / 1000`` in the latents' dtype): then the table would not be the call's."""
    import torch

    with torch.no_grad():
        keys = schedule.to(device=timestep.device, dtype=timestep.dtype) / 1000
        if not bool((keys == timestep.reshape(-1)[:1]).any()):  # once a call: the one synchronisation
            return None
        n, batch = int(keys.shape[0]), int(pooled.shape[0])
        temb = _embedding(transformer, hidden.dtype, keys.repeat_interleave(batch),
                          None if guidance is None else guidance.repeat(n), pooled.repeat(n, 1))
        weight = next(st.tabled[0].original.parameters())
        rows = torch.empty(n, batch * st.total, dtype=weight.dtype, device=weight.device)
        for out, view in zip(_products(st, temb), _slots(st, rows, n), strict=True):
            view.copy_(out.view(view.shape))
    st.stats.built += 1
    return Table(key, keys, rows)
