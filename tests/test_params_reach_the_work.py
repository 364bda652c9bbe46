"""Every documented parameter of every built-in node type reaches the work.

For each parameter, :data:`CHECKS` names two valid values; running a small recipe on the tiny models with each
must give observably different results (the node's outputs and their metadata, the files it writes, its log
lines, its progress metrics, or its error).  A control run per node type first proves the observation itself is
deterministic, so a difference can only come from the parameter.  Parameters that cannot show a difference on a
CPU are listed in :data:`NOT_ON_CPU` with the reason and where else they are covered.  A parameter in neither
table fails :func:`test_every_parameter_has_a_check`, so a new parameter cannot ship unchecked.
"""

from __future__ import annotations

import hashlib
import json
import re
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from test_caption_helpers import engine as fixture_engine

from fluxkiln.engine.registry import Registry


@dataclass(frozen=True)
class Check:
    """Two valid values of a parameter, and the other keys of the node that make the parameter matter."""

    a: Any
    b: Any
    base: dict[str, Any] = field(default_factory=dict)


TRAIN_FAST = {"steps": 3, "resolution": [32], "lora_rank": 2, "save_every": 0, "max_sequence_length": 16,
              "export_formats": ["diffusers"], "optimizer": "adamw", "learning_rate": 1e-3, "save_dtype": "float32",
              "caption_dropout_rate": 0.0}
SAMPLES = {"sample_every": 3, "sample_prompts": ["a photo of [trigger]"], "sample_steps": 2, "sample_resolution": 32}

