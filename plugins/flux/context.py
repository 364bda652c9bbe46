"""fluxkiln's own context parallelism for the FLUX transformer: one image's tokens split over N ranks.

Every rank holds the whole transformer and computes 1/N of the tokens — of the
image tokens *and* of the text tokens, so nothing is computed twice.  A
forward pre-hook cuts the transformer's inputs (``hidden_states``, ``img_ids``,
``encoder_hidden_states``, ``txt_ids``) into contiguous shares; rotary
embeddings follow from the ids, so every token keeps its own position.  Only
attention needs the other ranks' tokens; :class:`ContextAttnProcessor` (the
stock FLUX processor with the attention call replaced) exchanges them with
functional collectives (``torch.distributed._functional_collectives``), which
``torch.compile`` traces into the graph instead of breaking it:

- ``ulysses`` (heads divisible by N; on request): ONE all-to-all of the stacked q, k, v
  turns "my tokens, all heads" into "all tokens, my heads"; plain SDPA (the
  fast flash / cuDNN kernels, no log-sum-exp needed); one all-to-all back.
- ``allgather`` (any head count; ``auto``): the ranks all-gather k and v once and
  attend with their own queries (ring attention's result in one exchange).
- ``overlap`` (any head count): the same all-gather, started without waiting;
  meanwhile the queries attend to this rank's own keys, then to the other
  ranks' once they arrive, and the two parts merge exactly by their
  log-sum-exp (:mod:`.lse_attention`).  The wait is a separate op placed
  after the local attention, so the exchange runs beside it, eager and
  compiled.  Every key lives on exactly one rank (text tokens are split
  like image tokens), so local and remote keys are disjoint.

The order of the gathered keys differs from one process's (rank-major), which
attention does not see: the output equals one GPU's within float rounding.  A
forward hook all-gathers the output tokens at the end.  Inputs whose token
counts do not divide by N run unsplit on every rank (no exchange), so the
result is always right.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fluxkiln.engine import distributed

from . import attn_parts, fast

MODES = ("auto", "ulysses", "allgather", "overlap")
# Inductor's compute/communication reordering while a transformer is split: in each compiled block the exchange
# starts as soon as its input exists and is waited for only where attention needs it, with independent work (the
# single-stream blocks' MLP projection) scheduled between.  2 x H200, 28 steps at 1024^2, whole-step graphs: one
# image 2.32 -> 2.28 s.  FLUXKILN_CP_REORDER=0 leaves Inductor's settings alone.
REORDER = {"reorder_for_compute_comm_overlap": True,
           "reorder_for_compute_comm_overlap_passes": ["sink_waits", "raise_comms", "reorder_compute_for_overlap"]}


@dataclass
class Split:
    """The state one transformer shares with its attention processors."""

    degree: int
    rank: int
    mode: str  # ulysses | allgather | overlap
    group: Any = None
    group_name: str = ""  # the group's name, for the raw functional collective ops (a constant when compiled)
    active: bool = False  # True while a forward runs split (its token counts divide by the degree)
    handles: list[Any] = field(default_factory=list)
    saved_processors: dict[str, Any] = field(default_factory=dict)
    reorder: bool = False  # Inductor's compute/communication reordering on while this transformer is split

    def agree(self, ok: bool) -> bool:
        """Whether every rank of the group says ``ok`` (one small all-reduce)."""
        return not distributed.any_rank(not ok, group=self.group)


def choose_mode(mode: str, heads: int, degree: int) -> str:
    """``auto``: all-gather of k/v, for any degree: faster than Ulysses on 2 and 4 H200s (one exchange per
    attention instead of two; docs/gpus-many.md), though Ulysses moves fewer bytes."""
    if mode not in MODES:
        raise ValueError(f"unknown context-parallel mode {mode!r}; choose from {', '.join(MODES)}")
    if mode == "auto":
        return "allgather"
    if mode == "ulysses" and heads % degree:
        raise ValueError(f"ulysses needs the {heads} attention heads to divide by {degree} ranks; "
                         "use allgather (or auto)")
    return mode


def enable(transformer: Any, degree: int, mode: str = "auto", group: Any = None) -> Split:
    """Split ``transformer`` (a diffusers FluxTransformer2DModel) over ``degree`` ranks of ``group`` (default: all)."""
    import torch.distributed as dist

    group = group or dist.group.WORLD
    heads = int(transformer.config.num_attention_heads)
    state = Split(degree, dist.get_rank(group), choose_mode(mode, heads, degree), group, group.group_name)
    state.saved_processors = dict(transformer.attn_processors)
    transformer.set_attn_processor(ContextAttnProcessor(state))
    state.handles = [transformer.register_forward_pre_hook(_splitter(state), with_kwargs=True),
                     transformer.register_forward_hook(_gatherer(state), with_kwargs=True)]
    # the split and the gather are tensor work, the same at every call of a shape: a whole-step CUDA graph
    # (.graphed) records them with the blocks and their collectives
    setattr(transformer, fast.REPLAYABLE_HOOKS, frozenset(h.id for h in state.handles))
    transformer._fluxkiln_context = state
    state.reorder = not fast.switched_off("FLUXKILN_CP_REORDER")
    if state.reorder:
        _reordering(+1)
    return state


def disable(transformer: Any) -> None:
    """Undo :func:`enable`: the stock processors back, the hooks gone."""
    state = getattr(transformer, "_fluxkiln_context", None)
    if state is None:
        return
    for h in state.handles:
        h.remove()
    transformer.set_attn_processor(state.saved_processors)
    del transformer._fluxkiln_context
    vars(transformer).pop(fast.REPLAYABLE_HOOKS, None)
    if state.reorder:
        _reordering(-1)


@dataclass
class _Reordering:
    """How many split transformers want :data:`REORDER`, and Inductor's settings from before the first."""

    users: int = 0
    before: dict[str, Any] = field(default_factory=dict)


