"""train_lora publishing: W&B (real wandb, offline), the Hub upload plan, and secrets never leaking."""

from __future__ import annotations

import json
from pathlib import Path

import fakehub
import pytest
from test_train_support import failure, run, solid_dataset, write_recipe

from fluxkiln.plugins.train import hub

WANDB_KEY = "wb-SENTINEL-7f3a9c0d5e1b2468ace13579bdf02468ace13579"
HF_TOKEN = "hf_SENTINELtoken9d8c7b6a5f4e3d2c1b0a"


@pytest.fixture
def fake_hub(monkeypatch):
    """The real uploader (huggingface_hub) talking to a local fake of the Hub's HTTP API."""
    from huggingface_hub import constants

    with fakehub.serve() as server:
        monkeypatch.setattr(constants, "ENDPOINT", server.url)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        yield server


def _scan_for(root: Path, needles: list[str]) -> list[str]:
    found = []
    for p in root.rglob("*"):
        if p.is_file() and not p.is_symlink():
            data = p.read_bytes()
            found += [f"{p}: {n[:12]}..." for n in needles if n.encode() in data]
    return found


def test_wandb_hub_and_secrets(tmp_path, monkeypatch, fake_hub):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    for var in ("WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR"):  # wandb's staging, not $HOME
        monkeypatch.setenv(var, str(tmp_path / "wandb-home" / var.lower()))
    monkeypatch.setenv("MY_WANDB_KEY", WANDB_KEY)
    monkeypatch.setenv("MY_HF_TOKEN", HF_TOKEN)
    data = solid_dataset(tmp_path / "data")
    recipe = write_recipe(tmp_path / "r.toml", data, steps=4, sample_every=2, sample_steps=2,
                          sample_prompts=["a photo of [trigger]"], wandb_api_key="$MY_WANDB_KEY",
                          wandb_run="red-test", wandb_sample_interval=2, wandb_save_interval=2,
                          hf_repo_id="someone/red-lora", hf_token="$MY_HF_TOKEN")
    result = run(recipe, tmp_path / "cache", tmp_path / "out")
    assert result.ok, [e.data for e in result.events if e.event == "node_failed"]

    # Hub: one private repository with exactly the LoRA, the model card and the card's sample images, sent with
    # the token from the recipe's variable.
    assert fake_hub.repos == {"someone/red-lora": {"visibility": "private", "type": "model"}}
    assert fake_hub.tokens() == {HF_TOKEN}
    sent = fake_hub.files["someone/red-lora"]
    assert sorted(sent) == ["README.md", "images/step-000004-00.png", "lora.safetensors"]
    node_dir = result.run_dir / "lora"
    assert sent["lora.safetensors"] == (node_dir / "lora.safetensors").read_bytes()
    assert sent["images/step-000004-00.png"][:8] == b"\x89PNG\r\n\x1a\n"
    card = sent["README.md"].decode()
    assert fake_hub.cards == [card]  # the card's metadata was validated before the commit, as the Hub does
    assert 'instance_prompt: "TOK"' in card and "builtin:tiny-flux" in card and "[nodes.lora]" in card
    assert "url: \"images/step-000004-00.png\"" in card and "load_lora_weights" in card
    assert 'hf_token = "$MY_HF_TOKEN"' in card  # the recipe names the variable, never the value

    # W&B: an offline run with the logged metrics, samples and LoRA snapshots.
    runs = list((node_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    records = list(runs[0].glob("run-*.wandb"))
    assert records and records[0].stat().st_size > 0
    history = _wandb_history(records[0])
    assert [h["_step"] for h in history if "train/loss" in h] == [1, 2, 3, 4]
    assert [h["_step"] for h in history if "samples/filenames" in h] == [2, 4]
    assert len(list(runs[0].glob("files/media/images/samples_*.png"))) == 2
    id_files = list((tmp_path / "cache").glob("state/train_lora-*/wandb_run_id"))
    assert len(id_files) == 1, "the W&B run id is kept so a resumed training continues the same run"
    run_id = id_files[0].read_text().strip()
    assert run_id and runs[0].name.endswith(f"-{run_id}")

    # Secrets: nowhere in files (run folder, cache, W&B files), events, logs or metadata.
    leaks = _scan_for(tmp_path, [WANDB_KEY, HF_TOKEN])
    assert leaks == []
    stream = "\n".join(e.to_json() for e in result.events)
    assert WANDB_KEY not in stream and HF_TOKEN not in stream
    assert WANDB_KEY not in json.dumps(result.outputs["lora"]["lora"].meta)


def _wandb_history(path: Path) -> list[dict]:
    """History rows of an offline ``.wandb`` file: a LevelDB-style log of wandb protobuf records."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data, pos, block, buf, rows = path.read_bytes(), 7, 32768, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a record header is padding
            pos += block - pos % block
            continue
        _crc, size, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + size], pos + 7 + size
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(buf)
            if rec.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in rec.history.item})
    return rows


def test_hub_upload_needs_a_token_and_failures_hide_it(tmp_path, monkeypatch, fake_hub):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    data = solid_dataset(tmp_path / "data")
    recipe = write_recipe(tmp_path / "r.toml", data, steps=3, hf_repo_id="someone/red-lora")
    err = failure(run(recipe, tmp_path / "cache", tmp_path / "out"))
    assert "no Hugging Face token" in err["error"] and "HF_TOKEN" in err["hint"]

    fake_hub.refuse_token = True  # the Hub answers 401, as for a revoked token
    monkeypatch.setenv("HF_TOKEN", HF_TOKEN)
    err = failure(run(recipe, tmp_path / "cache", tmp_path / "out"))
    assert "upload to someone/red-lora failed" in err["error"] and HF_TOKEN not in json.dumps(err)
    assert "401" in err["error"] and fake_hub.tokens() == {HF_TOKEN} and not fake_hub.repos


def test_model_card_for_real_base_model():
    from fluxkiln.plugins.train.config import TrainConfig

    card = hub.model_card("me/x", TrainConfig(trigger_word='Z "q"'), "black-forest-labs/FLUX.1-dev",
                          {"fluxkiln.steps": "1000"}, [], "[recipe]\nname = \"x\"\n", has_comfy=True)
    head = card.split("---")[1]
    assert 'base_model: "black-forest-labs/FLUX.1-dev"' in head and "flux-1-dev-non-commercial-license" in head
    assert 'instance_prompt: "Z \\"q\\""' in head and "widget" not in head
    assert "lora_comfyui.safetensors" in card and "LoraLoaderModelOnly" in card