CHECKS: dict[tuple[str, str], Check] = {
    # load_model: observed through the sample it feeds
    ("load_model", "model"): Check("builtin:tiny-flux", "builtin:tiny-flux-schnell"),
    ("load_model", "dtype"): Check("float32", "bfloat16"),
    ("load_model", "download"): Check(False, True, {"model": "nobody-here/no-such-flux-model"}),
    ("load_model", "base"): Check("builtin:tiny-flux", "builtin:tiny-flux-schnell", {"model": "single.safetensors"}),
    # apply_lora: observed through the sample it feeds
    ("apply_lora", "lora"): Check("@t1", "@t2"),
    ("apply_lora", "lora_scale"): Check(1.0, 3.0),
    ("apply_lora", "extra_lora"): Check(None, "@t2"),
    ("apply_lora", "extra_lora_scale"): Check(1.0, -1.0, {"extra_lora": "@t2"}),
    ("apply_lora", "fuse"): Check(False, True),
    # sample
    ("sample", "prompt"): Check("a red fox", "a blue whale"),
    ("sample", "aspect_ratio"): Check("1:1", "16:9", {"width": None, "height": None, "megapixels": "0.25"}),
    ("sample", "width"): Check(256, 320),
    ("sample", "height"): Check(256, 320),
    ("sample", "megapixels"): Check("1", "0.25", {"aspect_ratio": "1:1", "width": None, "height": None}),
    ("sample", "num_outputs"): Check(1, 2),
    ("sample", "num_inference_steps"): Check(2, 3),
    ("sample", "guidance"): Check(1.0, 5.0),
    ("sample", "seed"): Check(1, 2),
    ("sample", "image"): Check(None, "in.png", {"prompt_strength": 0.5}),
    ("sample", "prompt_strength"): Check(0.3, 0.9, {"image": "in.png"}),
    ("sample", "cache_threshold"): Check(0.0, 0.9),  # 0.9 reuses the cached blocks on later steps: other pixels
    ("sample", "lora_scale"): Check(None, 0.5),  # no LoRA here: recorded and warned about (pixels: test_generation)
    # save
    ("save", "output_format"): Check("png", "jpg"),
    ("save", "output_quality"): Check(20, 90, {"output_format": "jpg"}),
    ("save", "filename"): Check("a", "b"),
    # grid (two sample inputs of two images each)
    ("grid", "images"): Check("@img", "@img2"),
    ("grid", "images_2"): Check(None, "@img2"),
    **{("grid", f"images_{i}"): Check(None, "@img2") for i in range(3, 9)},
    ("grid", "columns"): Check(1, 2),
    ("grid", "rows"): Check(1, 2),
    ("grid", "transpose"): Check(False, True),
    ("grid", "row_labels"): Check(["r"], ["s"]),
    ("grid", "col_labels"): Check(["c", "d"], ["e", "f"]),
    ("grid", "title"): Check("one", "two"),
    ("grid", "label_from"): Check("seed", "prompt"),
    ("grid", "cell_size"): Check(64, 96),
    ("grid", "font_size"): Check(8, 14),
    ("grid", "background"): Check("white", "black"),
    ("grid", "row_axis"): Check(None, "seed"),
    ("grid", "col_axis"): Check(None, "seed"),
    ("grid", "page_axis"): Check(None, "seed"),
    # safety_check on solid colours (tiny models: red unsafe, rose flagged by stage 1 only)
    ("safety_check", "checker"): Check("builtin:tiny-safety", "none"),
    ("safety_check", "classifier"): Check("builtin:tiny-safety", "none"),
    ("safety_check", "policy"): Check("drop", "blur"),
    ("safety_check", "checker_adjustment"): Check(0.0, 1.0),
    ("safety_check", "classifier_threshold"): Check(0.5, 0.0),
    # dataset
    ("dataset", "source"): Check("data", "data2"),
    ("dataset", "max_images"): Check(1000, 1),
    ("dataset", "max_files"): Check(10000, 1),
    ("dataset", "max_total_bytes"): Check(2**31, 10),
    ("dataset", "max_pixels"): Check(2**26, 100),
    # caption
    ("caption", "model"): Check("builtin:tiny-captioner", "builtin:tiny-florence2"),
    ("caption", "prompt"): Check(None, "a photo of"),
    ("caption", "prefix"): Check("", "P, "),
    ("caption", "suffix"): Check("", ", S"),
    ("caption", "trigger_word"): Check(None, "TOK"),
    ("caption", "trigger_placement"): Check("prefix", "suffix", {"trigger_word": "TOK"}),
    ("caption", "overwrite"): Check(False, True),
    ("caption", "max_length"): Check(4, 12),
    ("caption", "captions_dir"): Check(None, "caps"),
    # train_lora
    ("train_lora", "dataset"): Check("@data", "@data2"),
    ("train_lora", "trigger_word"): Check("TOK", "ZQX"),
    ("train_lora", "steps"): Check(3, 4),
    ("train_lora", "resume"): Check("auto", "never"),
    ("train_lora", "learning_rate"): Check(1e-3, 1e-2),
    ("train_lora", "batch_size"): Check(1, 2),
    ("train_lora", "resolution"): Check([32], [48]),
    ("train_lora", "lora_rank"): Check(2, 4),
    ("train_lora", "lora_alpha"): Check(None, 8.0),
    ("train_lora", "caption_dropout_rate"): Check(0.0, 1.0),
    ("train_lora", "optimizer"): Check("adamw", "sgd"),
    ("train_lora", "lr_scheduler"): Check("constant", "linear"),
    ("train_lora", "lr_warmup_steps"): Check(0, 2, {"lr_scheduler": "linear"}),
    ("train_lora", "max_grad_norm"): Check(1.0, 1e-4),
    ("train_lora", "layers_to_optimize_regex"): Check(None, "single_transformer_blocks"),
    ("train_lora", "timestep_sampling"): Check("sigmoid", "linear"),
    ("train_lora", "preservation_class"): Check(None, "photo"),
    ("train_lora", "preservation_weight"): Check(1.0, 4.0, {"preservation_class": "photo"}),
    ("train_lora", "preservation_every"): Check(1, 2, {"preservation_class": "photo"}),
    ("train_lora", "mask_path"): Check(None, "masks"),
    ("train_lora", "mask_min_value"): Check(0.1, 0.5, {"mask_path": "masks"}),
    ("train_lora", "ema"): Check(True, False),
    ("train_lora", "ema_decay"): Check(0.5, 0.9),
    ("train_lora", "seed"): Check(1, 2),
    ("train_lora", "save_every"): Check(0, 1),
    ("train_lora", "keep_last"): Check(1, 2, {"save_every": 1}),
    ("train_lora", "sample_every"): Check(0, 3, {k: v for k, v in SAMPLES.items() if k != "sample_every"}),
    ("train_lora", "sample_prompts"): Check(["a photo of [trigger]"], ["[trigger] at night"], SAMPLES),
    ("train_lora", "sample_steps"): Check(1, 2, SAMPLES),
    ("train_lora", "sample_guidance"): Check(1.0, 6.0, SAMPLES),
    ("train_lora", "sample_resolution"): Check(32, 48, SAMPLES),
    ("train_lora", "sample_seed"): Check(1, 2, SAMPLES),
    ("train_lora", "max_sequence_length"): Check(4, 16, {"trigger_word": "a b c d e f g h"}),
    ("train_lora", "use_pretrained_lora"): Check(None, "pre.safetensors"),
    ("train_lora", "export_formats"): Check(["diffusers"], ["diffusers", "comfyui"]),
    ("train_lora", "save_dtype"): Check("float32", "float16"),
    # evaluate: scores on the images, in scores.json and in the log
    ("evaluate", "metric"): Check("mini", "clip", {"clip_model": "builtin:tiny-clip"}),
    ("evaluate", "clip_model"): Check("builtin:tiny-clip", "nobody-here/no-such-clip", {"metric": "clip"}),
    ("evaluate", "aliases"): Check(None, {"fox": "hexagon"}),
}

