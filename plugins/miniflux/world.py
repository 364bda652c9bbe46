"""mini-flux's synthetic world: flat shapes on a flat background, their prompts, and a prompt parser.

A :class:`Scene` is one or two objects (colour, shape, size, position) on a background colour.  It has a
canonical prompt (``a large red circle at the top left on a blue background``) following the grammar

    a [small|large] <colour> <shape> [<position>] [and a ...] [on a <colour> background]

and :func:`parse` reads any such prompt back (case-insensitive, unknown words ignored).  Geometry is in
image fractions, so a scene renders at any size: positions are fractions of width and height, sizes
fractions of the shorter side.  Nothing here imports torch.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass, field

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (240, 220, 40),
    "orange": (245, 140, 30), "purple": (140, 60, 180), "white": (245, 245, 245), "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle", "star")
EXTRA_SHAPES = ("hexagon",)  # drawable and recognised, but never in mini-flux's training data
ALL_SHAPES = SHAPES + EXTRA_SHAPES  # the shapes the checker always considers
# other new concepts for LoRAs: drawable, and considered by the checker only where a prompt (or an alias) names them
# or it is asked to (its diamond template would take the base's blunt stars: 22 of 200 samples read otherwise)
CONCEPT_SHAPES = ("cross", "diamond", "ring", "bowtie")
# more outlines, each under a word of its own, for a broad base: one that knows many shapes, so that a LoRA's new
# one is one more of many (the bowtie is not among them); each fills its box and none is another stretched
OUTLINES = ("heart", "moon", "arrow", "house", "kite", "trapezoid", "chevron", "tee", "ell", "sparkle", "hexagram")
# shapes a base may also be trained on (``TrainConfig.more_shapes``): the regular polygons either side of the
# hexagon, which the base never sees, two pointed concepts (so that the star is not the only shape with
# points) and the outlines; drawable, and read by the checker where named, as the concepts are
TAUGHT_SHAPES = ("pentagon", "octagon", "cross", "diamond") + OUTLINES
DRAWABLE = tuple(dict.fromkeys(ALL_SHAPES + CONCEPT_SHAPES + TAUGHT_SHAPES))
SIZES = {"small": 0.11, "large": 0.19}  # half the object's extent, as a fraction of the shorter side
SIZE_SPLIT = 0.15  # measured half-extents below this count as small
POSITIONS: dict[str, tuple[float, float]] = {
    "top left": (0.25, 0.25), "top": (0.5, 0.25), "top right": (0.75, 0.25),
    "left": (0.25, 0.5), "center": (0.5, 0.5), "right": (0.75, 0.5),
    "bottom left": (0.25, 0.75), "bottom": (0.5, 0.75), "bottom right": (0.75, 0.75),
}
FILLER = ("photo", "of", "picture", "simple", "image", "drawing", "nice", "flat", "shape", "an", "with", "the")
VOCABULARY = tuple(COLOURS) + SHAPES + tuple(SIZES) + (
    "a", "at", "the", "in", "on", "and", "background", "left", "right", "top", "bottom", "center") + FILLER
JITTER = 0.05  # random offset of an object's centre from its named position (fraction of the side)
SIZE_JITTER = 0.12  # relative random change of an object's size


@dataclass(frozen=True)
class Obj:
    """One object of a prompt; None = not said (any value is right)."""

    colour: str | None = None
    shape: str | None = None
    size: str | None = None
    position: str | None = None


@dataclass(frozen=True)
class Scene:
    """What a prompt asks for: objects and a background colour (None = not said)."""

    objects: tuple[Obj, ...]
    background: str | None = None
    fillers: tuple[tuple[int, str], ...] = field(default=(), compare=False)

    @property
    def prompt(self) -> str:
        parts = [describe(o) for o in self.objects]
        text = " and ".join(parts)
        if self.background:
            text += f" on a {self.background} background"
        words = text.split()
        for index, word in self.fillers:
            words.insert(min(index, len(words)), word)
        return " ".join(words)


def describe(obj: Obj) -> str:
    words = ["a"] + [w for w in (obj.size, obj.colour, obj.shape) if w]
    if obj.position:
        words.append("in the center" if obj.position == "center" else f"at the {obj.position}")
    return " ".join(words)


def held_out(prompt: str) -> bool:
    """True for the 1 in 16 canonical prompts kept out of training (the evaluation prompts come from these)."""
    return hashlib.sha256(prompt.encode()).digest()[0] % 16 == 0


def far_apart(a: str, b: str) -> bool:
    """Two named positions far enough apart that large objects there do not touch."""
    (ax, ay), (bx, by) = POSITIONS[a], POSITIONS[b]
    return max(abs(ax - bx), abs(ay - by)) >= 0.5


@dataclass(frozen=True)
class Drawn:
    """One object as drawn: centre (fractions of width and height) and half-extent (fraction of the shorter
    side)."""

    colour: str
    shape: str
    x: float
    y: float
    r: float


@dataclass(frozen=True)
class Layout:
    """Everything a renderer needs: the background colour and the objects, drawn in order."""

    background: str
    objects: tuple[Drawn, ...]


def random_scene(rng: random.Random, *, two: float = 0.4, split: str = "train", shapes: tuple[str, ...] = SHAPES,
                 fillers: float = 0.0) -> Scene:
    """A random scene; ``split`` "train" never returns a held-out prompt, "eval" only held-out ones."""
    while True:
        scene = _draw(rng, two, shapes, fillers)
        if held_out(Scene(scene.objects, scene.background).prompt) == (split == "eval"):
            return scene


def _draw(rng: random.Random, two: float, shapes: tuple[str, ...], fillers: float) -> Scene:
    background = rng.choice(list(COLOURS))
    count = 2 if rng.random() < two else 1
    positions: list[str | None] = [None] * count
    if rng.random() < 0.75:
        if count == 2:  # two named positions far apart (so never the center)
            positions[:] = rng.choice([(a, b) for a in POSITIONS for b in POSITIONS if far_apart(a, b)])
        else:
            positions[0] = rng.choice(list(POSITIONS))
    objects = []
    for pos in positions:
        colour = rng.choice([c for c in COLOURS if c != background])
        size = rng.choice(list(SIZES)) if rng.random() < 0.7 else None
        objects.append(Obj(colour, rng.choice(shapes), size, pos))
    extra: list[tuple[int, str]] = []
    while rng.random() < fillers:
        extra.append((rng.randrange(12), rng.choice(FILLER)))
    return Scene(tuple(objects), background if rng.random() < 0.92 else None, tuple(extra))


def realise(scene: Scene, rng: random.Random, aspect: float = 1.0) -> Layout:
    """A concrete drawing of ``scene`` (``aspect`` = width / height): what the prompt leaves open is drawn at
    random; named positions and sizes get a little jitter; objects never overlap."""
    said = {o.colour for o in scene.objects}
    background = scene.background or rng.choice([c for c in COLOURS if c not in said])
    sx, sy = max(aspect, 1.0), max(1.0 / aspect, 1.0)  # width and height in units of the shorter side
    drawn: list[Drawn] = []
    for obj in scene.objects:
        r = SIZES[obj.size or rng.choice(list(SIZES))] * (1 + rng.uniform(-SIZE_JITTER, SIZE_JITTER))
        colour = obj.colour or rng.choice([c for c in COLOURS if c != background])
        shape = obj.shape or rng.choice(SHAPES)
        for _ in range(100):
            if obj.position:
                px, py = POSITIONS[obj.position]
                x, y = px + rng.uniform(-JITTER, JITTER), py + rng.uniform(-JITTER, JITTER)
            else:
                x = rng.uniform((r + 0.03) / sx, 1 - (r + 0.03) / sx)
                y = rng.uniform((r + 0.03) / sy, 1 - (r + 0.03) / sy)
            if all(((x - d.x) * sx) ** 2 + ((y - d.y) * sy) ** 2 > (r + d.r + 0.03) ** 2 for d in drawn):
                break
        drawn.append(Drawn(colour, shape, x, y, r))
    return Layout(background, tuple(drawn))


# -- parsing ----------------------------------------------------------------------------------------------

WORD = re.compile(r"[a-z]+")


def parse(prompt: str, aliases: dict[str, str] | None = None) -> Scene:
    """Read a prompt of mini-flux's grammar back into a Scene.  Unknown words are ignored; the shape words are
    those of :data:`DRAWABLE` (mini-flux's four and the new concepts), and ``aliases`` maps extra words to shapes
    (a LoRA's trigger word to the concept it teaches, say ``{"tok": "hexagon"}``)."""
    alias = {k.lower(): v for k, v in (aliases or {}).items()}
    words = WORD.findall(prompt.lower())
    background = None
    if "background" in words:
        end = words.index("background")
        start = max((i for i, w in enumerate(words[:end]) if w == "on"), default=end)
        colours = [w for w in words[start:end] if w in COLOURS]
        if colours:
            background = colours[-1]
            words = words[:start] + words[end + 1:]
    clauses: list[list[str]] = [[]]
    for w in words:
        if w == "and":
            clauses.append([])
        else:
            clauses[-1].append(w)
    objects = [obj for obj in (_clause(c, alias) for c in clauses) if obj is not None]
    return Scene(tuple(objects), background)


def _clause(words: list[str], alias: dict[str, str]) -> Obj | None:
    colour = next((w for w in words if w in COLOURS), None)
    shape = next((alias.get(w, w) for w in words if w in DRAWABLE or w in alias), None)
    size = next((w for w in words if w in SIZES), None)
    vertical = next((w for w in words if w in ("top", "bottom")), None)
    horizontal = next((w for w in words if w in ("left", "right")), None)
    centre = any(w in ("center", "centre", "middle") for w in words)
    position = " ".join(w for w in (vertical, horizontal) if w) or ("center" if centre else None)
    if colour is None and shape is None:
        return None
    return Obj(colour, shape, size, position)
