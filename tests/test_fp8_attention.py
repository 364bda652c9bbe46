"""go_fast's fp8 attention (:mod:`fluxkiln.plugins.flux.fp8_attention`): the operator's arithmetic, the processor
in the blocks with an exact way back, compilation without graph breaks, and when go_fast leaves it out.  The
cuDNN kernel itself needs a Hopper GPU: its tests skip elsewhere."""

from __future__ import annotations

import pytest
import torch

from fluxkiln.plugins.flux import fast, fp8_attention
from fluxkiln.plugins.flux.pipestate import plan, prepare, state_of
from fluxkiln.plugins.flux.tiny import build_tiny_flux

CUDNN_FP8 = fp8_attention.supported()[0]


def _exact(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    t = (x.float().transpose(1, 2) for x in (q, k, v))
    return torch.nn.functional.scaled_dot_product_attention(*t).transpose(1, 2)


def _qkv(tokens: int = 96, heads: int = 3, dim: int = 64, device: str = "cpu") -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(1, tokens, heads, dim, generator=gen).to(device) for _ in range(3)]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def test_fp8_attention_is_close_to_exact_attention_but_not_equal():
    q, k, v = _qkv()
    out = fp8_attention.attention(q, k, v)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert 0.005 < _rel(out, _exact(q, k, v)) < 0.1  # three fp8 roundings: lossy, within a few per cent
    half = fp8_attention.attention(*(x.bfloat16() for x in (q, k, v)))
    assert half.dtype == torch.bfloat16 and _rel(half, _exact(q, k, v)) < 0.1


def test_quantize_maps_the_largest_magnitude_to_fp8s_largest_and_back():
    t = torch.tensor([[-3.0, 0.5], [1.5, 0.0]])
    t8, descale = fp8_attention.quantize(t)
    assert t8.dtype == torch.float8_e4m3fn and descale.shape == (1, 1, 1, 1)
    assert float(t8.float().abs().max()) == 448.0
    assert torch.allclose(t8.float() * descale.reshape(()), t, rtol=0.07)
    zeros8, _ = fp8_attention.quantize(torch.zeros(2, 2))  # no division by zero
    assert torch.equal(zeros8.float(), torch.zeros(2, 2))


def test_rms_bound_limits_what_rms_norms_and_a_rotation_give():
    """The limit holds for FLUX's own modules in bf16 (torch's RMSNorm, diffusers' rotary embedding), whose
    roundings can pass the exact limit by a few thousandths, and for a norm with a bias."""
    from diffusers.models.embeddings import apply_rotary_emb
    from diffusers.models.normalization import RMSNorm
    from diffusers.models.transformers.transformer_flux import FluxPosEmbed

    gen = torch.Generator().manual_seed(3)
    flux_norm = torch.nn.RMSNorm(64, eps=1e-6).to(torch.bfloat16)
    biased = RMSNorm(64, eps=1e-6, elementwise_affine=True, bias=True)
    with torch.no_grad():
        flux_norm.weight.copy_(torch.randn(64, generator=gen) * 3)
        biased.weight.copy_(torch.randn(64, generator=gen) * 3)
        biased.bias.copy_(torch.randn(64, generator=gen))
    ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(20.0), torch.arange(25.0), indexing="ij"), -1)
    rope = FluxPosEmbed(theta=10000, axes_dim=[16, 24, 24])(ids.reshape(-1, 3))
    for norm, dtype in ((flux_norm, torch.bfloat16), (biased, torch.float32)):
        x = torch.randn(1, 500, 2, 64, generator=gen) * torch.logspace(-2, 2, 500).reshape(1, 500, 1, 1)
        x[:, :5] = 0
        x[:, 5:100] = 1e-4  # nearly one-hot rows: the norm puts all of their length in the largest weight's channel
        x[:, 5:100, :, int(norm.weight.detach().float().abs().argmax())] = torch.logspace(-1, 3, 95).reshape(1, 95, 1)
        bound = fp8_attention.rms_bound([norm], 64)
        with torch.no_grad():
            y = apply_rotary_emb(norm(x.to(dtype)), rope, sequence_dim=1)
        assert float(y.float().abs().max()) <= float(bound)
        assert float(bound) < 1.05 * (float(norm.weight.detach().float().abs().max()) * 8 + 2 * (
            float(norm.bias.detach().abs().max()) if getattr(norm, "bias", None) is not None else 0))  # not loose
    assert fp8_attention.rms_bound([torch.nn.LayerNorm(32)], 32) is None  # another norm: found by reading
    assert fp8_attention.rms_bound([RMSNorm(32, eps=1e-6, elementwise_affine=False)], 32) is None