_REORDERING = _Reordering()


def _reordering(change: int) -> None:
    """Turn :data:`REORDER` on with the first split transformer, back to what it was after the last."""
    import torch._inductor.config as cfg

    r = _REORDERING
    if change > 0:
        if r.users == 0:
            r.before = {k: getattr(cfg, k) for k in REORDER}
            for k, v in REORDER.items():
                setattr(cfg, k, v)
        r.users += 1
    elif r.users:
        r.users -= 1
        if r.users == 0:
            for k, v in r.before.items():
                setattr(cfg, k, v)


# ------------------------------------------------------------------ splitting the inputs, gathering the output
def _share(x: Any, dim: int, state: Split) -> Any:
    n = x.shape[dim] // state.degree
    return x.narrow(dim, state.rank * n, n)


def _ids(x: Any) -> Any:
    return x[0] if x is not None and x.ndim == 3 else x


def _splitter(state: Split) -> Any:
    def pre(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        kw = dict(kwargs)
        if args:  # the pipelines call with keywords; a positional hidden_states is accepted too
            kw["hidden_states"], args = args[0], args[1:]
        img, txt = kw["hidden_states"], kw.get("encoder_hidden_states")
        img_ids, txt_ids = _ids(kw.get("img_ids")), _ids(kw.get("txt_ids"))
        state.active = (txt is not None and img_ids is not None and txt_ids is not None
                        and img.shape[1] % state.degree == 0 and txt.shape[1] % state.degree == 0)
        if state.active:
            kw.update(hidden_states=_share(img, 1, state), encoder_hidden_states=_share(txt, 1, state),
                      img_ids=_share(img_ids, 0, state), txt_ids=_share(txt_ids, 0, state))
        return args, kw
    return pre


def _gatherer(state: Split) -> Any:
    def post(module: Any, args: Any, kwargs: Any, output: Any) -> Any:
        if not state.active:
            return output
        state.active = False
        if isinstance(output, tuple):
            return (_gather_tokens(output[0], state), *output[1:])
        output.sample = _gather_tokens(output.sample, state)
        return output
    return post


def _all_gather(x: Any, dim: int, state: Split) -> Any:
    import torch.distributed._functional_collectives as funcol

    gather = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor  # renamed in torch 2.12
    return _waited(gather(x.contiguous(), gather_dim=dim, group=state.group))


def _gather_tokens(x: Any, state: Split) -> Any:
    return _all_gather(x, 1, state)


def _waited(x: Any) -> Any:
    import torch.distributed._functional_collectives as funcol

    return x.wait() if isinstance(x, funcol.AsyncCollectiveTensor) else x


# ------------------------------------------------------------------ attention across ranks
def attention(q: Any, k: Any, v: Any, state: Split) -> Any:
    """Attention of this rank's queries over every rank's keys; (B, S_local, H, D) in, the same shape out."""
    import torch.nn.functional as F

    if not state.active:
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    if state.mode == "ulysses":
        return _ulysses(q, k, v, state)
    if state.mode == "overlap":
        return _overlap(q, k, v, state)
    return _allgather(q, k, v, state)


def _ulysses(q: Any, k: Any, v: Any, state: Split) -> Any:
    import torch
    import torch.distributed._functional_collectives as funcol
    import torch.nn.functional as F

    n = state.degree
    b, s, h, d = q.shape
    # (3, B, S, H, D) -> (N head groups, 3, B, S, H/N, D): group g goes to rank g
    x = torch.stack([q, k, v]).view(3, b, s, n, h // n, d).permute(3, 0, 1, 2, 4, 5).contiguous()
    y = _waited(funcol.all_to_all_single(x, None, None, state.group))
    # now dim 0 is the rank the tokens came from: (N, 3, B, S, H/N, D) -> 3 x (B, H/N, N*S, D)
    y = y.view(n, 3, b, s, h // n, d).permute(1, 2, 4, 0, 3, 5).reshape(3, b, h // n, n * s, d)
    out = F.scaled_dot_product_attention(y[0], y[1], y[2])  # (B, H/N, N*S, D)
    # back: the tokens of rank r go home to rank r, with this rank's heads
    o = out.view(b, h // n, n, s, d).permute(2, 0, 3, 1, 4).contiguous()  # (N, B, S, H/N, D)
    o = _waited(funcol.all_to_all_single(o, None, None, state.group))
    return o.view(n, b, s, h // n, d).permute(1, 2, 0, 3, 4).reshape(b, s, h, d)


def _allgather(q: Any, k: Any, v: Any, state: Split) -> Any:
    """Each token's key and value side by side, (B, S, 2, H, D), gathered rank after rank: for one image the
    result is already every token's in order, so attention reads keys and values as strided views (no copy
    into a head-major layout, which cost a read and a write of the gathered tensor in every block)."""
    import torch
    import torch.nn.functional as F

    n = state.degree
    b, s, h, d = k.shape
    kv = _all_gather(torch.stack([k, v], dim=2), 0, state)  # (N * B, S, 2, H, D), ranks outermost
    if b == 1:
        kv = kv.view(1, n * s, 2, h, d)
    else:  # a batch: each image's tokens from every rank together (a copy)
        kv = kv.view(n, b, s, 2, h, d).transpose(0, 1).reshape(b, n * s, 2, h, d)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2))
    return out.transpose(1, 2)


def _overlap(q: Any, k: Any, v: Any, state: Split) -> Any:
    """All-gather k/v in the background, attend to the local keys meanwhile, then to the others; merge exactly."""
    import torch

    from . import lse_attention

    n, r = state.degree, state.rank
    b, s, h, d = k.shape
    # the raw op returns the buffer un-waited: the wait below sits after the local attention (funcol's wrappers
    # would put it right after the collective when traced)
    c10d = torch.ops._c10d_functional
    pending = c10d.all_gather_into_tensor(torch.stack([k, v]).contiguous(), n, state.group_name)
    qt = q.transpose(1, 2)
    local_o, local_lse = lse_attention.attend(qt, k.transpose(1, 2), v.transpose(1, 2))
    kv = c10d.wait_tensor(pending).view(n, 2, b, s, h, d)
    others = _by_head(torch.cat([kv[:r], kv[r + 1:]]))  # every rank's keys but this one's (already attended)
    remote_o, remote_lse = lse_attention.attend(qt, others[0], others[1])
    return lse_attention.merge(local_o, local_lse, remote_o, remote_lse).transpose(1, 2)


def _by_head(kv: Any) -> Any:
    """Gathered (ranks, 2, B, S, H, D) keys and values as (2, B, H, ranks * S, D), ranks' tokens in rank order."""
    m, _, b, s, h, d = kv.shape
    return kv.permute(1, 2, 4, 0, 3, 5).reshape(2, b, h, m * s, d)


class ContextAttnProcessor:
    """diffusers' FLUX attention processor with the attention over every rank's tokens (see module doc)."""

    def __init__(self, state: Split) -> None:
        self.state = state

    @property
    def precompile_tag(self) -> str:
        """What a block's compiled code depends on here besides the class (:mod:`.precompiled`'s variant key): the
        mode, the degree, this rank (``overlap`` slices by it), the group the collectives name and whether Inductor
        reordered them."""
        s = self.state
        return f"context:{s.mode}/{s.degree}/rank{s.rank}/group{s.group_name}{'/reorder' if s.reorder else ''}"

    def __call__(self, attn: Any, hidden_states: Any, encoder_hidden_states: Any = None, attention_mask: Any = None,
                 image_rotary_emb: Any = None) -> Any:
        if attention_mask is not None:
            raise ValueError("context parallel attention takes no attention mask")
        query, key, value = attn_parts.heads(attn, hidden_states, encoder_hidden_states, image_rotary_emb)
        out = attention(query, key, value, self.state).flatten(2, 3).to(query.dtype)
        return attn_parts.project_out(attn, out, encoder_hidden_states)
