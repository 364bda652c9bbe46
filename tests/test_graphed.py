"""Whole transformer calls as CUDA graphs (plugins/flux/graphed.py).

On a CPU the bookkeeping is tested with a stand-in recorder whose "graph" runs the recorded call again on the
recording's input buffers: what is replayed, with which inputs, what is called as usual, and when graphs are
dropped.  On a CUDA GPU a real graph must give the ordinary call's output bit for bit, and ``sample`` must
replay graphs across calls and make the same image as without them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import FluxTransformer2DModel

from fluxkiln.plugins.flux import fast, graphed


class ReplaysTheCall:
    """A stand-in CUDA graph: replaying runs the recorded call again on the same buffers, into the same outputs."""

    def __init__(self, call, args, kwargs, output):
        self.call, self.args, self.kwargs, self.output = call, args, kwargs, output

    def replay(self):
        for o, new in zip(self.output, self.call(*self.args, **self.kwargs), strict=True):
            o.copy_(new)


def stand_in_record(call, args, kwargs, buffers):
    out = call(*args, **kwargs)
    static = tuple(o.clone() for o in out)
    return tuple(o.clone() for o in out), graphed.Graph(ReplaysTheCall(call, args, kwargs, static), buffers, static)


def failing_record(call, args, kwargs, buffers):
    raise RuntimeError("operation not permitted when stream is capturing")


def transformer(device: str = "cpu") -> torch.nn.Module:
    torch.manual_seed(0)
    return FluxTransformer2DModel(patch_size=1, in_channels=8, num_layers=1, num_single_layers=2,
                                  attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                  pooled_projection_dim=16, guidance_embeds=True, axes_dims_rope=(2, 2, 4)
                                  ).eval().to(device)


def inputs(seed: int, tokens: int = 64, device: str = "cpu", **extra) -> dict:
    g = torch.Generator().manual_seed(seed)
    args = dict(hidden_states=torch.randn(1, tokens, 8, generator=g), encoder_hidden_states=torch.randn(1, 8, 16, generator=g),
                pooled_projections=torch.randn(1, 16, generator=g), timestep=torch.rand(1, generator=g),
                guidance=torch.tensor([3.0]), img_ids=torch.zeros(tokens, 3), txt_ids=torch.zeros(8, 3),
                joint_attention_kwargs={}, return_dict=False)
    args = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    return {**args, **extra}


def ordinary(tr, **kw) -> torch.Tensor:
    with torch.no_grad():
        return tr._call_impl(**kw)[0]


def stepped(tr, recorder=stand_in_record):
    step = graphed.WholeStep(tr, recorder=recorder)
    tr._compiled_call_impl = step
    return step


def call(tr, **kw) -> torch.Tensor:
    with torch.no_grad():
        return tr(**kw)[0]


def test_second_call_records_later_calls_replay_with_their_own_inputs():
    tr = transformer()
    step = stepped(tr)
    outs = [call(tr, **inputs(s)) for s in range(5)]
    assert (step.stats.recorded, step.stats.replayed, step.stats.ordinary) == (1, 3, 1)
    for s, out in enumerate(outs):
        assert torch.equal(out, ordinary(tr, **inputs(s))), s  # replays read the new inputs, not the recorded ones
    assert not torch.equal(outs[3], outs[4])
    assert outs[3].data_ptr() != outs[4].data_ptr()  # each replay hands out its own copy of the output


def test_each_signature_gets_its_own_graph_and_the_oldest_is_dropped(monkeypatch):
    monkeypatch.setattr(graphed, "MAX_GRAPHS", 2)
    tr = transformer()
    step = stepped(tr)
    for tokens in (16, 32, 64):
        for s in range(3):
            assert torch.equal(call(tr, **inputs(s, tokens)), ordinary(tr, **inputs(s, tokens)))
    assert step.stats.recorded == 3 and step.stats.replayed == 3
    assert len(step.graphs) == 2  # 16 tokens was dropped
    call(tr, **inputs(0, 16))
    assert step.stats.recorded == 4  # recorded again at once: its first call was long ago


@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")  # CPU autocast's layer norm
@pytest.mark.parametrize("case", ["grad", "autocast", "return_dict", "attention_kwargs", "hook", "block_hook", "off"])
def test_calls_a_graph_cannot_hold_run_as_usual(case, monkeypatch):
    tr = transformer()
    step = stepped(tr)
    kw = inputs(0)
    if case == "return_dict":
        kw["return_dict"] = True
    elif case == "attention_kwargs":
        kw["joint_attention_kwargs"] = {"scale": 0.5}
    elif case == "hook":
        tr.register_forward_pre_hook(lambda m, a: None)
    elif case == "block_hook":
        fast.blocks(tr)[1].register_forward_hook(lambda m, a, o: None)
    elif case == "off":
        monkeypatch.setenv("FLUXKILN_CUDA_GRAPHS", "0")
    for _ in range(3):
        with torch.set_grad_enabled(case == "grad"), torch.autocast("cpu", enabled=case == "autocast"):
            tr(**kw)
    assert step.stats.recorded == 0 and step.stats.replayed == 0 and step.stats.ordinary == 3
    if case == "off":  # installed all the same (precomputed modulation is filled through it), never recording
        assert isinstance(graphed.install(transformer()), graphed.WholeStep)


def test_graphs_are_dropped_when_the_model_changes():
    tr = transformer()
    step = stepped(tr)
    for s in range(3):
        call(tr, **inputs(s))
    assert step.stats.recorded == 1
    tr.proj_out = torch.nn.Linear(tr.proj_out.in_features, tr.proj_out.out_features)  # a new module: new weights
    assert torch.equal(call(tr, **inputs(7)), ordinary(tr, **inputs(7)))
    assert step.stats.recorded == 1 and not step.graphs  # dropped; this signature starts again
    tr.to(torch.float64).to(torch.float32)  # every parameter moved
    for s in range(3):
        call(tr, **inputs(s))
    tr.to(torch.float64).to(torch.float32)
    assert torch.equal(call(tr, **inputs(9)), ordinary(tr, **inputs(9)))
    assert step.stats.recorded == 2
    block = fast.blocks(tr)[0]
    block.attn.processor = type(block.attn.processor)()  # another attention processor
    call(tr, **inputs(1))
    assert not step.graphs


class Sliced(torch.nn.Module):
    """Like diffusers' VAE mid-block: slicing a ModuleList in forward registers its modules into a new list."""

    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(3))

    def forward(self, x):
        for layer in self.layers[1:]:
            x = layer(x)
        return x