def test_the_processor_takes_a_mask_as_diffusers_does():
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    t = _transformer()
    attn = t.transformer_blocks[0].attn
    gen = torch.Generator().manual_seed(5)
    hidden, text = torch.randn(1, 56, 128, generator=gen), torch.randn(1, 8, 128, generator=gen)
    mask = torch.ones(1, 1, 64, 64, dtype=torch.bool)
    mask[..., :4] = False
    with torch.no_grad():
        stock = FluxAttnProcessor()(attn, hidden, text, attention_mask=mask)
        ours = fp8_attention.Fp8AttnProcessor(min_tokens=0)(attn, hidden, text, attention_mask=mask)
    assert all(torch.equal(a, b) for a, b in zip(stock, ours))


def test_fp8_attention_compiles_as_one_graph():
    q, k, v = _qkv(tokens=40)
    compiled = torch.compile(fp8_attention.attention, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(q, k, v), fp8_attention.attention(q, k, v))


def _transformer() -> torch.nn.Module:
    """A small FLUX transformer with heads of 64, a size cuDNN's fp8 kernel takes (the tiny model's are 16)."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                  attention_head_dim=64, num_attention_heads=2, joint_attention_dim=32,
                                  pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(16, 24, 24)).eval()


def _forward(t: torch.nn.Module, rows: int = 7) -> torch.Tensor:
    """The transformer on rows x 8 image tokens and 8 text tokens (7 rows: 64 tokens, a size fp8 attention takes)."""
    cfg = t.config
    gen = torch.Generator().manual_seed(1)
    grid = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(float(rows)), torch.arange(8.0), indexing="ij"), -1)
    with torch.no_grad():
        return t(hidden_states=torch.randn(1, rows * 8, cfg.in_channels, generator=gen),
                 encoder_hidden_states=torch.randn(1, 8, cfg.joint_attention_dim, generator=gen),
                 pooled_projections=torch.randn(1, cfg.pooled_projection_dim, generator=gen),
                 timestep=torch.tensor([0.5]), guidance=torch.tensor([3.0]), img_ids=grid.reshape(-1, 3),
                 txt_ids=torch.zeros(8, 3), return_dict=False)[0]


@pytest.mark.parametrize("fused", [False, True])
def test_the_processor_approximates_the_blocks_and_restores_them_exactly(fused: bool, monkeypatch):
    monkeypatch.setenv("FLUXKILN_FP8_ATTENTION_MIN_TOKENS", "0")  # these 64 tokens in fp8 too
    t = _transformer()
    if fused:
        t.fuse_qkv_projections()
    before = {name: type(p) for name, p in t.attn_processors.items()}
    ref = _forward(t)
    n = fp8_attention.apply(t)
    assert n == len(before) and fp8_attention.active(t)
    assert {type(p) for p in t.attn_processors.values()} == {fp8_attention.Fp8AttnProcessor}
    approx = _forward(t)
    assert fp8_attention.apply(t) == n  # a second apply keeps the first one's originals
    assert fp8_attention.restore(t) and not fp8_attention.active(t) and not fp8_attention.restore(t)
    assert {name: type(p) for name, p in t.attn_processors.items()} == before
    assert torch.equal(_forward(t), ref)
    assert 0 < _rel(approx, ref) < 0.15


def test_short_sequences_keep_the_exact_attention(monkeypatch):
    """Below ``MIN_TOKENS`` (images under about 1024^2, where cuDNN's fp8 kernel is the slower one) the processor
    attends as diffusers' own does: the same numbers, and a compiled block's variant key says which."""
    t = _transformer()
    ref = _forward(t)
    fp8_attention.apply(t)
    proc = next(iter(t.attn_processors.values()))
    assert proc.min_tokens == fp8_attention.MIN_TOKENS > 64
    assert torch.equal(_forward(t), ref)
    assert proc.precompile_tag == f"fp8-attention/min{fp8_attention.MIN_TOKENS}"
    for bad in ("many", "-1"):
        monkeypatch.setenv("FLUXKILN_FP8_ATTENTION_MIN_TOKENS", bad)
        with pytest.raises(ValueError, match="FLUXKILN_FP8_ATTENTION_MIN_TOKENS"):
            fp8_attention.min_tokens()
    monkeypatch.setenv("FLUXKILN_FP8_ATTENTION_MIN_TOKENS", "100")
    assert fp8_attention.min_tokens() == 100


def test_sequences_the_fp8_kernel_is_not_made_for_keep_the_exact_attention(monkeypatch):
    monkeypatch.setenv("FLUXKILN_FP8_ATTENTION_MIN_TOKENS", "0")
    t = _transformer()
    ref = _forward(t, rows=6)  # 56 tokens: not a multiple of 64
    fp8_attention.apply(t)
    assert torch.equal(_forward(t, rows=6), ref)
    assert fp8_attention.fits(4608, 128) and fp8_attention.fits(320, 64, least=0)
    assert not fp8_attention.fits(1536, 128)  # a 512^2 image: fp8 is slower there
    assert not fp8_attention.fits(8612, 128)  # Full HD: not a multiple of 64
    assert not fp8_attention.fits(4608, 96)


def test_go_fast_says_why_its_attention_stays_in_bf16(monkeypatch: pytest.MonkeyPatch):
    pipe = build_tiny_flux("dev")
    t = pipe.transformer
    if not torch.cuda.is_available():
        assert fast.fp8_attention_supported(t) == (False, "no CUDA GPU")
        assert not plan(pipe, {}, False, True, "cpu", fast=True).fp8_attention  # no fp8 layers on a CPU
    monkeypatch.setenv("FLUXKILN_FP8_ATTENTION", "0")
    assert fast.fp8_attention_supported(t) == (False, "FLUXKILN_FP8_ATTENTION=0")
    monkeypatch.delenv("FLUXKILN_FP8_ATTENTION")

    class OtherProcessor:
        def __call__(self, *args, **kwargs):
            raise AssertionError("not called")

    t.set_attn_processor(OtherProcessor())
    ok, why = fast.fp8_attention_supported(t)
    assert not ok and why == "the blocks have other attention processors (OtherProcessor)"


def test_go_fast_switches_it_on_and_off_with_its_fp8_layers(monkeypatch: pytest.MonkeyPatch):
    """Through ``prepare`` as ``sample`` calls it, with a GPU's answers stood in for on this CPU (fp8 layers are
    emulated here): on with go_fast, a new threshold taken, off again with go_fast = false and for training."""
    monkeypatch.setenv("FLUXKILN_COMPILE", "0")
    monkeypatch.setattr(fast, "fp8_supported", lambda: (True, ""))
    monkeypatch.setattr(fp8_attention, "supported", lambda device=None: (True, ""))
    pipe = build_tiny_flux("dev")
    t = pipe.transformer
    stock = {type(p) for p in t.attn_processors.values()}
    logged: list[str] = []

    def log(message: str, level: str = "info") -> None:
        logged.append(message)

    want = prepare(pipe, [], True, "cuda", lambda _a: {}, fast=True, log=log)
    assert want.fp8 and want.fp8_attention and state_of(pipe).fp8_attention
    assert {p.min_tokens for p in t.attn_processors.values()} == {fp8_attention.MIN_TOKENS}
    assert any(m.startswith("go_fast: attention in fp8 in") for m in logged)
    monkeypatch.setenv("FLUXKILN_FP8_ATTENTION_MIN_TOKENS", "0")
    prepare(pipe, [], True, "cuda", lambda _a: {}, fast=True, log=log)
    assert {p.min_tokens for p in t.attn_processors.values()} == {0}
    prepare(pipe, [], False, "cuda", lambda _a: {}, fast=True)
    assert {type(p) for p in t.attn_processors.values()} == stock and not state_of(pipe).fp8_attention
    prepare(pipe, [], True, "cuda", lambda _a: {}, fast=True)
    prepare(pipe, [], False, "cuda", lambda _a: {})  # what train_lora asks for
    assert {type(p) for p in t.attn_processors.values()} == stock and not fast.has_fp8(t)
    for p in t.attn_processors.values():  # diffusers' context parallelism keeps its processors
        p._parallel_config = object()
    assert fast.fp8_attention_supported(t) == (False, "diffusers' context parallelism attends across the GPUs")


@pytest.mark.skipif(not CUDNN_FP8, reason="cuDNN's fp8 attention needs a Hopper GPU and nvidia-cudnn-frontend")
def test_cudnn_fp8_attention_matches_the_written_out_arithmetic():
    q, k, v = _qkv(tokens=320, heads=2, dim=64, device="cuda")
    q8, dq = fp8_attention.quantize(q)
    k8, dk = fp8_attention.quantize(k)
    v8, dv = fp8_attention.quantize(v)
    args = (q8, k8, v8, dq, dk, dv, 1.0 / dv)
    gpu = torch.ops.fluxkiln.fp8_sdpa(*args).float() * dv
    written = torch.ops.fluxkiln.fp8_sdpa.default(*(a.cpu() for a in args)).float() * dv.cpu()
    assert _rel(gpu.cpu(), written) < 0.06  # the same roundings, accumulated in another order
    assert _rel(fp8_attention.attention(q, k, v), _exact(q, k, v)) < 0.1


@pytest.mark.skipif(not CUDNN_FP8, reason="cuDNN's fp8 attention needs a Hopper GPU and nvidia-cudnn-frontend")
def test_cudnn_fp8_attention_replays_in_a_cuda_graph():
    q, k, v = _qkv(tokens=320, heads=2, dim=64, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fp8_attention.attention(q, k, v)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fp8_attention.attention(q, k, v)
    q.mul_(0.5)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, fp8_attention.attention(q, k, v))
