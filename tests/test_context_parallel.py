"""fluxkiln's context parallelism on CPU with gloo: two processes split one forward's tokens and get one process's
output (Ulysses, all-gather and overlapped all-gather attention, an odd token count that cannot split, the hooks
removed again)."""

from __future__ import annotations

import os
import sys

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from helpers.ranks import spawn_ranks  # noqa: E402

from fluxkiln.plugins.flux import context  # noqa: E402


def _transformer(heads: int):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=2,
                                  attention_head_dim=16, num_attention_heads=heads, joint_attention_dim=32,
                                  pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=[4, 6, 6]).eval()


def _inputs(img_tokens: int, txt_tokens: int, batch: int = 1) -> dict:
    g = torch.Generator().manual_seed(1)
    side = int(img_tokens ** 0.5)
    ids = torch.zeros(side, img_tokens // side, 3)
    ids[..., 1] = torch.arange(side)[:, None]
    ids[..., 2] = torch.arange(img_tokens // side)[None, :]
    return dict(hidden_states=torch.randn(batch, img_tokens, 16, generator=g),
                encoder_hidden_states=torch.randn(batch, txt_tokens, 32, generator=g),
                pooled_projections=torch.randn(batch, 32, generator=g), timestep=torch.tensor([0.7] * batch),
                guidance=torch.tensor([3.5] * batch), img_ids=ids.reshape(-1, 3),
                txt_ids=torch.zeros(txt_tokens, 3), return_dict=False)


def _worker(rank: int, port: int, cases: list, out: dict) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        for name, heads, mode, img, txt, batch in cases:
            model = _transformer(heads)
            with torch.no_grad():
                alone = model(**_inputs(img, txt, batch))[0]
                state = context.enable(model, 2, mode)
                during = torch._inductor.config.reorder_for_compute_comm_overlap
                split = model(**_inputs(img, txt, batch))[0]
                context.disable(model)
                again = model(**_inputs(img, txt, batch))[0]
            out[f"{name}/reorder"] = (during, torch._inductor.config.reorder_for_compute_comm_overlap)
            if rank == 0:
                out[name] = (state.mode, float((split - alone).abs().max()), float(alone.abs().max()),
                             tuple(split.shape), bool(torch.equal(again, alone)),
                             type(model.attn_processors[next(iter(model.attn_processors))]).__name__)
    finally:
        dist.destroy_process_group()


CASES = [("ulysses", 2, "ulysses", 64, 8, 1), ("allgather", 3, "auto", 64, 8, 1), ("auto", 2, "auto", 64, 8, 1),
         ("overlap", 3, "overlap", 64, 8, 1), ("odd", 2, "ulysses", 63, 8, 1), ("batch", 2, "allgather", 64, 8, 2)]


@pytest.fixture(scope="module")
def results():
    return spawn_ranks(_worker, 2, CASES)


@pytest.mark.skipif(sys.platform == "win32", reason="gloo processes")
@pytest.mark.parametrize(("case", "mode"), [("ulysses", "ulysses"), ("allgather", "allgather"),
                                            ("auto", "allgather"), ("overlap", "overlap"),
                                            ("odd", "ulysses"), ("batch", "allgather")])
def test_two_ranks_make_one_process_output(results, case, mode):
    chosen, diff, scale, shape, restored, processor = results[case]
    assert chosen == mode  # auto: all-gather of k and v, whether the heads divide by the ranks or not
    assert shape[:2] == (2 if case == "batch" else 1, 63 if case == "odd" else 64)  # every token back, in order
    assert scale > 0.1 and diff <= 1e-5 * max(1.0, scale), (case, diff)
    assert restored and processor == "FluxAttnProcessor"  # disable() gives the stock model back exactly
    # Inductor reorders compute and exchanges while split (the compiled blocks overlap them), as before after
    assert results[f"{case}/reorder"] == (True, False)


def test_ulysses_refuses_heads_that_do_not_divide():
    with pytest.raises(ValueError, match="divide by 2 ranks"):
        context.choose_mode("ulysses", 3, 2)
    assert context.choose_mode("auto", 24, 4) == "allgather" and context.choose_mode("auto", 24, 5) == "allgather"
    assert context.choose_mode("ulysses", 24, 4) == "ulysses"
    assert context.choose_mode("overlap", 24, 4) == "overlap"  # never chosen by auto: only when asked for
    with pytest.raises(ValueError, match="choose from auto, ulysses, allgather, overlap"):
        context.choose_mode("ring", 24, 2)


CP_RECIPE = """
[recipe]
name = "cp"

[nodes.base]
type = "load_model"
model = "builtin:tiny-flux"
context_parallel = 2

[nodes.images]
type = "sample"
model = "@base"
prompt = "a red fox"
num_inference_steps = 3
aspect_ratio = "custom"
width = 256
height = 256
seed = 5

[nodes.saved]
type = "save"
images = "@images"
output_format = "png"
"""


def _run(tmp_path, name: str, *extra: str):
    import subprocess
    from pathlib import Path

    builtin = Path(os.environ["FLUXKILN_CACHE"]) / "builtin"
    builtin.mkdir(parents=True, exist_ok=True)
    cache = tmp_path / f"cache-{name}"
    cache.mkdir()
    (cache / "builtin").symlink_to(builtin, target_is_directory=True)
    recipe = tmp_path / "cp.toml"
    recipe.write_text(CP_RECIPE)
    done = subprocess.run([sys.executable, "-m", "fluxkiln.engine.cli", "run", str(recipe), "--output",
                           str(tmp_path / name), "--json", *extra], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, FLUXKILN_CACHE=str(cache), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES=""))
    assert done.returncode == 0, done.stderr[-3000:]
    return done, sorted((tmp_path / name).glob("saved_*.png"))


@pytest.mark.skipif(sys.platform == "win32", reason="gloo processes")
@pytest.mark.timeout(400)  # three fresh CLI runs, two of them two gloo ranks: past 120 s beside 15 xdist workers
def test_context_parallel_through_the_cli_makes_the_one_process_image(tmp_path):
    import json

    import numpy as np
    from PIL import Image

    two, [split] = _run(tmp_path, "two", "--gpus", "2")
    _one, [alone] = _run(tmp_path, "one", "--set", "nodes.base.context_parallel=1")
    over, [overlapped] = _run(tmp_path, "overlap", "--gpus", "2", "--set", "nodes.base.context_parallel_mode=overlap")
    a, b, c = (np.asarray(Image.open(p).convert("RGB")).astype(int) for p in (split, alone, overlapped))
    assert a.std() > 10 and abs(a - b).max() <= 2  # float rounding of a differently ordered attention sum
    assert abs(c - b).max() <= 2  # the local and remote halves of attention merged by log-sum-exp: the same image
    assert any(json.loads(x).get("message") == "context parallel: each image's tokens split over 2 ranks (overlap "
               "attention)" for x in over.stdout.splitlines() if x.startswith("{"))
    logs = [json.loads(x) for x in two.stdout.splitlines() if x.startswith("{")]
    assert not any("item(s) over 2 ranks" in e.get("message", "") for e in logs)  # one image, made by both ranks
    assert any(e.get("message") == "context parallel: each image's tokens split over 2 ranks (allgather attention)"
               for e in logs)


def test_saved_compiled_blocks_of_a_split_model_are_told_apart_by_mode_degree_and_rank():
    from fluxkiln.plugins.flux import variantkeys

    block = _transformer(2).single_transformer_blocks[0]
    sig = variantkeys.call_signature((torch.zeros(1, 4, 32),), {})
    keys = {variantkeys.variant_key(block, sig)}  # unsplit
    # overlap slices the gathered keys by rank: rank 1 running rank 0's compiled block would attend to its own
    # keys twice; ulysses and allgather trace other collectives for the same shapes
    for mode, degree, rank in [("ulysses", 2, 0), ("allgather", 2, 0), ("overlap", 2, 0), ("overlap", 2, 1),
                               ("allgather", 4, 0)]:
        block.attn.set_processor(context.ContextAttnProcessor(context.Split(degree, rank, mode, group_name="0")))
        keys.add(variantkeys.variant_key(block, sig))
    assert len(keys) == 6



def _graphed_worker(rank: int, port: int, failing_rank: int, out: dict) -> None:
    """A split transformer called through whole-step graphs (recorded on the second call, replayed after) in a
    world the engine joins and leaves, as a run does; real CUDA graphs where there are 2 GPUs."""
    import faulthandler

    from fluxkiln.engine import distributed
    from fluxkiln.plugins.flux import graphed

    faulthandler.dump_traceback_later(120, exit=True)  # a hang fails the test with every thread's stack
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
    torch.set_num_threads(1)
    distributed.init()
    try:
        sys.path.insert(0, os.path.dirname(__file__))
        from test_graphed import stand_in_record

        device = "cuda" if _two_gpus() else "cpu"
        recorder = _fails_capturing if rank == failing_rank else None if device == "cuda" else stand_in_record
        model = _transformer(2).to(device)
        step_inputs = [{k: v.to(device) if isinstance(v, torch.Tensor) else v
                        for k, v in _inputs(64, 8).items()} for _ in range(4)]
        for i, kw in enumerate(step_inputs):
            kw["hidden_states"] = kw["hidden_states"] * (1 + i)  # each step its own input
        context.enable(model, 2, "allgather")
        with torch.no_grad():
            ordinary = [model(**kw)[0].clone() for kw in step_inputs]
            step = graphed.WholeStep(model, recorder=recorder)
            model._compiled_call_impl = step
            stepped = [model(**kw)[0].clone() for kw in step_inputs]
            hooked = model.register_forward_pre_hook(lambda m, a: None)  # someone else's hook: not recorded
            model(**step_inputs[0])
            hooked.remove()
        held = sum(isinstance(g, graphed.Graph) for g in step.graphs.values())
        out[rank] = {"stats": (step.stats.recorded, step.stats.replayed, step.stats.ordinary),
                     "failed": list(step.stats.failed),
                     "diff": max(float((a - b).abs().max()) for a, b in zip(ordinary, stepped, strict=True)),
                     "distinct": not torch.equal(stepped[2], stepped[3]), "held": held}
    finally:
        distributed.shutdown()  # frees graphs that recorded collectives first: NCCL would wait for them forever
        out[f"left{rank}"] = True
        faulthandler.cancel_dump_traceback_later()
    out[f"released{rank}"] = not any(isinstance(g, graphed.Graph) for g in step.graphs.values())


def _fails_capturing(call, args, kwargs, buffers):
    """A recording that runs the call (with its exchanges, as a real one's first run does), then fails to capture."""
    call(*args, **kwargs)
    raise RuntimeError("operation not permitted when stream is capturing")


def _two_gpus() -> bool:
    return torch.cuda.is_available() and torch.cuda.device_count() >= 2


@pytest.mark.skipif(sys.platform == "win32", reason="gloo processes")
def test_a_split_transformer_is_recorded_whole_with_its_exchanges_and_released_before_the_group_is_left():
    got = spawn_ranks(_graphed_worker, 2, -1)  # real CUDA graphs and NCCL on 2 GPUs, else a stand-in and gloo
    for rank in (0, 1):
        # first call as usual, second recorded, two replays; the extra hook: as usual
        assert got[rank]["stats"] == (1, 2, 2) and got[rank]["held"] == 1
        assert got[rank]["diff"] == 0.0 and got[rank]["distinct"]  # the split and the exchanges are in the graph
        assert got[f"left{rank}"] and got[f"released{rank}"]


@pytest.mark.skipif(sys.platform == "win32", reason="gloo processes")
def test_when_one_rank_cannot_record_no_rank_keeps_a_graph_and_all_run_as_usual():
    got = spawn_ranks(_graphed_worker, 2, 1)  # rank 1's recording fails
    for rank in (0, 1):
        assert got[rank]["stats"] == (0, 0, 5) and got[rank]["held"] == 0  # agreed: nobody waits for a replay
        assert got[rank]["diff"] == 0.0
    assert "another rank of the context-parallel group could not record" in got[0]["failed"][0]
    assert "not permitted when stream is capturing" in got[1]["failed"][0]


def test_inductor_reorders_exchanges_while_any_transformer_is_split_and_is_restored_after_the_last(monkeypatch):
    from types import SimpleNamespace

    cfg = torch._inductor.config
    monkeypatch.setattr(cfg, "reorder_for_compute_comm_overlap", False)
    fake = SimpleNamespace(rank=lambda group=None: 0)
    monkeypatch.setattr(torch.distributed, "get_rank", fake.rank)
    group = SimpleNamespace(group_name="0")
    a, b = _transformer(2), _transformer(2)
    context.enable(a, 2, group=group)
    context.enable(b, 2, group=group)
    context.disable(a)
    assert cfg.reorder_for_compute_comm_overlap is True  # b is still split
    context.disable(b)
    assert cfg.reorder_for_compute_comm_overlap is False
    monkeypatch.setenv("FLUXKILN_CP_REORDER", "0")
    state = context.enable(a, 2, group=group)
    assert cfg.reorder_for_compute_comm_overlap is False and "/reorder" not in \
        a.single_transformer_blocks[0].attn.processor.precompile_tag  # a saved variant of either kind is told apart
    context.disable(a)
    assert not state.reorder


class Pipe:
    """What ``modulation.steps`` reads of a pipeline: its transformer and its scheduler's timesteps."""

    def __init__(self, **parts: object) -> None:
        self.__dict__.update(parts)


def _tabled_worker(rank: int, port: int, _arg: object, out: dict) -> None:
    """A split transformer called through whole steps with every step's modulation computed as the call starts
    (as ``sample`` runs on GPUs), against the same split transformer computing it step by step."""
    from types import SimpleNamespace

    import torch.distributed as dist

    from fluxkiln.plugins.flux import graphed, modulation

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        sys.path.insert(0, os.path.dirname(__file__))
        from test_graphed import stand_in_record

        model = _transformer(2)
        calls = []
        for i, t in enumerate((0.7, 0.5, 0.3)):  # three steps of one call: the same prompt, new times and latents
            kw = _inputs(64, 8)
            kw.update(hidden_states=kw["hidden_states"] * (1 + i), timestep=torch.tensor([t]))
            calls.append(kw)
        for kw in calls[1:]:
            kw.update(pooled_projections=calls[0]["pooled_projections"], guidance=calls[0]["guidance"])
        context.enable(model, 2, "allgather")
        with torch.no_grad():
            plain = [model(**kw)[0].clone() for kw in calls]
            model._compiled_call_impl = graphed.WholeStep(model, recorder=stand_in_record)
            modulation.install(model)
            pipe = Pipe(transformer=model, scheduler=SimpleNamespace(timesteps=torch.tensor([700., 500., 300.])))
            with modulation.steps(pipe):
                tabled = [model(**kw)[0].clone() for kw in calls]
        stats = modulation.stats(model)
        out[rank] = {"stats": (stats.built, stats.looked_up, stats.computed),
                     "diff": max(float((a - b).abs().max()) for a, b in zip(plain, tabled, strict=True)),
                     "scale": float(plain[0].abs().max())}
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(sys.platform == "win32", reason="gloo processes")
def test_a_split_transformer_takes_every_steps_modulation_from_one_table():
    got = spawn_ranks(_tabled_worker, 2, None)
    for rank in (0, 1):
        assert got[rank]["stats"] == (1, 3, 0)  # one table for the call, every step served from it
        assert got[rank]["scale"] > 0.1 and got[rank]["diff"] <= 1e-5 * got[rank]["scale"], got[rank]
