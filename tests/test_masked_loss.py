"""Masked loss (library/data/masks.py): masks from the alpha channel and from a mask folder follow their
image through bucket resize, random crop and flip, with and without cached latents; CLI runs of every
method; the hand-computed loss of a half mask; each error message."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from library.config import load_dataset_blueprint
from library.data.dataset import build_dataset_group
from library.data.masks import attach_mask_source
from library.errors import UserError
from library.option_groups import Options
from tests.train_util import run_script
from train_network import build_parser, main as train_network

HALF = torch.cat([torch.ones(1, 8, 4), torch.zeros(1, 8, 4)], dim=2)  # left half of a 64 px image, latent size


def blueprint_from(args, config, **support):
    """``load_dataset_blueprint`` with the option groups of the parsed ``args``."""
    opts = Options.from_args(args)
    return load_dataset_blueprint(opts.data, opts.validation, config, given=opts.given, **support)


def rgb(i: int, size=(64, 64)) -> np.ndarray:
    return (np.random.default_rng(i + 5).random((size[1], size[0], 3)) * 255).astype(np.uint8)


def half_plane(size=(64, 64)) -> np.ndarray:
    plane = np.zeros((size[1], size[0]), dtype=np.uint8)
    plane[:, : size[0] // 2] = 255
    return plane


@pytest.fixture(scope="module")
def alpha_data(tmp_path_factory) -> Path:
    """``10_sks dog/``: three RGBA images whose left half is opaque, the right half transparent."""
    folder = tmp_path_factory.mktemp("alpha") / "10_sks dog"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.dstack([rgb(i), half_plane()])).save(folder / f"img{i}.png")
    return folder


@pytest.fixture(scope="module")
def mask_data(tmp_path_factory) -> tuple[Path, Path]:
    """(``images/``: three RGB jpgs, ``masks/``: a greyscale png per image, left half white)."""
    root = tmp_path_factory.mktemp("masks")
    images, masks = root / "images", root / "masks"
    images.mkdir()
    masks.mkdir()
    for i in range(3):
        Image.fromarray(rgb(i)).save(images / f"img{i}.jpg", quality=95)
        Image.fromarray(half_plane()).save(masks / f"img{i}.png")
    return images, masks


def write_config(path: Path, subset_lines: str, *, resolution=64, batch=3, extra="") -> Path:
    path.write_text(f"""[general]
{extra}
[[datasets]]
resolution = {resolution}
batch_size = {batch}
  [[datasets.subsets]]
  class_tokens = 'sks dog'
{subset_lines}
""", encoding="utf-8")
    return path


def group_for(argv, config) -> tuple:
    args = build_parser().parse_args([*map(str, argv), "--dataset_config", str(config)])
    blueprint = blueprint_from(args, args.dataset_config)
    group = build_dataset_group(blueprint, seed=1)
    attach_mask_source(group, masked_loss=args.masked_loss, conditioning_data_dir=args.conditioning_data_dir)
    return args, group


def first_batch(group, epoch=1, position=0):
    return group.load_batch(group.epoch_batches(epoch)[position], epoch, position)


# ---- the masks in the batch ---------------------------------------------------------------------


def test_alpha_mask_gives_the_half_mask(alpha_data, tmp_path):
    config = write_config(tmp_path / "c.toml", f"  image_dir = '{alpha_data}'\n  alpha_mask = true")
    _, group = group_for([], config)  # alpha_mask masks the loss by itself (as sd-scripts)
    batch = first_batch(group)
    assert batch["masks"].shape == (3, 1, 8, 8)
    assert all(torch.equal(m, HALF) for m in batch["masks"])


def test_mask_folder_gives_the_half_mask_and_flips_with_the_image(mask_data, tmp_path):
    images, masks = mask_data
    config = write_config(tmp_path / "c.toml", f"  image_dir = '{images}'\n  conditioning_data_dir = '{masks}'\n"
                          "  flip_aug = true")
    _, group = group_for(["--masked_loss"], config)
    seen = set()
    for epoch in range(1, 5):
        batch = first_batch(group, epoch)
        for mask, flipped in zip(batch["masks"], batch["flipped"]):
            assert torch.equal(mask, HALF.flip(-1) if flipped else HALF)
            seen.add(flipped)
    assert seen == {True, False}


def test_mask_follows_resize_random_crop_and_flip(tmp_path):
    """The mask file is the image's own red channel: after any bucket resize, random crop and flip, the
    batch mask must be the area mean of the batch image's red channel."""
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    for i, size in enumerate([(96, 64), (64, 112), (80, 80)]):
        pixels = rgb(i, size)
        Image.fromarray(pixels).save(images / f"img{i}.png")
        Image.fromarray(pixels[:, :, 0]).save(masks / f"img{i}.png")
    config = write_config(tmp_path / "c.toml", f"  image_dir = '{images}'\n  conditioning_data_dir = '{masks}'\n"
                          "  random_crop = true\n  flip_aug = true", batch=1,
                          extra="enable_bucket = true\nmin_bucket_reso = 32\nmax_bucket_reso = 128\n"
                                "bucket_reso_steps = 16")
    _, group = group_for(["--masked_loss"], config)
    for epoch in (1, 2):
        for position, spec in enumerate(group.epoch_batches(epoch)):
            batch = group.load_batch(spec, epoch, position)
            red = torch.round((batch["images"][:, :1] + 1.0) * 127.5) / 255.0
            expected = F.interpolate(red, size=batch["masks"].shape[-2:], mode="area")
            torch.testing.assert_close(batch["masks"], expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("source", ["alpha", "folder"])
def test_cached_latents_give_the_same_masks(tmp_path, models, source):
    """Images larger than their bucket (resized, centre-cropped): the masks rebuilt for cached latents equal
    those that rode through the pixel path."""
    from library.data.group_latents import cache_group_latents
    from library.models.load import load_model

    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    for i, size in enumerate([(100, 72), (72, 90), (85, 85)]):
        plane = (np.random.default_rng(i).random((size[1], size[0])) * 255).astype(np.uint8)
        if source == "alpha":
            Image.fromarray(np.dstack([rgb(i, size), plane])).save(images / f"img{i}.png")
        else:
            Image.fromarray(rgb(i, size)).save(images / f"img{i}.png")
            Image.fromarray(plane).save(masks / f"img{i}.png")
    lines = f"  image_dir = '{images}'\n  flip_aug = true"
    if source == "folder":
        lines += f"\n  conditioning_data_dir = '{masks}'"
    config = write_config(tmp_path / "c.toml", lines, batch=1,
                          extra="enable_bucket = true\nmin_bucket_reso = 32\nmax_bucket_reso = 128\nbucket_reso_steps = 8")
    argv = ["--alpha_mask"] if source == "alpha" else ["--masked_loss"]
    _, pixels = group_for(argv, config)
    _, cached = group_for(argv, config)
    cache_group_latents(cached, load_model(models["sd1"]["safetensors"]).vae, to_disk=False)
    assert len(cached.latents) == 3
    flips = set()
    for epoch in (1, 2, 3):
        for position, spec in enumerate(pixels.epoch_batches(epoch)):
            a, b = pixels.load_batch(spec, epoch, position), cached.load_batch(spec, epoch, position)
            assert b["latents"] is not None and a["latents"] is None
            assert a["flipped"] == b["flipped"] and torch.equal(a["masks"], b["masks"])
            assert a["masks"].shape[-2:] == b["latents"].shape[-2:]
            flips.update(a["flipped"])
    assert flips == {True, False}


def test_subsets_without_a_source_get_ones(alpha_data, mask_data, tmp_path):
    config = tmp_path / "c.toml"
    config.write_text(f"""[[datasets]]
resolution = 64
batch_size = 1
  [[datasets.subsets]]
  image_dir = '{mask_data[0]}'
  conditioning_data_dir = '{mask_data[1]}'
  [[datasets.subsets]]
  image_dir = '{alpha_data}'
  is_reg = true
""", encoding="utf-8")
    _, group = group_for(["--masked_loss"], config)
    masks = {}
    for position, spec in enumerate(group.epoch_batches(1)):
        batch = group.load_batch(spec, 1, position)
        masks[batch["is_reg"][0]] = batch["masks"][0]
    assert torch.equal(masks[False], HALF) and torch.equal(masks[True], torch.ones(1, 8, 8))


def test_config_keys(alpha_data, tmp_path):
    bad = write_config(tmp_path / "c.toml", f"  image_dir = '{alpha_data}'", extra="conditioning_data_dir = 'x'")
    with pytest.raises(UserError, match="'conditioning_data_dir' is not allowed in \\[general\\]; it is allowed "
                                        "only in \\[\\[datasets.subsets\\]\\]"):
        group_for(["--masked_loss"], bad)
    ok = write_config(tmp_path / "d.toml", f"  image_dir = '{alpha_data}'", extra="alpha_mask = true")
    _, group = group_for([], ok)
    assert group.datasets[0].blueprint.subsets[0].alpha_mask and group.masks is not None


# ---- errors -------------------------------------------------------------------------------------


def test_masked_loss_without_any_mask_source(alpha_data, tmp_path):
    config = write_config(tmp_path / "c.toml", f"  image_dir = '{alpha_data}'")
    with pytest.raises(UserError, match="--masked_loss needs masks: set conditioning_data_dir"):
        group_for(["--masked_loss"], config)


def test_missing_mask_file_is_named(mask_data, tmp_path):
    images, masks = mask_data
    partial = tmp_path / "partial"
    partial.mkdir()
    Image.open(masks / "img0.png").save(partial / "img0.png")
    config = write_config(tmp_path / "c.toml", f"  image_dir = '{images}'\n  conditioning_data_dir = '{partial}'")
    with pytest.raises(UserError) as info:
        group_for(["--masked_loss"], config)
    text = str(info.value)
    assert "no mask image for 2 training image(s): img1.jpg (in" in text and "img2.jpg" in text
    assert str(partial) in text and "\n" not in text


def test_missing_mask_folder_and_wrong_aspect(mask_data, tmp_path):
    images, _ = mask_data
    config = write_config(tmp_path / "c.toml", f"  image_dir = '{images}'\n  conditioning_data_dir = "
                                               f"'{tmp_path / 'nope'}'")
    with pytest.raises(UserError, match="datasets\\[0\\].subsets\\[0\\] .*conditioning_data_dir '.*nope' does not "
                                        "exist or is not a folder"):
        group_for(["--masked_loss"], config)
    wide = tmp_path / "wide"
    wide.mkdir()
    for i in range(3):
        Image.fromarray(half_plane((128, 64))).save(wide / f"img{i}.png")
    config = write_config(tmp_path / "d.toml", f"  image_dir = '{images}'\n  conditioning_data_dir = '{wide}'")
    with pytest.raises(UserError, match="mask image .*img0.png is 128x64 but its image .*img0.jpg is 64x64"):
        group_for(["--masked_loss"], config)


def test_mask_of_half_size_is_resized(mask_data, tmp_path):
    images, _ = mask_data
    small = tmp_path / "small"
    small.mkdir()
    for i in range(3):
        Image.fromarray(half_plane((32, 32))).save(small / f"img{i}.png")
    config = write_config(tmp_path / "c.toml", f"  image_dir = '{images}'\n  conditioning_data_dir = '{small}'")
    _, group = group_for(["--masked_loss"], config)
    assert all(torch.equal(m, HALF) for m in first_batch(group)["masks"])


def test_folder_without_masked_loss_is_ignored_with_a_warning(mask_data, tmp_path, caplog):
    images, masks = mask_data
    config = write_config(tmp_path / "c.toml", f"  image_dir = '{images}'\n  conditioning_data_dir = '{masks}'")
    with caplog.at_level("WARNING"):
        _, group = group_for([], config)
    assert group.masks is None and "masks" not in first_batch(group)
    assert any("conditioning_data_dir is ignored without --masked_loss" in r.message for r in caplog.records)


# ---- command line -------------------------------------------------------------------------------


def lora(models, config, out, *extra, steps=3):
    return ["--pretrained_model_name_or_path", models["sd1"]["safetensors"], "--dataset_config", config,
            "--output_dir", out, "--network_module", "networks.lora", "--network_dim", "4",
            "--network_train_unet_only", "--max_train_steps", str(steps), "--learning_rate", "1e-2", "--seed", "3",
            "--max_data_loader_n_workers", "0", *extra]


def lora_weights(out: Path) -> dict:
    return load_file(str(out / "last.safetensors"))


@pytest.mark.parametrize("cache", [[], ["--cache_latents"], ["--cache_latents_to_disk"]])
def test_cli_masks_all_ones_equal_no_mask_and_zeros_train_nothing(models, tmp_path, cache):
    images, ones, zeros = tmp_path / "images", tmp_path / "ones", tmp_path / "zeros"
    for folder in (images, ones, zeros):
        folder.mkdir()
    for i in range(3):
        Image.fromarray(rgb(i)).save(images / f"img{i}.png")
        Image.fromarray(np.full((64, 64), 255, np.uint8)).save(ones / f"img{i}.png")
        Image.fromarray(np.zeros((64, 64), np.uint8)).save(zeros / f"img{i}.png")
    plain = write_config(tmp_path / "plain.toml", f"  image_dir = '{images}'\n  flip_aug = true", batch=2)
    assert run_script(train_network, lora(models, plain, tmp_path / "plain", *cache)) == 0
    for name, folder in (("ones", ones), ("zeros", zeros)):
        config = write_config(tmp_path / f"{name}.toml", f"  image_dir = '{images}'\n  flip_aug = true\n"
                              f"  conditioning_data_dir = '{folder}'", batch=2)
        assert run_script(train_network, lora(models, config, tmp_path / name, "--masked_loss", *cache)) == 0
    plain_w, ones_w, zeros_w = (lora_weights(tmp_path / n) for n in ("plain", "ones", "zeros"))
    assert all(torch.equal(plain_w[k], ones_w[k]) for k in plain_w)
    ups = [k for k in zeros_w if "lora_up" in k]
    assert ups and all(not zeros_w[k].any() for k in ups)  # lora_up starts at 0 and never got a gradient
    assert any(plain_w[k].any() for k in ups)


def test_cli_half_mask_changes_training_for_every_method(models, alpha_data, tmp_path):
    from fine_tune import main as fine_tune
    from train_db import main as train_db
    from train_textual_inversion import main as train_ti

    config = write_config(tmp_path / "c.toml", f"  image_dir = '{alpha_data}'\n  alpha_mask = true", batch=3)
    plain = write_config(tmp_path / "p.toml", f"  image_dir = '{alpha_data}'", batch=3)
    assert run_script(train_network, lora(models, config, tmp_path / "masked", steps=2)) == 0
    assert run_script(train_network, lora(models, plain, tmp_path / "plain", steps=2)) == 0
    masked, unmasked = lora_weights(tmp_path / "masked"), lora_weights(tmp_path / "plain")
    assert any(not torch.equal(masked[k], unmasked[k]) for k in masked)
    common = ["--pretrained_model_name_or_path", models["sd1"]["safetensors"], "--max_train_steps", "2",
              "--seed", "1", "--max_data_loader_n_workers", "0", "--masked_loss"]
    assert run_script(train_db, [*common, "--dataset_config", config, "--output_dir", tmp_path / "db",
                                 "--learning_rate", "1e-4", "--cache_latents"]) == 0
    assert run_script(train_ti, [*common, "--dataset_config", config, "--output_dir", tmp_path / "ti",
                                 "--token_string", "zqx", "--init_word", "dog", "--learning_rate", "1e-2"]) == 0
    meta = tmp_path / "meta.json"
    meta.write_text('{"img0": {"caption": "a dog"}, "img1": {"caption": "a cat"}, "img2": {"caption": "a cow"}}')
    assert run_script(fine_tune, [*common, "--in_json", meta, "--train_data_dir", alpha_data, "--resolution", "64",
                                  "--alpha_mask", "--output_dir", tmp_path / "ft", "--learning_rate", "1e-4"]) == 0
    assert (tmp_path / "db" / "last.ckpt").is_file() and (tmp_path / "ti" / "zqx.pt").is_file()
    assert (tmp_path / "ft" / "last.ckpt").is_file()


def test_cli_masked_loss_error_is_one_line(models, alpha_data, tmp_path, capsys):
    config = write_config(tmp_path / "c.toml", f"  image_dir = '{alpha_data}'")
    assert run_script(train_network, lora(models, config, tmp_path / "out", "--masked_loss")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --masked_loss needs masks") and len(err.splitlines()) == 1
