"""Helpers shared by the train_lora tests: a solid-colour dataset, a recipe on builtin:tiny-flux, runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fluxkiln.engine import hookimpl
from fluxkiln.engine.runner import Engine, RunResult
from helpers.recipes import toml_value

RED = (220, 40, 40)
FAST = {"resolution": [64], "lora_rank": 4, "optimizer": "adamw", "learning_rate": 1e-3, "max_sequence_length": 32,
        "save_every": 0, "caption_dropout_rate": 0.2, "export_formats": ["diffusers"], "save_dtype": "float32"}


def solid_dataset(folder: Path, color: tuple[int, int, int] = RED, n: int = 6, size: int = 64,
                  caption: str = "a photo of [trigger]") -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (size, size), color).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(caption)
    return folder


def write_recipe(path: Path, data: Path, extra_nodes: str = "", **train: Any) -> Path:
    params = {**FAST, **train}
    lines = ['[recipe]', 'name = "train-test"', '', '[nodes.base]', 'type = "load_model"',
             'model = "builtin:tiny-flux"', '', '[nodes.data]', 'type = "dataset"', f'source = "{data}"', '',
             '[nodes.lora]', 'type = "train_lora"', 'model = "@base"', 'dataset = "@data"']
    lines += [f"{k} = {toml_value(v)}" for k, v in params.items() if v is not None]
    path.write_text("\n".join(lines) + "\n" + extra_nodes)
    return path


class CancelAt:
    """An observer that cancels the run when node ``lora`` reports step ``step``."""

    def __init__(self, engine: Engine, step: int):
        self.engine, self.step = engine, step

    @hookimpl
    def on_event(self, event: Any) -> None:
        if event.event == "node_progress" and event.node == "lora" and event.data.get("step") == self.step \
                and event.data.get("metrics"):
            self.engine.cancel()


def run(recipe: Path, cache: Path, out: Path, overrides: list[str] | None = None, engine: Engine | None = None,
        cancel_at: int | None = None) -> RunResult:
    engine = engine or Engine(cache_dir=cache)
    observers = [CancelAt(engine, cancel_at)] if cancel_at else []
    return engine.run(recipe, output=out, overrides=overrides, observers=observers)


def failure(result: RunResult, node: str = "lora") -> dict[str, Any]:
    assert result.nodes.get(node) == "failed", (result.status, result.nodes)
    return next(e.data for e in result.events if e.event == "node_failed" and e.node == node)


def losses(result: RunResult) -> list[float]:
    return [e.data["metrics"]["loss"] for e in result.events
            if e.event == "node_progress" and e.node == "lora" and e.data.get("metrics")]


def load_weights(path: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(path))


def checkpoints(cache: Path) -> list[Path]:
    return sorted(cache.glob("state/train_lora-*/checkpoints/ckpt-*"))
