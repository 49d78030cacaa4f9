"""tools/resize_images_to_resolution.py: sizes, names, associated files, formats, EXIF, errors."""

from __future__ import annotations

import logging

import cv2
import numpy as np
import pytest
from PIL import Image

from tests.train_util import run_script
from tools import resize_images_to_resolution as resize


def noise(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A random RGB image array (H, W, 3)."""
    return (np.random.default_rng(seed).random((height, width, 3)) * 255).astype(np.uint8)


def error_of(capsys) -> str:
    """The one-line error printed by run_main."""
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: "), err
    return err[-1]


@pytest.fixture
def src(tmp_path):
    """big.png (800×600) with caption big.txt, small.jpg (100×80), and an unrelated notes.md."""
    folder = tmp_path / "src"
    folder.mkdir()
    Image.fromarray(noise(800, 600)).save(folder / "big.png")
    (folder / "big.txt").write_text("a big caption", encoding="utf-8")
    Image.fromarray(noise(100, 80, seed=1)).save(folder / "small.jpg", quality=95)
    (folder / "notes.md").write_text("notes", encoding="utf-8")
    return folder


def sizes(folder) -> dict[str, tuple[int, int]]:
    """{image file name: (width, height)} of the images in a folder."""
    return {p.name: Image.open(p).size for p in folder.iterdir() if p.suffix in (".jpg", ".png")}


def test_sizes_names_and_associated_files(src, tmp_path, capsys):
    dst = tmp_path / "out" / "dst"
    assert run_script(resize.main, [src, dst, "--max_resolution", "256x256, 128x128", "--divisible_by", "8",
                                    "--copy_associated_files"]) == 0
    # 800×600 → √(65536/480000) → 295×221 → 288×216; → √(16384/480000) → 147×110 → 144×104;
    # 100×80 is never enlarged, only cropped to multiples of 8 → 96×80
    assert sizes(dst) == {"big+256x256.jpg": (288, 216), "big+128x128.jpg": (144, 104),
                          "small+256x256.jpg": (96, 80), "small+128x128.jpg": (96, 80)}
    assert all(Image.open(dst / name).format == "JPEG" for name in sizes(dst))
    names = sorted(p.name for p in dst.iterdir())
    assert names == sorted(["big+256x256.jpg", "big+128x128.jpg", "small+256x256.jpg", "small+128x128.jpg",
                            "big.txt", "big+256x256.txt", "big+128x128.txt", "notes.md"])
    assert (dst / "big+128x128.txt").read_text(encoding="utf-8") == "a big caption"
    out = capsys.readouterr().out
    assert "Resized image: big.png with size 216x288 as big+256x256.jpg" in out
    assert "Saved image: small.jpg with size 80x96 as small+128x128.jpg" not in out  # cropped, so resized
    assert "Resized image: small.jpg with size 80x96 as small+128x128.jpg" in out


def test_png_pixels_come_from_the_original(src, tmp_path):
    dst = tmp_path / "dst"
    assert run_script(resize.main, [src, dst, "--max_resolution", "256x256,128x128", "--save_as_png",
                                    "--interpolation", "lanczos4"]) == 0
    assert sorted(p.name for p in dst.iterdir()) == sorted(
        ["big+256x256.png", "big+128x128.png", "small+256x256.png", "small+128x128.png", "big.txt", "notes.md"])
    original = np.asarray(Image.open(src / "big.png"))
    for name, size in (("big+256x256.png", (295, 221)), ("big+128x128.png", (147, 110))):
        # each target is made from the original (no chained re-scaling)
        want = cv2.resize(original, size, interpolation=cv2.INTER_LANCZOS4)
        assert np.array_equal(np.asarray(Image.open(dst / name)), want), name
    small = np.asarray(Image.open(src / "small.jpg").convert("RGB"))
    assert np.array_equal(np.asarray(Image.open(dst / "small+128x128.png")), small)  # unchanged, not enlarged


def test_divisible_by_crops_the_centre(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    image = noise(70, 45, seed=2)
    Image.fromarray(image).save(src / "a.png")
    assert run_script(resize.main, [src, dst, "--max_resolution", "512x512", "--divisible_by", "16",
                                    "--save_as_png"]) == 0
    # 70×45 → 64×32: offsets ⌊6/2⌋ = 3 and ⌊13/2⌋ = 6
    assert np.array_equal(np.asarray(Image.open(dst / "a+512x512.png")), image[6:38, 3:67])


def test_exif_orientation_is_applied(tmp_path, capsys):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise for display
    Image.fromarray(noise(60, 40, seed=3)).save(src / "photo.jpg", exif=exif, quality=95)
    assert run_script(resize.main, [src, dst, "--max_resolution", "1000x1000"]) == 0
    assert sizes(dst) == {"photo+1000x1000.jpg": (40, 60)}
    assert "Saved image: photo.jpg with size 60x40 as photo+1000x1000.jpg" in capsys.readouterr().out


def test_skipped_inputs_are_reported(tmp_path, caplog, capsys):
    src, dst = tmp_path / "src", tmp_path / "dst"
    (src / "sub").mkdir(parents=True)
    Image.fromarray(noise(40, 40)).save(src / "a.png")
    Image.fromarray(noise(40, 40, seed=1)).save(src / "a.JPG")  # same stem, upper-case extension
    Image.fromarray(noise(12, 12)).save(src / "tiny.png")
    (src / "broken.png").write_bytes(b"not an image")
    with caplog.at_level(logging.WARNING):
        assert run_script(resize.main, [src, dst, "--max_resolution", "64x64", "--divisible_by", "16"]) == 0
    text = caplog.text
    assert "a.png skipped: its copies would have the same names as those of a.JPG" in text
    assert "cannot read image" in text and "broken.png" in text
    assert "tiny.png at 64x64: a side is smaller than --divisible_by 16; skipped" in text
    assert "skipping sub-folder" in text
    assert "1 of 4 images could not be read and were skipped" in capsys.readouterr().out
    assert sorted(p.name for p in dst.iterdir()) == ["a+64x64.jpg"]


@pytest.mark.parametrize("argv, message", [
    (["{src}", "{src}"], "is the source folder"),
    (["{tmp}/nope", "{tmp}/dst"], "src_img_folder {tmp}/nope: no such folder"),
    (["{src}", "{src}/notes.md"], "exists and is not a folder"),
    (["{src}", "{tmp}/dst", "--max_resolution", "512"], "entry '512' is not WIDTHxHEIGHT"),
    (["{src}", "{tmp}/dst", "--max_resolution", "512x512,0x64"], "entry '0x64' is not WIDTHxHEIGHT"),
    (["{src}", "{tmp}/dst", "--max_resolution", "axb"], "entry 'axb' is not WIDTHxHEIGHT"),
    (["{src}", "{tmp}/dst", "--divisible_by", "0"], "--divisible_by 0: must be at least 1"),
])
def test_errors(src, tmp_path, capsys, argv, message):
    values = {"src": str(src), "tmp": str(tmp_path)}
    before = sorted(p.name for p in src.iterdir())
    assert run_script(resize.main, [a.format(**values) for a in argv]) == 2
    assert message.format(**values) in error_of(capsys)
    assert sorted(p.name for p in src.iterdir()) == before
    assert not (tmp_path / "dst").exists()
