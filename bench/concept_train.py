"""The training half of ``bench/concept_probe.py``: what it encodes, which weights it trains and the loop (the
same flow loss as ``train_lora``), with the experiment's variations — caption variants, a prior set, text-encoder
LoRAs, trigger embeddings, a new token, and the self-distilled preservation of ``--preserve``."""

from __future__ import annotations

import argparse
from typing import Any


def encode(pipe: Any, images: list[Any], captions: list[str]) -> tuple[Any, Any, Any, Any]:
    """Normalised VAE latents and both text encoders' outputs, as ``train_lora`` caches them (on the CPU), and
    each image's :func:`object_coverage`."""
    import torch

    from fluxkiln.plugins.miniflux.trainparts import latents_of
    from fluxkiln.plugins.train.data import to_tensor

    with torch.no_grad():
        pixels = torch.cat([to_tensor(i.convert("RGB")) for i in images]).to(pipe.device)
        latents = latents_of(pipe.vae, pixels).cpu()
        embeds, pooled = encode_text(pipe, captions)
    return latents, embeds, pooled, object_coverage(images)


def encode_text(pipe: Any, captions: list[str]) -> tuple[Any, Any]:
    """Both text encoders' outputs for ``captions``, on the CPU."""
    import torch

    with torch.no_grad():
        embeds, pooled, _ = pipe.encode_prompt(captions, captions, max_sequence_length=pipe.tokenizer_2.model_max_length)
    return embeds.cpu(), pooled.cpu()


OPTIONAL = (r" (small|large)(?= )", r" (red|green|blue|yellow|orange|purple|white|black)(?= TOK)",
            r" (at the [a-z ]+?|in the center)(?= on a|$)", r" on a \w+ background")


def object_coverage(images: list[Any]) -> Any:
    """(images, 256) float: the share of each packed latent token's 16x16 pixels that differ from the picture's
    background (the colour most of its border has) — the object, for ``--object-weight``."""
    import numpy as np
    import torch

    out = []
    for image in images:
        px = np.asarray(image.convert("RGB"), dtype=np.int16)
        border = np.concatenate([px[0], px[-1], px[:, 0], px[:, -1]])
        colours, counts = np.unique(border, axis=0, return_counts=True)
        background = colours[counts.argmax()]
        mask = (np.abs(px - background).max(-1) > 40).astype(np.float32)
        h, w = mask.shape
        out.append(torch.from_numpy(mask.reshape(h // 16, 16, w // 16, 16).mean((1, 3)).reshape(-1)))
    return torch.stack(out)


def caption_variants(caption: str) -> list[str]:
    """The caption with every subset of its optional parts (size, colour, position, background) left out, the
    full caption first: the trigger is the one word all of them share."""
    import itertools
    import re

    found = [p for p in OPTIONAL if re.search(p, caption)]
    out = []
    for keep in itertools.product((True, False), repeat=len(found)):
        text = caption
        for pattern, kept in zip(found, keep, strict=True):
            text = text if kept else re.sub(pattern, "", text, count=1)
        out.append(text)
    return out


def trainable(transformer: Any, rank: int, full: bool, layers: str | None = None) -> list[Any]:
    """Switch on the weights that train: a LoRA on the layers ``train_lora`` targets (every linear layer of the
    blocks, or those ``layers`` matches, as ``layers_to_optimize_regex``), or all block weights."""
    import re

    from peft import LoraConfig

    from fluxkiln.plugins.train.adapter import BLOCKS, candidate_layers

    transformer.requires_grad_(False)
    if not rank and not full:  # no adapter: the trigger's embeddings alone train (--embeddings: textual inversion)
        return []
    if full:
        params = [p for n, p in transformer.named_parameters() if BLOCKS.match(n)]
        for p in params:
            p.requires_grad_(True)
        return params
    names = [n for n in candidate_layers(transformer) if layers is None or re.search(layers, n)]
    if not names:
        raise ValueError(f"--layers {layers!r} matches none of the transformer's LoRA layers")
    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=names, init_lora_weights="gaussian"))
    return [p for p in transformer.parameters() if p.requires_grad]


def rate_groups(transformer: Any, params: list[Any], lr: float, loraplus: float = 1.0) -> list[dict[str, Any]]:
    """The optimizer's groups: ``params`` at ``lr``, or with ``loraplus`` != 1 the transformer's LoRA B matrices at
    ``loraplus`` x ``lr`` and the rest at ``lr`` (LoRA+, Hayou et al. 2024: B, which starts at zero, learns faster)."""
    if loraplus == 1:
        return [{"params": params, "lr": lr}]
    up = {id(p) for n, p in transformer.named_parameters() if ".lora_B." in n}
    return [{"params": [p for p in params if id(p) not in up], "lr": lr},
            {"params": [p for p in params if id(p) in up], "lr": lr * loraplus}]


TEXT_LAYERS = {"text_encoder": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
               "text_encoder_2": ["q", "k", "v", "o", "wi_0", "wi_1", "wo"]}


def text_trainable(pipe: Any, rank: int) -> list[Any]:
    """A LoRA on every linear layer of both text encoders (CLIP and T5), the rest of them frozen."""
    from peft import LoraConfig, inject_adapter_in_model

    params = []
    for name, layers in TEXT_LAYERS.items():
        encoder = getattr(pipe, name)
        encoder.requires_grad_(False)
        inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=layers,
                                           init_lora_weights="gaussian"), encoder)
        params += [p for p in encoder.parameters() if p.requires_grad]
    return params


