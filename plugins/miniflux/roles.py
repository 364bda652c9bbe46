"""What every word of a training prompt is about, as labels for mini-flux's auxiliary text losses.

The renderer knows each prompt's structure, so the text encoders can be told it directly: every T5 token
gets the role of its word (object 1, object 2, the background, or nothing) and the attributes of the thing
it belongs to (an object's colour, shape, size and position; the background's colour), and CLIP's pooled
vector gets the scene's summary (background colour, object count, both objects' colours).  Small linear
heads (:class:`AuxHeads`) trained on these labels beside the flow loss make the encoders' features
role-tagged, which is what binds "red" to the circle and "blue" to the background; the heads are dropped
when the pipeline is saved.
"""

from __future__ import annotations

from typing import Any

from .world import COLOURS, POSITIONS, SHAPES, SIZES, TAUGHT_SHAPES, Obj, Scene, describe, held_out

ROLES = ("other", "object 1", "object 2", "background")
IGNORE = -1  # label of tokens (and attributes) that carry no target
SHAPE_CLASSES = SHAPES + TAUGHT_SHAPES  # the shape head's classes (a base trained on more shapes uses them all)
# per-token targets: role, then the owner's colour, shape, size, position ("unsaid" is the last class of each)
TOKEN_HEADS = {"role": len(ROLES), "colour": len(COLOURS) + 1, "shape": len(SHAPE_CLASSES) + 1, "size": len(SIZES) + 1,
               "position": len(POSITIONS) + 1}
# per-prompt targets of CLIP's pooled vector: background colour, object count - 1, each object's colour
POOLED_HEADS = {"background": len(COLOURS) + 1, "count": 2, "colour 1": len(COLOURS) + 1,
                "colour 2": len(COLOURS) + 1}


def _index(value: str | None, names: Any) -> int:
    names = list(names)
    return len(names) if value is None else names.index(value)


def _object_labels(obj: Obj, slot: int) -> tuple[int, ...]:
    return (slot + 1, _index(obj.colour, COLOURS), _index(obj.shape, SHAPE_CLASSES), _index(obj.size, SIZES),
            _index(obj.position, POSITIONS))


def word_labels(scene: Scene) -> list[tuple[str, tuple[int, ...]]]:
    """Every word of ``scene.prompt`` with its labels (role, colour, shape, size, position), in order.

    Built the way :attr:`~.world.Scene.prompt` builds the prompt: an object's words (``a large red circle
    at the top left``) belong to it, ``on a blue background`` to the background (colour target: blue; no
    shape, size or position target), ``and`` and inserted filler words to nothing."""
    none = (0,) + (IGNORE,) * 4
    words: list[tuple[str, tuple[int, ...]]] = []
    for slot, obj in enumerate(scene.objects):
        if slot:
            words.append(("and", none))
        words += [(w, _object_labels(obj, slot)) for w in describe(obj).split()]
    if scene.background:
        bg = (3, _index(scene.background, COLOURS), IGNORE, IGNORE, IGNORE)
        words += [(w, bg) for w in f"on a {scene.background} background".split()]
    for index, word in scene.fillers:
        words.insert(min(index, len(words)), (word, none))
    return words


def token_labels(scenes: list[Scene], tokens: Any) -> Any:
    """(B, length, 5) int8 labels aligned with the T5 ids of the scenes' prompts (``tokens`` is the
    :class:`~.trainparts.WordTokens` of the T5 tokenizer): each word's labels on each of its pieces;
    special tokens, padding and anything cut off get :data:`IGNORE`."""
    import torch

    out = torch.full((len(scenes), tokens.length, len(TOKEN_HEADS)), IGNORE, dtype=torch.int8)
    room = tokens.length - len(tokens.prefix) - len(tokens.suffix)
    for row, scene in enumerate(scenes):
        labels: list[tuple[int, ...]] = []
        for word, lab in word_labels(scene):
            labels += [lab] * len(tokens.word_ids(word))
        labels = labels[:room]
        if labels:
            at = len(tokens.prefix)
            out[row, at:at + len(labels)] = torch.tensor(labels, dtype=torch.int8)
    return out


def scene_labels(scenes: list[Scene]) -> Any:
    """(B, 4) int8 targets of CLIP's pooled vector: background colour, object count - 1, colours 1 and 2."""
    import torch

    rows = []
    for s in scenes:
        colours = [o.colour for o in s.objects] + [None]
        rows.append((_index(s.background, COLOURS), len(s.objects) - 1, _index(colours[0], COLOURS),
                     _index(colours[1], COLOURS) if len(s.objects) > 1 else IGNORE))
    return torch.tensor(rows, dtype=torch.int8)


def swap_roles(scene: Scene, split: str = "train") -> Scene | None:
    """The scene with the first object's and the background's colours exchanged; None where that is not a
    scene of ``split`` (a held-out prompt for "train"), or without both colours, or where another object
    has the first one's colour (it would vanish into the new background)."""
    if not scene.background or not scene.objects or scene.objects[0].colour is None:
        return None
    first = scene.objects[0]
    if any(o.colour == first.colour for o in scene.objects[1:]):
        return None
    objects = (Obj(scene.background, first.shape, first.size, first.position),) + scene.objects[1:]
    swapped = Scene(objects, first.colour, scene.fillers)
    return swapped if held_out(Scene(objects, first.colour).prompt) == (split == "eval") else None


def aux_heads(t5_dim: int, pooled_dim: int) -> Any:
    """The linear heads of the auxiliary losses (an ``nn.Module``; training only, never saved)."""
    import torch

    class AuxHeads(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.token = torch.nn.Linear(t5_dim, sum(TOKEN_HEADS.values()))
            self.pooled = torch.nn.Linear(pooled_dim, sum(POOLED_HEADS.values()))

    return AuxHeads()


def _split_ce(logits: Any, labels: Any, sizes: dict[str, int]) -> tuple[Any, dict[str, Any]]:
    """Summed cross-entropy over the heads' slices (each the mean over its labelled entries), and each head's
    accuracy on them; no host synchronisation (entries without a label simply do not count)."""
    import torch.nn.functional as F

    total, acc, start = logits.new_zeros((), dtype=logits.dtype).float(), {}, 0
    for k, (name, n) in enumerate(sizes.items()):
        part, target = logits[..., start:start + n].reshape(-1, n).float(), labels[..., k].reshape(-1).long()
        start += n
        seen = target != IGNORE
        count = seen.sum().clamp(min=1)
        total = total + F.cross_entropy(part, target.clamp(min=0), reduction="none").mul(seen).sum() / count
        acc[name] = ((part.argmax(-1) == target) & seen).sum().detach() / count
    return total, acc


def aux_loss(heads: Any, seq: Any, pooled: Any, tok_labels: Any, pooled_labels: Any) -> tuple[Any, dict[str, Any]]:
    """The auxiliary loss of T5's sequence and CLIP's pooled output, and per-head accuracies (tensors)."""
    tok, tok_acc = _split_ce(heads.token(seq), tok_labels, TOKEN_HEADS)
    pool, pool_acc = _split_ce(heads.pooled(pooled), pooled_labels, POOLED_HEADS)
    return tok + pool, tok_acc | {f"pooled {k}": v for k, v in pool_acc.items()}
