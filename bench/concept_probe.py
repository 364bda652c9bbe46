"""Why mini-flux's LoRA does not learn the hexagon: the same training as ``train_lora``, run in this process, so
the adapter's size, the trained weights, the time sampling and a prior-preservation set can be varied freely
and the samples looked at.

    python bench/concept_probe.py [--steps 300] [--lr 1e-3] [--batch 1] [--times sigmoid] [--rank 16] [--full]
                                  [--text-encoders] [--embeddings] [--new-token] [--prior N] [--prior-every 2]
                                  [--prior-scenes same] [--caption-variants] [--augment N] [--layers REGEX]
                                  [--class-word circle] [--data DIR] [--shape S] [--lora-scales 1.5,2]
                                  [--preserve W] [--preserve-every K] [--embedding-lr LR]
                                  [--new-token-init pentagon,octagon] [--weights DIR] [--device cuda]
                                  [--object-weight K] [--preserve-batch N] [--schedule cosine] [--ema DECAY]
                                  [--seed N] [--preserve-prompts same|world|mix]
                                  [--preserve-words star,star,circle] [--vocab N]
                                  [--preserve-on concept|rendered|generated|concept+generated] [--preserve-n 32]
                                  [--preserve-guidance G] [--null-space E] [--null-space-n 64] [--warmup N]
                                  [--adam-eps EPS] [--loraplus R] [--probe 8] [--sample-steps 28] [--grid FILE]
                                  [--json FILE]

It trains on ``recipes/data/hexagons`` (or ``--data DIR``; the trigger ``TOK``) with ``train_lora``'s own flow loss
(:func:`fluxkiln.plugins.train.flow.flow_loss`: guidance 1, the same packing, ids and velocity target),
``--batch`` images a step (1), AdamW, then samples 28 steps with the adapter still in memory (no export, no
reload: nothing between the training and the samples): the 8 training captions at guidance 1 and 3, ``--probe``
new prompts with the trigger and the same prompts with an ordinary shape (leakage), each scored by the pixel
checker. ``--full`` trains every weight of the transformer blocks instead of a LoRA (is the adapter too small?);
``--text-encoders`` adds a LoRA of the same rank on every linear layer of CLIP and T5 (they never saw the
trigger's characters in a caption); ``--embeddings`` trains the trigger's own token embeddings in both
(textual inversion; with the LoRA, pivotal tuning); ``--prior N`` adds N rendered images of the known shapes
with their own captions, trained every other step (DreamBooth's prior preservation; ``--prior-every K``: every K-th step;
``--prior-scenes same``: the training images' own scenes with the known shapes). ``--new-token`` makes the trigger
one new token of T5's tokenizer; ``--caption-variants`` leaves out a random subset of each caption's optional parts
each step; ``--augment N`` adds N mirrored and recoloured variants of each training image with captions to
match (:func:`augment`); ``--class-word`` puts a known shape word after the trigger in every caption and prompt
with it (DreamBooth's "a [V] dog"); ``--layers`` trains only the LoRA layers a regular expression matches;
``--lora-scales`` samples the new and leakage prompts again with the LoRA scaled (``lora_scale``);
``--data DIR --shape S`` trains on another concept's images (``python -m fluxkiln.plugins.miniflux.concept dataset
DIR --balanced --shape cross``) and reads the samples as that shape; ``--preserve W`` adds W x the distance of the
adapted model's velocity from the base model's on the concept's images captioned with known shapes instead of the
trigger (``train_lora``'s ``preservation_loss``: a prior of the base model's own predictions, no pictures);
``--rank 0`` trains no adapter (with ``--embeddings``: textual inversion alone), ``--embedding-lr`` gives the
embeddings their own learning rate, ``--new-token-init`` starts the new token at the mean of the given words' rows;
``--weights DIR`` starts from another base (``DIR/mini-flux``, say one trained with ``more_shapes``), whose samples
are then read among the taught shapes it knows as well, and also as the shipped base's are, to compare;
``--object-weight K`` weighs each latent token's flow loss by 1 + K x the share of its pixels the object covers
(``train_lora``'s masked loss with ``mask_min_value = 1 / (1 + K)``); ``--preserve-batch N`` reads only N of a step's
images for ``--preserve``; ``--schedule cosine`` takes the learning rate to zero; ``--ema DECAY`` samples with an
average of the weights; ``--seed N`` changes the training's randomness (the LoRA's start, batches, noise, times), not
the probe prompts, to tell a setting from its seed; ``--preserve-prompts world`` holds the LoRA to the base on
prompts of the whole world (one or two objects, any size and place) instead of the concept's own captions
(``mix``: either, at even odds per image); ``--preserve-words`` names the known shapes it puts in the
captions (``star,star,circle,square,triangle``: the star twice as often as each other); ``--preserve-on``
holds it to the base on pictures of their own instead of the concept's (``--preserve-n`` of them, of those
prompts: rendered, or drawn by the base, so the term reads the states that prompts of the known shapes pass
through when sampled); ``--preserve-guidance G`` makes both of the term's predictions at guidance G (3: the
samples'); ``--null-space E`` keeps every LoRA A matrix off the input directions that hold E of the energy the
known shapes' pictures give its layer (``bench/null_space.py``); ``--warmup N`` (with ``--schedule
constant_with_warmup``) raises the rate over N steps and ``--adam-eps`` sets AdamW's epsilon; ``--vocab N`` scores N
held-out prompts of the vocabulary with and without the LoRA (the shape adherence the LoRA costs); each row also
gives its cost in plain 8-image steps on this CPU
(``cpu_units``: about half a second each). ``--device cuda`` runs it all on a GPU (``bench/concept_sweep.py`` runs several settings in one process).
``--grid`` saves the training images over the four rows of samples.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from concept_train import add_trigger_token, encode, render_scenes, train  # noqa: E402  (bench/ is no package: the script's own folder)
# the rows a summary (bench/concept_sweep.py's table) reads: training captions, new prompts, leakage (guidance 3)
SUMMARY_ROWS = ("training captions, guidance 3", "new prompts with the trigger", "the same with a known shape (leakage)")


SWAPS = {"h": {"left": "right", "right": "left"}, "v": {"top": "bottom", "bottom": "top"}}


def augment(image: Any, caption: str, rng: random.Random) -> tuple[Any, str]:
    """One variant of a training image and its caption: mirrored left-right and/or top-bottom (the position words
    swapped with it; the hexagon is symmetric both ways), and the object and background recoloured to two other
    palette colours (each pixel keeps its blend of the two, so the edges stay smooth; the words follow)."""
    import re

    import numpy as np
    from PIL import Image, ImageOps

    from fluxkiln.plugins.miniflux.world import COLOURS

    m = re.search(r"(\w+) TOK .* on a (\w+) background", caption)
    if m is None or m.group(1) not in COLOURS or m.group(2) not in COLOURS:
        raise ValueError(f"cannot recolour {caption!r}: it names no object and background colour")
    obj, bg = m.group(1), m.group(2)
    new_obj, new_bg = rng.sample(sorted(COLOURS), 2)
    px = np.asarray(image.convert("RGB"), dtype=np.float32)
    a, b = np.array(COLOURS[obj], np.float32), np.array(COLOURS[bg], np.float32)
    alpha = np.clip(((px - b) @ (a - b)) / float((a - b) @ (a - b)), 0.0, 1.0)[..., None]
    out = alpha * np.array(COLOURS[new_obj], np.float32) + (1 - alpha) * np.array(COLOURS[new_bg], np.float32)
    image = Image.fromarray(out.round().astype(np.uint8))
    caption = re.sub(rf"\b{obj} TOK", f"{new_obj} TOK", caption, count=1)
    caption = re.sub(rf"on a {bg} background", f"on a {new_bg} background", caption, count=1)
    for axis, flip in (("h", ImageOps.mirror), ("v", ImageOps.flip)):
        if rng.random() < 0.5:
            image = flip(image)
            caption = re.sub(r"\b(left|right|top|bottom)\b", lambda w: SWAPS[axis].get(w.group(1), w.group(1)),
                             caption)
    return image, caption


def augmented_set(images: list[Any], captions: list[str], per_image: int, seed: int = 7) -> tuple[list[Any], list[str]]:
    """``per_image`` variants of every training image (:func:`augment`), the originals first."""
    rng = random.Random(seed)
    out_images, out_captions = list(images), list(captions)
    for image, caption in zip(images, captions, strict=True):
        for _ in range(per_image):
            im, cap = augment(image, caption, rng)
            out_images.append(im)
            out_captions.append(cap)
    return out_images, out_captions


def prior_set(n: int, same_scenes: list[str] | None = None) -> tuple[list[Any], list[str]]:
    """``n`` rendered single-object scenes of the known shapes (an equal share each) and their captions; with
    ``same_scenes`` (the training captions) those captions' own scenes (colours, sizes, places, backgrounds) with
    each known shape instead of the concept, so that only the word tells the concept's images from these."""
    import dataclasses

    from fluxkiln.plugins.miniflux.concept import TRIGGER, concept_scenes
    from fluxkiln.plugins.miniflux.world import SHAPES, Scene, parse

    if same_scenes:
        read = [parse(c, {TRIGGER: "circle"}) for c in same_scenes]  # the trigger read as a shape, then replaced
        scenes = [Scene(tuple(dataclasses.replace(o, shape=shape) for o in s.objects), s.background)
                  for shape in SHAPES for s in read][:n]
    else:
        scenes = [s for i, shape in enumerate(SHAPES) for s in concept_scenes(n // len(SHAPES), seed=50 + i,
                                                                             shape=shape)]
    return render_scenes(scenes, seed=60), [s.prompt for s in scenes]


