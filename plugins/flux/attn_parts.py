"""The two halves of diffusers' FLUX attention processor around its attention call, for fluxkiln's processors.

A FLUX attention processor projects the tokens to queries, keys and values (fused or not), normalises the
queries and keys, puts the text stream's before the image stream's, rotates both, attends, then splits the
result back into the two streams and projects each.  :func:`heads` is everything before the attention call
and :func:`project_out` everything after it, written once for the processors that replace only the call
(context parallelism's, :mod:`.context`; fp8 attention's, :mod:`.fp8_attention`).
"""

from __future__ import annotations

from typing import Any


def heads(attn: Any, hidden_states: Any, encoder_hidden_states: Any, image_rotary_emb: Any) -> tuple[Any, Any, Any]:
    """Queries, keys and values of every token, (batch, tokens, heads, head dim), text tokens first, rotated."""
    import torch
    from diffusers.models.embeddings import apply_rotary_emb
    from diffusers.models.transformers.transformer_flux import _get_qkv_projections

    query, key, value, eq, ek, ev = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
    query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
    key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
    value = value.unflatten(-1, (-1, attn.head_dim))
    if attn.added_kv_proj_dim is not None:
        query = torch.cat([attn.norm_added_q(eq.unflatten(-1, (-1, attn.head_dim))), query], dim=1)
        key = torch.cat([attn.norm_added_k(ek.unflatten(-1, (-1, attn.head_dim))), key], dim=1)
        value = torch.cat([ev.unflatten(-1, (-1, attn.head_dim)), value], dim=1)
    if image_rotary_emb is not None:
        query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
        key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
    return query, key, value


def project_out(attn: Any, out: Any, encoder_hidden_states: Any) -> Any:
    """The attention's output (batch, tokens, channels) as the processor returns it: a single block's as it is,
    a double block's split into the image and text streams, each through its output projection."""
    if encoder_hidden_states is None:
        return out
    n_text = encoder_hidden_states.shape[1]
    text, image = out.split_with_sizes([n_text, out.shape[1] - n_text], dim=1)
    image = attn.to_out[1](attn.to_out[0](image.contiguous()))
    return image, attn.to_add_out(text.contiguous())
