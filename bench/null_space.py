"""The LoRA kept out of the known shapes' way (``bench/concept_probe.py --null-space E``): Gradient Projection
Memory (Saha et al. 2021), applied to a LoRA's down-projections.

Every LoRA layer's input is recorded while the base model predicts on pictures of the world's known shapes,
noised at the training's times. The directions that carry a share ``E`` of those inputs' energy are the ones the
known shapes use; each A matrix is projected off them at the start and after every optimizer step, so the
adapter's output on the known shapes' inputs stays (nearly) zero however it trains, and the concept can only be
learnt in the directions they leave free.
"""

from __future__ import annotations

from typing import Any

ROUNDS = 2  # noisings of each picture read
FORWARD_UNITS = 0.4  # a no-gradient forward of 8 pictures, in plain 8-image training steps on this CPU (0.20 / 0.51 s)


def lora_downs(transformer: Any) -> dict[str, Any]:
    """Each LoRA layer's name and its A (down-projection) module, for the adapter named ``default``."""
    return {name: module.lora_A["default"] for name, module in transformer.named_modules()
            if "default" in getattr(module, "lora_A", {})}


def input_energy(pipe: Any, downs: dict[str, Any], n: int, rounds: int, times: str, device: str,
                 seed: int = 47) -> dict[str, Any]:
    """Each A module's summed outer product of its inputs (float64, d x d), over ``rounds`` noisings of ``n``
    rendered pictures of training-split prompts with the known shapes, the adapter contributing nothing."""
    import random

    import torch

    from concept_train import encode, render_scenes
    from fluxkiln.plugins.miniflux.world import random_scene
    from fluxkiln.plugins.train.flow import flow_loss

    rng = random.Random(seed)
    scenes = [random_scene(rng) for _ in range(n)]
    latents, embeds, pooled, _ = encode(pipe, render_scenes(scenes, seed), [s.prompt for s in scenes])
    energy: dict[str, Any] = {}

    def recorder(name: str) -> Any:
        def hook(_module: Any, inputs: tuple[Any, ...]) -> None:
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
            energy[name] = energy.get(name, 0) + x.T @ x
        return hook

    handles = [module.register_forward_pre_hook(recorder(name)) for name, module in downs.items()]
    gen = torch.Generator().manual_seed(seed)
    try:
        with torch.no_grad():
            for _ in range(rounds):
                for start in range(0, n, 8):
                    part = slice(start, start + 8)
                    flow_loss(pipe.transformer, latents[part], embeds[part], pooled[part], gen, times, device,
                              torch.float32)
    finally:
        for handle in handles:
            handle.remove()
    return energy


def free_projector(energy: Any, share: float) -> tuple[Any, int]:
    """The projector onto the directions left once the fewest eigenvectors of ``energy`` that hold ``share`` of
    its trace are taken out, and how many were taken (computed where ``energy`` is: on a GPU, not its host's
    threads, which parallel probes share)."""
    import torch

    values, vectors = torch.linalg.eigh(energy)
    values, vectors = values.flip(0).clamp_min(0), vectors.flip(1)
    held = (torch.cumsum(values, 0) / values.sum().clamp_min(1e-30)).tolist()
    k = next((i + 1 for i, h in enumerate(held) if h >= share), len(held))
    used = vectors[:, :k]
    return torch.eye(len(held), dtype=used.dtype, device=used.device) - used @ used.T, k


def projectors(pipe: Any, share: float, n: int, times: str,
               device: str) -> tuple[list[tuple[Any, Any]], dict[str, int]]:
    """(A weight, projector) for every LoRA layer, each A already projected, and how many input directions each
    layer gave to the known shapes."""
    downs = lora_downs(pipe.transformer)
    if not downs:
        raise ValueError("--null-space needs a LoRA on the transformer: give --rank 1 or more")
    energy = input_energy(pipe, downs, n, ROUNDS, times, device)
    pairs, used = [], {}
    for name, module in downs.items():
        p, used[name] = free_projector(energy[name], share)
        p = p.to(module.weight.device, module.weight.dtype)
        pairs.append((module.weight, p))
    project(pairs)
    return pairs, used


def project(pairs: list[tuple[Any, Any]]) -> None:
    """Each A matrix onto its free directions (A <- A P: its rows lose what the known shapes' inputs carry)."""
    import torch

    with torch.no_grad():
        for weight, p in pairs:
            weight.copy_(weight @ p)
