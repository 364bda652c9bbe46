"""train_lora's speed and memory settings: checkpointing every n-th block, fp8-stored base weights, encoders
parked on the CPU while the transformer trains, and the float32 master weights updated in bulk."""

from __future__ import annotations

import types

import pytest
import torch
from test_train_support import load_weights, losses, run, solid_dataset, write_recipe

from fluxkiln.engine.runner import Engine
from fluxkiln.plugins.train import gpu


CUDA = torch.cuda.is_available()  # train_lora compiles the blocks there, in bfloat16


@pytest.fixture
def counted_checkpoints(monkeypatch):
    """Counts the blocks run under a checkpoint: eager blocks (CPU) call torch's checkpoint on every call;
    compiled ones (GPU) call the one compiled "checkpoint this block" function, inside which torch's checkpoint
    runs only while Dynamo traces it."""
    calls: list[int] = []
    real, real_inside = torch.utils.checkpoint.checkpoint, gpu._compiled_checkpoint

    def counting(fn, *args, **kw):
        if not torch.compiler.is_compiling():
            calls.append(1)
        return real(fn, *args, **kw)

    def counting_inside(backend):
        compiled = real_inside(backend)

        def call(block, *args):
            calls.append(1)
            return compiled(block, *args)

        return call

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting)
    monkeypatch.setattr(gpu, "_compiled_checkpoint", counting_inside)
    return calls


def test_checkpointing_any_interval_gives_the_same_losses(tmp_path, counted_checkpoints):
    data = solid_dataset(tmp_path / "data")
    got = {}
    for name, extra in {"off": {}, "all": {"gradient_checkpointing": True},
                        "half": {"gradient_checkpointing": True, "gradient_checkpointing_interval": 2}}.items():
        counted_checkpoints.clear()
        recipe = write_recipe(tmp_path / f"{name}.toml", data, steps=4, **extra)
        result = run(recipe, tmp_path / f"cache-{name}", tmp_path / f"out-{name}")
        assert result.ok, [e.data for e in result.events if e.event == "node_failed"]
        got[name] = (losses(result), len(counted_checkpoints))
    blocks = 3  # builtin:tiny-flux: 1 double-stream and 2 single-stream blocks
    assert got["off"][1] == 0
    assert got["all"][1] == 4 * blocks  # every block of every step
    assert got["half"][1] == 4 * 2  # blocks 0 and 2
    # a GPU trains in bfloat16 with compiled blocks, whose recomputation fuses other kernels, and its backward
    # reductions are not bit-exact: the losses agree to bfloat16's precision there (float32 on a CPU)
    rel = 2e-2 if CUDA else 1e-5
    assert got["all"][0] == pytest.approx(got["off"][0], rel=rel)
    assert got["half"][0] == pytest.approx(got["off"][0], rel=rel)


def test_gradient_checkpointing_interval_is_checked(tmp_path, capsys):
    from fluxkiln.engine.cli import main

    recipe = write_recipe(tmp_path / "r.toml", solid_dataset(tmp_path / "data"), steps=4,
                          gradient_checkpointing=True, gradient_checkpointing_interval=0)
    assert main(["validate", str(recipe)]) != 0
    out = capsys.readouterr()
    assert "gradient_checkpointing_interval" in out.out + out.err
    assert "r.toml:" in out.out + out.err


def test_training_over_fp8_stored_base_weights(tmp_path):
    """What load_model's quantize = "fp8" does on a GPU (fluxkiln's fp8-stored layers), applied to the resident tiny
    pipeline: the adapter trains in the compute dtype with an unrounded init, and the base stays fp8."""
    from fluxkiln.plugins.flux.load import store_fp8

    data = solid_dataset(tmp_path / "data")
    engine = Engine(cache_dir=tmp_path / "cache")
    first = write_recipe(tmp_path / "a.toml", data, steps=3, learning_rate=5e-3)
    assert run(first, tmp_path / "cache", tmp_path / "out-a", engine=engine).ok
    (key,) = engine.models.keys()
    pipe = engine.models.get(key, lambda: None)
    pipe._fluxkiln_fp8 = store_fp8(pipe, pipe.transformer.dtype)  # bfloat16 on a GPU, float32 on a CPU
    linear = pipe.transformer.single_transformer_blocks[0].proj_out
    assert linear.weight.dtype == torch.float8_e4m3fn

    still = write_recipe(tmp_path / "b.toml", data, steps=3, learning_rate=1e-12, ema=False, seed=7)
    result = run(still, tmp_path / "cache", tmp_path / "out-b", engine=engine)
    assert result.ok, [e.data for e in result.events if e.event == "node_failed"]
    lora_a = [v for k, v in load_weights(result.outputs["lora"]["lora"].path).items() if ".lora_A." in k]
    assert lora_a and all(v.dtype == torch.float32 for v in lora_a)
    on_fp8_grid = [torch.equal(v, v.to(torch.float8_e4m3fn).float()) for v in lora_a]
    assert not any(on_fp8_grid), "the adapter's initial weights were rounded to fp8"

    trained = write_recipe(tmp_path / "c.toml", data, steps=12, learning_rate=5e-3, seed=7,
                           gradient_checkpointing=True)
    result = run(trained, tmp_path / "cache", tmp_path / "out-c", engine=engine)
    assert result.ok, [e.data for e in result.events if e.event == "node_failed"]
    assert all(torch.isfinite(torch.tensor(losses(result))))
    assert linear.weight.dtype == torch.float8_e4m3fn  # the base is untouched