NOT_ON_CPU: dict[tuple[str, str], str] = {
    ("load_model", "offload"): "moves components between CPU and GPU memory: needs CUDA (the CPU refusal is tested "
                               "in test_flux_load; the GPU effect in test_gpu_paths)",
    ("load_model", "quantize"): "fp8 weights need a GPU of compute capability >= 8.9 (test_gpu_paths; the CPU "
                                "refusal in test_flux_load)",
    ("load_model", "context_parallel"): "splits each image's tokens over N processes: needs N of them (a CLI "
                                        "run on two gloo processes equals one process in test_context_parallel; "
                                        "the refusals in test_distributed_units)",
    ("load_model", "context_parallel_mode"): "how the N processes exchange tokens: needs N of them (ulysses, "
                                             "allgather and overlap each equal one process in "
                                             "test_context_parallel; diffusers' "
                                             "is CUDA only, its CPU refusal in test_distributed_units)",
    ("sample", "go_fast"): "fp8 matmuls and compiled blocks exist only on CUDA; on a CPU it changes nothing by "
                           "design (test_gpu_paths checks the fast path runs and stays within the quality guard)",
    ("caption", "batch_size"): "how many images go through the captioner at once: the captions are the same by "
                               "design (memory/speed only)",
    ("safety_check", "batch_size"): "images checked at once: the verdicts are the same by design (memory/speed only)",
    ("train_lora", "gradient_checkpointing"): "recomputes activations: the same weights by design, less memory "
                                              "(test_train_lora checks equality; test_train_gpu the memory)",
    ("train_lora", "gradient_checkpointing_interval"): "which blocks are recomputed: same weights by design "
                                                       "(memory/speed only; test_train_gpu)",
    ("train_lora", "cache_latents"): "encode once vs every step: same latents, same weights by design (speed only)",
    ("train_lora", "cache_latents_to_disk"): "where cached latents live (files vs memory): same weights by design",
    ("train_lora", "cache_text_embeddings"): "encode captions once vs every step: same weights by design",
    ("train_lora", "wandb_api_key"): "a secret: it only switches W&B logging on (test_train_publish checks the "
                                     "offline run, and that the key never appears anywhere)",
    ("train_lora", "wandb_project"): "written into the W&B run (test_train_publish reads the offline run)",
    ("train_lora", "wandb_run"): "written into the W&B run (test_train_publish)",
    ("train_lora", "wandb_entity"): "written into the W&B run (test_train_publish)",
    ("train_lora", "wandb_sample_interval"): "W&B sample logging steps (test_train_publish reads them back)",
    ("train_lora", "wandb_save_interval"): "W&B LoRA snapshot steps (test_train_publish)",
    ("train_lora", "hf_repo_id"): "the Hub upload target (test_train_publish, against a local fake of the Hub API)",
    ("train_lora", "hf_token"): "a secret sent to the Hub only (test_train_publish)",
    ("train_lora", "hf_private"): "the Hub repository's visibility (test_train_publish)",
}


