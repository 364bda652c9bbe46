"""go_fast's attention in float8: cuDNN's fused fp8 attention, and the processor that puts it in the blocks.

PyTorch's SDPA has no fp8 attention; cuDNN has one for Hopper and newer GPUs, reached through NVIDIA's
``nvidia-cudnn-frontend`` wheel (its Python graph API; the cuDNN library itself comes with torch).  The
arithmetic, per attention call (lossy, as go_fast's fp8 matmuls are):

- queries, keys and values are each quantized to float8 e4m3 with one scale per tensor, the values' largest
  magnitude mapped to fp8's largest value (448), the queries' and keys' limit that their RMS norms set
  (:func:`rms_bound`: no pass over them to find it); the kernel takes the inverse scales (``descale_*``);
- the softmax's unnormalised probabilities (at most 1) are held in fp8 scaled by 448 for the second matmul;
- the output comes back in fp8 (Hopper's kernel writes no bf16): a softmax-weighted mean of the values'
  rows, so it is scaled as the values were and cannot overflow; it is turned back to the model's dtype.

The quantization and the conversion back are plain torch operations, so a compiled block fuses them with the
rotary embedding and the output projection's own quantization; only the attention itself is the opaque
operator ``torch.ops.fluxkiln.fp8_sdpa``.  That operator's cuDNN kernel serves CUDA tensors; its default
kernel is the same arithmetic written out in float32 (any device, small shapes: it holds the whole score
matrix), which the CPU tests use and the GPU test compares cuDNN with.

:func:`supported` says whether a GPU can take it (and why not), :func:`apply`/:func:`restore` swap the blocks'
attention processors.  Sequences shorter than :data:`MIN_TOKENS` (images under about 1024x1024), where cuDNN's
fp8 kernel is the slower one, and those it is not made for (:func:`fits`) keep bf16 attention.  This module
imports torch: import it only where torch is wanted.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from . import attn_parts
from .fast import FP8_MAX

P_SCALE = FP8_MAX  # the softmax's unnormalised probabilities are at most 1
FP8 = torch.float8_e4m3fn
# Below this many tokens (text and image together) cuDNN's fp8 attention is slower than its bf16 one: on an H200,
# 0.095 against 0.063 ms at 1,536 tokens (a 512^2 image), 0.284 against 0.394 ms at 4,608 (1024^2).
MIN_TOKENS = 4096
ROUNDING = 1 + 2**-6  # room for bf16's roundings above :func:`rms_bound`'s exact limit (three of at most 2^-8)


def supported(device: Any = None) -> tuple[bool, str]:
    """Whether cuDNN's fp8 attention can run on ``device`` (the current CUDA device by default), and why not."""
    if not torch.cuda.is_available():
        return False, "no CUDA GPU"
    cap = torch.cuda.get_device_capability(device)
    if cap < (9, 0):
        return False, f"cuDNN's fp8 attention needs compute capability 9.0 or newer (this GPU: {cap[0]}.{cap[1]})"
    try:
        import cudnn
    except ImportError:
        return False, "the nvidia-cudnn-frontend package is not installed (pip install nvidia-cudnn-frontend)"
    except OSError as exc:  # the wheel is there but cannot load the cuDNN library
        return False, f"nvidia-cudnn-frontend cannot load cuDNN: {exc}"
    try:
        version = int(cudnn.backend_version())
    except Exception as exc:  # the frontend found no cuDNN library it can use (its loader leaves none)
        return False, f"nvidia-cudnn-frontend cannot reach cuDNN: {exc}"
    if version < 90100:
        return False, f"cuDNN {version} is older than 9.1, the first with fp8 attention"
    return True, ""


# --- the operator --------------------------------------------------------------------------------------------


@torch.library.custom_op("fluxkiln::fp8_sdpa", mutates_args=())
def fp8_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, descale_q: torch.Tensor, descale_k: torch.Tensor,
             descale_v: torch.Tensor, scale_o: torch.Tensor) -> torch.Tensor:
    """Attention of fp8 ``q`` over fp8 ``k``/``v`` (batch, tokens, heads, head dim; scale 1/sqrt(head dim), no
    mask), each multiplied back by its ``descale_*`` (1-element float32 tensors); the output in fp8, multiplied
    by ``scale_o``, in the same layout.  This default kernel is the arithmetic written out in float32."""
    scale = q.shape[-1] ** -0.5
    qf, kf, vf = (t.float().transpose(1, 2) * d.reshape(()) for t, d in ((q, descale_q), (k, descale_k),
                                                                       (v, descale_v)))
    scores = qf @ kf.transpose(-2, -1) * scale
    p = torch.exp(scores - scores.amax(dim=-1, keepdim=True))
    p8 = (p * P_SCALE).to(FP8).float() / P_SCALE  # the probabilities as the second matmul sees them
    out = (p8 @ vf) / p.sum(dim=-1, keepdim=True)
    return (out * scale_o.reshape(())).clamp(-FP8_MAX, FP8_MAX).to(FP8).transpose(1, 2).contiguous()


