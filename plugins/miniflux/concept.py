"""LoRA acquisition on mini-flux: a concept the base model has never seen (a hexagon, called by a trigger
word; or a cross, diamond, ring or bowtie), its captioned training images, and the measurement of what a trained LoRA
learned.

    python -m fluxkiln.plugins.miniflux.concept dataset DIR [--balanced] [--shape cross]   # the 8 captioned images
    python -m fluxkiln.plugins.miniflux.concept measure [--steps N] [--samples N] [--json FILE] [--set K=V ...]

``measure`` trains a LoRA with ``train_lora`` (recipes/train-lora-tiny.toml's settings, changed by ``--set``
as for ``fluxkiln run``) on a CPU, then samples with it at the recipe's ``lora_scale`` on the model the recipe
loaded (``--set 'nodes.base.model="DIR"'``: another base's pipeline folder): prompts with the trigger
(share of samples the checker sees the recipe's concept in, the shape its ``evaluate`` node reads the trigger as:
should be high), the 8 training captions (does it draw its own training images?), the same prompts with ordinary
shapes (share of the concept: leakage, should be low), and the rest of the vocabulary's adherence with and without
the LoRA (each attribute, the shape adherence of the prompts naming each known shape, and how many of those
draw the concept instead).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .render import render, to_pil
from .world import COLOURS, CONCEPT_SHAPES, EXTRA_SHAPES, POSITIONS, SHAPES, Obj, Scene, parse, realise

CONCEPT = "hexagon"
TRIGGER = "TOK"


def repo_root() -> Path:
    """The fluxkiln repository whose ``recipes/`` this tool uses: the source tree of an editable install, else
    the current folder (an installed copy carries no recipes)."""
    for root in (Path(__file__).resolve().parents[2], Path.cwd()):
        if (root / "recipes" / "train-lora-tiny.toml").is_file():
            return root
    raise SystemExit("recipes/train-lora-tiny.toml not found beside this installed fluxkiln nor in the current "
                     f"folder ({Path.cwd()}): run the concept tool from the fluxkiln repository")


def concept_scenes(n: int, seed: int = 5, shape: str = CONCEPT) -> list[Scene]:
    """``n`` single-object scenes of ``shape`` with varied colours, sizes, positions and backgrounds."""
    rng = random.Random(seed)
    scenes = []
    for i in range(n):
        background = rng.choice(list(COLOURS))
        colour = rng.choice([c for c in COLOURS if c != background])
        scenes.append(Scene((Obj(colour, shape, ("small", "large")[i % 2], rng.choice(list(POSITIONS))),), background))
    return scenes


def balanced_scenes(seed: int = 3, shape: str = CONCEPT) -> list[Scene]:
    """Eight scenes of ``shape`` that spread the vocabulary evenly: every object colour once, every background
    colour once (never the object's own), eight different positions (all but the center), four small and four
    large — where :func:`concept_scenes`' draws repeat some (three white objects) and leave others out."""
    rng = random.Random(seed)
    objects = list(COLOURS)
    rng.shuffle(objects)
    while True:
        backgrounds = list(COLOURS)
        rng.shuffle(backgrounds)
        if all(o != b for o, b in zip(objects, backgrounds, strict=True)):
            break
    places = [p for p in POSITIONS if p != "center"]
    rng.shuffle(places)
    return [Scene((Obj(o, shape, ("small", "large")[i % 2], p),), b)
            for i, (o, b, p) in enumerate(zip(objects, backgrounds, places, strict=True))]


def caption(scene: Scene, word: str = "[trigger]", concept: str = CONCEPT) -> str:
    """The scene's prompt with the concept's shape word replaced (``[trigger]`` for train_lora's captions)."""
    return scene.prompt.replace(concept, word)


def dataset_scenes(n: int = 8, size: int = 256, shape: str = CONCEPT) -> tuple[list[Scene], list[Any], list[Any]]:
    """The dataset's ``n`` scenes, their images and their object masks (PIL); with another ``shape``, the same
    scenes (colours, sizes, places, backgrounds, drawn the same way) with that shape instead of the hexagon."""
    scenes = concept_scenes(n, shape=shape)
    rng = random.Random(6)
    return (scenes, *_drawn([realise(s, rng) for s in scenes], size))


def balanced_dataset(size: int = 256, shape: str = CONCEPT) -> tuple[list[Scene], list[Any], list[Any]]:
    """The eight :func:`balanced_scenes`, their images and object masks (PIL), each scene drawn with its own seed."""
    scenes = balanced_scenes(shape=shape)
    return (scenes, *_drawn([realise(s, random.Random(6 + i)) for i, s in enumerate(scenes)], size))


def _drawn(layouts: list[Any], size: int) -> tuple[list[Any], list[Any]]:
    """The pictures of ``layouts`` and their object masks (white where the object covers a pixel), as PIL images."""
    from PIL import Image

    images, cover = render(layouts, size, size, supersample=4, masks=True)
    masks = [Image.fromarray(m) for m in (cover * 255).round().byte().cpu().numpy()]
    return list(to_pil(images)), masks


def write_dataset(folder: Path, n: int = 8, size: int = 256, balanced: bool = False,
                  shape: str = CONCEPT, masks: Path | None = None) -> list[Path]:
    """Write ``n`` captioned images of ``shape`` (``concept-<i>.png`` + ``.txt``) into ``folder``: the bundled
    dataset's scenes, or (``balanced``) :func:`balanced_dataset`'s eight; with ``masks``, each image's object mask
    under the same name there (``train_lora``'s ``mask_path``)."""
    if balanced and n != 8:
        raise ValueError(f"a balanced dataset has 8 images, one per palette colour, not {n}")
    scenes, images, covers = balanced_dataset(size, shape) if balanced else dataset_scenes(n, size, shape)
    folder.mkdir(parents=True, exist_ok=True)
    if masks is not None:
        masks.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (scene, image, cover) in enumerate(zip(scenes, images, covers, strict=True)):
        path = folder / f"concept-{i + 1}.png"
        image.save(path)
        path.with_suffix(".txt").write_text(caption(scene, concept=shape) + "\n")
        if masks is not None:
            cover.save(masks / path.name)
        paths.append(path)
    return paths


def probe_prompts(n: int, seed: int = 11, shape: str = CONCEPT) -> tuple[list[str], list[str]]:
    """(prompts with the trigger, the same prompts with an ordinary shape instead)."""
    rng = random.Random(seed)
    scenes = concept_scenes(n, seed=seed, shape=shape)
    with_trigger = [caption(s, TRIGGER, shape) for s in scenes]
    without = [caption(s, rng.choice(SHAPES), shape) for s in scenes]
    return with_trigger, without


def training_captions(folder: Path | None = None) -> list[str]:
    """The captions of ``folder`` (the bundled dataset's by default) as ``train_lora`` trains on them, with the
    trigger word, in the images' order (does the LoRA draw its own training images?)."""
    from fluxkiln.plugins.train.config import TrainConfig

    folder, trained = folder or repo_root() / "recipes" / "data" / "hexagons", TrainConfig(trigger_word=TRIGGER)
    return [trained.caption(p.read_text()) for p in sorted(folder.glob("*.txt"))]


def concept_share(images: list[Any], prompts: list[str], shape: str = CONCEPT, also: tuple[str, ...] = ()) -> float:
    """Share of images whose largest object the checker reads as ``shape`` (the concept), which is one of the
    shapes it reads each blob among, whether the prompt names it or not (the leakage prompts do not), as are
    ``also`` (the shapes a base trained on more shapes knows)."""
    from .checker import check

    checks = (check(im, p, also=(shape, *also)) for im, p in zip(images, prompts, strict=True))
    hits = [bool(c.blobs) and c.blobs[0].shape == shape for c in checks]
    return sum(hits) / max(1, len(hits))


def measure(steps: int | None, samples: int, log: Any = print, overrides: list[str] | None = None) -> dict[str, Any]:
    """Train the recipe's LoRA (optionally with other ``steps`` or ``--set`` overrides) and measure acquisition
    (on new prompts and on the training captions themselves) and leakage."""
    from .adherence import checks_of, eval_prompts, generate
    from .weights import load_folder

    recipe = repo_root() / "recipes" / "train-lora-tiny.toml"
    overrides = [*(overrides or []), *([f"nodes.lora.steps={steps}"] if steps else [])]
    read = recipe_concept(recipe, overrides)
    folder, shape, scale = read.folder, read.shape, read.scale
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        result = run_recipe(recipe, Path(tmp), overrides)
        seconds = time.perf_counter() - t0
        lora = result.outputs["lora"]["lora"]
        pipe = load_folder(loaded_folder(result.outputs[read.model_node]["output"]))
        with_trigger, without = probe_prompts(samples, shape=shape)
        vocab = eval_prompts(samples)

        def sampled(prompts: list[str]) -> list[Any]:
            return generate(pipe, prompts, steps=28, guidance=3.0)

        before_checks = checks_of(sampled(vocab), vocab)
        pipe.load_lora_weights(str(Path(lora.path)), adapter_name="concept")
        pipe.set_adapters(["concept"], adapter_weights=[scale])
        hits = concept_share(sampled(with_trigger), with_trigger, shape)
        captions = training_captions(folder)
        fitted = concept_share(sampled(captions), captions, shape)
        leaks = concept_share(sampled(without), without, shape)
        after_images = sampled(vocab)
        after_checks = checks_of(after_images, vocab)
    row = {"train_seconds": round(seconds, 1), "overrides": overrides, "model": read.model, "concept": shape,
           "lora_scale": scale,
           "with_trigger": round(100 * hits, 1), "training_captions": round(100 * fitted, 1),
           "without_trigger": round(100 * leaks, 1), **vocabulary_readings(before_checks, after_checks, vocab),
           "concept_by_word_after": concept_by_word(after_images, vocab, shape)}
    log(json.dumps(row, indent=1))
    return row


def run_recipe(recipe: Path, folder: Path, overrides: list[str]) -> Any:
    """Run ``recipe`` with ``overrides`` (cache and outputs under ``folder``); SystemExit with every problem (file,
    line, node, key) if the settings are not valid or a node fails."""
    from fluxkiln.engine.cli_output import located_failure
    from fluxkiln.engine.errors import RecipeInvalid
    from fluxkiln.engine.runner import Engine

    try:
        result = Engine(cache_dir=folder / "cache").run(recipe, output=folder / "run", overrides=overrides)
    except RecipeInvalid as exc:
        raise SystemExit(f"the recipe with these settings is not valid:\n{exc}") from exc
    if not result.ok:
        raise SystemExit("the recipe failed:\n" + "\n".join(
            located_failure(e.node, e.data) + (f" (hint: {e.data['hint']})" if e.data.get("hint") else "")
            for e in result.events if e.event == "node_failed"))
    return result


def vocabulary_readings(before: list[Any], after: list[Any], vocab: list[str]) -> dict[str, dict[str, float]]:
    """The vocabulary prompts' checks without the LoRA (``before``) and with it, summarised and per shape word."""
    from .adherence import summarise

    return {"vocabulary_before": summarise(before), "vocabulary_after": summarise(after),
            "shape_by_word_before": shape_by_word(before, vocab), "shape_by_word_after": shape_by_word(after, vocab)}


def shape_by_word(checks: list[Any], prompts: list[str]) -> dict[str, float]:
    """Shape adherence (percent) of the prompts that name each known shape: where a LoRA's cost to the rest of the
    vocabulary falls (a prompt naming two shapes counts for both)."""
    return _by_word(prompts, [c.scores.get("shape") for c in checks])


def concept_by_word(images: list[Any], prompts: list[str], concept: str) -> dict[str, float]:
    """Share (percent) of the prompts naming each known shape whose picture holds the concept (read among the
    known shapes and it): how much of a LoRA's cost to that shape is the concept leaking in."""
    from .checker import check

    return _by_word(prompts, [float(any(b.shape == concept for b in check(im, p, also=(concept,)).blobs))
                              for im, p in zip(images, prompts, strict=True)])


def _by_word(prompts: list[str], values: list[float | None]) -> dict[str, float]:
    """The mean of ``values`` (percent) over the prompts naming each known shape, None values left out."""
    named: dict[str, list[float]] = {shape: [] for shape in SHAPES}
    for prompt, value in zip(prompts, values, strict=True):
        if value is not None:
            for shape in {o.shape for o in parse(prompt).objects} & set(SHAPES):
                named[shape].append(value)
    return {shape: round(100 * sum(v) / len(v), 1) for shape, v in named.items() if v}


@dataclass(frozen=True)
class RecipeConcept:
    """What ``measure`` reads from the recipe: the dataset folder, the shape its ``evaluate`` node reads the trigger
    as, its ``apply_lora``'s ``lora_scale``, the model its ``load_model`` loads and that node's name."""

    folder: Path
    shape: str
    scale: float
    model: str
    model_node: str


def recipe_concept(recipe: Path, overrides: list[str] | None = None) -> RecipeConcept:
    """The recipe's :class:`RecipeConcept`, with ``overrides`` (``--set``) applied as the engine applies them."""
    from fluxkiln.engine.recipe import load_recipe

    parsed, problems = load_recipe(recipe, overrides)
    if problems:
        raise SystemExit("\n".join(p.format() for p in problems))
    first = {n.type: (name, n.values) for name, n in reversed(parsed.nodes.items())}  # the first of each type
    nodes = {kind: values for kind, (_, values) in first.items()}
    return RecipeConcept(recipe.parent / nodes["dataset"]["source"], nodes["evaluate"]["aliases"][TRIGGER],
                         float(nodes["apply_lora"].get("lora_scale", 1.0)), str(nodes["load_model"]["model"]),
                         first["load_model"][0])


def loaded_folder(model: Any) -> Path:
    """The pipeline folder ``load_model`` loaded ``model`` from (its own resolution of the recipe's reference): the
    model the LoRA trained on is the one it is sampled on."""
    path = Path(model.info["path"])
    if not (path / "model_index.json").is_file():
        raise SystemExit(f"measure samples a pipeline folder; the recipe's model {model.ref!r} loaded from {path}, "
                         "which is not one (no model_index.json): give builtin:mini-flux or a folder such as the "
                         "training script writes")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fluxkiln.plugins.miniflux.concept", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    ds = sub.add_parser("dataset", help="write the captioned concept images")
    ds.add_argument("folder", type=Path)
    ds.add_argument("--balanced", action="store_true", help="every colour, background and place once (balanced_scenes)")
    ds.add_argument("--shape", default=CONCEPT, choices=EXTRA_SHAPES + CONCEPT_SHAPES,
                    help="the concept's shape (default: %(default)s)")
    ds.add_argument("--masks", type=Path, metavar="FOLDER", help="also write each image's object mask there "
                    "(train_lora's mask_path)")
    me = sub.add_parser("measure", help="train the LoRA and measure acquisition and leakage")
    me.add_argument("--steps", type=int, help="training steps (default: the recipe's)")
    me.add_argument("--samples", type=int, default=20)
    me.add_argument("--json", type=Path)
    me.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a value of recipes/train-lora-tiny.toml, e.g. nodes.lora.batch_size=4")
    args = parser.parse_args(argv)
    if args.command == "dataset":
        for path in write_dataset(args.folder, balanced=args.balanced, shape=args.shape, masks=args.masks):
            print(path, "-", path.with_suffix(".txt").read_text().strip())
        return 0
    from fluxkiln.engine.errors import RecipeInvalid

    try:
        row = measure(args.steps, args.samples, overrides=args.overrides)
    except RecipeInvalid as exc:
        raise SystemExit("\n".join(p.format() for p in exc.problems)) from None
    if args.json:
        args.json.write_text(json.dumps(row, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
