"""Later kohya image / cache / loader options through the CLI: --resize_interpolation (and the dataset key),
--cache_info, --skip_cache_check, --dataset_class, --persistent_data_loader_workers, --highvram."""

from __future__ import annotations

import json
import os
import shutil
import textwrap

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from library.data.dataset import BatchSpec
from library.data.images import INTERPOLATIONS, default_interpolation, resize_image
from library.data.info_cache import INFO_CACHE_NAME
from library.data.latents import encode_batch, latent_seed, release_device_memory
from library.training.epoch_loader import EpochLoader
from tests.train_util import make_dataset, run_script
from train_network import main as train


def _args(models, out, *extra, data=None, steps=1):
    head = ["--train_data_dir", data] if data is not None else []
    return ["--pretrained_model_name_or_path", models["sd1"]["safetensors"], *head, "--resolution", "64",
            "--output_dir", out, "--network_module", "networks.lora", "--network_dim", "4",
            "--max_train_steps", str(steps), "--learning_rate", "1e-3", "--seed", "1",
            "--max_data_loader_n_workers", "0", *extra]


def _image(path, size, seed):
    rng = np.random.default_rng(seed)
    Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype(np.uint8)).save(path)


# ---------------------------------------------------------------------------------------- resize_interpolation


def test_resize_names_map_to_opencv_and_pillow():
    image = (np.random.default_rng(3).random((48, 40, 3)) * 255).astype(np.uint8)
    cv = {"nearest": cv2.INTER_NEAREST_EXACT, "bilinear": cv2.INTER_LINEAR, "linear": cv2.INTER_LINEAR,
          "bicubic": cv2.INTER_CUBIC, "cubic": cv2.INTER_CUBIC, "area": cv2.INTER_AREA}
    pil = {"lanczos": Image.Resampling.LANCZOS, "box": Image.Resampling.BOX}
    assert set(cv) | set(pil) == set(INTERPOLATIONS)
    for size in ((30, 20), (64, 72)):
        for name, flag in cv.items():
            np.testing.assert_array_equal(resize_image(image, size, name), cv2.resize(image, size, interpolation=flag))
        for name, flag in pil.items():
            np.testing.assert_array_equal(resize_image(image, size, name),
                                          np.asarray(Image.fromarray(image).resize(size, resample=flag)))
    # default: INTER_AREA when no side grows, Pillow LANCZOS otherwise (also when only one side grows)
    assert default_interpolation((40, 48), (30, 20)) == "area" and default_interpolation((40, 48), (50, 20)) == "lanczos"
    np.testing.assert_array_equal(resize_image(image, (30, 20)), cv2.resize(image, (30, 20), interpolation=cv2.INTER_AREA))
    np.testing.assert_array_equal(resize_image(image, (64, 72)), resize_image(image, (64, 72), "lanczos"))
    # a 4th channel (a loss mask) is resized on its own, not treated as alpha by Pillow
    rgba = np.concatenate([image, np.zeros_like(image[:, :, :1])], axis=2)
    np.testing.assert_array_equal(resize_image(rgba, (64, 72), "lanczos")[:, :, :3], resize_image(image, (64, 72), "lanczos"))
    with pytest.raises(ValueError, match="unknown resize interpolation"):
        resize_image(image, (30, 20), "fancy")


def test_resize_interpolation_decides_the_cached_latent(models, tmp_path):
    """--resize_interpolation bilinear: the cached latent is the VAE encoding of a hand-made cv2 INTER_LINEAR
    resize; the dataset key ``nearest`` (config beats nothing on the command line) rebuilds it differently."""
    from library.models.load import load_model

    data = tmp_path / "data"
    folder = data / "1_sks dog"
    folder.mkdir(parents=True)
    _image(folder / "img0.png", (96, 96), 5)
    out = tmp_path / "out"
    assert run_script(train, _args(models, out, "--cache_latents_to_disk", "--resize_interpolation", "bilinear",
                                   data=data)) == 0
    with safe_open(str(out / "last.safetensors"), "pt") as f:
        assert f.metadata()["ss_resize_interpolation"] == "bilinear"
    npz = folder / "img0.npz"
    with np.load(npz) as f:
        bilinear, meta = f["arr_0"], json.loads(str(f["sdtrain_meta"]))
    assert meta["resize_interpolation"] == "bilinear"
    vae = load_model(models["sd1"]["safetensors"]).vae
    pixels = np.asarray(Image.open(folder / "img0.png").convert("RGB"))
    by_hand = cv2.resize(pixels, (64, 64), interpolation=cv2.INTER_LINEAR)
    expected = encode_batch(vae, by_hand[None], [latent_seed(folder / "img0.png", 1, False)])[0]
    np.testing.assert_allclose(bilinear, expected, atol=1e-5)

    config = tmp_path / "data.toml"
    config.write_text(f"[general]\nresize_interpolation = 'nearest'\n[[datasets]]\nresolution = 64\n"
                      f"  [[datasets.subsets]]\n  image_dir = '{folder}'\n", encoding="utf-8")
    argv = _args(models, tmp_path / "out2", "--cache_latents_to_disk", "--dataset_config", config)
    assert run_script(train, argv) == 0
    with np.load(npz) as f:
        nearest = f["arr_0"]
    near_hand = cv2.resize(pixels, (64, 64), interpolation=cv2.INTER_NEAREST_EXACT)
    np.testing.assert_allclose(nearest, encode_batch(vae, near_hand[None], [latent_seed(folder / "img0.png", 1, False)])[0],
                               atol=1e-5)
    assert np.abs(nearest - bilinear).max() > 1e-3