def swapped_embeddings(pipe: Any, captions: list[str], words: tuple[str, ...] | None = None) -> tuple[Any, Any]:
    """Both encoders' outputs for every concept caption with the trigger replaced by each known shape word (or
    each of ``words``, a word named twice drawn twice as often): (words, captions, ...) — the prompts whose
    predictions ``--preserve`` keeps at the base model's."""
    import torch

    from fluxkiln.plugins.miniflux.concept import TRIGGER
    from fluxkiln.plugins.miniflux.world import SHAPES

    pairs = [encode_text(pipe, [c.replace(TRIGGER, shape) for c in captions]) for shape in words or SHAPES]
    return torch.stack([e for e, _ in pairs]), torch.stack([p for _, p in pairs])


def world_embeddings(pipe: Any, n: int = 256, seed: int = 23) -> tuple[Any, Any]:
    """Both encoders' outputs for ``n`` prompts of mini-flux's whole world (one or two objects, any size, place or
    background; training-split prompts, never the held-out ones the vocabulary is measured on): what
    ``--preserve-prompts world`` holds the LoRA to the base model on."""
    import random

    from fluxkiln.plugins.miniflux.world import random_scene

    rng = random.Random(seed)
    return encode_text(pipe, [random_scene(rng).prompt for _ in range(n)])


def preserved_text(swapped: tuple[Any, Any], world: tuple[Any, Any] | None, kept: Any, gen: Any,
                   mode: str) -> tuple[Any, Any]:
    """The preservation term's text for the images ``kept``: their captions with a known shape drawn for each
    (``same``), a prompt of the world drawn for each (``world``), or either at even odds per image (``mix``)."""
    import torch

    k = torch.randint(0, swapped[0].shape[0], (len(kept),), generator=gen)
    e, p = swapped[0][k, kept], swapped[1][k, kept]
    if mode == "same" or world is None:
        return e, p
    w = torch.randint(0, world[0].shape[0], (len(kept),), generator=gen)
    use = torch.ones(len(kept), dtype=torch.bool) if mode == "world" else torch.rand(len(kept), generator=gen) < 0.5
    return (torch.where(use[:, None, None], world[0][w], e), torch.where(use[:, None], world[1][w], p))