def cpu_units(args: argparse.Namespace) -> float:
    """The training's cost in plain 8-image steps on this CPU (about 0.5 s each): a step of ``--batch`` images
    costs batch/8, a preservation term its images' forward and backward plus the base's forward (about 1.45 x),
    and ``--null-space`` its forward passes over the known shapes' pictures."""
    from null_space import FORWARD_UNITS, ROUNDS

    preserved = (args.preserve_batch or args.batch) / args.preserve_every if args.preserve else 0
    recorded = FORWARD_UNITS * ROUNDS * args.null_space_n / 8 if args.null_space else 0
    return round(args.steps * (args.batch + 1.45 * preserved) / 8 + recorded, 1)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch", type=int, default=1, help="images a step (drawn with replacement)")
    parser.add_argument("--times", default="sigmoid", choices=["sigmoid", "linear", "shift", "flux_shift"])
    parser.add_argument("--rank", type=int, default=16, help="the LoRA's rank; 0: no LoRA (with --embeddings: textual "
                        "inversion alone)")
    parser.add_argument("--full", action="store_true", help="train every block weight, not a LoRA")
    parser.add_argument("--text-encoders", action="store_true", help="a LoRA on both text encoders too")
    parser.add_argument("--embeddings", action="store_true", help="train the trigger's token embeddings in both "
                        "text encoders too (textual inversion: pivotal tuning with the LoRA)")
    parser.add_argument("--embedding-lr", type=float, help="the learning rate of --embeddings (default: --lr)")
    parser.add_argument("--new-token", action="store_true", help="make the trigger one new token of T5's "
                        "tokenizer (with --embeddings: train its row, and only T5's)")
    parser.add_argument("--new-token-init", default="shapes", help="its first embedding: the mean of the four shape "
                        "words' rows (shapes), or of the rows of the comma-separated words given")
    parser.add_argument("--prior", type=int, default=0, help="rendered images of the known shapes to add")
    parser.add_argument("--prior-every", type=int, default=2, help="every how many steps a step of the prior set "
                        "comes (2: every other step)")
    parser.add_argument("--prior-scenes", choices=["random", "same"], default="random",
                        help="the prior set's scenes: random ones, or the training images' own with known shapes")
    parser.add_argument("--preserve", type=float, default=0.0, metavar="W", help="add W x the distance of the "
                        "adapted model's velocity from the base model's on the concept's images captioned with a "
                        "known shape instead of the trigger (self-distilled preservation: only the word may matter)")
    parser.add_argument("--preserve-prompts", choices=["same", "world", "mix"], default="same",
                        help="what --preserve reads: the concept's captions with a known shape (same), prompts of "
                             "the whole world, one or two objects (world), or either at even odds (mix)")
    parser.add_argument("--preserve-on", choices=["concept", "rendered", "generated", "concept+rendered", "concept+generated"],
                        default="concept",
                        help="the pictures --preserve reads: the concept's own, noised (concept), or a set of "
                        "--preserve-n pictures of --preserve-prompts' prompts, rendered by the world's renderer "
                        "(rendered) or drawn by the base model (generated: DreamBooth's class images); concept+...: half "
                        "of each")
    parser.add_argument("--preserve-n", type=int, default=32, help="the size of --preserve-on's set")
    parser.add_argument("--preserve-words", type=lambda v: tuple(v.split(",")), metavar="W,W,...",
                        help="the known shapes --preserve names in the captions, one drawn for each image (default: "
                             "all four; a word given twice is drawn twice as often; train_lora's preservation_class)")
    parser.add_argument("--vocab", type=int, default=0, metavar="N", help="also score N held-out prompts of the "
                        "vocabulary with the LoRA (at 1 and each --lora-scales) and without it")
    parser.add_argument("--preserve-every", type=int, default=1, help="every how many steps --preserve applies")
    parser.add_argument("--preserve-batch", type=int, help="how many of a step's images --preserve reads (default: "
                        "all --batch)")
    parser.add_argument("--object-weight", type=float, default=0.0, metavar="K", help="weigh each latent token's "
                        "flow loss by 1 + K x the share of its pixels the object covers (not the background)")
    parser.add_argument("--warmup", type=int, default=0, metavar="N", help="the learning rate rises linearly over the "
                        "first N steps (train_lora's warmup_steps; not with --schedule constant)")
    parser.add_argument("--adam-eps", type=float, default=1e-8, metavar="EPS", help="AdamW's epsilon: weights whose "
                        "gradients are far under it move less than the rate (1e-8: PyTorch's default)")
    parser.add_argument("--preserve-guidance", type=float, default=1.0, metavar="G", help="the guidance --preserve's "
                        "two predictions are made at (1: the training's; 3: the samples')")
    parser.add_argument("--null-space", type=float, default=0.0, metavar="E", help="keep every LoRA A matrix off "
                        "the input directions holding E (e.g. 0.99) of the energy the known shapes' pictures give "
                        "each layer (Gradient Projection Memory: bench/null_space.py)")
    parser.add_argument("--null-space-n", type=int, default=64, help="rendered pictures --null-space reads")
    parser.add_argument("--loraplus", type=float, default=1.0, metavar="R", help="LoRA+: train the transformer's "
                        "LoRA B matrices at R x --lr (1: one rate for both)")
    parser.add_argument("--schedule", choices=["constant", "constant_with_warmup", "cosine"], default="constant",
                        help="the learning rate over the steps: constant, constant after --warmup, or cosine to zero")
    parser.add_argument("--ema", type=float, default=0.0, metavar="DECAY", help="sample with an exponential "
                        "moving average of the trained weights (e.g. 0.99; 0: the weights as trained)")
    parser.add_argument("--seed", type=int, default=0, help="the training's seed (the LoRA's start, the batches, "
                        "noise and times; the probe prompts stay the same)")
    parser.add_argument("--layers", help="train only the LoRA layers this regular expression matches")
    parser.add_argument("--caption-variants", action="store_true", help="each step, each image's caption with a "
                        "random subset of its optional parts (size, colour, position, background) left out")
    parser.add_argument("--augment", type=int, default=0, metavar="N", help="N mirrored and recoloured variants of "
                        "each training image (captions to match) join the concept's images")
    parser.add_argument("--data", type=Path, default=ROOT / "recipes" / "data" / "hexagons",
                        help="the captioned concept images (python -m fluxkiln.plugins.miniflux.concept dataset DIR "
                        "[--balanced] writes them)")
    parser.add_argument("--shape", default="hexagon", help="the concept --data shows (python -m "
                        "fluxkiln.plugins.miniflux.concept dataset DIR --shape S): the checker's reading")
    parser.add_argument("--class-word", help="a known shape word after the trigger in every caption and prompt "
                        "with it (DreamBooth's class noun: 'a [V] dog'), e.g. circle")
    parser.add_argument("--weights", type=Path, help="a folder holding a mini-flux pipeline folder (mini-flux/) to "
                        "start from instead of the shipped weights (a base trained with more_shapes)")
    parser.add_argument("--device", default="cpu", help="cpu (the table's) or cuda (to try settings quickly)")
    parser.add_argument("--more-guidance", type=lambda v: [float(x) for x in v.split(",")], default=[],
                        help="also sample the new prompts (and the leakage prompts) at these guidances, e.g. 5")
    parser.add_argument("--lora-scales", type=lambda v: [float(x) for x in v.split(",")], default=[],
                        help="also sample the new prompts (and the leakage prompts) with the LoRA at these scales, "
                        "e.g. 1.5,2 (a LoRA's strength at sampling, lora_scale)")
    parser.add_argument("--probe", type=int, default=8, help="new prompts with (and without) the trigger")
    parser.add_argument("--sample-steps", type=int, default=28, help="steps of each sample (28 for the table)")
    parser.add_argument("--grid", type=Path)
    parser.add_argument("--json", type=Path)
    return parser