def test_bad_resize_interpolation_is_one_line(models, tmp_path, capsys):
    data = make_dataset(tmp_path / "data", count=1)
    with pytest.raises(SystemExit) as stop:  # argparse choices: one line, exit 2 (library/cli.py)
        run_script(train, _args(models, tmp_path / "o", "--resize_interpolation", "fancy", data=data))
    assert stop.value.code == 2 and "invalid choice: 'fancy'" in capsys.readouterr().err
    config = tmp_path / "bad.toml"
    config.write_text(f"[[datasets]]\nresolution = 64\n  [[datasets.subsets]]\n  image_dir = '{data / '5_sks dog'}'\n"
                      "  resize_interpolation = 'fancy'\n", encoding="utf-8")
    assert run_script(train, _args(models, tmp_path / "o", "--dataset_config", config)) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "resize_interpolation" in errors[0] and "lanczos" in errors[0]


# ---------------------------------------------------------------------------------------- cache_info


def _dry_run(models, tmp_path, name, *extra):
    report = tmp_path / f"{name}.json"
    assert run_script(train, _args(models, tmp_path / name, "--dry_run_json", report, *extra)) == 0
    return json.loads(report.read_text(encoding="utf-8"))


def test_cache_info_writes_kohya_file_and_next_start_reads_it(models, tmp_path):
    data = make_dataset(tmp_path / "data", folder="1_sks dog", count=2, captions={0: "a caption"})
    folder = data / "1_sks dog"
    bucket = ["--resolution", "128", "--enable_bucket", "--bucket_no_upscale", "--min_bucket_reso", "64",
              "--max_bucket_reso", "256", "--bucket_reso_steps", "64"]  # one bucket per image size
    _dry_run(models, tmp_path, "first", "--train_data_dir", data, "--cache_info", *bucket)
    cache = json.loads((folder / INFO_CACHE_NAME).read_text(encoding="utf-8"))
    assert cache == {os.path.join(str(folder), "img0.png"): {"caption": "a caption", "resolution": [64, 64]},
                     os.path.join(str(folder), "img1.png"): {"caption": "sks dog", "resolution": [64, 64]}}
    # the next start takes sizes and captions from the file, not from the images and caption files
    cache[os.path.join(str(folder), "img1.png")] = {"caption": "from the cache", "resolution": [128, 64]}
    (folder / INFO_CACHE_NAME).write_text(json.dumps(cache), encoding="utf-8")
    report = _dry_run(models, tmp_path, "second", "--train_data_dir", data, "--cache_info", *bucket)
    seen = {os.path.basename(c["key"]): (c["caption"], c["bucket"]) for c in report["captions"]}
    assert seen["img1.png"] == ("from the cache", [128, 64]) and seen["img0.png"] == ("a caption", [64, 64])
    assert json.loads((folder / INFO_CACHE_NAME).read_text(encoding="utf-8")) == cache  # a valid cache stays
    plain = _dry_run(models, tmp_path, "plain", "--train_data_dir", data, *bucket)
    assert {os.path.basename(c["key"]): c["bucket"] for c in plain["captions"]}["img1.png"] == [64, 64]
    # an image added to the folder makes the file stale: everything is read again and the file rewritten
    _image(folder / "img2.png", (64, 128), 9)
    report = _dry_run(models, tmp_path, "third", "--train_data_dir", data, "--cache_info", *bucket)
    seen = {os.path.basename(c["key"]): c["bucket"] for c in report["captions"]}
    assert seen["img1.png"] == [64, 64] and seen["img2.png"] == [64, 128]
    assert len(json.loads((folder / INFO_CACHE_NAME).read_text(encoding="utf-8"))) == 3


