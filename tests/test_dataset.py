"""Datasets end to end: blueprint -> entries -> buckets -> deterministic batches, from TOML and legacy options."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from library.cli import run_main
from library.config import load_dataset_blueprint
from library.data.dataset import build_dataset_group, check_cache_compatibility
from library.errors import UserError
from library.models.tokenizer import load_tokenizer
from library.dataset_debug import build_parser
from library.option_groups import Options


def blueprint_from(args, config, **support):
    """``load_dataset_blueprint`` with the option groups of the parsed ``args``."""
    opts = Options.from_args(args)
    return load_dataset_blueprint(opts.data, opts.validation, config, given=opts.given, **support)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SDTRAIN_CACHE_DIR", str(tmp_path / "cache"))


def make_image(path: Path, size: tuple[int, int], color=(200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(abs(hash(path.name)) % 2**32)
    arr = (rng.random((size[1], size[0], 3)) * 255).astype(np.uint8)
    arr[..., 0] = color[0]
    Image.fromarray(arr).save(path)
    return path


def parse(argv) -> object:
    args, unknown = build_parser("t.py", support_dreambooth=True, support_caption=True,
                                 support_caption_dropout=True).parse_known_args([str(a) for a in argv])
    assert not unknown
    return args


def group_from(argv, seed=1, tokenizer=None, config=None, **kw):
    args = parse(argv)
    blueprint = blueprint_from(args, config)
    return build_dataset_group(blueprint, seed=seed, tokenizer=tokenizer, max_token_length=args.max_token_length,
                               weighted_captions=args.weighted_captions, **kw)


@pytest.fixture()
def db_folders(tmp_path):
    train = tmp_path / "train" / "5_sks dog"
    for i in range(3):
        make_image(train / f"t{i}.png", (64, 64))
    (train / "t0.caption").write_text("sks dog, running, park", encoding="utf-8")
    reg = tmp_path / "reg" / "1_dog"
    for i in range(10):
        make_image(reg / f"r{i:02d}.jpg", (64, 64))
    return tmp_path


def test_legacy_dreambooth_folders_with_reg_balancing(db_folders):
    group = group_from(["--train_data_dir", db_folders / "train", "--reg_data_dir", db_folders / "reg",
                        "--resolution", "64", "--train_batch_size", "4"])
    (ds,) = group.datasets
    train = [e for e in ds.entries if not e.is_reg]
    reg = [e for e in ds.entries if e.is_reg]
    assert len(train) == 3 and all(e.num_repeats == 5 for e in train)
    # 15 training samples: 10 reg images once each, then one more pass adds a repeat to the first 5
    assert [e.num_repeats for e in reg] == [2] * 5 + [1] * 5
    assert ds.num_samples == 30 and len(group) == 8  # one bucket, ceil(30 / 4)
    captions = {Path(e.key).name: e.caption for e in train}
    assert captions == {"t0.png": "sks dog, running, park", "t1.png": "sks dog", "t2.png": "sks dog"}


def test_prior_loss_weight_and_batch_contents(db_folders):
    tok = load_tokenizer(False)
    group = group_from(["--train_data_dir", db_folders / "train", "--reg_data_dir", db_folders / "reg",
                        "--resolution", "64", "--train_batch_size", "30", "--prior_loss_weight", "0.25"],
                       tokenizer=tok)
    (spec,) = group.epoch_batches(1)
    batch = group.load_batch(spec, 1, 0)
    assert batch["images"].shape == (30, 3, 64, 64)
    assert batch["images"].min() >= -1 and batch["images"].max() <= 1
    assert batch["input_ids"].shape == (30, 1, 77)
    weights = dict(zip(batch["keys"], batch["loss_weights"].tolist()))
    assert {w for k, w in weights.items() if "/reg/" in k} == {0.25}
    assert {w for k, w in weights.items() if "/train/" in k} == {1.0}
    assert sum(batch["is_reg"]) == 15


def _batch_signature(group, epoch):
    out = []
    for pos, spec in enumerate(group.epoch_batches(epoch)):
        b = group.load_batch(spec, epoch, pos)
        out.append((tuple(b["keys"]), tuple(b["captions"]), tuple(b["flipped"]), float(b["images"].sum())))
    return out


def test_same_seed_and_epoch_give_the_same_batches(db_folders):
    argv = ["--train_data_dir", db_folders / "train", "--resolution", "64", "--train_batch_size", "2",
            "--shuffle_caption", "--flip_aug"]
    a, b = group_from(argv, seed=3), group_from(argv, seed=3)
    assert _batch_signature(a, 2) == _batch_signature(b, 2)
    assert [s.items for s in a.epoch_batches(1)] != [s.items for s in a.epoch_batches(2)]
    assert [s.items for s in a.epoch_batches(1)] != [s.items for s in group_from(argv, seed=4).epoch_batches(1)]
    # a batch does not depend on which batches were built before it (workers, mid-epoch resume)
    specs = a.epoch_batches(2)
    late_first = a.load_batch(specs[5], 2, 5)
    for pos in range(5):
        a.load_batch(specs[pos], 2, pos)
    again = a.load_batch(specs[5], 2, 5)
    assert late_first["captions"] == again["captions"] and torch.equal(late_first["images"], again["images"])


def test_buckets_from_toml_with_two_datasets(tmp_path):
    for i in range(3):
        make_image(tmp_path / "a" / f"w{i}.png", (256, 96))  # aspect 2.67 -> bucket (192, 64)
    for i in range(2):
        make_image(tmp_path / "a" / f"t{i}.png", (96, 256))  # -> (64, 192)
    make_image(tmp_path / "b" / "sq.png", (80, 80))
    config = tmp_path / "c.toml"
    config.write_text(f"""
