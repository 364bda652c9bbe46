"""A mini-flux base trained on more shapes (``TrainConfig.more_shapes``): the new words join T5's vocabulary
without moving any earlier id, their embedding rows start at the shape words' mean, and the shapes reach the
training scenes and their role labels.  Only the taught shapes are allowed.  ``shape_weights`` draws a shape in
more of the scenes."""

from __future__ import annotations

import random

import pytest

from fluxkiln.plugins.miniflux.config import t5_tokenizer
from fluxkiln.plugins.miniflux.roles import SHAPE_CLASSES, token_labels
from fluxkiln.plugins.miniflux.trainconfig import preset
from fluxkiln.plugins.miniflux.world import SHAPES, TAUGHT_SHAPES, random_scene

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_more_words_become_single_pieces_after_every_earlier_one():
    plain, more = t5_tokenizer(), t5_tokenizer(TAUGHT_SHAPES)
    assert len(more) == len(plain) + len(TAUGHT_SHAPES)
    assert all(more.convert_tokens_to_ids(piece) == i for piece, i in plain.get_vocab().items())
    for word in TAUGHT_SHAPES:
        assert len(plain(word, add_special_tokens=False).input_ids) > 1  # spelled out before
        (only,) = more(word, add_special_tokens=False).input_ids
        assert only >= len(plain)
    prompt = "a large red circle at the top left on a blue background"
    assert plain(prompt).input_ids == more(prompt).input_ids  # the old vocabulary encodes as before


def test_extending_a_pipeline_adds_each_word_once_with_its_row_at_the_shape_words_mean(tmp_path):
    import torch
    from transformers import T5Tokenizer

    from fluxkiln.plugins.miniflux.trainio import extend_vocabulary, load_modules
    from fluxkiln.plugins.miniflux.weights import model_path

    m = load_modules(model_path("dev"))  # the shipped pipeline, as training continues from it
    before = m["text_encoder_2"].get_input_embeddings().weight.detach().clone()
    assert extend_vocabulary(m, TAUGHT_SHAPES) == list(TAUGHT_SHAPES)
    tok, table = m["tokenizer_2"], m["text_encoder_2"].get_input_embeddings().weight
    assert table.shape[0] == len(tok) == before.shape[0] + len(TAUGHT_SHAPES)
    assert torch.equal(table[:before.shape[0]], before)  # no earlier row moves
    shape_rows = [tok(w, add_special_tokens=False).input_ids[0] for w in SHAPES]
    for word in TAUGHT_SHAPES:
        (row,) = tok(word, add_special_tokens=False).input_ids
        assert torch.allclose(table[row], before[shape_rows].mean(0))
    assert extend_vocabulary(m, TAUGHT_SHAPES) == []  # a base that knows them: nothing to add
    tok.save_pretrained(tmp_path / "tokenizer_2")
    saved = T5Tokenizer.from_pretrained(tmp_path / "tokenizer_2")
    assert [saved(w, add_special_tokens=False).input_ids for w in TAUGHT_SHAPES] == \
        [tok(w, add_special_tokens=False).input_ids for w in TAUGHT_SHAPES]


def test_a_foreign_vocabulary_is_refused_rather_than_renumbered():
    from transformers import T5Tokenizer

    from fluxkiln.plugins.miniflux.trainio import extend_vocabulary

    foreign = T5Tokenizer(vocab=[("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581hello", -1.0)],
                          extra_ids=0)
    with pytest.raises(SystemExit, match="not mini-flux's"):
        extend_vocabulary({"tokenizer_2": foreign, "text_encoder_2": None}, ("pentagon",))


def test_more_shapes_are_checked_and_only_taught_shapes_are_allowed():
    cfg = preset("micro", more_shapes="pentagon, octagon")
    assert cfg.shape_words == ("pentagon", "octagon") and cfg.shapes == SHAPES + ("pentagon", "octagon")
    assert preset("micro").shapes == SHAPES
    with pytest.raises(SystemExit, match="hexagon cannot be taught; choose from pentagon, octagon, cross, diamond"):
        preset("micro", more_shapes="pentagon,hexagon")
    with pytest.raises(SystemExit, match="names a shape twice"):
        preset("micro", more_shapes="octagon,octagon")


def test_shape_weights_draw_a_shape_in_more_of_the_scenes():
    assert preset("micro").scene_shapes == SHAPES  # no weights: the scenes' draws are what they always were
    cfg = preset("micro", shape_weights="star:2")
    assert cfg.scene_shapes == ("circle", "square", "triangle", "star", "star") and cfg.shapes == SHAPES
    rng = random.Random(0)
    drawn = [o.shape for _ in range(3000) for o in random_scene(rng, shapes=cfg.scene_shapes).objects]
    assert abs(drawn.count("star") / len(drawn) - 2 / 5) < 0.03  # twice each other shape's 1/5
    assert abs(drawn.count("circle") / len(drawn) - 1 / 5) < 0.03
    both = preset("micro", more_shapes="cross", shape_weights=" star:3 , cross:2")
    assert both.weights_of_shapes == {"star": 3, "cross": 2}
    assert both.scene_shapes.count("star") == 3 and both.scene_shapes.count("cross") == 2
    assert len(both.scene_shapes) == 8