def test_cache_info_never_uses_or_replaces_a_foreign_file(models, tmp_path):
    data = make_dataset(tmp_path / "data", folder="1_sks dog", count=2)
    mine = data / "1_sks dog" / INFO_CACHE_NAME
    mine.write_text('{"my": "notes"}', encoding="utf-8")
    config = tmp_path / "d.toml"
    config.write_text(f"[[datasets]]\nresolution = 64\n  [[datasets.subsets]]\n  image_dir = '{data / '1_sks dog'}'\n"
                      "  cache_info = true\n", encoding="utf-8")
    report = _dry_run(models, tmp_path, "run", "--dataset_config", config)
    assert len(report["captions"]) == 2
    assert mine.read_text(encoding="utf-8") == '{"my": "notes"}'


# ---------------------------------------------------------------------------------------- --skip_cache_check


def test_skip_cache_check_trusts_a_stale_cache(models, tmp_path):
    data = make_dataset(tmp_path / "data", folder="1_sks dog", count=1)
    image, npz = data / "1_sks dog" / "img0.png", data / "1_sks dog" / "img0.npz"
    assert run_script(train, _args(models, tmp_path / "a", "--cache_latents_to_disk", data=data)) == 0
    made = npz.read_bytes()
    _image(image, (64, 64), 99)  # another picture: the cache is well-formed but stale
    assert run_script(train, _args(models, tmp_path / "b", "--cache_latents_to_disk", "--skip_cache_check",
                                   data=data)) == 0
    assert npz.read_bytes() == made  # used as it was
    assert run_script(train, _args(models, tmp_path / "c", "--cache_latents_to_disk", data=data)) == 0
    assert npz.read_bytes() != made  # checked: rebuilt from the new picture


def test_highvram_keeps_memory_on_the_cpu_path(models, tmp_path):
    """On the CPU there is no accelerator cache to release (the release runs on CUDA / MPS only); the run
    with --highvram caches the same latents as without."""
    assert release_device_memory(torch.device("cpu")) is False
    data = make_dataset(tmp_path / "data", folder="1_sks dog", count=1)
    npz = data / "1_sks dog" / "img0.npz"
    assert run_script(train, _args(models, tmp_path / "a", "--cache_latents_to_disk", data=data)) == 0
    first = np.load(npz)["arr_0"]
    npz.unlink()
    assert run_script(train, _args(models, tmp_path / "b", "--cache_latents_to_disk", "--highvram", data=data)) == 0
    np.testing.assert_array_equal(np.load(npz)["arr_0"], first)


# ---------------------------------------------------------------------------------------- --dataset_class

USER_MODULE = '''
import json, os
import torch


class TinyBatches:
    """Two batches of two 64 px images, deterministic per index; records what it was given."""

    def __init__(self, tokenizer, max_token_length, resolution, debug_dataset):
        self.log = os.environ["TINY_LOG"]
        with open(self.log, "a") as f:
            f.write(json.dumps({"init": [max_token_length, list(resolution), debug_dataset,
                                         tokenizer is not None]}) + "\\n")

    def __len__(self):
        return 2

    def set_current_epoch(self, epoch):
        self.epoch = epoch

    def __getitem__(self, index):
        with open(self.log, "a") as f:
            f.write(json.dumps({"item": index, "epoch": self.epoch}) + "\\n")
        g = torch.Generator().manual_seed(index)
        return {"images": torch.rand(2, 3, 64, 64, generator=g) * 2 - 1,
                "captions": [f"sks dog {index}", "sks cat"], "loss_weights": [1.0, 0.5], "latents": None}


class NoItems:
    def __len__(self):
        return 1


class BadItems(TinyBatches):
    def __getitem__(self, index):
        return {"images": torch.zeros(1, 3, 64, 64)}
'''


@pytest.fixture()
def user_module(tmp_path, monkeypatch):
    folder = tmp_path / "usermods"
    folder.mkdir()
    (folder / "tinydata.py").write_text(textwrap.dedent(USER_MODULE), encoding="utf-8")
    monkeypatch.syspath_prepend(str(folder))  # as PYTHONPATH=<folder> does
    monkeypatch.setenv("TINY_LOG", str(tmp_path / "log.jsonl"))
    return tmp_path / "log.jsonl"