def concept_set(parser: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[list[Any], list[str], str]:
    """The concept's images and captions from ``--data`` (the trigger followed by ``--class-word`` where given),
    and the words that call the concept."""
    from PIL import Image

    from fluxkiln.plugins.miniflux.concept import TRIGGER, training_captions

    pictures = sorted(args.data.glob("*.png"))
    if not pictures or [p.stem for p in pictures] != [t.stem for t in sorted(args.data.glob("*.txt"))]:
        parser.error(f"--data {args.data}: needs .png images, each with a .txt caption of the same name (python -m "
                     "fluxkiln.plugins.miniflux.concept dataset DIR writes such a folder)")
    images = [Image.open(p) for p in pictures]
    called = f"{TRIGGER} {args.class_word}" if args.class_word else TRIGGER  # what calls the concept
    captions = [c.replace(TRIGGER, called) for c in training_captions(args.data)]  # train_lora's caption rule
    return images, captions, called


def probe_rows(args: argparse.Namespace, captions: list[str], called: str
               ) -> tuple[dict[str, tuple[list[str], list[str], float]], dict[str, float]]:
    """Each row's prompts, the prompts the checker reads (the trigger as the concept) and guidance; and the LoRA
    scale of each row."""
    from fluxkiln.plugins.miniflux.concept import TRIGGER, probe_prompts

    with_trigger, without = probe_prompts(args.probe, shape=args.shape)
    with_trigger = [p.replace(TRIGGER, called) for p in with_trigger]
    named = [c.replace(called, args.shape) for c in captions]  # what the checker reads the trigger as
    fitted, new, leaked = SUMMARY_ROWS
    rows = {"training captions, guidance 1": (captions, named, 1.0),
            fitted: (captions, named, 3.0),
            new: (with_trigger, [p.replace(called, args.shape) for p in with_trigger], 3.0),
            leaked: (without, without, 3.0)}
    for g in args.more_guidance:
        rows[f"{new}, guidance {g:g}"] = (with_trigger, rows[new][1], g)
        rows[f"leakage, guidance {g:g}"] = (without, without, g)
    scales = {name: 1.0 for name in rows}
    for s in args.lora_scales:
        rows[f"{new}, LoRA scale {s:g}"] = (with_trigger, rows[new][1], 3.0)
        rows[f"leakage, LoRA scale {s:g}"] = (without, without, 3.0)
        scales[f"{new}, LoRA scale {s:g}"] = scales[f"leakage, LoRA scale {s:g}"] = s
    return rows, scales


BASE_VOCAB: dict[tuple[str, int, int], dict[str, float]] = {}  # the base's vocabulary rows, once a process


def vocabulary(pipe: Any, args: argparse.Namespace) -> dict[str, Any]:
    """The held-out vocabulary's adherence (the checker's attributes, guidance 3) without the LoRA and with it at
    1 and each ``--lora-scales``, and each scale's drop in shape adherence (points)."""
    from fluxkiln.plugins.miniflux.adherence import eval_prompts, generate, score_images

    prompts = eval_prompts(args.vocab)
    key = (str(args.weights), args.vocab, args.sample_steps)
    if key not in BASE_VOCAB:
        pipe.transformer.disable_adapters()
        BASE_VOCAB[key] = score_images(generate(pipe, prompts, steps=args.sample_steps, guidance=3.0), prompts)
        pipe.transformer.enable_adapters()
    out: dict[str, Any] = {"vocabulary without the LoRA": BASE_VOCAB[key]}
    for scale in (1.0, *args.lora_scales):
        pipe.transformer.set_adapters(["default"], weights=[scale])
        row = score_images(generate(pipe, prompts, steps=args.sample_steps, guidance=3.0), prompts)
        out[f"vocabulary, LoRA scale {scale:g}"] = row
        out[f"vocabulary shape drop, LoRA scale {scale:g}"] = round(BASE_VOCAB[key]["shape"] - row["shape"], 1)
    return out


def known_taught(pipe: Any) -> tuple[str, ...]:
    """The taught shapes (:data:`~fluxkiln.plugins.miniflux.world.TAUGHT_SHAPES`) that are words of the
    pipeline's T5 vocabulary: those its base was trained on."""
    from fluxkiln.plugins.miniflux.config import knows_word
    from fluxkiln.plugins.miniflux.world import TAUGHT_SHAPES

    return tuple(w for w in TAUGHT_SHAPES if knows_word(pipe.tokenizer_2, w))


def save_grid(path: Path, images: list[Any], sampled: list[list[Any]], probe: int) -> None:
    """The training images, then each row's samples, 128 pixels a picture."""
    from PIL import Image

    side, cols = 128, max(len(images), probe)
    grid = Image.new("RGB", (cols * side, (len(sampled) + 1) * side))
    for r, row in enumerate([images, *sampled]):
        for c, im in enumerate(row):
            grid.paste(im.convert("RGB").resize((side, side)), (c * side, r * side))
    grid.save(path)


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    if args.prior_every < 2:
        parser.error("--prior-every must be 2 or more (1 would train the prior set alone)")
    if args.lora_scales and args.full:
        parser.error("--lora-scales needs a LoRA: --full trains the block weights themselves")
    if args.preserve and args.full:
        parser.error("--preserve needs a LoRA (the base model is the adapter switched off): drop --full")
    if not args.rank and not args.full and not args.embeddings:
        parser.error("--rank 0 trains no adapter: add --embeddings (textual inversion), or give a rank")
    if not args.rank and (args.lora_scales or args.preserve or args.vocab):
        parser.error("--lora-scales, --preserve and --vocab need a LoRA: give --rank 1 or more")
    if args.vocab and args.full:
        parser.error("--vocab compares the LoRA on and off: --full trains the block weights themselves")
    if args.preserve_on != "concept" and not args.preserve:
        parser.error("--preserve-on needs --preserve W (the preservation term's weight)")
    if args.preserve_every < 1:
        parser.error("--preserve-every must be 1 or more")
    if not 0 <= args.null_space < 1 or (args.null_space and (args.full or not args.rank)):
        parser.error(f"--null-space {args.null_space:g}: give a share of the energy in (0, 1) for a LoRA (--rank 1 "
                     "or more, not --full), e.g. --null-space 0.99")
    if args.warmup and args.schedule == "constant":
        parser.error("--warmup N needs a schedule that warms up: --schedule constant_with_warmup (or cosine)")
    if args.loraplus <= 0 or (args.loraplus != 1 and (args.full or not args.rank)):
        parser.error(f"--loraplus {args.loraplus:g}: give a rate ratio above 0 for a LoRA (--rank 1 or more, "
                     "not --full), e.g. --loraplus 4")

    import torch

    from fluxkiln.plugins.miniflux.adherence import generate
    from fluxkiln.plugins.miniflux.concept import TRIGGER, concept_share
    from fluxkiln.plugins.miniflux.weights import load_pipeline

    torch.manual_seed(args.seed)
    images, captions, called = concept_set(parser, args)
    trained_images, trained_captions = augmented_set(images, captions, args.augment)  # the originals alone at 0
    same = captions if args.prior_scenes == "same" else None
    extra_images, extra_captions = prior_set(args.prior, same) if args.prior else ([], [])
    pipe = load_pipeline("dev", root=args.weights, device=args.device)
    taught = known_taught(pipe)  # a base trained on more shapes: its samples are read among those too
    if args.new_token:
        add_trigger_token(pipe, TRIGGER, args.new_token_init)
    data = encode(pipe, trained_images + extra_images, trained_captions + extra_captions)
    t0 = time.perf_counter()
    notes: dict[str, Any] = {}
    losses = train(pipe, data, trained_captions + extra_captions, len(trained_images), args, notes)
    seconds = time.perf_counter() - t0
    rows, scales = probe_rows(args, captions, called)
    result: dict[str, Any] = {"settings": vars(args) | {k: str(getattr(args, k)) for k in ("grid", "json", "data",
                                                                                                 "weights")},
                              "read_among_taught": list(taught),
                              "train_seconds": round(seconds, 1), "cpu_units": cpu_units(args),
                              "last_100_loss": round(sum(losses[-100:]) / 100, 4), **notes}
    sampled = []
    for name, (prompts, checked, guidance) in rows.items():
        if args.rank and not args.full:
            pipe.transformer.set_adapters(["default"], weights=[scales[name]])
        out = generate(pipe, prompts, steps=args.sample_steps, guidance=guidance)
        result[name] = round(100 * concept_share(out, checked, args.shape, taught), 1)
        if taught:  # the same samples read as the shipped base's are (without the taught shapes), to compare
            result[f"{name} (not read among {', '.join(taught)})"] = round(
                100 * concept_share(out, checked, args.shape), 1)
        sampled.append(out)
    if args.vocab:
        result.update(vocabulary(pipe, args))
    if args.grid:
        save_grid(args.grid, images, sampled, args.probe)
    print(f"\n{args.steps} steps in {seconds:.1f} s, last 100 steps' loss {result['last_100_loss']}\n")
    print(f"| samples | read as {args.shape} |\n|---|---|")
    for name in rows:
        print(f"| {name} | {result[name]} % |")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