@pytest.mark.parametrize(("value", "message"), [
    ("hexagon:2", "'hexagon' is not a shape of the training scenes; choose from circle, square, triangle, star"),
    ("cross:2", "'cross' is not a shape of the training scenes.*more_shapes adds to them"),
    ("star:0", "'star:0' needs a whole number from 1 to 10 after the colon"),
    ("star:two", "'star:two' needs a whole number"),
    ("star:\u00b2", "'star:\u00b2' needs a whole number"),  # a digit to str.isdigit, not to int()
    ("star:11", "'star:11' needs a whole number from 1 to 10"),
    ("star", "'star' needs a whole number"),
    ("star:2,star:3", "'star' is named twice"),
])
def test_bad_shape_weights_are_refused_before_any_work(value, message):
    with pytest.raises(SystemExit, match=f"shape_weights: {message}"):
        preset("micro", shape_weights=value)


@pytest.mark.parametrize("key", ["more_shapes", "shape_weights"])
def test_shape_settings_that_are_not_strings_are_refused_with_the_quoting_to_use(key):
    with pytest.raises(SystemExit, match=f"{key}: 2 is not a string; write it in quotes, e.g. --set {key}="):
        preset("micro", **{key: 2})


def test_the_shapes_reach_the_pools_scenes_and_their_shape_labels():
    import torch
    from diffusers import AutoencoderKL

    from fluxkiln.plugins.miniflux import trainparts
    from fluxkiln.plugins.miniflux.config import CLIP_TOKENS, TEXT_TOKENS, VAE, clip_tokenizer
    from fluxkiln.plugins.miniflux.pool import Pools

    tok = t5_tokenizer(TAUGHT_SHAPES)
    batch = trainparts.make_batch(random.Random(0), 64, (32, 32), "cpu", shapes=SHAPES + TAUGHT_SHAPES)
    drawn = {o.shape for s in batch.scenes for o in s.objects}
    assert drawn == set(SHAPES + TAUGHT_SHAPES)
    words = trainparts.WordTokens(tok, TEXT_TOKENS)
    labels = token_labels(batch.scenes, words)
    said = {int(v) for v in labels[..., 2].flatten() if 0 <= v < len(SHAPE_CLASSES)}
    assert {SHAPE_CLASSES[v] for v in said} == drawn  # every shape word labelled with its own class

    torch.manual_seed(0)
    enc = trainparts.TextEncoder(None, clip_tokenizer(), None, tok, "cpu")  # ids only
    pools = Pools(32, capacity=8, multi_capacity=0, chunk=8, vae=AutoencoderKL(**VAE), enc=enc,
                  rng=random.Random(1), device="cpu", share=0.0, shapes=("octagon",))
    assert pools.fill(0.0, log=lambda _: None)["pool_shapes"] == {"octagon": 100.0}  # each shape's share of objects
    d = pools.batch(8, multi_res=0.0)
    assert d.clip.shape == (8, CLIP_TOKENS)
    shape_labels = d.t5_labels[..., 2]
    assert set(shape_labels[shape_labels >= 0].tolist()) <= {SHAPE_CLASSES.index("octagon"), len(SHAPE_CLASSES)}
    assert (shape_labels == SHAPE_CLASSES.index("octagon")).any()
    assert (d.t5 == tok("octagon", add_special_tokens=False).input_ids[0]).any(dim=1).all()


def test_adherence_on_the_taught_shapes_names_them_in_held_out_prompts(monkeypatch, capsys):
    from fluxkiln.plugins.miniflux import adherence
    from fluxkiln.plugins.miniflux.world import held_out, parse

    prompts = adherence.eval_prompts(40, shapes=("cross", "diamond"))
    named = {o.shape for p in prompts for o in parse(p).objects}
    assert named == {"cross", "diamond"} and all(held_out(p) for p in prompts)
    assert adherence.eval_prompts(8) == adherence.eval_prompts(8, shapes=SHAPES)  # the four by default, as before
    seen = []
    monkeypatch.setattr(adherence, "run", lambda load, n, variants, shapes: seen.append(shapes) or {})
    assert adherence.main(["--shapes", "cross, diamond", "--variants", "dev"]) == 0
    assert seen == [("cross", "diamond")]
    with pytest.raises(SystemExit):
        adherence.main(["--shapes", "cross,blob"])
    assert "name one or more of" in capsys.readouterr().err
