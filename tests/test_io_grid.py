"""The `grid` node: layout, size, labels and errors."""

from __future__ import annotations

import pytest

from fluxkiln.engine import ImageItem, Images, NodeError
from fluxkiln.plugins.io.grid import grid
from test_io_helpers import make_ctx, picture, sample_images

WHITE = (255, 255, 255)


def _ink(im, box) -> int:
    """Number of non-white pixels inside box."""
    region = im.crop(box).convert("RGB")
    return sum(1 for px in region.get_flattened_data() if px != WHITE)


def _cells(n, colour=(0, 0, 0), steps=4):
    return Images(ImageItem(image=picture(colour, (40, 40)), seed=i, meta={"params": {"num_inference_steps": steps}})
                  for i in range(n))


def test_one_input_is_near_square_and_sized_by_cell(tmp_path):
    ctx, _ = make_ctx(tmp_path, node="g")
    out = grid(ctx, sample_images(4), cell_size=64, font_size=10)
    assert len(out) == 1
    item = out[0]
    assert item.meta["rows"] == 2 and item.meta["columns"] == 2
    pad = 5  # max(4, font_size // 2)
    assert item.image.size == (pad + 2 * (64 + pad), pad + 2 * (64 + pad))
    assert [[c["seed"] for c in row] for row in item.meta["cells"]] == [[42, 43], [44, 45]]


def test_each_input_is_a_row_and_transpose(tmp_path):
    ctx, _ = make_ctx(tmp_path, node="g")
    out = grid(ctx, _cells(3), images_2=_cells(2), cell_size=32)
    assert (out[0].meta["rows"], out[0].meta["columns"]) == (2, 3)
    assert out[0].meta["cells"][1][2] is None  # ragged row padded with an empty cell
    out = grid(ctx, _cells(3), images_2=_cells(2), cell_size=32, transpose=True)
    assert (out[0].meta["rows"], out[0].meta["columns"]) == (3, 2)


def test_columns_wrap_images_of_all_inputs(tmp_path):
    ctx, _ = make_ctx(tmp_path, node="g")
    ins = {"images": _cells(1), "images_2": _cells(1), "images_3": _cells(1), "images_4": _cells(1),
           "images_5": _cells(1), "images_6": _cells(1)}
    out = grid(ctx, **ins, columns=3, cell_size=32)
    assert (out[0].meta["rows"], out[0].meta["columns"]) == (2, 3)
    out = grid(ctx, **ins, rows=3, cell_size=32)
    assert (out[0].meta["rows"], out[0].meta["columns"]) == (3, 2)


def test_labels_title_and_captions_are_drawn(tmp_path):
    ctx, _ = make_ctx(tmp_path, node="g")
    cell, fs = 64, 12
    plain = grid(ctx, _cells(2, WHITE), images_2=_cells(2, WHITE), cell_size=cell, font_size=fs)[0].image
    assert _ink(plain, (0, 0) + plain.size) == 0  # white images on white: nothing drawn without labels
    out = grid(ctx, _cells(2, WHITE), images_2=_cells(2, WHITE), cell_size=cell, font_size=fs, title="Steps study",
               row_labels=["dev", "schnell"], col_labels=["4 steps", "28 steps"], label_from="num_inference_steps")
    im = out[0].image
    assert im.width > plain.width and im.height > plain.height
    pad, line = 6, round(fs * 1.3)
    title_h = round(fs * 1.8) + pad
    top = pad + title_h
    assert _ink(im, (0, 0, im.width, top)) > 20  # title
    left = im.width - 2 * (cell + pad)
    assert _ink(im, (left, top, im.width, top + line)) > 20  # column labels
    assert _ink(im, (0, top + line, left, im.height)) > 20  # row labels
    caption_top = top + line + pad // 2 + cell
    assert _ink(im, (left, caption_top, left + cell, caption_top + line)) > 20  # "num_inference_steps: 4"


def test_label_from_unknown_key_shows_dash_and_rgba_input(tmp_path):
    from PIL import Image

    ctx, _ = make_ctx(tmp_path, node="g")
    items = Images([ImageItem(image=Image.new("RGBA", (30, 60), (255, 0, 0, 128)))])
    out = grid(ctx, items, cell_size=32, label_from=["seed", "guidance"])
    assert out[0].image.mode == "RGB"

    def caption_of(**meta):
        cell = Images([ImageItem(image=Image.new("RGB", (30, 60), (255, 0, 0)), meta=meta)])
        return grid(ctx, cell, cell_size=160, label_from="guidance")[0].image.tobytes()

    unknown = caption_of()
    assert unknown == caption_of(guidance="-")  # the unknown key is written as "guidance: -"
    assert unknown != caption_of(guidance=7)


def test_errors_are_explained(tmp_path):
    ctx, _ = make_ctx(tmp_path, node="g")
    with pytest.raises(NodeError, match="no images"):
        grid(ctx, Images())
    with pytest.raises(NodeError, match="col_labels has 3 labels but the grid has 2 columns"):
        grid(ctx, _cells(2), images_2=_cells(2), col_labels=["a", "b", "c"])
    with pytest.raises(NodeError, match="do not fit"):
        grid(ctx, _cells(5), rows=2, columns=2)
    with pytest.raises(NodeError, match="per side"):
        grid(ctx, _cells(9), columns=9, cell_size=2048)