class _Part:
    def __init__(self, log: list[str], name: str):
        self.log, self.name = log, name

    def to(self, device):
        self.log.append(f"{self.name}->{torch.device(device).type}")
        return self


def _pipe(log: list[str], offload: str = "none"):
    return types.SimpleNamespace(text_encoder=_Part(log, "clip"), text_encoder_2=_Part(log, "t5"),
                                 vae=_Part(log, "vae"), _fluxkiln_offload=offload)


def test_encoders_wait_on_the_cpu_only_when_their_outputs_are_cached():
    cuda, cpu = types.SimpleNamespace(type="cuda"), types.SimpleNamespace(type="cpu")
    pipe = _pipe([])
    assert gpu.parkable(pipe, cuda, True, True) == ["text_encoder", "text_encoder_2", "vae"]
    assert gpu.parkable(pipe, cuda, True, False) == ["text_encoder", "text_encoder_2"]
    assert gpu.parkable(pipe, cuda, False, True) == ["vae"]
    assert gpu.parkable(pipe, cpu, True, True) == []
    assert gpu.parkable(_pipe([], offload="model"), cuda, True, True) == []


def test_parked_parts_come_back_after_a_failure_and_for_previews():
    log: list[str] = []
    pipe = _pipe(log)
    with pytest.raises(RuntimeError), gpu.parked(pipe, ["text_encoder_2", "vae"], "meta"):
        assert log == ["t5->cpu", "vae->cpu"]
        with gpu.unparked(pipe, ["text_encoder_2"], "meta"):
            assert log[-1] == "t5->meta"
        assert log[-1] == "t5->cpu"
        raise RuntimeError("step failed")
    assert log[-2:] == ["t5->meta", "vae->meta"]


def _compiled_checkpointed_step_matches_eager(t, params) -> None:
    """One flow-loss step of ``t`` eager, then with its blocks compiled (aot_eager: Dynamo and the autograd
    partitioner, without generating kernels) and checkpointed inside the compiled region: the same loss and
    gradients for ``params``."""
    from fluxkiln.plugins.flux import fast
    from fluxkiln.plugins.train.flow import flow_loss

    for p in params:
        p.requires_grad_(True)
    gen = torch.Generator().manual_seed(0)
    latents, embeds = torch.randn(1, 4, 16, 16, generator=gen), torch.randn(1, 8, t.config.joint_attention_dim)
    pooled = torch.randn(1, t.config.pooled_projection_dim, generator=gen)

    def step():
        for p in params:
            p.grad = None
        loss = flow_loss(t, latents, embeds, pooled, torch.Generator().manual_seed(1), "sigmoid",
                         torch.device("cpu"), torch.float32)
        loss.backward()
        return loss.item(), torch.cat([p.grad.flatten() for p in params])

    eager_loss, eager_grads = step()
    fast.compile_blocks(t, backend="aot_eager")
    gpu.checkpointing(t, 1, compiled=True, backend="aot_eager")
    try:
        loss, grads = step()
    finally:
        fast.uncompile_blocks(t)
    assert loss == pytest.approx(eager_loss, rel=1e-6)
    assert torch.allclose(grads, eager_grads, rtol=1e-5, atol=1e-7)
    assert grads.abs().sum() > 0