def test_registrations_outside_the_model_keep_its_graphs_and_do_not_recompile_other_code():
    tr = transformer()
    step = stepped(tr)
    for s in range(3):
        call(tr, **inputs(s))
    compiles = []

    def backend(gm, example_inputs):
        compiles.append(gm)
        return gm.forward

    sliced = torch.compile(Sliced(), backend=backend)
    with torch.no_grad():
        for _ in range(3):
            sliced(torch.ones(1, 4))
            Sliced()(torch.ones(1, 4))
    assert len(compiles) == 1  # a traced registration hook would be a guard that fails at every call
    call(tr, **inputs(5))
    assert step.stats.recorded == 1 and step.stats.replayed == 2  # the graph survived the registrations


def test_a_vae_decode_between_images_is_not_a_change_of_the_watched_model():
    from fluxkiln.plugins.flux.tiny import build_tiny_flux

    pipe = build_tiny_flux()
    graphed.install(pipe.transformer)
    before = graphed.CHANGES.count
    with torch.no_grad():
        pipe.vae.decode(torch.zeros(1, pipe.vae.config.latent_channels, 8, 8))  # its mid-block slices a ModuleList
    assert graphed.CHANGES.count == before
    fast.blocks(pipe.transformer)[0].extra = torch.nn.Linear(2, 2)  # a change of the model itself
    assert graphed.CHANGES.count == before + 1
    fast.blocks(pipe.transformer)[0].extra.bias = torch.nn.Parameter(torch.zeros(2))  # inside what was added
    assert graphed.CHANGES.count == before + 2


def test_a_failed_recording_warns_and_leaves_that_size_to_ordinary_calls():
    tr = transformer()
    step = stepped(tr, recorder=failing_record)
    with pytest.warns(RuntimeWarning, match="CUDA graph failed.*stream is capturing"):
        outs = [call(tr, **inputs(s)) for s in range(4)]
    assert torch.equal(outs[1], ordinary(tr, **inputs(1)))
    assert step.stats.recorded == 0 and step.stats.ordinary == 4 and len(step.stats.failed) == 1


