"""The first single-stream block is called with its inputs laid out as the later ones are (views of one joined
tensor), so every single-stream block compiles to one variant; the output is the same, bit for bit, and calls
that must stay as they are (gradients, hooks, positional arguments, odd inputs) are passed through."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from diffusers import FluxTransformer2DModel  # noqa: E402

from fluxkiln.plugins.flux import fast, joined, variantkeys  # noqa: E402


def _model():
    torch.manual_seed(0)
    return FluxTransformer2DModel(patch_size=1, in_channels=8, num_layers=1, num_single_layers=3,
                                  attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                  pooled_projection_dim=16, guidance_embeds=True, axes_dims_rope=(2, 2, 4)).eval()


def _inputs(tokens: int = 16) -> dict:
    g = torch.Generator().manual_seed(1)
    return dict(hidden_states=torch.randn(1, tokens, 8, generator=g),
                encoder_hidden_states=torch.randn(1, 4, 16, generator=g),
                pooled_projections=torch.randn(1, 16, generator=g), timestep=torch.tensor([0.5]),
                guidance=torch.tensor([3.0]), img_ids=torch.zeros(tokens, 3), txt_ids=torch.zeros(4, 3),
                return_dict=False)


class _Seen:
    """A stand-in compiled call that runs the block eagerly and notes each call's signature."""

    def __init__(self, block) -> None:
        self.block, self.calls = block, []

    def __call__(self, *args, **kwargs):
        self.calls.append(variantkeys.call_signature(args, kwargs))
        return self.block._call_impl(*args, **kwargs)


def test_every_single_block_is_called_with_one_layout_and_the_output_is_bit_identical():
    tr = _model()
    with torch.no_grad():
        plain = tr(**_inputs())[0]
    seen = [_Seen(b) for b in tr.single_transformer_blocks]
    for block, call in zip(tr.single_transformer_blocks, seen):
        block._compiled_call_impl = call
    with torch.no_grad():
        before = tr(**_inputs())[0]
    assert seen[0].calls[0] != seen[1].calls[0] == seen[2].calls[0]  # contiguous first, strided after
    joined.install(list(tr.single_transformer_blocks))
    joined.install(list(tr.single_transformer_blocks))  # once: installing again does not wrap twice
    assert joined.inner(tr.single_transformer_blocks[0]._compiled_call_impl) is seen[0]
    assert joined.inner(seen[1]) is seen[1]
    with torch.no_grad():
        after = tr(**_inputs())[0]
    assert seen[0].calls[1] == seen[1].calls[1] == seen[2].calls[1]  # one layout: one compiled variant
    assert torch.equal(plain, before) and torch.equal(plain, after)


def test_calls_that_must_stay_as_they_are_are_passed_through():
    block = _model().single_transformer_blocks[0]
    got = []
    call = joined.Joined(block, lambda *a, **k: got.append((a, k)))
    text, image, temb = torch.randn(1, 4, 16), torch.randn(1, 8, 16), torch.randn(1, 16)

    def passed(*args, **kwargs) -> bool:
        """Whether the call reached the inner one with the very tensors it was given."""
        call(*args, **kwargs)
        a, k = got[-1]
        return all(x is y for x, y in zip(a, args)) and all(k[name] is v for name, v in kwargs.items())

    with torch.no_grad():
        assert not passed(encoder_hidden_states=text, hidden_states=image, temb=temb)  # joined
        k = got[-1][1]
        assert k["hidden_states"].stride() == k["encoder_hidden_states"].stride() == (12 * 16, 16, 1)
        assert torch.equal(k["hidden_states"], image) and torch.equal(k["encoder_hidden_states"], text)
        assert k["temb"] is temb
        hook = block.register_forward_pre_hook(lambda *a: None)
        assert passed(encoder_hidden_states=text, hidden_states=image, temb=temb)  # hooks see the call as it was
        hook.remove()
        assert passed(encoder_hidden_states=text, hidden_states=image.half(), temb=temb)  # unlike dtypes
        assert passed(encoder_hidden_states=text, hidden_states=torch.randn(2, 8, 16), temb=temb)  # batches
        assert passed(encoder_hidden_states=text, hidden_states=torch.randn(1, 16, 8).transpose(1, 2), temb=temb)
        assert passed(image, text, temb)  # positional (gradient checkpointing)
    assert passed(encoder_hidden_states=text, hidden_states=image, temb=temb)  # gradients on (training)


def test_compile_blocks_installs_it_on_the_first_single_block_only():
    tr = _model()
    fast.compile_blocks(tr, backend="eager", saved=False)
    calls = [b._compiled_call_impl for b in tr.single_transformer_blocks]
    assert isinstance(calls[0], joined.Joined) and not any(isinstance(c, joined.Joined) for c in calls[1:])
    assert not isinstance(tr.transformer_blocks[0]._compiled_call_impl, joined.Joined)
    fast.uncompile_blocks(tr)
    assert all(b._compiled_call_impl is None for b in tr.single_transformer_blocks)
