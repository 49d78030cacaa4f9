"""Tests for the --debug_dataset batch printout and contact sheets (library/data/preview.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageFont

from library.data import preview
from library.data.preview import (
    CAPTION_LINES,
    ELLIPSIS,
    batch_lines,
    render_contact_sheet,
    sheet_layout,
    sheet_title,
    wrap_text,
    write_contact_sheet,
)

LONG_CAPTION = "a very long caption about a small dog sitting on a wooden bench in the park, " * 6
UNICODE_CAPTION = "犬, 写真, a photo of a dog, " * 5
KEYS = ["/data/train/10_dog/red.png", "/data/train/10_dog/long.jpg", "/data/reg/1_dog/unicode.webp"]
CAPTIONS = ["solid red", LONG_CAPTION, UNICODE_CAPTION]


def _batch_tensor(width: int = 64, height: int = 48) -> torch.Tensor:
    """Three images in [-1, 1]: the first solid red, the others random."""
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(3, 3, height, width, generator=gen) * 2 - 1
    images[0] = torch.tensor([1.0, -1.0, -1.0]).view(3, 1, 1)
    return images


def _assert_red_cell(pixels: np.ndarray, layout, index: int, size: tuple[int, int]) -> None:
    left, top, width, height = layout.image_box(index, size)
    assert (width, height) == preview.fit_size(size, layout.thumb)
    region = pixels[top : top + height, left : left + width].astype(int)
    assert region.shape[:2] == (height, width)
    assert np.abs(region - np.array([255, 0, 0])).max() <= 2
    # the picture square around a non-square image is background, not red
    tx, ty = layout.thumb_origin(index)
    assert tuple(pixels[ty, tx]) != (255, 0, 0)


def test_tensor_batch_sheet_written_and_drawn(tmp_path):
    images = _batch_tensor()
    title = sheet_title(1, 3, (64, 48))
    assert title == "epoch 1 batch 3 bucket 64x48"
    sheet = render_contact_sheet(images, CAPTIONS, KEYS, title, thumb=128)
    path = write_contact_sheet(sheet, tmp_path / "debug", epoch=1, batch_index=3)
    assert path == tmp_path / "debug" / "epoch001_batch00003.png"
    assert path.is_file()
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temporaries left

    layout = sheet_layout(3, 128)
    assert (layout.columns, layout.rows) == (3, 1)
    with Image.open(path) as reopened:
        assert reopened.format == "PNG"
        assert reopened.size == (layout.width, layout.height)
        assert reopened.size == (3 * (128 + 12), 16 + 12 + 18 + 128 + 9 * 16)
        pixels = np.asarray(reopened.convert("RGB"))

    _assert_red_cell(pixels, layout, 0, (64, 48))
    # the title bar is dark, and it holds some light (text) pixels
    title_bar = pixels[: layout.title_height]
    assert title_bar[0, 0].max() < 80 and title_bar.max() > 200
    # the random images are drawn (their squares are not flat)
    for index in (1, 2):
        left, top, width, height = layout.image_box(index, (64, 48))
        assert pixels[top : top + height, left : left + width].std() > 30
    # caption text is drawn in every cell: dark pixels below the key line
    for index in range(3):
        x, y = layout.text_origin(index)
        caption_area = pixels[y + layout.line_height : y + layout.line_height * 2, x : x + layout.thumb]
        assert caption_area.min() < 100


def test_sheet_matches_tensor_values():
    images = torch.zeros(1, 3, 32, 32)
    images[0, 0] = -1.0  # R = 0
    images[0, 1] = 0.0  # G = 127.5 -> 128
    images[0, 2] = 1.0  # B = 255
    sheet = render_contact_sheet(images, ["c"], ["k.png"], "t", thumb=32)
    layout = sheet_layout(1, 32)
    left, top, _, _ = layout.image_box(0, (32, 32))
    assert tuple(np.asarray(sheet)[top + 5, left + 5]) == (0, 128, 255)


def test_uint8_arrays_grid_wraps_to_rows():
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (40, 60, 3), dtype=np.uint8) for _ in range(5)]
    arrays[4] = np.zeros((40, 60, 3), np.uint8)
    arrays[4][:, :, 0] = 255
    keys = [f"img{i}.png" for i in range(5)]
    sheet = render_contact_sheet(arrays, ["cap"] * 5, keys, "epoch 2 batch 0 bucket 60x40", thumb=64)
    layout = sheet_layout(5, 64)
    assert (layout.columns, layout.rows) == (4, 2)
    assert sheet.size == (layout.width, layout.height) == (4 * 76, layout.title_height + 2 * layout.cell_height)
    pixels = np.asarray(sheet)
    _assert_red_cell(pixels, layout, 4, (60, 40))
    left, top, width, height = layout.image_box(0, (60, 40))
    assert (width, height) == (64, 43)  # upscaled, aspect kept
    assert pixels[top : top + height, left : left + width].std() > 30


def test_missing_image_draws_placeholder():
    red = np.zeros((48, 64, 3), np.uint8)
    red[:, :, 0] = 255
    sheet = render_contact_sheet([red, None], ["a", "b"], ["a.png", "b.npz"], "t", thumb=96)
    layout = sheet_layout(2, 96)
    pixels = np.asarray(sheet)
    _assert_red_cell(pixels, layout, 0, (64, 48))
    tx, ty = layout.thumb_origin(1)
    square = pixels[ty : ty + 96, tx : tx + 96].astype(int)
    assert tuple(square[0, 0]) == (128, 128, 128)
    assert tuple(square[-1, -1]) == (128, 128, 128)
    assert square.max() > 200  # the "latents only" label
    # all images missing at once
    sheet = render_contact_sheet(None, ["a"], ["a"], "t", thumb=64)
    tx, ty = sheet_layout(1, 64).thumb_origin(0)
    assert tuple(np.asarray(sheet)[ty, tx]) == (128, 128, 128)


def test_bitmap_font_fallback_does_not_raise_on_unicode(monkeypatch):
    if not hasattr(ImageFont, "load_default_imagefont"):
        pytest.skip("Pillow has no separate bitmap default font")
    monkeypatch.setattr(preview, "_load_font", lambda size: ImageFont.load_default_imagefont())
    sheet = render_contact_sheet(_batch_tensor(), CAPTIONS, KEYS, "犬 title", thumb=64)
    assert sheet.size == (sheet_layout(3, 64).width, sheet_layout(3, 64).height)


def test_wrap_text_limits_lines_and_breaks_long_words():
    font = preview._load_font(12)
    lines = wrap_text(LONG_CAPTION, font, 100)
    assert len(lines) == CAPTION_LINES
    assert lines[-1].endswith(ELLIPSIS)
    assert all(preview._text_length(font, line) <= 100 for line in lines)
    assert wrap_text("short one", font, 200) == ["short one"]
    assert wrap_text("", font, 200) == []
    pieces = wrap_text("x" * 200, font, 50, max_lines=100)
    assert "".join(pieces) == "x" * 200 and len(pieces) > 1
    cjk = wrap_text("写真" * 40, font, 60, max_lines=100)
    assert "".join(cjk) == "写真" * 40


def test_mismatched_lengths_raise():
    with pytest.raises(ValueError):
        render_contact_sheet(None, ["a"], ["a", "b"], "t")
    with pytest.raises(ValueError):
        render_contact_sheet(_batch_tensor(), ["a", "b"], ["a", "b"], "t")


def test_batch_lines_contents():
    input_ids = torch.full((3, 1, 77), 49407, dtype=torch.long)
    input_ids[:, 0, 0] = 49406
    input_ids[:, 0, 1] = 320
    batch = {
        "keys": KEYS,
        "bucket_reso": (512, 384),
        "captions": CAPTIONS,
        "loss_weights": [1.0, 1.0, 0.5],
        "original_sizes": [(640, 480), (1024, 768), (300, 200)],
        "flipped": [False, True, False],
        "input_ids": input_ids,
    }
    lines = batch_lines(batch, batch_index=3, epoch=1)
    assert lines[0] == "epoch 1 batch 3 bucket (512, 384) size 3"
    text = "\n".join(lines)
    for key, caption in zip(KEYS, CAPTIONS):
        assert f"key={key}" in text
        assert f'caption: "{caption}"' in text
    item_lines = [line for line in lines if line.startswith("  [")]
    assert len(item_lines) == 3
    assert item_lines[0].startswith("  [0] key=/data/train/10_dog/red.png  size=(640, 480)  weight=1.0  flip=no")
    assert "weight=0.5" in item_lines[2] and "flip=yes" in item_lines[1]
    assert "      input_ids[0]: [49406, 320, 49407] (+74 pad)" in lines

    minimal = batch_lines({"keys": ["k"], "bucket_reso": (64, 48), "captions": ["c"], "loss_weights": [1.0]}, 0, 0)
    assert minimal == ["epoch 0 batch 0 bucket (64, 48) size 1", '  [0] key=k  weight=1.0  caption: "c"']


def test_font_falls_back_when_size_is_unsupported(monkeypatch):
    original = ImageFont.load_default

    def old_pillow_load_default(*args, **kwargs):
        if args or kwargs:
            raise TypeError("load_default() takes no arguments")
        return original()

    monkeypatch.setattr(ImageFont, "load_default", old_pillow_load_default)
    assert preview._load_font(12) is not None
    sheet = render_contact_sheet(None, [UNICODE_CAPTION], ["k"], "t", thumb=64)
    assert sheet.size == (sheet_layout(1, 64).width, sheet_layout(1, 64).height)
