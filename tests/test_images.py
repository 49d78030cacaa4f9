"""Image discovery, header reads, decoding and augmentations on real files made with Pillow."""

from __future__ import annotations

import random
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image, ImageFile, ImageOps, WebPImagePlugin

from library.data.images import (
    IMAGE_EXTENSIONS,
    ImageLoadError,
    color_aug,
    cover_size,
    face_crop_aug_range,
    flip,
    list_images,
    load_image_rgb,
    parse_face_info,
    read_image_size,
    read_image_sizes,
    resize_and_crop,
    strip_face_suffix,
)


def _pattern(width: int, height: int) -> np.ndarray:
    """A recognisable RGB pattern: red grows along x, green along y, blue marks the top-left quarter."""
    image = np.zeros((height, width, 3), dtype=np.uint8)
    image[:, :, 0] = np.linspace(0, 255, width, dtype=np.uint8)[None, :]
    image[:, :, 1] = np.linspace(0, 255, height, dtype=np.uint8)[:, None]
    image[: height // 2, : width // 2, 2] = 255
    return image


def _save_with_orientation(path: Path, array: np.ndarray, orientation: int, fmt: str) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(array).save(path, format=fmt, exif=exif.tobytes())


def test_extensions_constant():
    assert IMAGE_EXTENSIONS == (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def test_list_images_case_insensitive_sorted_and_recursive(tmp_path: Path):
    for name in ["b.JPG", "a.png", "c.JpEg", "d.WEBP", "e.bmp", "notes.txt", "anim.gif"]:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "folder.png").mkdir()
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "f.Png").write_bytes(b"x")
    top = list_images(tmp_path)
    assert [p.name for p in top] == ["a.png", "b.JPG", "c.JpEg", "d.WEBP", "e.bmp"]
    assert all(p.parent == tmp_path for p in top)
    deep = list_images(tmp_path, recursive=True)
    assert [p.relative_to(tmp_path).as_posix() for p in deep] == [
        "a.png", "b.JPG", "c.JpEg", "d.WEBP", "e.bmp", "sub/f.Png"
    ]


@pytest.mark.parametrize("orientation", [1, 2, 3, 4, 5, 6, 7, 8])
def test_exif_orientation_png_matches_exif_transpose(tmp_path: Path, orientation: int):
    path = tmp_path / f"o{orientation}.png"
    _save_with_orientation(path, _pattern(40, 24), orientation, "PNG")
    expected = np.asarray(ImageOps.exif_transpose(Image.open(path)).convert("RGB"))
    size = read_image_size(path)
    assert size == ((24, 40) if orientation >= 5 else (40, 24))
    loaded = load_image_rgb(path)
    assert loaded.shape == (size[1], size[0], 3)
    np.testing.assert_array_equal(loaded, expected)


def test_exif_rotated_jpeg_size_swapped_and_pixels_rotated(tmp_path: Path):
    path = tmp_path / "phone.jpg"
    array = np.zeros((20, 40, 3), dtype=np.uint8)
    array[:, :20] = (255, 0, 0)  # left half red, right half blue
    array[:, 20:] = (0, 0, 255)
    _save_with_orientation(path, array, 6, "JPEG")  # 6: rotate 90 degrees clockwise to display
    assert Image.open(path).size == (40, 20)
    assert read_image_size(path) == (20, 40)
    loaded = load_image_rgb(path)
    assert loaded.shape == (40, 20, 3)
    assert loaded[5, 10, 0] > 200 and loaded[5, 10, 2] < 60  # the left (red) half is now on top
    assert loaded[35, 10, 2] > 200 and loaded[35, 10, 0] < 60
    np.testing.assert_array_equal(loaded, np.asarray(ImageOps.exif_transpose(Image.open(path))))


def test_size_read_does_not_decode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    for name, fmt in [("a.jpg", "JPEG"), ("b.png", "PNG"), ("c.webp", "WEBP"), ("d.bmp", "BMP")]:
        Image.fromarray(_pattern(30, 10)).save(tmp_path / name, format=fmt)

    def refuse(self):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)
    monkeypatch.setattr(WebPImagePlugin.WebPImageFile, "load", refuse)
    for name in ["a.jpg", "b.png", "c.webp", "d.bmp"]:
        assert read_image_size(tmp_path / name) == (30, 10)


def test_rgba_composited_on_white_or_dropped(tmp_path: Path):
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[0, 0] = (255, 0, 0, 0)  # transparent red
    rgba[0, 1] = (0, 0, 255, 255)  # opaque blue
    rgba[1, 0] = (0, 0, 0, 128)  # half-transparent black
    rgba[1, 1] = (10, 20, 30, 255)
    path = tmp_path / "a.png"
    Image.fromarray(rgba, "RGBA").save(path)
    out = load_image_rgb(path)
    assert out.dtype == np.uint8 and out.shape == (2, 2, 3)
    assert tuple(out[0, 0]) == (255, 255, 255)
    assert tuple(out[0, 1]) == (0, 0, 255)
    assert tuple(out[1, 0]) == (127, 127, 127)
    assert tuple(out[1, 1]) == (10, 20, 30)
    dropped = load_image_rgb(path, alpha_background=None)
    assert tuple(dropped[0, 0]) == (255, 0, 0)
    assert tuple(dropped[1, 0]) == (0, 0, 0)


