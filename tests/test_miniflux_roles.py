"""The labels of mini-flux's auxiliary text losses: every word of a training prompt gets the role of what it
describes (object 1, object 2, the background, nothing) and that thing's attributes, aligned with the T5
tokens; the pooled labels summarise the scene; the heads' loss learns them."""

from __future__ import annotations

import random

import pytest

from fluxkiln.plugins.miniflux import roles
from fluxkiln.plugins.miniflux.config import TEXT_TOKENS, t5_tokenizer
from fluxkiln.plugins.miniflux.trainparts import WordTokens
from fluxkiln.plugins.miniflux.world import COLOURS, POSITIONS, SIZES, Obj, Scene, random_scene

OBJ1, OBJ2, BG, OTHER = 1, 2, 3, 0


@pytest.fixture(scope="module")
def t5():
    return WordTokens(t5_tokenizer(), TEXT_TOKENS)


def _token_rows(scene, t5):
    """(token id, labels) of the scene's prompt, labelled tokens only."""
    ids = t5([scene.prompt])[0].tolist()
    labels = roles.token_labels([scene], t5)[0].tolist()
    return [(i, lab) for i, lab in zip(ids, labels, strict=True) if lab[0] != roles.IGNORE]


def test_two_objects_and_a_background_each_colour_word_gets_its_owners_role(t5):
    scene = Scene((Obj("red", "circle", "large", "top left"), Obj("blue", "star", None, "bottom right")), "green")
    assert scene.prompt == ("a large red circle at the top left and a blue star at the bottom right "
                            "on a green background")
    rows = _token_rows(scene, t5)
    words = scene.prompt.split()
    assert len(rows) == len(words)  # one T5 token per known word, every word labelled
    by_word = list(zip(words, (lab for _, lab in rows), strict=True))
    assert by_word[2] == ("red", [OBJ1, 0, 0, 1, list(POSITIONS).index("top left")])
    assert by_word[10] == ("blue", [OBJ2, 2, 3, len(SIZES), list(POSITIONS).index("bottom right")])
    assert by_word[-2] == ("green", [BG, 1, -1, -1, -1])
    assert by_word[8] == ("and", [OTHER, -1, -1, -1, -1])
    assert all(lab[0] == OBJ1 for w, lab in by_word[:8])  # "at the top left" belongs to object 1 as well


def test_a_prompt_without_a_background_has_no_background_role_and_unsaid_attributes(t5):
    scene = Scene((Obj("yellow", "square", None, None),), None)
    rows = _token_rows(scene, t5)
    assert [lab for _, lab in rows] == [[OBJ1, 3, 1, len(SIZES), len(POSITIONS)]] * 3  # a yellow square
    assert roles.scene_labels([scene]).tolist() == [[len(COLOURS), 0, 3, -1]]


def test_every_colour_word_of_random_prompts_gets_the_right_role(t5):
    """Filler words anywhere (also inside an object's words) take no role; colours keep theirs."""
    rng = random.Random(11)
    colour_ids = {t5.word_ids(c)[0]: c for c in COLOURS}
    seen = set()
    for _ in range(300):
        scene = random_scene(rng, two=0.5, fillers=0.6)
        expected = [(o.colour, k + 1) for k, o in enumerate(scene.objects)]
        if scene.background:
            expected.append((scene.background, BG))
        found = [(colour_ids[i], lab[0], lab[1]) for i, lab in _token_rows(scene, t5) if i in colour_ids]
        assert [(c, r) for c, r, _ in found] == expected, scene.prompt
        assert all(list(COLOURS)[k] == c for c, _, k in found)  # the colour target is the word's colour
        seen |= {(len(scene.objects), scene.background is None)}
    assert seen == {(1, False), (2, False), (1, True), (2, True)}


def test_labels_beyond_the_token_limit_are_cut_and_padding_is_ignored(t5):
    scene = Scene((Obj("red", "circle"),), "blue", tuple((0, "photo") for _ in range(80)))
    labels = roles.token_labels([scene], t5)[0]
    assert labels.shape == (TEXT_TOKENS, 5)
    assert (labels[:TEXT_TOKENS - 1, 0] == OTHER).all() and labels[-1, 0] == roles.IGNORE  # </s>
    short = roles.token_labels([Scene((Obj("red"),))], t5)[0]
    assert (short[3:, 0] == roles.IGNORE).all()  # "a red" + </s>, then padding


def test_role_swapped_scene_exchanges_object_and_background_colours():
    scene = Scene((Obj("red", "circle"), Obj("white", "star")), "blue")
    assert roles.swap_roles(scene).prompt == "a blue circle and a white star on a red background"
    assert roles.swap_roles(Scene((Obj("red", "circle"),))) is None


def test_the_aux_loss_learns_the_roles_and_ignores_unlabelled_entries():
    import torch

    torch.manual_seed(0)
    heads = roles.aux_heads(8, 4)
    seq, pooled = torch.randn(2, 5, 8), torch.randn(2, 4)
    tok = torch.full((2, 5, 5), roles.IGNORE, dtype=torch.int8)
    tok[0, 1] = torch.tensor([1, 2, 0, 1, 3])
    pool = torch.tensor([[3, 0, 2, -1], [-1, -1, -1, -1]], dtype=torch.int8)
    loss, acc = roles.aux_loss(heads, seq, pooled, tok, pool)
    assert torch.isfinite(loss) and set(acc) == set(roles.TOKEN_HEADS) | {f"pooled {k}" for k in roles.POOLED_HEADS}
    opt = torch.optim.Adam(heads.parameters(), lr=0.1)
    for _ in range(60):
        loss, acc = roles.aux_loss(heads, seq, pooled, tok, pool)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05 and all(float(v) == 1.0 for k, v in acc.items() if k != "pooled colour 2")
    assert float(acc["pooled colour 2"]) == 0.0  # no labelled entry: counts nothing, costs nothing
