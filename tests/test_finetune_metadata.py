"""finetune/ metadata tools: merge_captions_to_metadata, merge_dd_tags_to_metadata,
clean_captions_and_tags, prepare_buckets_latents, and the whole chain into fine_tune.py."""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from finetune.cleaning import clean_caption, clean_tags
from finetune.clean_captions_and_tags import main as clean_main
from finetune.merge_captions_to_metadata import main as merge_captions
from finetune.merge_dd_tags_to_metadata import main as merge_tags
from finetune.metadata import image_key, metadata_text
from finetune.prepare_buckets_latents import main as prepare_main
from library.data.latents import latent_seed
from tests.train_util import run_script

# 64 px training resolution, buckets 32..128 in steps of 16:
# (32,128) (48,80) (64,64) (80,48) (96,32) (112,32) (128,32) and the mirrored ones.
BUCKETS = ["--max_resolution", "64,64", "--min_bucket_reso", "32", "--max_bucket_reso", "128",
           "--bucket_reso_steps", "16"]


def write_image(path: Path, size: tuple[int, int], seed: int = 0) -> Path:
    """A random RGB image of ``size`` (width, height), format by extension."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def error_line(capsys) -> str:
    """The single stderr line of a failed run."""
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("error: ")
    return err[0]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny-sd1 model as an ldm .safetensors file and a diffusers folder."""
    from tests.models_util import make_model_files

    return make_model_files(tmp_path_factory.mktemp("models"), "tiny-sd1",
                            formats="safetensors,diffusers_safetensors")


@pytest.fixture()
def captioned(tmp_path):
    """data/ with a.png, b.jpg, c.webp and sub/d.png; captions for a, b, sub/d; tags for a and c."""
    data = tmp_path / "data"
    write_image(data / "a.png", (96, 64), 1)
    write_image(data / "b.jpg", (64, 96), 2)
    write_image(data / "c.webp", (64, 64), 3)
    write_image(data / "sub" / "d.png", (128, 40), 4)
    (data / "a.caption").write_text("  a young woman on grass \n", encoding="utf-8")
    (data / "b.caption").write_text("anime people, café", encoding="utf-8")
    (data / "sub" / "d.caption").write_text("a lady", encoding="utf-8")
    (data / "a.txt").write_text("1girl, long_hair, rating:safe\n", encoding="utf-8")
    (data / "c.txt").write_text("2girls, blue_eyes, red_eyes, shirt, white_shirt", encoding="utf-8")
    return data


# --------------------------------------------------------------------------------------------------
# merge scripts


def test_merge_captions_stem_keys_and_exact_file_format(captioned, tmp_path, caplog):
    out = tmp_path / "meta.json"
    assert run_script(merge_captions, [captioned, out]) == 0
    text = out.read_text(encoding="utf-8")
    assert text == json.dumps({"a": {"caption": "a young woman on grass"},
                               "b": {"caption": "anime people, caf\u00e9"}}, indent=2)
    assert "caf\\u00e9" in text and not text.endswith("\n")  # non-ASCII escaped, no trailing newline
    assert "c.webp" in caplog.text and "no caption file" in caplog.text  # reported, not fatal