@fp8_sdpa.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, descale_q: torch.Tensor, descale_k: torch.Tensor,
      descale_v: torch.Tensor, scale_o: torch.Tensor) -> torch.Tensor:
    return q.new_empty(q.shape)


@fp8_sdpa.register_kernel("cuda")
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, descale_q: torch.Tensor, descale_k: torch.Tensor,
      descale_v: torch.Tensor, scale_o: torch.Tensor) -> torch.Tensor:
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    descale_q, descale_k, descale_v, scale_o = (t.reshape(1, 1, 1, 1) for t in (descale_q, descale_k, descale_v,
                                                                               scale_o))
    built = _CudnnGraph.get(q, k, v)
    if built is None:  # cuDNN refused this shape: the same contract, computed in bf16 from the fp8 inputs
        qb, kb, vb = ((t.float() * d).to(torch.bfloat16).transpose(1, 2) for t, d in ((q, descale_q),
                                                                                   (k, descale_k), (v, descale_v)))
        out = torch.nn.functional.scaled_dot_product_attention(qb, kb, vb).transpose(1, 2).float()
        return (out * scale_o).clamp(-FP8_MAX, FP8_MAX).to(FP8).contiguous()
    out = q.new_empty(q.shape)
    built.run(q, k, v, descale_q, descale_k, descale_v, scale_o, out)
    return out


