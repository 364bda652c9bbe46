"""load_model: built-in tiny models, local folders, single files, hub ids, residency; the shipped recipes."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from flux_support import failure as node_failure
from flux_support import run_body
from fluxkiln.engine.cli import main as cli
from fluxkiln.engine.residency import Residency
from fluxkiln.engine.runner import Engine
from fluxkiln.plugins.flux.tiny import build_tiny_flux, tiny_flux_path

ROOT = Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return Engine(cache_dir=tmp_path_factory.mktemp("flux-load-cache"))


SAMPLE = '[nodes.img]\ntype = "sample"\nmodel = "@base"\nmegapixels = "0.25"\nnum_inference_steps = 1\nseed = 9\n'


def failure(result, node="base"):
    return node_failure(result, node)


def base(model: str, extra: str = "") -> str:
    return f'[nodes.base]\ntype = "load_model"\nmodel = "{model}"\n{extra}\n'


def px(result, node="img"):
    return np.asarray(result.outputs[node]["output"][0].image).astype(np.float32)


def test_local_folder_relative_to_the_recipe_and_variant_detection(engine, tmp_path):
    shutil.copytree(tiny_flux_path("dev"), tmp_path / "models" / "my-flux")
    shutil.copytree(tiny_flux_path("schnell"), tmp_path / "models" / "my-schnell")
    folder = run_body(engine, tmp_path, base("models/my-flux") + SAMPLE, "folder")
    model = folder.outputs["base"]["output"]
    assert model.info["variant"] == "dev" and model.info["source"] == "folder"
    assert model.info["path"] == str((tmp_path / "models" / "my-flux").resolve())
    builtin = run_body(engine, tmp_path, base("builtin:tiny-flux") + SAMPLE, "builtin")
    assert np.array_equal(px(folder), px(builtin))  # same weights, same image
    schnell = run_body(engine, tmp_path, base("models/my-schnell") + SAMPLE, "schnell")
    assert schnell.outputs["base"]["output"].info["variant"] == "schnell"
    assert schnell.outputs["img"]["output"][0].meta["num_inference_steps"] == 1


def test_single_file_transformer_with_a_base(engine, tmp_path):
    from safetensors.torch import save_file

    pipe = build_tiny_flux("dev")
    save_file({k: v.contiguous() for k, v in pipe.transformer.state_dict().items()}, tmp_path / "flux-tiny.safetensors")
    result = run_body(engine, tmp_path, base("flux-tiny.safetensors", 'base = "builtin:tiny-flux"') + SAMPLE, "single")
    model = result.outputs["base"]["output"]
    assert model.info["source"] == "single_file" and model.info["variant"] == "dev"
    builtin = run_body(engine, tmp_path, base("builtin:tiny-flux") + SAMPLE, "builtin")
    assert np.array_equal(px(result), px(builtin))


def test_hub_id_missing_from_the_cache_says_how_to_fetch_it(engine, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    result = run_body(engine, tmp_path, base("black-forest-labs/FLUX.1-dev") + SAMPLE, "hub", expect="failed")
    info = failure(result)
    assert "'black-forest-labs/FLUX.1-dev' is not in the local Hugging Face cache" in info["error"]
    assert "hf download black-forest-labs/FLUX.1-dev" in info["hint"] and "HF_TOKEN" in info["hint"]
    assert result.nodes["img"] == "skipped"
    schnell = failure(run_body(engine, tmp_path, base("black-forest-labs/FLUX.1-schnell"), "hub2", expect="failed"))
    assert "HF_TOKEN" not in schnell["hint"]


_CUDA = __import__("torch").cuda.is_available()


@pytest.mark.parametrize(("model", "extra", "message"), [
    *([("builtin:tiny-flux", 'offload = "model"', 'offload = "model" needs a CUDA GPU'),
       ("builtin:tiny-flux", 'quantize = "fp8"', 'quantize = "fp8" needs a CUDA GPU')]
      if not _CUDA else []),  # on a GPU both run: tests/test_gpu_paths.py
    ("nohub:thing", "", "no plugin resolves the model reference 'nohub:thing'"),
    ("builtin:tiny-flux", 'base = "builtin:tiny-flux"', "`base` only applies"),
    ("./not/here", "", "model './not/here' not found"),
    ("empty", "", "is not a diffusers pipeline folder"),
])
def test_load_errors_are_clear(engine, tmp_path, model, extra, message):
    (tmp_path / "empty").mkdir()
    info = failure(run_body(engine, tmp_path, base(model, extra), "err", expect="failed"))
    assert message in info["error"] and info["error_type"] == "NodeError"


def test_pickle_checkpoints_are_refused(engine, tmp_path):
    (tmp_path / "model.ckpt").write_bytes(b"not safe")
    info = failure(run_body(engine, tmp_path, base("model.ckpt"), "pickle", expect="failed"))
    assert "pickle checkpoints" in info["error"]


def test_evicted_pipeline_is_reloaded_on_use(tmp_path):
    engine = Engine(cache_dir=tmp_path / "cache", residency=Residency(budget=1))  # room for one pipeline
    body = (base("builtin:tiny-flux") + '[nodes.other]\ntype = "load_model"\nmodel = "builtin:tiny-flux-schnell"\n'
            + SAMPLE + '[nodes.img2]\ntype = "sample"\nmodel = "@other"\nmegapixels = "0.25"\nnum_inference_steps = 1\n'
            'seed = 9\n')
    result = run_body(engine, tmp_path, body)
    assert result.outputs["img"]["output"][0].image.size == (512, 512)
    assert len(engine.models.evictions) >= 1  # loading one pipeline pushed the other out, and it came back


def test_tiny_models_are_built_once_atomically_and_deterministically(tmp_path, monkeypatch):
    monkeypatch.setenv("FLUXKILN_CACHE", str(tmp_path / "cache"))
    found: list[Path] = []
    threads = [threading.Thread(target=lambda: found.append(tiny_flux_path("schnell"))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(found) == 2 and found[0] == found[1] and found[0].name == "tiny-flux-schnell-v2"
    assert sorted(p.name for p in found[0].parent.iterdir()) == ["tiny-flux-schnell-v2"]  # no temp folders left
    index = json.loads((found[0] / "model_index.json").read_text())
    assert index["_class_name"] == "FluxPipeline" and {"transformer", "vae", "tokenizer_2"} <= set(index)
    size = sum(p.stat().st_size for p in found[0].rglob("*") if p.is_file())
    assert size < 2_000_000
    a, b = build_tiny_flux("schnell").transformer.state_dict(), build_tiny_flux("schnell").transformer.state_dict()
    assert all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)
    with pytest.raises(ValueError, match="unknown tiny FLUX variant"):
        tiny_flux_path("pro")


def test_shipped_recipes_validate_without_weights_and_run_on_the_tiny_models(tmp_path, capsys):
    for name in ("flux-dev", "flux-schnell"):
        assert cli(["validate", str(ROOT / "recipes" / f"{name}.toml")]) == 0
    code = cli(["run", str(ROOT / "recipes" / "flux-schnell.toml"), "--set", "vars.model=builtin:tiny-flux-schnell",
                "--set", "vars.checker=builtin:tiny-safety", "--set", "vars.classifier=builtin:tiny-safety",
                "--set", 'nodes.images.megapixels="0.25"', "--set", "nodes.images.seed=1",
                "--output", str(tmp_path / "out"), "--json"])
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert code == 0, events[-3:]
    assert any(e.get("event") == "node_finished" and e.get("node") == "saved" for e in events)
    assert list((tmp_path / "out").glob("*.webp"))


def test_editing_a_local_model_folder_changes_load_model_fingerprint(tmp_path):
    from fluxkiln.plugins.flux.load import local_model_signature

    folder = tmp_path / "model"
    (folder / "transformer").mkdir(parents=True)
    (folder / "transformer" / "w.safetensors").write_bytes(b"1234")
    first = local_model_signature({"model": "model"}, tmp_path / "n", tmp_path)
    assert first and local_model_signature({"model": "model"}, tmp_path / "n", tmp_path) == first
    (folder / "transformer" / "w.safetensors").write_bytes(b"123456")
    assert local_model_signature({"model": "model"}, tmp_path / "n", tmp_path) != first
    assert local_model_signature({"model": "builtin:tiny-flux"}, tmp_path / "n", tmp_path) == {}
    assert local_model_signature({"model": "black-forest-labs/FLUX.1-dev"}, tmp_path / "n", tmp_path) == {}