def test_install_remove_and_reset():
    tr = transformer()
    step = graphed.install(tr)
    assert isinstance(step, graphed.WholeStep) and graphed.install(tr) is step
    step.graphs[("x",)] = graphed.EAGER
    graphed.reset(tr)
    assert not step.graphs and graphed.stats(tr) is step.stats
    graphed.remove(tr)
    assert tr._compiled_call_impl is None and graphed.stats(tr) is None
    tr._compiled_call_impl = lambda *a, **k: None  # someone else's compiled call is left alone
    assert graphed.install(tr) is None


def test_unloading_a_pipeline_frees_its_graphs():
    from fluxkiln.plugins.flux.load import release_pipeline
    from fluxkiln.plugins.flux.tiny import build_tiny_flux

    pipe = build_tiny_flux()
    step = graphed.install(pipe.transformer)
    step.graphs[("x",)] = graphed.EAGER
    release_pipeline(pipe)
    assert graphed.stats(pipe.transformer) is None and not step.graphs


# ------------------------------------------------------------------ a real CUDA GPU
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@gpu
def test_a_real_graph_gives_the_ordinary_output_bit_for_bit():
    tr = transformer("cuda").to(torch.bfloat16)
    fast.compile_blocks(tr, saved=False)
    step = graphed.install(tr)

    def kw(s):
        return {k: v.to(torch.bfloat16) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                for k, v in inputs(s, device="cuda").items()}

    outs = [call(tr, **kw(s)) for s in range(4)]
    assert step.stats.recorded == 1 and step.stats.replayed == 2, step.stats
    graphed.remove(tr)
    for s, out in enumerate(outs):
        assert torch.equal(out, call(tr, **kw(s))), s


@gpu
def test_sample_replays_graphs_across_calls_and_makes_the_same_images(tmp_path, monkeypatch):
    from flux_support import run_body

    from fluxkiln.engine.runner import Engine
    from fluxkiln.plugins.flux.load import get_pipeline

    sample = ('[nodes.{name}]\ntype = "sample"\nmodel = "@base"\nprompt = ["a red fox", "a blue bird"]\n'
              'aspect_ratio = "custom"\nwidth = 256\nheight = 256\nnum_inference_steps = 4\nseed = {seed}\n')
    recipe = ('[nodes.base]\ntype = "load_model"\nmodel = "builtin:tiny-flux"\ndtype = "bfloat16"\n'
              + sample.format(name="img", seed=3) + sample.format(name="img2", seed=4))
    engine = Engine(cache_dir=tmp_path / "cache")
    result = run_body(engine, tmp_path, recipe, "graphs")
    pipe = get_pipeline(result.outputs["base"]["output"])
    stats = graphed.stats(pipe.transformer)
    # both prompts in one batch: the first node's 4 calls are ordinary, recorded, replayed, replayed; the second
    # node's 4 are replays (the VAE decodes between them register modules, which must not drop the graph)
    assert stats is not None and (stats.recorded, stats.replayed, stats.ordinary) == (1, 6, 1), stats

    def images(res):
        return [np.asarray(i.image) for node in ("img", "img2") for i in res.outputs[node]["output"]]

    monkeypatch.setenv("FLUXKILN_CUDA_GRAPHS", "0")
    plain = run_body(Engine(cache_dir=tmp_path / "cache2"), tmp_path, recipe, "plain")
    for a, b in zip(images(result), images(plain), strict=True):
        assert np.array_equal(a, b)


def test_the_log_says_when_sizes_were_recorded_and_how_many_calls_replayed():
    tr = transformer()
    step = stepped(tr)
    before = step.stats.copy()
    for s in range(4):
        call(tr, **inputs(s))
    assert step.stats.since(before) == ("whole steps as CUDA graphs: 1 size(s) recorded; of 4 transformer calls "
                                        "2 replayed, 1 run as usual")
    before = step.stats.copy()
    call(tr, **inputs(5))
    assert step.stats.since(before) is None  # only replays: nothing worth a line at every call
    failing = stepped(transformer(), recorder=failing_record)
    before = failing.stats.copy()
    with pytest.warns(RuntimeWarning, match="recording the transformer call"):
        for s in range(3):
            call(failing.module, **inputs(s))
    assert failing.stats.since(before).endswith("recording failed (RuntimeError: operation not permitted when "
                                                "stream is capturing), so that size runs without")