[general]
enable_bucket = true
min_bucket_reso = 64
max_bucket_reso = 256
bucket_reso_steps = 64
[[datasets]]
resolution = 128
batch_size = 2
  [[datasets.subsets]]
  image_dir = '{tmp_path / "a"}'
  class_tokens = 'zkz'
  num_repeats = 2
[[datasets]]
resolution = 64
batch_size = 1
  [[datasets.subsets]]
  image_dir = '{tmp_path / "b"}'
  class_tokens = 'other'
""", encoding="utf-8")
    group = group_from([], config=config)
    first, second = group.datasets
    assigned = {Path(e.key).name: a.bucket for e, a in zip(first.entries, first.assignments)}
    assert assigned == {"t0.png": (64, 192), "t1.png": (64, 192), "w0.png": (192, 64), "w1.png": (192, 64),
                        "w2.png": (192, 64)}
    buckets = {r: len(v) for r, v in first.buckets.items()}
    assert buckets == {(64, 192): 4, (192, 64): 6}  # repeats 2
    assert list(second.buckets) == [(64, 64)]
    assert len(group) == sum(-(-n // 2) for n in buckets.values()) + 1
    for pos, spec in enumerate(group.epoch_batches(1)):
        batch = group.load_batch(spec, 1, pos)
        w, h = spec.bucket
        assert batch["images"].shape[2:] == (h, w)
        assert len(batch["keys"]) <= (2 if spec.dataset == 0 else 1)


def test_finetuning_metadata_with_precomputed_latents(tmp_path):
    from library.data.latents import save_latent_npz

    folder = tmp_path / "ft"
    meta = {}
    for i in range(3):
        make_image(folder / f"img{i}.jpg", (128, 64))
        save_latent_npz(folder / f"img{i}.npz", np.full((4, 8, 16), i, dtype=np.float32))
        meta[f"img{i}"] = {"caption": f"caption {i}", "tags": "tag a, tag b", "train_resolution": [128, 64]}
    meta_path = tmp_path / "meta.json"
    meta_path.write_text(json.dumps(meta), encoding="utf-8")
    group = group_from(["--train_data_dir", folder, "--in_json", meta_path, "--train_batch_size", "3"],
                       tokenizer=load_tokenizer(False))
    assert group.precomputed_ok
    (spec,) = group.epoch_batches(1)
    batch = group.load_batch(spec, 1, 0)
    assert batch["images"] is None and batch["latents"].shape == (3, 4, 8, 16)
    assert sorted(batch["captions"]) == [f"caption {i}, tag a, tag b" for i in range(3)]
    by_key = dict(zip(batch["keys"], batch["latents"]))
    assert float(by_key["img2"].mean()) == 2.0


def test_corrupt_and_empty_images_are_reported_once_and_left_out(db_folders, caplog):
    folder = db_folders / "train" / "5_sks dog"
    (folder / "empty.png").write_bytes(b"")
    (folder / "garbage.jpg").write_bytes(b"this is not a jpeg" * 10)
    good = (folder / "t1.png").read_bytes()
    with caplog.at_level(logging.WARNING):
        group = group_from(["--train_data_dir", db_folders / "train", "--resolution", "64"])
    summary = [r.message for r in caplog.records if "unreadable" in r.message]
    assert len(summary) == 1 and "empty.png" in summary[0] and "garbage.jpg" in summary[0]
    assert len(group.datasets[0].entries) == 3
    # a file whose header is fine but whose pixels are cut off is skipped when its batch is built
    (folder / "t1.png").write_bytes(good[: len(good) // 2])
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        batches = [group.load_batch(spec, 1, pos) for pos, spec in enumerate(group.epoch_batches(1))]
    keys = [k for b in batches if b is not None for k in b["keys"]]
    assert batches.count(None) == 5  # batch size 1: the 5 repeats of the broken image
    assert not any(k.endswith("t1.png") for k in keys) and len(keys) == 10
    assert len([r for r in caplog.records if "t1.png" in r.message]) == 1  # reported once


def test_small_images_get_a_warning(tmp_path, caplog):
    make_image(tmp_path / "d" / "1_x" / "tiny.png", (16, 16))
    with caplog.at_level(logging.WARNING):
        group_from(["--train_data_dir", tmp_path / "d", "--resolution", "64"])
    assert any("tiny.png" in r.message and "quarter" in r.message for r in caplog.records)


def test_long_and_weighted_captions_in_batches(db_folders):
    tok = load_tokenizer(False)
    (db_folders / "train" / "5_sks dog" / "t1.caption").write_text("(sks dog:1.5), [park]", encoding="utf-8")
    group = group_from(["--train_data_dir", db_folders / "train", "--resolution", "64", "--train_batch_size", "15",
                        "--max_token_length", "150", "--weighted_captions"], tokenizer=tok)
    (spec,) = group.epoch_batches(1)
    batch = group.load_batch(spec, 1, 0)
    # weighted captions use as many 75-token chunks as the longest caption of the batch needs (here 1)
    assert batch["input_ids"].shape == (15, 1, 77) and batch["token_weights"].shape == (15, 1, 77)
    i = batch["keys"].index(str(db_folders / "train" / "5_sks dog" / "t1.png"))
    assert pytest.approx(float(batch["token_weights"][i, 0, 1])) == 1.5


def test_long_captions_give_chunked_input_ids(db_folders):
    group = group_from(["--train_data_dir", db_folders / "train", "--resolution", "64", "--train_batch_size", "15",
                        "--max_token_length", "225"], tokenizer=load_tokenizer(True))
    (spec,) = group.epoch_batches(1)
    ids = group.load_batch(spec, 1, 0)["input_ids"]
    assert ids.shape == (15, 3, 77)
    assert ids[0, 2, 1] == 49407 and ids[0, 2, 2] == 0  # empty SD2 chunk: BOS, EOS, pad "!"...


def test_cached_latents_refuse_pixel_augmentations(db_folders):
    args = parse(["--train_data_dir", db_folders / "train", "--resolution", "64", "--color_aug"])
    blueprint = blueprint_from(args, None)
    with pytest.raises(UserError, match="color_aug.*cache_latents"):
        check_cache_compatibility(blueprint, True)
    check_cache_compatibility(blueprint, False)


def test_size_index_makes_a_second_scan_reuse_sizes(tmp_path, monkeypatch):
    from library.data import size_index

    folder = tmp_path / "imgs"
    paths = [str(make_image(folder / f"{i}.png", (32 + i, 40))) for i in range(5)]
    calls = []
    real = size_index.read_image_sizes
    monkeypatch.setattr(size_index, "read_image_sizes", lambda p, workers=None: (calls.append(list(p)), real(p))[1])
    sizes, _ = size_index.cached_image_sizes(paths)
    assert sizes[paths[3]] == (35, 40) and len(calls[0]) == 5
    sizes, _ = size_index.cached_image_sizes(paths)
    assert len(calls) == 1, "second scan must come from the index"
    make_image(Path(paths[3]), (50, 20))  # changed file: read again, only that one
    sizes, _ = size_index.cached_image_sizes(paths)
    assert sizes[paths[3]] == (50, 20) and calls[1] == [paths[3]]


def test_debug_dataset_from_the_cli_writes_contact_sheets(db_folders, tmp_path, capsys):
    from train_network import main

    out = tmp_path / "sheets"
    code = run_main(main, ["--train_data_dir", str(db_folders / "train"), "--resolution", "64",
                           "--train_batch_size", "5", "--shuffle_caption", "--debug_dataset",
                           "--debug_dataset_dir", str(out), "--seed", "7", "--network_module", "networks.lora"])
    assert code == 0
    printed = capsys.readouterr().out
    sheets = sorted(out.glob("*.png"))
    assert len(sheets) == 3 and sheets[0].name == "epoch001_batch00000.png"
    assert "sks dog" in printed and "t0.png" in printed
    with Image.open(sheets[0]) as im:
        assert im.width > 64 and im.height > 64


def test_min_bucket_reso_below_steps_is_a_config_error(tmp_path):
    make_image(tmp_path / "d" / "1_x" / "a.png", (64, 64))
    args = parse(["--train_data_dir", tmp_path / "d", "--resolution", "128", "--enable_bucket",
                  "--min_bucket_reso", "32", "--bucket_reso_steps", "64"])
    with pytest.raises(UserError, match="min_bucket_reso 32 must be at least bucket_reso_steps 64"):
        blueprint_from(args, None)


def test_images_fitting_no_bucket_are_left_out_with_a_warning(tmp_path, caplog):
    make_image(tmp_path / "d" / "1_x" / "ok.png", (128, 128))
    make_image(tmp_path / "d" / "1_x" / "sliver.png", (40, 300))  # narrower than one 64-px step
    with caplog.at_level(logging.WARNING):
        group = group_from(["--train_data_dir", tmp_path / "d", "--resolution", "128", "--enable_bucket",
                            "--min_bucket_reso", "64", "--bucket_no_upscale"])
    assert [Path(e.key).name for e in group.datasets[0].entries] == ["ok.png"]
    assert any("sliver.png" in r.message and "fit no bucket" in r.message for r in caplog.records)