def test_merge_full_path_keys_are_relative_as_given(captioned, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run_script(merge_captions, ["data", "meta.json", "--full_path", "--recursive"]) == 0
    meta = read_json(tmp_path / "meta.json")
    assert list(meta) == [str(Path("data/a.png")), str(Path("data/b.jpg")), str(Path("data/sub/d.png"))]
    assert meta[str(Path("data/sub/d.png"))] == {"caption": "a lady"}
    assert image_key(Path("data/sub/d.png"), full_path=False) == "d"


def test_recursive_requires_full_path(captioned, tmp_path, capsys):
    for script in (merge_captions, merge_tags):
        assert run_script(script, [captioned, tmp_path / "m.json", "--recursive"]) == 2
        assert "--recursive requires --full_path" in error_line(capsys)
    assert not (tmp_path / "m.json").exists()


def test_merge_tags_extends_in_json_without_truncating(captioned, tmp_path):
    src = tmp_path / "meta_cap.json"
    existing = {"a": {"caption": "kept", "tags": "old", "train_resolution": [64, 64], "custom": 1},
                "gone": {"caption": "image no longer on disk"}}
    src.write_text(json.dumps(existing), encoding="utf-8")
    before = src.read_bytes()
    out = tmp_path / "meta_dd.json"
    assert run_script(merge_tags, [captioned, out, "--in_json", src]) == 0
    assert src.read_bytes() == before
    meta = read_json(out)
    assert meta == {"a": {"caption": "kept", "tags": "1girl, long_hair, rating:safe", "train_resolution": [64, 64],
                          "custom": 1},
                    "gone": {"caption": "image no longer on disk"},
                    "c": {"tags": "2girls, blue_eyes, red_eyes, shirt, white_shirt"}}
    assert list(meta) == ["a", "gone", "c"]


def test_merge_without_in_json_updates_existing_out_json(captioned, tmp_path):
    out = tmp_path / "meta.json"
    out.write_text(json.dumps({"b": {"tags": "cat", "caption": "old"}, "x": {"tags": "y"}}), encoding="utf-8")
    assert run_script(merge_captions, [captioned, out]) == 0
    assert read_json(out) == {"b": {"tags": "cat", "caption": "anime people, caf\u00e9"}, "x": {"tags": "y"},
                              "a": {"caption": "a young woman on grass"}}
    first = out.read_bytes()
    assert run_script(merge_captions, [captioned, out]) == 0  # a re-run changes nothing
    assert out.read_bytes() == first


def test_missing_caption_leaves_existing_entry_untouched(captioned, tmp_path):
    out = tmp_path / "meta.json"
    out.write_text(json.dumps({"c": {"caption": "hand-written"}}), encoding="utf-8")
    assert run_script(merge_captions, [captioned, out]) == 0
    assert read_json(out)["c"] == {"caption": "hand-written"}


def test_caption_extension_and_legacy_alias(captioned, tmp_path, capsys):
    (captioned / "a.cap2").write_text("from cap2", encoding="utf-8")
    (captioned / "a.cap3").write_text("from cap3", encoding="utf-8")
    out = tmp_path / "m.json"
    assert run_script(merge_captions, [captioned, out, "--caption_extension", ".cap2"]) == 0
    assert read_json(out) == {"a": {"caption": "from cap2"}}
    out.unlink()
    assert run_script(merge_captions, [captioned, out, "--caption_extension", ".cap2",
                                       "--caption_extention", ".cap3"]) == 0
    assert read_json(out) == {"a": {"caption": "from cap3"}}
    assert run_script(merge_tags, [captioned, out, "--caption_extension", "txt"]) == 2
    assert "--caption_extension must be a file extension starting with '.'" in error_line(capsys)
    with pytest.raises(SystemExit) as exc:  # the tag script has no legacy alias
        merge_tags([str(captioned), str(out), "--caption_extention", ".txt"])
    assert exc.value.code == 2


def test_broken_existing_json_is_reported_and_kept(captioned, tmp_path, capsys):
    out = tmp_path / "meta.json"
    out.write_text('{"a": {"caption": "x"},', encoding="utf-8")
    before = out.read_bytes()
    assert run_script(merge_captions, [captioned, out]) == 2
    line = error_line(capsys)
    assert str(out) in line and "not valid JSON" in line
    assert out.read_bytes() == before
    out.write_text('["a"]', encoding="utf-8")
    assert run_script(merge_tags, [captioned, out]) == 2
    assert "must hold a JSON object" in error_line(capsys)
    out.write_text('{"a": "caption"}', encoding="utf-8")
    assert run_script(merge_tags, [captioned, out]) == 2
    assert "entry 'a' must be a JSON object" in error_line(capsys)
    out.write_bytes(b'{"a": {"caption": "\xff"}}')
    assert run_script(merge_tags, [captioned, out]) == 2
    assert f"metadata file {out} is not UTF-8 text" in error_line(capsys)
    assert run_script(merge_tags, [captioned, tmp_path]) == 2  # out_json names a folder
    assert f"cannot read metadata file {tmp_path}" in error_line(capsys)


def test_merge_errors_leave_output_untouched(captioned, tmp_path, capsys):
    out = tmp_path / "meta.json"
    out.write_text('{"z": {}}', encoding="utf-8")
    before = out.read_bytes()
    (captioned / "b.caption").write_bytes(b"\xff\xfe broken")
    assert run_script(merge_captions, [captioned, out]) == 2
    line = error_line(capsys)
    assert "b.caption" in line and "not UTF-8" in line
    assert out.read_bytes() == before
    assert run_script(merge_captions, [tmp_path / "nope", out]) == 2
    assert "train_data_dir" in error_line(capsys)
    assert run_script(merge_captions, [captioned, out, "--in_json", tmp_path / "missing.json"]) == 2
    assert "missing.json does not exist" in error_line(capsys)
    assert out.read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind


def test_merge_debug_prints_each_caption(captioned, tmp_path, capsys):
    assert run_script(merge_captions, [captioned, tmp_path / "m.json", "--debug"]) == 0
    assert "a: a young woman on grass" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------------
# cleaning


@pytest.mark.parametrize("tags, cleaned", [
    ("1girl, long_hair, ^_^, blue_eyes", "1girl, long hair, ^_^, blue eyes"),
    ("1girl, solo, rating:safe, something", "1girl, solo"),
    ("2girls, long hair, short hair, blue eyes, red eyes, smile", "2girls, smile"),
    ("2girls, long hair, blonde hair, black hair, smile", "2girls, long hair, smile"),
    ("2girls, long hair, blonde hair, smile", "2girls, long hair, blonde hair, smile"),
    ("multiple boys, ponytail, twintails, hair bun, detached sleeves, sleeveless", "multiple boys"),
    ("1girl, blonde hair, black hair, ponytail, braid", "1girl, blonde hair, black hair, ponytail, braid"),
    ("shirt, white shirt, hair ornament, star hair ornament", "white shirt, star hair ornament"),
    ("a, , b", "a, b"),
    ("", ""),
])
def test_clean_tags_rules(tags, cleaned):
    assert clean_tags(tags) == cleaned
    assert clean_tags(cleaned) == cleaned


@pytest.mark.parametrize("caption, cleaned", [
    ("a young woman standing", "a girl standing"),
    ("anime anime girl with a cartoon character", "girl with a girl"),
    ("two women and a person", "two girls and a girl"),
    ("a cartoon image of a ladybug", "an image of a girlbug"),  # plain substrings, as the reference
    ("anime people", "girls"),  # needs a second pass of the list in the reference
])
def test_clean_caption_rules(caption, cleaned):
    assert clean_caption(caption) == cleaned
    assert clean_caption(cleaned) == cleaned


def test_clean_script_is_idempotent_and_keeps_other_fields(tmp_path, caplog):
    src = tmp_path / "in.json"
    meta = {"a": {"caption": "a young woman", "tags": "1girl, long_hair, rating:safe", "train_resolution": [64, 48]},
            "b": {"caption": "anime people"}, "c": {"tags": "shirt, white_shirt"}, "d": {}}
    src.write_text(json.dumps(meta), encoding="utf-8")
    once, twice = tmp_path / "once.json", tmp_path / "twice.json"
    assert run_script(clean_main, [src, once]) == 0
    assert read_json(once) == {"a": {"caption": "a girl", "tags": "1girl, long hair", "train_resolution": [64, 48]},
                               "b": {"caption": "girls"}, "c": {"tags": "white shirt"}, "d": {}}
    assert "2 entries without tags" in caplog.text and "2 entries without caption" in caplog.text
    assert run_script(clean_main, [once, twice]) == 0
    assert twice.read_bytes() == once.read_bytes()
    assert run_script(clean_main, [once, once]) == 0  # in place is allowed (atomic)
    assert once.read_bytes() == twice.read_bytes()


def test_clean_legacy_form_debug_and_errors(tmp_path, capsys, caplog):
    src = tmp_path / "in.json"
    src.write_text(json.dumps({"a": {"caption": "a woman"}}), encoding="utf-8")
    out = tmp_path / "out.json"
    assert run_script(clean_main, [tmp_path / "ignored_dir", src, out, "--debug"]) == 0
    assert read_json(out) == {"a": {"caption": "a girl"}}
    assert "FROM: a woman\nTO:   a girl" in capsys.readouterr().out
    assert "no longer needed" in caplog.text
    with pytest.raises(SystemExit):
        clean_main([str(tmp_path), str(src), str(out), "extra"])
    assert "unrecognized arguments: extra" in capsys.readouterr().err
    assert run_script(clean_main, [tmp_path / "missing.json", out]) == 2
    assert "missing.json does not exist" in error_line(capsys)
    out.write_text("{", encoding="utf-8")
    before = out.read_bytes()
    assert run_script(clean_main, [out, tmp_path / "x.json"]) == 2
    assert "not valid JSON" in error_line(capsys)
    assert out.read_bytes() == before and not (tmp_path / "x.json").exists()
    (tmp_path / "folder").mkdir()
    assert run_script(clean_main, [src, tmp_path / "folder"]) == 2
    assert "is a folder; give a file name" in error_line(capsys)


# --------------------------------------------------------------------------------------------------
# prepare_buckets_latents


def expected_latent(vae, image_path: Path, bucket, resized, flipped: bool = False) -> np.ndarray:
    """Hand-made reference: INTER_AREA resize, centre crop, [-1, 1], posterior mean + std * seeded noise."""
    pixels = np.asarray(Image.open(image_path).convert("RGB"))
    if (pixels.shape[1], pixels.shape[0]) != tuple(resized):
        pixels = cv2.resize(pixels, tuple(resized), interpolation=cv2.INTER_AREA)
    left, top = (resized[0] - bucket[0]) // 2, (resized[1] - bucket[1]) // 2
    crop = pixels[top:top + bucket[1], left:left + bucket[0]]
    if flipped:
        crop = crop[:, ::-1]
    x = torch.from_numpy(np.ascontiguousarray(crop)).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.no_grad():
        dist = vae.encode(x).latent_dist
    gen = torch.Generator().manual_seed(latent_seed(image_path, 0, flipped))
    noise = torch.randn(dist.mean.shape[1:], generator=gen)
    return (dist.mean[0] + dist.std[0] * noise).numpy()


def npz_array(path: Path) -> np.ndarray:
    with np.load(path) as npz:
        assert npz["arr_0"].dtype == np.float32
        return npz["arr_0"]


def prepare_args(data, in_json, out_json, model, *extra):
    return [data, in_json, out_json, model, *BUCKETS, "--max_data_loader_n_workers", "0", *extra]


def test_prepare_latents_equal_the_vae_encoding_of_the_bucket_crop(tiny, captioned, tmp_path):
    from library.models.load import load_model

    src = tmp_path / "in.json"
    src.write_text(json.dumps({"a": {"caption": "x", "custom": True}, "other": {"tags": "t"}}), encoding="utf-8")
    out = tmp_path / "out.json"
    assert run_script(prepare_main, prepare_args(captioned, src, out, tiny["safetensors"], "--flip_aug",
                                                 "--batch_size", "2")) == 0
    meta = read_json(out)
    assert meta == {"a": {"caption": "x", "custom": True, "train_resolution": [80, 48]},
                    "other": {"tags": "t"},
                    "b": {"train_resolution": [48, 80]}, "c": {"train_resolution": [64, 64]}}
    vae = load_model(tiny["safetensors"]).vae
    # a.png is 96x64 (aspect 1.5): nearest bucket 80x48, resized to 80x53, 2 rows cropped at the top
    for flipped, name in ((False, "a.npz"), (True, "a_flip.npz")):
        got = npz_array(captioned / name)
        assert got.shape == (4, 6, 10)
        want = expected_latent(vae, captioned / "a.png", (80, 48), (80, 53), flipped)
        np.testing.assert_allclose(got, want, atol=2e-5)
    assert npz_array(captioned / "b.npz").shape == (4, 10, 6)
    assert not (captioned / "d.npz").exists()  # sub-folder not read without --recursive
    assert not list(captioned.glob(".*"))  # no staging files left


def test_prepare_full_path_recursive_diffusers_and_idempotent_rerun(tiny, captioned, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "meta.json").write_text("{}", encoding="utf-8")
    argv = prepare_args("data", "meta.json", "meta.json", tiny["diffusers"], "--full_path", "--recursive")
    assert run_script(prepare_main, argv) == 0
    meta = read_json(tmp_path / "meta.json")
    assert meta[str(Path("data/sub/d.png"))] == {"train_resolution": [96, 32]}
    npz = captioned / "sub" / "d.npz"
    assert npz_array(npz).shape == (4, 4, 12)
    files = {p: p.read_bytes() for p in captioned.rglob("*.npz")}
    json_bytes = (tmp_path / "meta.json").read_bytes()
    os.utime(npz, ns=(1, 1))  # mark: a re-run without --skip_existing re-encodes
    assert run_script(prepare_main, argv) == 0
    assert {p: p.read_bytes() for p in captioned.rglob("*.npz")} == files
    assert os.stat(npz).st_mtime_ns != 1
    assert (tmp_path / "meta.json").read_bytes() == json_bytes
    assert run_script(prepare_main, argv + ["--seed", "1"]) == 0  # another noise seed, other samples
    assert not np.array_equal(npz_array(npz), np.load(io.BytesIO(files[npz]))["arr_0"])


def test_skip_existing_reuses_valid_files_and_rebuilds_wrong_ones(tiny, captioned, tmp_path, caplog):
    (tmp_path / "m.json").write_text("{}", encoding="utf-8")
    argv = prepare_args(captioned, tmp_path / "m.json", tmp_path / "out.json", tiny["safetensors"], "--skip_existing")
    assert run_script(prepare_main, argv) == 0
    good = npz_array(captioned / "a.npz")
    os.utime(captioned / "a.npz", ns=(1, 1))
    np.savez(captioned / "b.npz", np.zeros((4, 3, 3), dtype=np.float32))  # wrong shape for its bucket
    caplog.clear()
    assert run_script(prepare_main, argv) == 0
    assert os.stat(captioned / "a.npz").st_mtime_ns == 1  # kept as it was
    np.testing.assert_array_equal(npz_array(captioned / "a.npz"), good)
    assert npz_array(captioned / "b.npz").shape == (4, 10, 6)
    assert "1 encoded (1 rebuilt), 2 reused" in caplog.text


def test_flip_files_removed_without_flip_aug(tiny, captioned, tmp_path):
    (tmp_path / "m.json").write_text("{}", encoding="utf-8")
    for skip in ([], ["--skip_existing"]):
        argv = prepare_args(captioned, tmp_path / "m.json", tmp_path / "o.json", tiny["safetensors"], *skip)
        assert run_script(prepare_main, argv + ["--flip_aug"]) == 0
        assert (captioned / "a_flip.npz").exists()
        assert run_script(prepare_main, argv) == 0
        assert not list(captioned.glob("*_flip.npz")) and (captioned / "a.npz").exists()


@pytest.mark.parametrize("workers", ["0", "2"])
def test_unreadable_images_are_reported_and_skipped(tiny, tmp_path, caplog, workers):
    data = tmp_path / "data"
    write_image(data / "good.png", (64, 64))
    (data / "garbage.png").write_bytes(b"not an image at all")
    full = write_image(data / "cut.jpg", (64, 64), 5).read_bytes()
    (data / "cut.jpg").write_bytes(full[: len(full) // 2])  # header fine, pixel data truncated
    (data / "empty.webp").write_bytes(b"")
    (tmp_path / "m.json").write_text(json.dumps({"cut": {"caption": "kept"}}), encoding="utf-8")
    argv = [data, tmp_path / "m.json", tmp_path / "o.json", tiny["safetensors"], *BUCKETS,
            "--max_data_loader_n_workers", workers]
    assert run_script(prepare_main, argv) == 0
    assert read_json(tmp_path / "o.json") == {"cut": {"caption": "kept"}, "good": {"train_resolution": [64, 64]}}
    assert sorted(p.name for p in data.glob("*.npz")) == ["good.npz"]
    assert "left out 3 image(s)" in caplog.text
    for name in ("garbage.png", "cut.jpg", "empty.webp"):
        assert name in caplog.text


def test_bucket_no_upscale_and_bf16(tiny, tmp_path):
    data = tmp_path / "data"
    write_image(data / "small.png", (50, 40))
    write_image(data / "big.png", (300, 150))
    (tmp_path / "m.json").write_text("{}", encoding="utf-8")
    argv = [data, tmp_path / "m.json", tmp_path / "o.json", tiny["safetensors"], "--max_resolution", "64,64",
            "--bucket_reso_steps", "16", "--bucket_no_upscale", "--mixed_precision", "bf16",
            "--max_data_loader_n_workers", "0"]
    assert run_script(prepare_main, argv) == 0
    meta = read_json(tmp_path / "o.json")
    # small: kept at 50x40, floored to steps -> 48x32; big: shrunk to the 64*64 area at aspect 2 (90x45),
    # the height rounded to steps (32) gives the exact aspect: 64x32
    assert meta == {"big": {"train_resolution": [64, 32]}, "small": {"train_resolution": [48, 32]}}
    assert npz_array(data / "small.npz").shape == (4, 4, 6)
    assert np.isfinite(npz_array(data / "big.npz")).all()


def test_latent_file_collisions_are_refused(tiny, tmp_path, capsys):
    data = tmp_path / "data"
    write_image(data / "x.png", (64, 64))
    write_image(data / "sub" / "x.png", (64, 64))
    (tmp_path / "m.json").write_text("{}", encoding="utf-8")
    argv = [data, tmp_path / "m.json", tmp_path / "o.json", tiny["safetensors"], *BUCKETS, "--recursive"]
    assert run_script(prepare_main, argv) == 2
    line = error_line(capsys)
    assert "would both write the latent file" in line and "--full_path" in line
    assert not (tmp_path / "o.json").exists() and not list(data.rglob("*.npz"))
    assert run_script(prepare_main, argv + ["--full_path"]) == 0
    assert (data / "x.npz").exists() and (data / "sub" / "x.npz").exists()


def test_a_users_npz_is_never_replaced_or_deleted(tiny, tmp_path, capsys):
    data = tmp_path / "data"
    write_image(data / "x.png", (64, 64))
    write_image(data / "y.png", (64, 64))
    np.savez(data / "x.npz", notes=np.arange(3))  # the user's own file at x's latent name
    (data / "y_flip.npz").write_bytes(b"not a zip")  # and at y's mirrored name (removed without --flip_aug)
    mine = {p.name: p.read_bytes() for p in data.glob("*.npz")}
    (tmp_path / "m.json").write_text("{}", encoding="utf-8")
    argv = [data, tmp_path / "m.json", tmp_path / "o.json", tiny["safetensors"], *BUCKETS]
    assert run_script(prepare_main, argv) == 2
    assert "x.npz" in error_line(capsys) and {p.name: p.read_bytes() for p in data.glob("*.npz")} == mine
    (data / "x.npz").unlink()
    assert run_script(prepare_main, argv) == 2
    assert "y_flip.npz" in error_line(capsys) and (data / "y_flip.npz").read_bytes() == b"not a zip"
    (data / "y_flip.npz").unlink()
    assert run_script(prepare_main, argv) == 0
    assert sorted(p.name for p in data.glob("*.npz")) == ["x.npz", "y.npz"]


@pytest.mark.parametrize("extra, message", [
    (["--max_resolution", "512x512"], "--max_resolution: must be 'size' or 'width,height'"),
    (["--bucket_reso_steps", "12"], "--bucket_reso_steps must be a positive multiple of 8"),
    (["--min_bucket_reso", "36"], "--min_bucket_reso must be a positive multiple of 8"),
    (["--min_bucket_reso", "256", "--max_bucket_reso", "128"], "bucket options: min_bucket_reso (256) must not exceed"),
    (["--batch_size", "0"], "--batch_size must be at least 1"),
    (["--max_data_loader_n_workers", "-1"], "--max_data_loader_n_workers must be 0 or more"),
    (["--bucket_no_upscale", "--max_resolution", "8,8"], "--max_resolution (8, 8) is smaller than one bucket step"),
])
def test_prepare_option_errors(tiny, captioned, tmp_path, capsys, extra, message):
    (tmp_path / "m.json").write_text("{}", encoding="utf-8")
    argv = [captioned, tmp_path / "m.json", tmp_path / "o.json", tiny["safetensors"], *BUCKETS, *extra]
    assert run_script(prepare_main, argv) == 2
    assert message in error_line(capsys)
    assert not (tmp_path / "o.json").exists()


def test_prepare_input_errors(tiny, captioned, tmp_path, capsys):
    meta = tmp_path / "m.json"
    out = tmp_path / "o.json"
    assert run_script(prepare_main, prepare_args(captioned, meta, out, tiny["safetensors"])) == 2
    assert "m.json does not exist" in error_line(capsys)
    meta.write_text("{}", encoding="utf-8")
    assert run_script(prepare_main, prepare_args(captioned, meta, out, tmp_path / "nomodel.safetensors")) == 2
    assert "nomodel.safetensors: no such file or folder" in error_line(capsys)
    lora = tmp_path / "lora.safetensors"
    from safetensors.torch import save_file

    save_file({"lora_unet_x.lora_down.weight": torch.zeros(4, 8)}, str(lora))
    assert run_script(prepare_main, prepare_args(captioned, meta, out, lora)) == 2
    assert "is a LoRA network file" in error_line(capsys)
    other = tmp_path / "other.safetensors"
    save_file({"foo.weight": torch.zeros(2)}, str(other))
    assert run_script(prepare_main, prepare_args(captioned, meta, out, other)) == 2
    assert "is not a Stable Diffusion model or VAE" in error_line(capsys)
    assert run_script(prepare_main, prepare_args(captioned, meta, out, tmp_path)) == 2
    assert "neither vae/config.json" in error_line(capsys)
    assert not out.exists()
    with pytest.raises(SystemExit):
        prepare_main([str(captioned), str(meta), str(out), str(lora), "--mixed_precision", "fp32"])


# --------------------------------------------------------------------------------------------------
# the whole chain


def test_chain_from_caption_files_to_fine_tune(tiny, tmp_path, monkeypatch, caplog):
    """images + .caption + .txt -> merge captions -> merge tags -> clean -> latents -> fine_tune.py trains
    from the latents alone (the images are moved away before training)."""
    from fine_tune import main as fine_tune
    from library.models.statedict import open_state_dict

    monkeypatch.chdir(tmp_path)
    data = Path("train_data")
    sizes = [(96, 64), (64, 96), (64, 64), (80, 48)]
    for i, size in enumerate(sizes):
        write_image(data / f"img{i}.png", size, i)
        (data / f"img{i}.caption").write_text(f"a young woman number {i}\n", encoding="utf-8")
        (data / f"img{i}.txt").write_text("1girl, long_hair, shirt, white_shirt, rating:safe", encoding="utf-8")
    assert run_script(merge_captions, ["--full_path", data, "meta_cap.json"]) == 0
    assert run_script(merge_tags, ["--full_path", data, "--in_json", "meta_cap.json", "meta_cap_dd.json"]) == 0
    assert run_script(clean_main, ["meta_cap_dd.json", "meta_clean.json"]) == 0
    assert run_script(prepare_main, ["--full_path", data, "meta_clean.json", "meta_lat.json", tiny["safetensors"],
                                     *BUCKETS, "--batch_size", "2", "--flip_aug"]) == 0
    meta = read_json(Path("meta_lat.json"))
    key = str(data / "img0.png")
    assert meta[key] == {"caption": "a girl number 0", "tags": "1girl, long hair, white shirt",
                         "train_resolution": [80, 48]}
    assert metadata_text(meta) == Path("meta_lat.json").read_text(encoding="utf-8")
    assert len(list(data.glob("*_flip.npz"))) == 4

    shutil.move(str(data), "kept")  # training must not need the images: keep only captions and latents
    data.mkdir()
    for npz in Path("kept").glob("*.npz"):
        shutil.copy(npz, data / npz.name)
    caplog.clear()
    argv = ["--pretrained_model_name_or_path", tiny["safetensors"], "--in_json", "meta_lat.json",
            "--train_data_dir", data, "--output_dir", "out", "--max_train_steps", "3", "--learning_rate", "1e-3",
            "--seed", "1", "--max_data_loader_n_workers", "0", "--train_batch_size", "1", "--flip_aug",
            "--save_model_as", "safetensors"]
    assert run_script(fine_tune, argv) == 0
    assert "bucket 0: resolution (48, 80), count: 1" in caplog.text
    trained = open_state_dict(Path("out/last.safetensors"))
    base = open_state_dict(tiny["safetensors"])
    unet_keys = [k for k in base.keys() if k.startswith("model.diffusion_model.")]
    assert any(not torch.equal(trained[k], base[k]) for k in unet_keys)


def test_fine_tune_uses_each_images_own_train_resolution(tiny, tmp_path, caplog):
    """After --bucket_no_upscale an image's bucket is not the nearest aspect ratio among all buckets:
    training (from the images, batch 2) must use its own train_resolution, not re-pick a bucket."""
    from fine_tune import main as fine_tune

    data = tmp_path / "data"
    for i in range(2):
        write_image(data / f"a{i}.png", (50, 44), i)  # aspect 1.14 -> 48x32 (1.5), nearest would be 64x64
        write_image(data / f"b{i}.png", (64, 64), 10 + i)
    meta = tmp_path / "m.json"
    meta.write_text(json.dumps({f"{c}{i}": {"caption": "x"} for c in "ab" for i in range(2)}), encoding="utf-8")
    assert run_script(prepare_main, [data, meta, tmp_path / "o.json", tiny["safetensors"], "--max_resolution",
                                     "64,64", "--bucket_reso_steps", "16", "--bucket_no_upscale",
                                     "--max_data_loader_n_workers", "0"]) == 0
    assert read_json(tmp_path / "o.json")["a0"]["train_resolution"] == [48, 32]
    caplog.clear()
    argv = ["--pretrained_model_name_or_path", tiny["safetensors"], "--in_json", tmp_path / "o.json",
            "--train_data_dir", data, "--output_dir", tmp_path / "out", "--max_train_steps", "2",
            "--learning_rate", "1e-3", "--seed", "1", "--max_data_loader_n_workers", "0", "--train_batch_size", "2",
            "--save_model_as", "safetensors"]
    with caplog.at_level("INFO"):
        assert run_script(fine_tune, argv) == 0
    assert "resolution (48, 32), count: 2" in caplog.text and "resolution (64, 64), count: 2" in caplog.text