@dataclass
class _CudnnGraph:
    """One built cuDNN graph for a shape of (batch, tokens, heads, head dim), and what executing it needs."""

    graph: Any
    handle: Any
    tensors: dict[str, Any]
    workspace_bytes: int
    constants: dict[str, torch.Tensor]

    @classmethod
    def get(cls, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> _CudnnGraph | None:
        """The graph for these shapes, built on first use; None where cuDNN cannot build it (said once, in a
        warning, and remembered: the caller attends in bf16 instead)."""
        key = (q.device.index, tuple(q.shape), tuple(k.shape), tuple(v.shape))
        if key not in _GRAPHS:
            try:
                _GRAPHS[key] = cls.build(q, k, v)
            except Exception as exc:  # cuDNN's own error types (not supported, build failed) and torch's
                _GRAPHS[key] = None
                warnings.warn(f"cuDNN cannot build its fp8 attention for (batch, tokens, heads, head dim) = "
                              f"{tuple(q.shape)} ({exc}); attending in bf16 there. FLUXKILN_FP8_ATTENTION=0 "
                              f"keeps go_fast's attention in bf16 everywhere.", RuntimeWarning, stacklevel=2)
        return _GRAPHS[key]

    @classmethod
    def build(cls, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> _CudnnGraph:
        import cudnn

        with torch.cuda.device(q.device):
            handle = _HANDLES.get(q.device.index) or _HANDLES.setdefault(q.device.index, cudnn.create_handle())
            e4m3, f32 = cudnn.data_type.FP8_E4M3, cudnn.data_type.FLOAT
            graph = cudnn.pygraph(io_data_type=e4m3, intermediate_data_type=f32, compute_data_type=f32,
                                  handle=handle)

            t = {name: graph.tensor(name=name, **_heads_first(x.shape), data_type=e4m3)
                 for name, x in (("q", q), ("k", k), ("v", v))}
            scalar = {"dim": [1, 1, 1, 1], "stride": [1, 1, 1, 1], "data_type": f32}
            for name in ("descale_q", "descale_k", "descale_v", "descale_s", "scale_s", "scale_o"):
                t[name] = graph.tensor(name=name, **scalar)
            o, _, amax_s, amax_o = graph.sdpa_fp8(
                q=t["q"], k=t["k"], v=t["v"], descale_q=t["descale_q"], descale_k=t["descale_k"],
                descale_v=t["descale_v"], descale_s=t["descale_s"], scale_s=t["scale_s"], scale_o=t["scale_o"],
                is_inference=True, attn_scale=1.0 / math.sqrt(q.shape[-1]), use_causal_mask=False, name="fp8_sdpa")
            layout = _heads_first(q.shape)
            o.set_output(True).set_dim(layout["dim"]).set_stride(layout["stride"]).set_data_type(e4m3)
            for amax in (amax_s, amax_o):
                amax.set_output(True).set_dim([1, 1, 1, 1]).set_stride([1, 1, 1, 1]).set_data_type(f32)
            t.update(o=o, amax_s=amax_s, amax_o=amax_o)
            graph.validate()
            graph.build_operation_graph()
            graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
            graph.check_support()
            graph.build_plans()
            one = torch.ones(1, 1, 1, 1, dtype=torch.float32, device=q.device)
            constants = {"scale_s": one * P_SCALE, "descale_s": one / P_SCALE}
            return cls(graph, handle, t, int(graph.get_workspace_size()), constants)

    def run(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, descale_q: torch.Tensor,
            descale_k: torch.Tensor, descale_v: torch.Tensor, scale_o: torch.Tensor, out: torch.Tensor) -> None:
        import cudnn

        amax = torch.empty(2, 1, 1, 1, dtype=torch.float32, device=q.device)
        given = {"q": q, "k": k, "v": v, "descale_q": descale_q, "descale_k": descale_k, "descale_v": descale_v,
                 "scale_o": scale_o, "o": out, "amax_s": amax[0:1], "amax_o": amax[1:2], **self.constants}
        pack = {self.tensors[name]: value for name, value in given.items()}
        workspace = torch.empty(max(self.workspace_bytes, 1), dtype=torch.uint8, device=q.device)
        with torch.cuda.device(q.device):
            cudnn.set_stream(self.handle, torch.cuda.current_stream(q.device).cuda_stream)
            self.graph.execute(pack, workspace, handle=self.handle)


def _heads_first(shape: torch.Size) -> dict[str, list[int]]:
    """A contiguous (batch, tokens, heads, head dim) tensor described to cuDNN as (batch, heads, tokens, head dim)."""
    b, s, h, d = shape
    return {"dim": [b, h, s, d], "stride": [s * h * d, d, h * d, 1]}


_GRAPHS: dict[tuple, _CudnnGraph | None] = {}
_HANDLES: dict[int | None, Any] = {}


# --- attention in fp8, and the processor -----------------------------------------------------------------------


def quantize(t: torch.Tensor, bound: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``t`` in float8 e4m3 with one scale; returns it and the float32 inverse scale (shape (1, 1, 1, 1)) that
    multiplies it back.  The scale maps ``bound`` (a known limit of ``t``'s magnitudes, a 0-d tensor) or else
    ``t``'s largest magnitude to fp8's largest value."""
    top = t.abs().amax() if bound is None else bound
    descale = top.float().clamp(min=1e-12) / FP8_MAX
    return (t.float() / descale).clamp(-FP8_MAX, FP8_MAX).to(FP8), descale.reshape(1, 1, 1, 1)


def rms_bound(norms: list[Any], head_dim: int) -> torch.Tensor | None:
    """A limit of the magnitudes that these RMS norms (diffusers' ``RMSNorm``) and then a rotary embedding can
    give, or None where a norm is of another kind or has no weight.

    An RMS norm scales its input to a root mean square of 1, so no element exceeds sqrt(head dim) before the
    weight multiplies it; a rotation keeps each pair's length, which is at most the whole vector's.  A limit
    known without reading the tensor lets the quantization fuse into the rotation's kernel: no pass over the
    queries and keys to find their largest value.  bf16 rounds three times on the way (the normalised value, its
    product with the weight, the rotation), each by at most 2^-8, hence :data:`ROUNDING`."""
    limits = []
    for norm in norms:
        if type(norm).__name__ != "RMSNorm":
            return None
        weight, bias = getattr(norm, "weight", None), getattr(norm, "bias", None)
        if weight is None:  # FLUX's norms have weights; without one, read the tensor (the limit's device unknown)
            return None
        limit = weight.detach().abs().amax().float() * head_dim ** 0.5
        limits.append(limit + 2 * bias.detach().abs().amax().float() if bias is not None else limit)
    return torch.stack(limits).amax() * ROUNDING if limits else None


def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, q_bound: torch.Tensor | None = None,
              k_bound: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax attention (scale 1/sqrt(head dim), no mask) computed in fp8; (batch, tokens, heads, head dim) in,
    the same layout out in ``query``'s dtype.  ``q_bound``/``k_bound``: known limits of the queries' and keys'
    magnitudes (:func:`rms_bound`); without them each tensor's largest magnitude is found first."""
    q8, dq = quantize(query, q_bound)
    k8, dk = quantize(key, k_bound)
    v8, dv = quantize(value)
    out = torch.ops.fluxkiln.fp8_sdpa(q8, k8, v8, dq, dk, dv, 1.0 / dv)
    return (out.float() * dv).to(query.dtype)


class Fp8AttnProcessor:
    """diffusers' FLUX attention processor with the attention computed in fp8 (see the module doc) where the
    joint sequence has at least ``min_tokens`` tokens, and by diffusers' own attention call below that."""

    _attention_backend = None  # set by diffusers' set_attention_backend; the bf16 path honours it
    _parallel_config = None  # diffusers' context parallelism: go_fast leaves such processors alone

    def __init__(self, min_tokens: int = MIN_TOKENS) -> None:
        self.min_tokens = min_tokens

    @property
    def precompile_tag(self) -> str:
        """What a block's compiled code depends on here besides the class (:mod:`.precompiled`'s variant key)."""
        return f"fp8-attention/min{self.min_tokens}"

    def __call__(self, attn: Any, hidden_states: Any, encoder_hidden_states: Any = None, attention_mask: Any = None,
                 image_rotary_emb: Any = None) -> Any:
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        query, key, value = attn_parts.heads(attn, hidden_states, encoder_hidden_states, image_rotary_emb)
        if attention_mask is not None or not fits(query.shape[1], query.shape[-1], self.min_tokens):
            # a mask, or a size fp8 does not take (static per compiled shape: no graph break): diffusers' own call
            out = dispatch_attention_fn(query, key, value, attn_mask=attention_mask, backend=self._attention_backend)
        else:
            added = attn.added_kv_proj_dim is not None
            q_bound = rms_bound([attn.norm_q] + ([attn.norm_added_q] if added else []), attn.head_dim)
            k_bound = rms_bound([attn.norm_k] + ([attn.norm_added_k] if added else []), attn.head_dim)
            out = attention(query, key, value, q_bound, k_bound)
        return attn_parts.project_out(attn, out.flatten(2, 3).to(query.dtype), encoder_hidden_states)


def fits(tokens: int, head_dim: int, least: int = MIN_TOKENS) -> bool:
    """Whether a joint sequence of ``tokens`` goes to cuDNN's fp8 attention: at least ``least`` of them (where it
    pays), and of the sizes its Hopper kernel is documented and measured for (a multiple of 64 tokens, as a
    1024^2 image's 4,608 are, and heads of 64 or 128).  Other sequences (Full HD's 8,612 tokens) keep bf16."""
    return tokens >= least and tokens % 64 == 0 and head_dim in (64, 128)


def min_tokens() -> int:
    """The shortest joint sequence (text and image tokens) computed in fp8: ``FLUXKILN_FP8_ATTENTION_MIN_TOKENS``,
    else :data:`MIN_TOKENS`."""
    raw = os.environ.get("FLUXKILN_FP8_ATTENTION_MIN_TOKENS", "").strip()
    if not raw:
        return MIN_TOKENS
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"FLUXKILN_FP8_ATTENTION_MIN_TOKENS={raw!r} is not a whole number of tokens (e.g. 0 for "
                         f"every size, or unset for {MIN_TOKENS})") from None
    if value < 0:
        raise ValueError(f"FLUXKILN_FP8_ATTENTION_MIN_TOKENS={raw!r} must be 0 or more")
    return value


def apply(transformer: Any, least: int | None = None) -> int:
    """Give every block's attention the fp8 processor (from ``least`` tokens on; default :func:`min_tokens`),
    keeping the processors it had; returns how many."""
    if getattr(transformer, "_fluxkiln_fp8_attention", None) is None:
        transformer._fluxkiln_fp8_attention = dict(transformer.attn_processors)
    transformer.set_attn_processor(Fp8AttnProcessor(min_tokens() if least is None else least))
    return len(transformer._fluxkiln_fp8_attention)


def restore(transformer: Any) -> bool:
    """Put back the processors :func:`apply` replaced; whether there were any."""
    saved = getattr(transformer, "_fluxkiln_fp8_attention", None)
    if saved is None:
        return False
    transformer.set_attn_processor(saved)
    transformer._fluxkiln_fp8_attention = None
    return True


def active(transformer: Any) -> bool:
    """Whether :func:`apply` is in effect on ``transformer``."""
    return getattr(transformer, "_fluxkiln_fp8_attention", None) is not None
