"""The ``evaluate`` node: score images against their prompts, per image and on average.

``metric = "mini"`` is mini-flux's deterministic pixel checker (object colour, shape, size, position,
background, object count); ``metric = "clip"`` is CLIP score with a CLIP model from the local cache or a
folder.  Scores go onto each image's ``meta["scores"]`` (so ``save`` embeds them), into
``<run folder>/<node>/scores.json`` and into the run report.
"""

from __future__ import annotations

import json
import os
from typing import Annotated, Any, Literal

from pydantic import Field

from fluxkiln.engine import ImageItem, Images, NodeError, RunContext, node
from fluxkiln.engine.sweep import cell_of

from .metrics import clip_scores, load_clip, mini_scores

DEFAULT_CLIP = "openai/clip-vit-large-patch14"


def _prompt(item: ImageItem, index: int) -> str:
    prompt = item.prompt or (item.meta or {}).get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise NodeError(f"image {index} ({item.name or 'unnamed'}) has no prompt to score it against",
                        key="images", hint="link `images` to a sample node (its images carry their prompts)")
    return prompt


def _clip_model(ctx: RunContext, ref: str) -> tuple[Any, Any]:
    """The CLIP model and processor for ``ref`` (hub id from the local cache, folder, or builtin:tiny-clip),
    held by the residency manager between nodes."""
    from fluxkiln.plugins.flux.load import resolve_source

    try:
        src = resolve_source(ref, ctx, key="clip_model")
    except NodeError as exc:  # name this node's key, not load_model's
        raise NodeError(f"CLIP {exc}", key="clip_model", hint=exc.hint) from exc
    if not (src.path / "config.json").is_file():
        raise NodeError(f"'{ref}' is not a CLIP model folder ({src.path} has no config.json)", key="clip_model",
                        hint=f"use a CLIP model such as {DEFAULT_CLIP} (`hf download {DEFAULT_CLIP}` once)")
    device = ctx.device

    def loader() -> tuple[Any, Any]:
        model, processor = load_clip(str(src.path))
        return model.to(device), processor

    def size(value: tuple[Any, Any]) -> int:
        return sum(p.numel() * p.element_size() for p in value[0].parameters())

    def release(value: tuple[Any, Any]) -> None:
        value[0].to("meta")

    return ctx.models.get(f"clip|{src.path}|{src.stamp() if src.kind != 'folder' else ''}|{device}", loader,
                          size=size, release=release, kind="inference")


def _row(index: int, item: ImageItem, prompt: str, scores: dict[str, Any]) -> dict[str, Any]:
    """One image's entry of scores.json; an image from a sweep names its cell (the report's sweep tables
    join the scores to their cells by it)."""
    row = {"index": index, "name": item.name, "prompt": prompt, "seed": item.seed, "scores": scores}
    cell = cell_of(item.meta)
    return {**row, "sweep": cell} if cell else row


def _means(rows: list[dict[str, Any]]) -> dict[str, float]:
    keys = list(dict.fromkeys(k for r in rows for k in r["scores"]))
    means = {}
    for key in keys:
        vals = [r["scores"][key] for r in rows if isinstance(r["scores"].get(key), (int, float))]
        if vals:
            means[key] = round(sum(vals) / len(vals), 4)
    return means


def _write(ctx: RunContext, data: dict[str, Any]) -> None:
    path = ctx.node_dir() / "scores.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)
    ctx.artifact(path)


@node("evaluate", version="2", category="images")
def evaluate(
    ctx: RunContext,
    images: Annotated[Images, Field(description="images to score; each is scored against its own prompt")],
    metric: Annotated[Literal["mini", "clip"], Field(description="mini: mini-flux's pixel checker (colour, shape, "
                                                     "size, position, background; for builtin:mini-flux images); "
                                                     "clip: CLIP score (100 x cosine similarity) with clip_model")] = "mini",
    clip_model: Annotated[str, Field(min_length=1, description="clip metric: hub id (from the local cache, "
                                     "offline), CLIP folder relative to the recipe, or builtin:tiny-clip")] = DEFAULT_CLIP,
    aliases: Annotated[dict[str, str] | None, Field(description="mini metric: extra words for shapes, e.g. a LoRA "
                                                    "trigger {TOK = \"hexagon\"}")] = None,
) -> Images:
    """Score images for prompt adherence and report per-image and mean scores.

    Each output image is the input image with `meta["scores"]` added (the
    `save` node embeds it in the file).  The scores are also written to
    `runs/<recipe>/<node>/scores.json` and shown in the run report; for
    images from a sweep, each cell's mean scores also go into that sweep's
    table in the report.  The
    mini metric scores every attribute the prompt names (1 right, 0 wrong)
    and `score`, the fraction right; clip gives `clip_score` (0-100).
    """
    prompts = [_prompt(item, i) for i, item in enumerate(images)]
    if metric == "clip":
        model, processor = _clip_model(ctx, clip_model)
        values = clip_scores(model, processor, [it.image for it in images], prompts)
        per_image = [{"score": v, "clip_score": v} for v in values]
    else:
        bad = {k: v for k, v in (aliases or {}).items() if v not in _shapes()}
        if bad:
            raise NodeError(f"aliases map to unknown shapes: {', '.join(f'{k} = {v!r}' for k, v in bad.items())}",
                            key="aliases", hint="known shapes: " + ", ".join(_shapes()))
        per_image = []
        for i, (item, prompt) in enumerate(zip(images, prompts, strict=True)):
            ctx.check_cancelled()
            per_image.append(mini_scores(item.image, prompt, aliases or {}))
            ctx.progress(i + 1, len(images))
    rows = [_row(i, item, prompt, scores) for i, (item, prompt, scores) in
            enumerate(zip(images, prompts, per_image, strict=True))]
    means = _means(rows)
    _write(ctx, {"metric": metric, "model": clip_model if metric == "clip" else "mini-flux pixel checker",
                 "count": len(rows), "mean": means, "images": rows})
    ctx.log(f"{metric} scores, mean over {len(rows)} image(s): " + ", ".join(f"{k} {v:g}" for k, v in means.items()))
    return Images(ImageItem(image=item.image, seed=item.seed, prompt=item.prompt, name=item.name,
                            meta={**item.meta, "scores": {"metric": metric, **scores}}, flags=dict(item.flags))
                  for item, scores in zip(images, per_image, strict=True))


def _shapes() -> tuple[str, ...]:
    from fluxkiln.plugins.miniflux.world import DRAWABLE

    return DRAWABLE