def _builtin_params() -> set[tuple[str, str]]:
    reg = Registry.load(entry_points=False)
    return {(t, k) for t, nt in reg.node_types.items() if nt.plugin.startswith("fluxkiln.plugins.")
            for k, spec in nt.params.items()
            if spec.accepts_literal or (t, k) in CHECKS}


def test_every_parameter_has_a_check():
    """A parameter of a built-in node type is either checked here or listed, with its reason, in NOT_ON_CPU."""
    params = _builtin_params()
    missing = sorted(params - set(CHECKS) - set(NOT_ON_CPU))
    assert not missing, f"add a Check (or a reviewed NOT_ON_CPU reason) for: {missing}"
    stale = sorted((set(CHECKS) | set(NOT_ON_CPU)) - params)
    assert not stale, f"these are no longer parameters of built-in node types: {stale}"
    assert not set(CHECKS) & set(NOT_ON_CPU)


# ---------------------------------------------------------------------------------------------- scenarios
def _toml(v: Any) -> str:
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {_toml(x)}" for k, x in v.items()) + " }"
    return json.dumps(v)


def _node(nid: str, ntype: str, values: dict[str, Any]) -> str:
    lines = [f"[nodes.{nid}]", f'type = "{ntype}"']
    lines += [f"{k} = {_toml(v)}" for k, v in values.items() if v is not None]
    return "\n".join(lines) + "\n\n"


SAMPLE = {"prompt": "a red fox", "aspect_ratio": "custom", "width": 256, "height": 256, "num_inference_steps": 2,
          "seed": 1}


def _train(nid: str, seed: int) -> str:
    return _node(nid, "train_lora", {"model": "@base", "dataset": "@data", **TRAIN_FAST, "seed": seed})


BASE = _node("base", "load_model", {"model": "builtin:tiny-flux"})
DATA = _node("data", "dataset", {"source": "data"})


def _scenario(ntype: str, values: dict[str, Any]) -> tuple[str, list[str]]:
    """The recipe body in which node ``x`` of ``ntype`` has ``values``, and the nodes to observe."""
    if ntype == "load_model":
        return _node("x", ntype, {"model": "builtin:tiny-flux", **values}) + _node("img", "sample",
                                                                                    {"model": "@x", **SAMPLE}), ["x", "img"]
    if ntype == "apply_lora":
        body = BASE + DATA + _train("t1", 1) + _train("t2", 2)
        return body + _node("x", ntype, {"model": "@base", "lora": "@t1", **values}) + _node(
            "img", "sample", {"model": "@x", **SAMPLE}), ["x", "img"]
    if ntype == "sample":
        return BASE + _node("x", ntype, {"model": "@base", **{**SAMPLE, **values}}), ["x"]
    if ntype in ("save", "grid"):
        two = {**SAMPLE, "num_outputs": 2}
        body = BASE + _node("img", "sample", {"model": "@base", **two}) + _node(
            "img2", "sample", {"model": "@base", **two, "seed": 5})
        return body + _node("x", ntype, {"images": "@img", **values}), ["x"]
    if ntype == "safety_check":
        colours = _node("img", "fixture_colors", {"colors": ["#808080", "#ff0000", "#ff0080", "#ffff00"]})
        return colours + _node("x", ntype, {"images": "@img", "checker": "builtin:tiny-safety",
                                            "classifier": "builtin:tiny-safety", "policy": "flag", **values}), ["x"]
    if ntype == "dataset":
        return _node("x", ntype, {"source": "data", **values}), ["x"]
    if ntype == "evaluate":
        return BASE + _node("img", "sample", {"model": "@base", **SAMPLE}) + _node(
            "x", ntype, {"images": "@img", **values}), ["x"]
    if ntype == "caption":
        return DATA + _node("x", ntype, {"dataset": "@data", "model": "builtin:tiny-captioner", "max_length": 8,
                                         **values}), ["x"]
    if ntype == "train_lora":
        data2 = _node("data2", "dataset", {"source": "data2"})
        return BASE + DATA + data2 + _node("x", ntype, {"model": "@base", "dataset": "@data", **TRAIN_FAST,
                                                        **values}), ["x"]
    raise AssertionError(f"no scenario for node type {ntype!r}")