def preservation_prompts(captions: list[str], n: int, mode: str, words: tuple[str, ...] | None,
                         seed: int = 31) -> list[str]:
    """``n`` prompts for a preservation set of its own pictures (``--preserve-on``): the concept's captions with
    each known shape (or each of ``words``) in turn (``same``), or prompts of the whole world (``world``; one or
    two objects, training-split prompts), or either at even odds (``mix``)."""
    import random

    from fluxkiln.plugins.miniflux.concept import TRIGGER
    from fluxkiln.plugins.miniflux.world import SHAPES, random_scene

    rng = random.Random(seed)
    shapes = words or SHAPES
    same = [c.replace(TRIGGER, shapes[i // len(captions) % len(shapes)]) for i, c in
            enumerate(captions * (n // len(captions) + 1))][:n]
    if mode == "same":
        return same
    return [random_scene(rng).prompt if mode == "world" or rng.random() < 0.5 else s for s in same]


def preservation_set(pipe: Any, prompts: list[str], kind: str) -> tuple[Any, Any, Any]:
    """Latents and both encoders' outputs of a preservation set: ``prompts`` rendered by the world's renderer
    (``rendered``: the right pictures), or drawn by the base model itself (``generated``, 28 steps at guidance 3:
    DreamBooth's class images, the states its sampling passes through)."""
    from fluxkiln.plugins.miniflux.adherence import generate
    from fluxkiln.plugins.miniflux.world import parse

    if kind == "rendered":
        images = render_scenes([parse(p) for p in prompts], seed=61)
    else:
        images = generate(pipe, prompts, steps=28, guidance=3.0, seed=9000)
    latents, embeds, pooled, _ = encode(pipe, images, prompts)
    return latents, embeds, pooled


def render_scenes(scenes: list[Any], seed: int) -> list[Any]:
    """``scenes`` drawn by the world's renderer at 256x256 (PIL), laid out in order from one ``seed``."""
    import random

    from fluxkiln.plugins.miniflux.render import render, to_pil
    from fluxkiln.plugins.miniflux.world import realise

    rng = random.Random(seed)
    return list(to_pil(render([realise(s, rng) for s in scenes], 256, 256, supersample=4)))


def is_prior_step(step: int, every: int) -> bool:
    """Whether step ``step`` (from 0) trains on the prior set: every ``every``-th step, the first after
    ``every - 1`` steps of the concept."""
    return step % every == every - 1


def add_trigger_token(pipe: Any, word: str, init: str = "shapes") -> int:
    """Make ``word`` one new token of T5's tokenizer (it reads the trigger as three letter pieces, which its
    training taught it to ignore as filler), its embedding row started at the mean of the four shape words'
    rows (``init="shapes"``) or at one shape word's: the new-token pivotal tuning of diffusers' advanced
    DreamBooth script.  CLIP keeps its letters (its pooled vector carries colours and counts, not shapes).
    Returns the new token's id."""
    import torch
    from transformers import AddedToken

    from fluxkiln.plugins.miniflux.world import SHAPES

    tokenizer, encoder = pipe.tokenizer_2, pipe.text_encoder_2
    tokenizer.add_tokens([AddedToken(word, single_word=True, normalized=False)])
    new = tokenizer.convert_tokens_to_ids(word)
    encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    table = encoder.get_input_embeddings().weight
    words = SHAPES if init == "shapes" else tuple(init.split(","))
    rows = [tokenizer(w, add_special_tokens=False)["input_ids"] for w in words]
    if any(len(r) != 1 for r in rows):
        raise ValueError(f"--new-token-init {init!r}: every word must be one T5 token ({rows})")
    with torch.no_grad():
        table[new] = table[[r[0] for r in rows]].mean(0)
    return new


def embedding_trainable(pipe: Any, word: str, clip: bool = True) -> list[Any]:
    """The input embeddings of ``word``'s tokens in both text encoders (``clip=False``: T5's alone; textual
    inversion, with the LoRA pivotal tuning), every other row and weight of the encoders frozen (their gradients
    masked to zero)."""
    import torch

    pairs = ((pipe.text_encoder, pipe.tokenizer), (pipe.text_encoder_2, pipe.tokenizer_2))
    params = []
    for encoder, tokenizer in pairs if clip else pairs[1:]:
        encoder.requires_grad_(False)
        table = encoder.get_input_embeddings().weight
        mask = torch.zeros(table.shape[0], 1, device=table.device)
        mask[sorted(set(tokenizer(word, add_special_tokens=False)["input_ids"]))] = 1.0
        table.requires_grad_(True)
        table.register_hook(lambda grad, mask=mask: grad * mask)
        params.append(table)
    return params


def train(pipe: Any, data: tuple[Any, Any, Any], captions: list[str], n_concept: int,
          args: argparse.Namespace, notes: dict[str, Any] | None = None) -> list[float]:
    """``args.steps`` steps of ``args.batch`` images drawn at random; with a prior set, every
    ``args.prior_every``-th step takes its images from that set; with ``--text-encoders`` each step encodes its
    captions afresh through the encoders' LoRAs; with ``--null-space`` every A matrix is kept off the known
    shapes' input directions (``bench/null_space.py``; ``notes`` receives how many each layer gave them)."""
    import torch

    from fluxkiln.plugins.train.flow import flow_loss, preservation_loss
    from fluxkiln.plugins.train.optim import make_scheduler
    from null_space import project

    latents, embeds, pooled, coverage = data
    weights = 1 + args.object_weight * coverage if args.object_weight else None
    params = trainable(pipe.transformer, args.rank, args.full, args.layers)
    kept_off = []
    if args.null_space:
        from null_space import projectors

        kept_off, used = projectors(pipe, args.null_space, args.null_space_n, args.times, args.device)
        if notes is not None:
            notes["null_space_directions_taken"] = {"mean": round(sum(used.values()) / len(used), 1),
                                                    "min": min(used.values()), "max": max(used.values())}
    variants = None
    if args.caption_variants:  # every caption's variants, encoded once: (image, variant) -> row
        per_image = [caption_variants(c) for c in captions[:n_concept]]
        variants = [encode_text(pipe, v) for v in per_image]
    if args.text_encoders:
        params += text_trainable(pipe, args.rank)
    groups = rate_groups(pipe.transformer, params, args.lr, args.loraplus)
    if args.embeddings:
        from fluxkiln.plugins.miniflux.concept import TRIGGER

        tables = embedding_trainable(pipe, TRIGGER, clip=not args.new_token)  # a new token is T5's alone
        groups.append({"params": tables, "lr": args.embedding_lr or args.lr})
    swapped = swapped_embeddings(pipe, captions[:n_concept], args.preserve_words) if args.preserve else None
    world = (world_embeddings(pipe) if args.preserve and args.preserve_prompts != "same"
             and args.preserve_on == "concept" else None)
    own = (preservation_set(pipe, preservation_prompts(captions[:n_concept], args.preserve_n, args.preserve_prompts,
                                                       args.preserve_words), args.preserve_on.split("+")[-1])
           if args.preserve and args.preserve_on != "concept" else None)
    opt = torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=0.0, eps=args.adam_eps)
    gen = torch.Generator().manual_seed(1 + 1000 * args.seed)
    schedule = make_scheduler(opt, args.schedule, args.warmup, args.steps)  # train_lora's own schedules
    trained = [p for g in groups for p in g["params"]]
    ema = [p.detach().clone() for p in trained] if args.ema else None
    losses = []
    for step in range(args.steps):
        prior = len(latents) > n_concept and is_prior_step(step, args.prior_every)
        i = (n_concept + torch.randint(0, len(latents) - n_concept, (args.batch,), generator=gen) if prior
             else torch.randint(0, n_concept, (args.batch,), generator=gen))
        if args.text_encoders or args.embeddings:
            caption = [captions[int(j)] for j in i]
            e, p, _ = pipe.encode_prompt(caption, caption, max_sequence_length=pipe.tokenizer_2.model_max_length)
        elif variants is not None and not prior:
            pick = [(int(j), int(torch.randint(0, len(variants[int(j)][0]), (1,), generator=gen))) for j in i]
            e = torch.stack([variants[j][0][v] for j, v in pick])
            p = torch.stack([variants[j][1][v] for j, v in pick])
        else:
            e, p = embeds[i], pooled[i]
        loss = flow_loss(pipe.transformer, latents[i], e, p, gen, args.times, args.device, torch.float32,
                         token_weights=None if weights is None else weights[i])
        if swapped is not None and not prior and step % args.preserve_every == 0:
            kept = i[:args.preserve_batch or args.batch]
            n_own = 0 if own is None else len(kept) // 2 if args.preserve_on.startswith("concept+") else len(kept)
            l_kept, e_kept, p_kept = latents[kept[n_own:]], *preserved_text(swapped, world, kept[n_own:], gen,
                                                                            args.preserve_prompts)
            if own is not None:  # pictures of their own: a draw from the preservation set, each with its prompt
                k = torch.randint(0, len(own[0]), (n_own,), generator=gen)
                l_kept, e_kept, p_kept = (torch.cat([a[k], b]) for a, b in zip(own, (l_kept, e_kept, p_kept),
                                                                                strict=True))
            loss = loss + args.preserve * preservation_loss(pipe.transformer, l_kept, e_kept, p_kept, gen,
                                                            args.times, args.device, torch.float32,
                                                            guidance=args.preserve_guidance)
        opt.zero_grad()
        loss.backward()
        opt.step()
        project(kept_off)
        schedule.step()
        if ema is not None:
            with torch.no_grad():
                torch._foreach_lerp_(ema, [p.detach() for p in trained], 1 - args.ema)
        losses.append(loss.item())
        if (step + 1) % 100 == 0:
            print(f"step {step + 1}: loss {sum(losses[-100:]) / 100:.4f}", flush=True)
    if ema is not None:  # sample with the average
        with torch.no_grad():
            for p, e in zip(trained, ema, strict=True):
                p.copy_(e)
    for module in (pipe.transformer, pipe.text_encoder, pipe.text_encoder_2):
        module.eval()
    return losses