def test_dataset_class_trains_from_the_users_batches(models, tmp_path, user_module):
    argv = _args(models, tmp_path / "out", "--dataset_class", "tinydata.TinyBatches", steps=4)
    assert run_script(train, argv) == 0
    records = [json.loads(line) for line in user_module.read_text().splitlines()]
    assert records[0] == {"init": [None, [64, 64], False, True]}
    items = [(r["epoch"], r["item"]) for r in records[1:]]
    assert len(items) == 4 and sorted(i for e, i in items if e == 1) == [0, 1] and \
        sorted(i for e, i in items if e == 2) == [0, 1]  # every batch once per epoch, epochs told to the class
    with safe_open(str(tmp_path / "out" / "last.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["ss_num_batches_per_epoch"] == "2" and meta["ss_num_epochs"] == "2"
    # the same run again: the same weights (batch order seeded)
    assert run_script(train, _args(models, tmp_path / "again", "--dataset_class", "tinydata.TinyBatches", steps=4)) == 0
    a, b = load_file(str(tmp_path / "out" / "last.safetensors")), load_file(str(tmp_path / "again" / "last.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name, message", [
    ("nosuchmodule.Data", "cannot import module 'nosuchmodule'"),
    ("tinydata.Missing", "has no class 'Missing'"),
    ("tinydata.NoItems", "has no __getitem__"),
    ("tinydata.BadItems", "must be a dict with 'captions'"),
    ("Data", "must be 'package.module.Class'"),
])
def test_dataset_class_errors_are_one_line(models, tmp_path, user_module, capsys, name, message):
    assert run_script(train, _args(models, tmp_path / "out", "--dataset_class", name)) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0]


def test_dataset_class_refuses_options_that_need_images(models, tmp_path, user_module, capsys):
    assert run_script(train, _args(models, tmp_path / "out", "--dataset_class", "tinydata.TinyBatches",
                                   "--cache_latents")) == 2
    assert "--cache_latents cannot be used with --dataset_class" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------- persistent workers


class _PidGroup:
    """A minimal dataset group: three one-item batches per epoch whose batch says which process built it."""

    def __len__(self):
        return 3

    def epoch_batches(self, epoch):
        order = [(i + epoch) % 3 for i in range(3)]
        return [BatchSpec(0, (8, 8), (i,)) for i in order]

    def load_batch(self, spec, epoch, position, step=0):
        return {"pid": os.getpid(), "item": spec.items[0], "epoch": epoch, "step": step,
                "loss_weights": torch.ones(1)}


@pytest.mark.parametrize("persistent", [True, False])
def test_loader_workers_live_across_epochs_only_when_persistent(persistent):
    loader = EpochLoader(_PidGroup(), rank=0, world=1, accumulation=1, num_workers=1, persistent_workers=persistent)
    first = list(loader.for_epoch(1, 0, 0))
    second = list(loader.for_epoch(2, 1, 4))  # resumed at the second batch of epoch 2
    assert [(b["epoch"], b["item"], b["step"]) for b in first] == [(1, 1, 0), (1, 2, 1), (1, 0, 2)]
    assert [(b["epoch"], b["item"], b["step"]) for b in second] == [(2, 0, 4), (2, 1, 5)]
    pids = {b["pid"] for b in first}, {b["pid"] for b in second}
    assert os.getpid() not in pids[0] | pids[1] and len(pids[0]) == len(pids[1]) == 1
    assert (pids[0] == pids[1]) is persistent


def test_resume_with_persistent_workers_is_bit_identical(models, tmp_path):
    """6 steps over 3 epochs with one persistent worker == 3 steps (mid-epoch), save state, resume to 6."""
    data = make_dataset(tmp_path / "data", folder="1_sks dog", count=2, captions={0: "sks dog, grass, sun"})
    extra = ["--persistent_data_loader_workers", "--shuffle_caption", "--flip_aug", "--network_dropout", "0.1"]

    def argv(out, *more):
        args = _args(models, out, *extra, *more, data=data, steps=6)
        args[args.index("--max_data_loader_n_workers") + 1] = "1"
        return args

    assert run_script(train, argv(tmp_path / "a")) == 0
    assert run_script(train, argv(tmp_path / "b", "--save_every_n_steps", "3", "--save_state")) == 0
    (tmp_path / "b" / "last.safetensors").unlink()
    shutil.rmtree(tmp_path / "b" / "last-state", ignore_errors=True)
    assert run_script(train, argv(tmp_path / "b", "--resume", tmp_path / "b" / "at-step00000003-state")) == 0
    a, b = load_file(str(tmp_path / "a" / "last.safetensors")), load_file(str(tmp_path / "b" / "last.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