def test_la_and_l(tmp_path: Path):
    la = np.array([[[100, 255], [100, 0]]], dtype=np.uint8)
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    out = load_image_rgb(tmp_path / "la.png")
    assert tuple(out[0, 0]) == (100, 100, 100)
    assert tuple(out[0, 1]) == (255, 255, 255)
    Image.fromarray(np.full((3, 4), 77, dtype=np.uint8), "L").save(tmp_path / "l.png")
    out = load_image_rgb(tmp_path / "l.png")
    assert out.shape == (3, 4, 3) and (out == 77).all()


def test_palette_with_transparency(tmp_path: Path):
    im = Image.new("P", (3, 1))
    im.putpalette([0, 255, 0, 255, 0, 0] + [0] * 762)
    im.putdata([0, 1, 1])
    path = tmp_path / "p.png"
    im.save(path, transparency=0)
    assert Image.open(path).mode == "P"
    out = load_image_rgb(path)
    assert tuple(out[0, 0]) == (255, 255, 255)  # transparent green index → background
    assert tuple(out[0, 1]) == (255, 0, 0)
    im.save(tmp_path / "plain.png")
    assert tuple(load_image_rgb(tmp_path / "plain.png")[0, 0]) == (0, 255, 0)


def test_sixteen_bit_png_scaled_not_clipped(tmp_path: Path):
    values = np.array([[0, 257, 32768, 65535, 1000]], dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode in ("I;16", "I")
    out = load_image_rgb(path)
    assert out[0, :, 0].tolist() == [0, 1, 128, 255, 4]
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()


def test_cmyk_jpeg_and_one_bit(tmp_path: Path):
    path = tmp_path / "print.JPG"
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(path, format="JPEG", quality=95)
    assert Image.open(path).mode == "CMYK"
    out = load_image_rgb(path)
    assert out.shape == (8, 8, 3)
    assert out[4, 4, 0] > 240 and out[4, 4, 1] < 15 and out[4, 4, 2] < 15
    bits = Image.new("1", (4, 2))
    bits.putpixel((1, 0), 1)
    bits.save(tmp_path / "bits.PNG")
    out = load_image_rgb(tmp_path / "bits.PNG")
    assert tuple(out[0, 1]) == (255, 255, 255) and tuple(out[0, 0]) == (0, 0, 0)


def test_corrupt_files_reported_not_crashing(tmp_path: Path):
    good = tmp_path / "good.jpg"
    Image.fromarray(_pattern(64, 48)).save(good, quality=90)
    data = good.read_bytes()
    body_cut = tmp_path / "body_cut.jpg"
    body_cut.write_bytes(data[: len(data) * 2 // 3])
    header_cut = tmp_path / "header_cut.jpg"
    header_cut.write_bytes(data[:20])
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    text = tmp_path / "text.webp"
    text.write_text("not an image")
    missing = tmp_path / "missing.png"

    sizes, failures = read_image_sizes([good, body_cut, header_cut, empty, text, missing])
    assert sizes == {good: (64, 48), body_cut: (64, 48)}  # header intact: size readable
    assert list(failures) == [header_cut, empty, text, missing]
    assert failures[empty] == "empty file"
    assert all(isinstance(r, str) and r and "\n" not in r for r in failures.values())

    with pytest.raises(ImageLoadError) as info:
        load_image_rgb(body_cut)
    assert info.value.path == body_cut and "truncated" in info.value.reason
    for bad in (header_cut, empty, text, missing):
        with pytest.raises(ImageLoadError):
            load_image_rgb(bad)


def test_read_image_sizes_process_pool(tmp_path: Path):
    sizes_written = {}
    blobs = {}
    for w, h in [(16, 8), (8, 16), (12, 12)]:
        path = tmp_path / f"proto_{w}x{h}.png"
        Image.fromarray(_pattern(w, h)).save(path)
        blobs[(w, h)] = path.read_bytes()
        path.unlink()
    paths = []
    for i in range(2100):
        size = list(blobs)[i % 3]
        path = tmp_path / f"i{i:04d}.{'PNG' if i % 2 else 'png'}"
        path.write_bytes(blobs[size])
        sizes_written[path] = size
        paths.append(path)
    broken = tmp_path / "zz.png"
    broken.write_bytes(b"")
    sizes, failures = read_image_sizes(paths + [broken], workers=2)
    assert sizes == sizes_written and list(sizes) == paths
    assert failures == {broken: "empty file"}
    serial_sizes, _ = read_image_sizes(paths[:50], workers=1)
    assert serial_sizes == {p: sizes_written[p] for p in paths[:50]}


def test_resize_and_crop_centre_and_offsets():
    image = _pattern(100, 50)
    assert cover_size((100, 50), (64, 64)) == (128, 64)
    out, (left, top) = resize_and_crop(image, (64, 64))
    assert out.shape == (64, 64, 3) and (left, top) == (32, 0)
    # enlarging: Pillow LANCZOS by default (the reference's rule since resize_interpolation; shrinking: INTER_AREA)
    resized = np.asarray(Image.fromarray(image).resize((128, 64), resample=Image.Resampling.LANCZOS))
    np.testing.assert_array_equal(out, resized[:, 32:96])
    same, offset = resize_and_crop(image, (100, 40), resized_size=(100, 50))
    np.testing.assert_array_equal(same, image[5:45])
    assert offset == (0, 5)
    with pytest.raises(ValueError):
        resize_and_crop(image, (64, 64), resized_size=(60, 30))


def test_resize_and_crop_random_is_seeded():
    image = _pattern(300, 200)
    results = set()
    for seed in range(20):
        out, (left, top) = resize_and_crop(image, (64, 128), random_crop=True, rng=random.Random(seed))
        expected = random.Random(seed)
        assert (left, top) == (expected.randint(0, 192 - 64), 0)  # resized (192, 128): width excess only
        assert out.shape == (128, 64, 3)
        results.add(left)
        again, offsets = resize_and_crop(image, (64, 128), random_crop=True, rng=random.Random(seed))
        assert offsets == (left, top) and np.array_equal(again, out)
    assert len(results) > 5


def test_flip_and_color_aug_are_seeded():
    image = _pattern(16, 8)
    flips = [flip(image, random.Random(s))[1] for s in range(40)]
    assert any(flips) and not all(flips)
    out, flipped = flip(image, random.Random(0), p=1.0)
    assert flipped and np.array_equal(out, image[:, ::-1])

    changed = 0
    for seed in range(60):
        out = color_aug(image, random.Random(seed))
        assert out.shape == image.shape and out.dtype == np.uint8
        assert np.array_equal(out, color_aug(image, random.Random(seed)))
        if random.Random(seed).random() >= 0.33:
            assert out is image
        else:
            changed += 1
            assert np.abs(out.astype(int) - image.astype(int)).max() < 80
    assert changed > 5


def test_face_info_parsing():
    assert parse_face_info("x/img_0256_0300_0120_0140.png") == (256, 300, 120, 140)
    assert parse_face_info("x/a_b_0256_0300_0120_0140.png") == (256, 300, 120, 140)
    assert parse_face_info("x/img_0256_0300_0120.png") is None
    assert parse_face_info("x/img_a_1_2_3.png") is None
    assert parse_face_info("x/img_0_1_2_3.png") is None
    assert strip_face_suffix("img_0256_0300_0120_0140") == "img"
    assert strip_face_suffix("my_cat_photo") == "my_cat_photo"


def test_face_crop_centres_face_and_covers_small_images():
    image = _pattern(1000, 800)
    out, (left, top) = face_crop_aug_range(
        image, (700, 400, 200, 200), (512, 512), (2.0, 2.0), False, random.Random(0)
    )
    assert out.shape == (512, 512, 3) and (left, top) == (444, 144)
    np.testing.assert_array_equal(out, image[144:656, 444:956])
    # face near the edge: the crop is shifted to stay inside
    face = (980, 20, 50, 50)
    _, offsets = face_crop_aug_range(image, face, (512, 512), (1.0, 1.0), False, random.Random(0))
    assert offsets == (1000 - 512, 0)
    # a small image is enlarged to cover the resolution (the reference asserted)
    small, _ = face_crop_aug_range(_pattern(300, 200), (150, 100, 40, 40), (256, 256), (1.0, 3.0), True,
                                   random.Random(3))
    assert small.shape == (256, 256, 3)
    a = face_crop_aug_range(image, (700, 400, 100, 100), (512, 512), (1.0, 4.0), True, random.Random(5))
    b = face_crop_aug_range(image, (700, 400, 100, 100), (512, 512), (1.0, 4.0), True, random.Random(5))
    assert a[1] == b[1] and np.array_equal(a[0], b[0])
    with pytest.raises(ValueError):
        face_crop_aug_range(image, (700, 400, 100, 100), (512, 512), (3.0, 1.0), False, random.Random(0))


def test_loaded_array_is_writable_and_contiguous(tmp_path: Path):
    path = tmp_path / "w.jpg"
    Image.fromarray(_pattern(20, 10)).save(path)
    out = load_image_rgb(path)
    assert out.flags.writeable and out.flags.c_contiguous
    out[0, 0] = 0