def test_checkpoint_inside_compiled_blocks_gives_the_same_gradients(one_torch_thread):
    """On a GPU the blocks are compiled and the checkpoint goes inside the compiled region."""
    from fluxkiln.plugins.flux.tiny import build_tiny_flux

    t = build_tiny_flux("dev").transformer.requires_grad_(False)
    _compiled_checkpointed_step_matches_eager(
        t, [b.norm.linear.weight for b in t.single_transformer_blocks] + [t.transformer_blocks[0].ff.net[2].weight])


def test_fp8_stored_layers_compile_train_and_keep_no_dequantized_copy(one_torch_thread):
    """quantize = "fp8" stores the block linears as Fp8StoredLinear: outputs within fp8's rounding of the
    original weights, a backward pass that saves the fp8 weight (not a dequantized copy, not the input), and
    compiled checkpointed blocks with the eager gradients: what lets the 24 GB-card setup train with compiled
    blocks on a GPU."""
    from fluxkiln.plugins.flux.fp8linear import Fp8StoredLinear, store_fp8
    from fluxkiln.plugins.flux.tiny import build_tiny_flux

    t = build_tiny_flux("dev").transformer.requires_grad_(False)
    linear = t.single_transformer_blocks[0].proj_out
    x = torch.randn(3, 5, linear.in_features)
    want = linear(x)
    how = store_fp8(t, torch.float32)
    assert "fp8" in how and "float32" in how
    stored = t.single_transformer_blocks[0].proj_out
    assert isinstance(stored, Fp8StoredLinear) and stored.weight.dtype == torch.float8_e4m3fn
    assert not isinstance(t.single_transformer_blocks[0].norm.linear, Fp8StoredLinear)  # modulation stays
    assert not isinstance(t.x_embedder, Fp8StoredLinear)  # only the blocks' layers
    got = stored(x)
    assert (got - want).abs().max() <= 0.07 * want.abs().max()  # e4m3's 3 mantissa bits
    assert not torch.equal(got, want)

    xg = x.clone().requires_grad_(True)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda s: saved.append(s) or s, lambda s: s):
        out = stored(xg)
    assert [s.dtype for s in saved] == [torch.float8_e4m3fn, torch.float32]  # the weight and its row scales
    out.pow(2).sum().backward()
    dequantized = stored.weight.float() * stored.weight_scale
    assert torch.allclose(xg.grad, (2 * out.detach()) @ dequantized, rtol=1e-5, atol=1e-6)
    # trainable weights in every block (as a LoRA's are), before and after fp8-stored layers
    _compiled_checkpointed_step_matches_eager(
        t, [b.norm.linear.weight for b in t.single_transformer_blocks] + [t.transformer_blocks[0].norm1.linear.weight])


def test_attention_gradient_arrives_in_the_output_layout():
    import torch.nn.functional as F

    q, k, v = (torch.randn(2, 6, 4, 8).permute(0, 2, 1, 3).requires_grad_(True) for _ in range(3))
    real = F.scaled_dot_product_attention
    seen: list[tuple[int, ...]] = []
    with gpu.gradient_in_output_layout():
        assert F.scaled_dot_product_attention is not real
        out = F.scaled_dot_product_attention(query=q, key=k, value=v)
        kernel_out = out.grad_fn.next_functions[0][0]  # the SDPA node behind the layout fix
        kernel_out.register_prehook(lambda grads: seen.append(tuple(grads[0].stride())))
        layout = tuple(out.stride())
        out.permute(0, 2, 1, 3).flatten(2, 3).pow(2).sum().backward()  # what diffusers does with it
    assert F.scaled_dot_product_attention is real
    assert seen == [layout]
    expected = [g.clone() for g in torch.autograd.grad(real(q, k, v).permute(0, 2, 1, 3).flatten(2, 3).pow(2).sum(),
                                                     (q, k, v))]
    assert all(torch.allclose(a, b) for a, b in zip([q.grad, k.grad, v.grad], expected, strict=True))


def test_out_of_memory_hint_leads_to_the_24gb_setup():
    from fluxkiln.plugins.train.config import TrainConfig
    from fluxkiln.plugins.train.preview import oom_hint

    plain = oom_hint(TrainConfig(resolution=[1024]), {"quantize": "none", "offload": "none"})
    assert plain.index("gradient_checkpointing = true") < plain.index('quantize = "fp8"') < plain.index(
        'offload = "model"') < plain.index("resolution = [512]")
    half = oom_hint(TrainConfig(gradient_checkpointing=True, gradient_checkpointing_interval=2),
                    {"quantize": "fp8", "offload": "model"})
    assert "gradient_checkpointing_interval = 1 (now 2)" in half
    assert 'quantize = "fp8"' not in half and 'offload = "model"' not in half
