"""Built-in plugin: the ``train_lora`` node (FLUX.1 LoRA training with resume, checkpoints, W&B and Hub upload)."""

from __future__ import annotations

from fluxkiln.engine import hookimpl

from .node import train_lora


@hookimpl
def register_node_types(register):
    register(train_lora)