def _files(tmp: Path) -> None:
    """The small inputs every scenario may read: two datasets, an input image, a pretrained LoRA."""
    from PIL import Image

    for name, colours in (("data", [(220, 40, 40), (40, 40, 220)]), ("data2", [(40, 200, 40), (200, 200, 40)])):
        folder = tmp / name
        folder.mkdir()
        for i, c in enumerate(colours):
            Image.new("RGB", (64, 48 if i else 64), c).save(folder / f"img{i}.png")
        (folder / "img0.txt").write_text("a photo of [trigger]")
    (tmp / "masks").mkdir()
    for i, size in enumerate([(64, 64), (64, 48)]):  # the left half of each image of "data" trains
        mask = Image.new("L", size, 0)
        mask.paste(255, (0, 0, size[0] // 2, size[1]))
        mask.save(tmp / "masks" / f"img{i}.png")
    Image.new("RGB", (256, 256), (30, 160, 30)).save(tmp / "in.png")
    from safetensors.torch import save_file

    from fluxkiln.plugins.flux.tiny import build_tiny_flux

    transformer = build_tiny_flux("dev").transformer.state_dict()
    save_file({k: v.contiguous() for k, v in transformer.items()}, str(tmp / "single.safetensors"))


# --------------------------------------------------------------------------------------------- observation
# what sample logs when it first sets up a resident pipeline's GPU fast path (compiling the blocks and the VAE
# decoder, with the seconds that took; swapping in fp8 layers or saying why not): the first run in a process
# logs it, a rerun on the same warm pipeline does not
_ONCE_PER_PIPELINE = ("transformer blocks compiled", "torch.compile:", "go_fast:")
_TIMING = {"elapsed", "rate", "eta", "seconds", "time", "it_per_s", "s_per_step", "samples_per_s"}


def _digest(value: Any) -> Any:
    """A comparable, deterministic summary of an output value (pixels, tensors and files hashed)."""
    from fluxkiln.engine.ports import Dataset, Images, Lora, Model

    if isinstance(value, Images):
        return [(hashlib.sha256(it.image.tobytes()).hexdigest(), it.image.size, it.image.mode, it.seed, it.prompt,
                 json.dumps({k: v for k, v in it.meta.items() if k != "timing"}, sort_keys=True, default=str), json.dumps(it.flags, sort_keys=True, default=str))
                for it in value]
    if isinstance(value, Lora):
        return (_file_digest(Path(value.path)), json.dumps(value.meta, sort_keys=True),
                sorted((k, _file_digest(Path(p))) for k, p in value.extra_files.items()))
    if isinstance(value, Dataset):
        return [(it.name, it.caption, _file_digest(Path(it.path))) for it in value.items]
    if isinstance(value, Model):
        return (value.ref, value.kind, json.dumps(value.info, sort_keys=True, default=str),
                json.dumps(value.adapters, sort_keys=True, default=str))
    return repr(value)


def _file_digest(path: Path) -> str:
    if path.suffix == ".safetensors":  # tensors, not the header's ordering or metadata timestamps
        from safetensors.torch import load_file

        tensors = load_file(str(path))
        h = hashlib.sha256()
        for k in sorted(tensors):
            h.update(k.encode() + tensors[k].float().numpy().tobytes())
        return h.hexdigest()
    if path.name == "metrics.csv":  # step, loss, lr, seconds: the wall time differs from run to run
        rows = [",".join(line.split(",")[:3]) for line in path.read_text().splitlines()]
        return hashlib.sha256("\n".join(rows).encode()).hexdigest()
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _observe(result: Any, nodes: list[str]) -> dict[str, Any]:
    """What the nodes did, with this run's folder written as <run> (each run has a fresh folder)."""
    obs: dict[str, Any] = {}
    for nid in nodes:
        events = [e for e in result.events if e.node == nid]
        obs[nid] = {
            "status": result.nodes.get(nid),
            "errors": [(e.data.get("error"), e.data.get("key")) for e in events if e.event == "node_failed"],
            "logs": [e.data.get("message") for e in events if e.event == "node_log"
                     and not str(e.data.get("message")).startswith(_ONCE_PER_PIPELINE)],
            "progress": [(e.data.get("step"), e.data.get("total"), e.data.get("message"),
                          {k: v for k, v in (e.data.get("metrics") or {}).items() if k not in _TIMING})
                         for e in events if e.event == "node_progress"],
            "outputs": {port: _digest(v) for port, v in (result.outputs.get(nid) or {}).items()},
            "files": sorted((Path(a).name, _file_digest(result.run_dir / a)) for e in events
                            if e.event == "node_finished" for a in e.data.get("artifacts", [])
                            if (result.run_dir / a).is_file()),
        }
    return json.loads(json.dumps(obs, default=str).replace(str(result.run_dir), "<run>"))


@pytest.fixture(scope="module")
def world(tmp_path_factory, one_torch_thread):
    tmp = tmp_path_factory.mktemp("params")
    _files(tmp)
    from safetensors.torch import save_file

    eng = fixture_engine(tmp)
    return tmp, eng, save_file


def _run(world: Any, ntype: str, values: dict[str, Any], tag: str) -> dict[str, Any]:
    tmp, eng, _ = world
    body, nodes = _scenario(ntype, values)
    path = tmp / f"{ntype}.toml"  # one recipe name per node type: only the values differ
    path.write_text(f'[recipe]\nname = "p-{ntype}"\n\n' + textwrap.dedent(body))
    result = eng.run(path, output=tmp / "runs" / ntype / tag, force=nodes)  # fresh folder: nothing carried over
    observed = _observe(result, nodes)
    for seen in observed.values():  # whether a prompt was encoded before shows in the log, not in the images
        if isinstance(seen, dict) and isinstance(seen.get("logs"), list):
            seen["logs"] = [m for m in seen["logs"] if not str(m).startswith("prompt cache:")]
    if ntype == "load_model":  # whether the pipeline was already hot shows in its log, not in what it loads
        observed["x"].pop("logs")
    if ntype == "train_lora":  # a forced run discards the checkpoints an earlier run of the same values left
        observed["x"]["logs"] = [re.sub(r"; \d+ earlier checkpoint\(s\) of this configuration discarded", "", m or "")
                                 for m in observed["x"]["logs"]]
    return observed


@pytest.mark.parametrize("ntype", sorted({t for t, _ in CHECKS}))
def test_the_observation_is_deterministic(world, ntype):
    """Control: the same values twice give the same observation (so a difference below means the parameter)."""
    assert _run(world, ntype, {}, "control-1") == _run(world, ntype, {}, "control-2")


@pytest.mark.parametrize("ntype,key", sorted(CHECKS), ids=[f"{t}.{k}" for t, k in sorted(CHECKS)])
def test_two_values_give_different_results(world, ntype, key):
    check = CHECKS[(ntype, key)]
    if key == "use_pretrained_lora":
        _pretrained_lora(world)
    first = _run(world, ntype, {**check.base, key: check.a}, f"{key}-a")
    second = _run(world, ntype, {**check.base, key: check.b}, f"{key}-b")
    assert first != second, f"{ntype}.{key} = {check.a!r} and = {check.b!r} gave the same result"


def _pretrained_lora(world: Any) -> None:
    """A small LoRA file in diffusers keys for the tiny model (what use_pretrained_lora points at)."""
    import torch

    tmp, _, save_file = world
    if (tmp / "pre.safetensors").exists():
        return
    gen = torch.Generator().manual_seed(3)
    name = "transformer.single_transformer_blocks.0.proj_out"
    save_file({f"{name}.lora_A.weight": torch.randn(2, 64, generator=gen),
               f"{name}.lora_B.weight": torch.randn(32, 2, generator=gen)}, str(tmp / "pre.safetensors"))
