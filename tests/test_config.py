"""Dataset configuration layer: TOML/JSON configs, the command-line fallback, the cascade and the errors."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import pytest
from PIL import Image

from library.cli import run_main
from library.config import (
    BlueprintSubset,
    DatasetBlueprint,
    add_config_arguments,
    add_dataset_arguments,
    load_dataset_blueprint,
    parse_resolution_option,
    split_folder_name,
)
from library.errors import UserError
from library.option_groups import Options

# ----------------------------------------------------------------------------------------------- helpers


def blueprint_from(args, config, **support):
    """``load_dataset_blueprint`` with the option groups of the parsed ``args``."""
    opts = Options.from_args(args)
    return load_dataset_blueprint(opts.data, opts.validation, config, given=opts.given, **support)


def make_images(folder: Path, count: int = 2) -> Path:
    """Create ``folder`` with ``count`` tiny PNG files."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(folder / f"img{i}.png")
    return folder


def make_metadata(path: Path) -> Path:
    """Write a minimal fine-tuning metadata json."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"img0": {"caption": "a cat"}}), encoding="utf-8")
    return path


def parse(argv: Sequence[str], *, dreambooth: bool = True, caption: bool = True, dropout: bool = True
          ) -> argparse.Namespace:
    """Parse ``argv`` with the dataset options (plus the few training options the blueprint reads)."""
    parser = argparse.ArgumentParser()
    add_dataset_arguments(parser, support_dreambooth=dreambooth, support_caption=caption,
                          support_caption_dropout=dropout)
    add_config_arguments(parser)
    parser.add_argument("--train_batch_size", type=int, default=1)
    parser.add_argument("--max_token_length", type=int, default=None, choices=[None, 150, 225])
    parser.add_argument("--prior_loss_weight", type=float, default=1.0)
    return parser.parse_args(list(argv))


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def q(path: Path) -> str:
    """A path as a TOML literal string."""
    return "'" + str(path) + "'"


def one_subset(image_dir: Path, subset_lines: str = "", dataset_lines: str = "resolution = 512") -> str:
    """A config with one DreamBooth dataset holding one subset."""
    return f"[[datasets]]\n{dataset_lines}\n[[datasets.subsets]]\nimage_dir = {q(image_dir)}\n{subset_lines}\n"


def load(config: Path, argv: Sequence[str] = (), **support: bool) -> DatasetBlueprint:
    return blueprint_from(parse(argv), config, **support)


def config_error(tmp_path: Path, text: str, argv: Sequence[str] = (), **support: bool) -> str:
    """Load a config that must fail; return the one-line message."""
    config = write(tmp_path / "bad.toml", text)
    with pytest.raises(UserError) as info:
        load(config, argv, **support)
    message = str(info.value)
    assert "\n" not in message
    assert "bad.toml" in message
    return message


@pytest.fixture()
def dirs(tmp_path: Path) -> dict[str, Path]:
    return {
        "hoge": make_images(tmp_path / "hoge"),
        "fuga": make_images(tmp_path / "fuga"),
        "reg": make_images(tmp_path / "reg"),
        "piyo": make_images(tmp_path / "piyo"),
        "md": make_metadata(tmp_path / "piyo" / "piyo_md.json"),
    }


# ---------------------------------------------------------------------------------------- from a config


def test_readme_example_dreambooth_and_finetuning(tmp_path: Path, dirs: dict[str, Path]) -> None:
    config = write(tmp_path / "x.toml", f"""
[general]
shuffle_caption = true
caption_extension = '.txt'
keep_tokens = 1

[[datasets]]
resolution = 512
batch_size = 4
keep_tokens = 2

  [[datasets.subsets]]
  image_dir = {q(dirs['hoge'])}
  class_tokens = 'hoge girl'

  [[datasets.subsets]]
  image_dir = {q(dirs['fuga'])}
  class_tokens = 'fuga boy'
  keep_tokens = 3

  [[datasets.subsets]]
  is_reg = true
  image_dir = {q(dirs['reg'])}
  class_tokens = 'human'
  keep_tokens = 1

[[datasets]]
resolution = [768, 768]
batch_size = 2

  [[datasets.subsets]]
  image_dir = {q(dirs['piyo'])}
  metadata_file = {q(dirs['md'])}
""")
    blueprint = load(config)
    assert blueprint.source == str(config)
    db, ft = blueprint.datasets
    assert db.style == "dreambooth" and db.is_dreambooth
    assert (db.resolution, db.batch_size) == ((512, 512), 4)
    assert [s.keep_tokens for s in db.subsets] == [2, 3, 1]
    assert [s.class_tokens for s in db.subsets] == ["hoge girl", "fuga boy", "human"]
    assert [s.is_reg for s in db.subsets] == [False, False, True]
    assert all(s.caption_extension == ".txt" and s.shuffle_caption for s in db.subsets)
    assert db.subsets[0].image_dir == str(dirs["hoge"])
    assert ft.style == "finetuning" and not ft.is_dreambooth
    assert (ft.resolution, ft.batch_size) == ((768, 768), 2)
    (piyo,) = ft.subsets
    assert piyo.is_finetuning and piyo.metadata_file == str(dirs["md"])
    assert piyo.keep_tokens == 1 and piyo.class_tokens is None and not piyo.is_reg
    assert "2 dataset(s)" in blueprint.summary()


def test_finetuning_without_resolution_and_image_dir(tmp_path: Path, dirs: dict[str, Path]) -> None:
    config = write(tmp_path / "ft.toml", f"""
[[datasets]]
  [[datasets.subsets]]
  metadata_file = {q(dirs['md'])}
  num_repeats = 3
""")
    (ds,) = load(config, support_dreambooth=False).datasets
    assert ds.style == "finetuning" and ds.resolution is None
    assert ds.subsets[0].image_dir is None and ds.subsets[0].num_repeats == 3


def test_json_config(tmp_path: Path, dirs: dict[str, Path]) -> None:
    document = {"general": {"flip_aug": True},
                "datasets": [{"resolution": [512, 768], "subsets": [{"image_dir": str(dirs["hoge"])}]}]}
    config = write(tmp_path / "c.json", json.dumps(document))
    (ds,) = load(config).datasets
    assert ds.resolution == (512, 768) and ds.subsets[0].flip_aug


def test_blueprint_is_frozen(tmp_path: Path, dirs: dict[str, Path]) -> None:
    blueprint = load(write(tmp_path / "c.toml", one_subset(dirs["hoge"])))
    with pytest.raises(dataclasses.FrozenInstanceError):
        blueprint.datasets[0].subsets[0].num_repeats = 5  # type: ignore[misc]
    assert isinstance(blueprint.datasets, tuple) and isinstance(blueprint.datasets[0].subsets, tuple)
    subset = BlueprintSubset(image_dir="x")
    assert not subset.is_finetuning and subset.caption_extension == ".caption" and subset.token_warmup_min == 1


def test_cascade_subset_dataset_general_command_line(tmp_path: Path, dirs: dict[str, Path]) -> None:
    config = write(tmp_path / "c.toml", f"""
[general]
keep_tokens = 1
color_aug = true
min_bucket_reso = 128

[[datasets]]
keep_tokens = 2
enable_bucket = true

  [[datasets.subsets]]
  image_dir = {q(dirs['hoge'])}
  keep_tokens = 3
  caption_dropout_rate = 1

  [[datasets.subsets]]
  image_dir = {q(dirs['fuga'])}

[[datasets]]
resolution = [256, 320]

  [[datasets.subsets]]
  image_dir = {q(dirs['reg'])}
  num_repeats = 2
""")
    argv = ["--resolution", "512,768", "--train_batch_size", "3", "--dataset_repeats", "7", "--flip_aug",
            "--keep_tokens", "9", "--caption_extention", ".tags", "--token_warmup_step", "0.5",
            "--face_crop_aug_range", "2,4", "--max_token_length", "225", "--prior_loss_weight", "0.5"]
    first, second = load(config, argv).datasets
    hoge, fuga = first.subsets
    (reg,) = second.subsets
    assert (hoge.keep_tokens, fuga.keep_tokens, reg.keep_tokens) == (3, 2, 1)  # subset > dataset > general
    assert hoge.caption_dropout_rate == 1.0 and isinstance(hoge.caption_dropout_rate, float)
    assert fuga.caption_dropout_rate == 0.0
    assert all(s.color_aug for s in (hoge, fuga, reg))  # general
    assert all(s.flip_aug for s in (hoge, fuga, reg))  # command line
    assert (hoge.num_repeats, fuga.num_repeats, reg.num_repeats) == (7, 7, 2)  # --dataset_repeats fallback
    assert hoge.caption_extension == ".tags"  # legacy spelling wins
    assert hoge.token_warmup_step == 0.5 and hoge.face_crop_aug_range == (2.0, 4.0)
    assert first.resolution == (512, 768) and second.resolution == (256, 320)
    assert first.batch_size == second.batch_size == 3
    assert first.enable_bucket and not second.enable_bucket
    assert first.min_bucket_reso == 128 and first.max_bucket_reso == 1024
    assert first.max_token_length == 225 and first.prior_loss_weight == 0.5


def test_builtin_defaults_when_options_absent(tmp_path: Path, dirs: dict[str, Path]) -> None:
    config = write(tmp_path / "c.toml", one_subset(dirs["hoge"]))
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    (ds,) = blueprint_from(parser.parse_args([]), config).datasets
    sub = ds.subsets[0]
    assert (ds.batch_size, ds.min_bucket_reso, ds.max_bucket_reso, ds.bucket_reso_steps) == (1, 256, 1024, 64)
    assert (sub.num_repeats, sub.caption_extension, sub.token_warmup_min, sub.token_warmup_step) == (1, ".caption", 1, 0.0)
    assert ds.max_token_length is None and ds.prior_loss_weight == 1.0


def test_duplicate_subsets_ignored_within_dataset_only(tmp_path: Path, dirs: dict[str, Path],
                                                       caplog: pytest.LogCaptureFixture) -> None:
    config = write(tmp_path / "c.toml", f"""
[[datasets]]
resolution = 512
  [[datasets.subsets]]
  image_dir = {q(dirs['hoge'])}
  num_repeats = 2
  [[datasets.subsets]]
  image_dir = {q(dirs['hoge'])}
  num_repeats = 5
  [[datasets.subsets]]
  image_dir = {q(dirs['fuga'])}
  num_repeats = 0

[[datasets]]
resolution = 768
max_bucket_reso = 2048
  [[datasets.subsets]]
  image_dir = {q(dirs['hoge'])}

[[datasets]]
  [[datasets.subsets]]
  metadata_file = {q(dirs['md'])}
  [[datasets.subsets]]
  metadata_file = {q(dirs['md'])}
  image_dir = {q(dirs['piyo'])}
""")
    with caplog.at_level(logging.WARNING):
        first, second, third = load(config).datasets
    assert [s.num_repeats for s in first.subsets] == [2]
    assert len(second.subsets) == 1 and second.subsets[0].image_dir == str(dirs["hoge"])
    assert len(third.subsets) == 1 and third.subsets[0].image_dir is None
    text = caplog.text
    assert "datasets[0].subsets[1]" in text and "duplicate" in text
    assert "datasets[0].subsets[2]" in text and "num_repeats" in text
    assert "datasets[2].subsets[1]" in text


# ------------------------------------------------------------------------------ command-line fallback


def test_command_line_dreambooth_folders(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    train = tmp_path / "train"
    make_images(train / "10_sks dog")
    make_images(train / "3_a_b c")
    make_images(train / "notes")
    make_images(train / "0_zero")
    (train / "stray.png").write_bytes(b"")
    make_images(tmp_path / "reg" / "1_dog")
    argv = ["--train_data_dir", str(train), "--reg_data_dir", str(tmp_path / "reg"), "--resolution", "512",
            "--enable_bucket", "--caption_extension", ".txt", "--shuffle_caption", "--keep_tokens", "1",
            "--train_batch_size", "2", "--caption_tag_dropout_rate", "0.1"]
    with caplog.at_level(logging.WARNING):
        blueprint = blueprint_from(parse(argv), None)
    assert blueprint.source is None
    (ds,) = blueprint.datasets
    assert ds.style == "dreambooth" and ds.resolution == (512, 512) and ds.enable_bucket and ds.batch_size == 2
    assert [(Path(s.image_dir).name, s.num_repeats, s.class_tokens, s.is_reg) for s in ds.subsets] == [
        ("10_sks dog", 10, "sks dog", False),
        ("3_a_b c", 3, "a_b c", False),
        ("1_dog", 1, "dog", True),
    ]
    assert all(s.caption_extension == ".txt" and s.shuffle_caption and s.keep_tokens == 1 for s in ds.subsets)
    assert ds.subsets[0].caption_tag_dropout_rate == pytest.approx(0.1)
    assert "notes" in caplog.text and "0_zero" in caplog.text


def test_command_line_finetuning(tmp_path: Path, dirs: dict[str, Path]) -> None:
    argv = ["--train_data_dir", str(dirs["piyo"]), "--in_json", str(dirs["md"]), "--dataset_repeats", "4",
            "--color_aug"]
    (ds,) = blueprint_from(parse(argv), None).datasets
    assert ds.style == "finetuning" and ds.resolution is None
    (sub,) = ds.subsets
    assert sub.image_dir == str(dirs["piyo"]) and sub.metadata_file == str(dirs["md"])
    assert sub.num_repeats == 4 and sub.color_aug


def test_config_ignores_train_data_dir(tmp_path: Path, dirs: dict[str, Path],
                                       caplog: pytest.LogCaptureFixture) -> None:
    config = write(tmp_path / "c.toml", one_subset(dirs["hoge"]))
    with caplog.at_level(logging.INFO):
        blueprint = load(config, ["--train_data_dir", str(tmp_path / "nowhere"), "--in_json", "x.json"])
    assert blueprint.datasets[0].subsets[0].image_dir == str(dirs["hoge"])
    assert "--train_data_dir, --in_json are ignored" in caplog.text


@pytest.mark.parametrize(
    ("argv_factory", "expected"),
    [
        (lambda t: ["--resolution", "512"], "--train_data_dir is required"),
        (lambda t: ["--train_data_dir", str(t / "missing"), "--resolution", "512"], "does not exist"),
        (lambda t: ["--train_data_dir", str(t / "flat"), "--resolution", "512"], "not the image folder itself"),
        (lambda t: ["--train_data_dir", str(t / "named"), "--resolution", "512"], "['cats']"),
        (lambda t: ["--train_data_dir", str(t / "named"), "--resolution", "abc"], "--resolution"),
        (lambda t: ["--train_data_dir", str(t / "ok"), "--resolution", "512", "--face_crop_aug_range", "3,1"],
         "--face_crop_aug_range"),
        (lambda t: ["--train_data_dir", str(t / "ok")], "resolution is required"),
        (lambda t: ["--train_data_dir", str(t / "ok"), "--resolution", "512", "--enable_bucket",
                    "--min_bucket_reso", "640"], "min_bucket_reso 640"),
        (lambda t: ["--train_data_dir", str(t / "ok"), "--resolution", "512", "--keep_tokens", "-1"],
         "--keep_tokens: must be an integer >= 0"),
        (lambda t: ["--in_json", str(t / "missing.json")], "--in_json"),
    ],
)
def test_command_line_errors(tmp_path: Path, argv_factory, expected: str) -> None:
    make_images(tmp_path / "flat")
    make_images(tmp_path / "named" / "cats")
    make_images(tmp_path / "ok" / "5_cat")
    with pytest.raises(UserError) as info:
        blueprint_from(parse(argv_factory(tmp_path)), None)
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_command_line_finetuning_only_requires_in_json(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="--in_json"):
        blueprint_from(parse(["--train_data_dir", str(tmp_path)], dreambooth=False), None,
                               support_dreambooth=False)


def test_folder_name_and_resolution_parsing() -> None:
    assert split_folder_name("20_sls frog") == (20, "sls frog")
    assert split_folder_name("2_a_b") == (2, "a_b")
    assert split_folder_name("frog") is None
    assert parse_resolution_option("512") == (512, 512)
    assert parse_resolution_option("512,768") == (512, 768)
    assert parse_resolution_option(640) == (640, 640)
    for bad in ("512,768,1", "0", "-5", "x"):
        with pytest.raises(UserError, match="--resolution"):
            parse_resolution_option(bad)


def test_add_dataset_arguments_flags_follow_support() -> None:
    def options(**support: bool) -> set[str]:
        parser = argparse.ArgumentParser()
        add_dataset_arguments(parser, **support)
        return {opt for action in parser._actions for opt in action.option_strings}

    full = options(support_dreambooth=True, support_caption=True, support_caption_dropout=True)
    assert {"--reg_data_dir", "--in_json", "--dataset_repeats", "--caption_dropout_rate",
            "--caption_extention", "--token_warmup_min", "--bucket_no_upscale"} <= full
    db = options(support_dreambooth=True, support_caption=False, support_caption_dropout=True)
    assert "--in_json" not in db and "--dataset_repeats" not in db
    ti = options(support_dreambooth=True, support_caption=True, support_caption_dropout=False)
    assert "--caption_dropout_rate" not in ti
    ft = options(support_dreambooth=False, support_caption=True, support_caption_dropout=True)
    assert "--reg_data_dir" not in ft
    args = parse([])
    assert (args.caption_extension, args.keep_tokens, args.min_bucket_reso, args.max_bucket_reso,
            args.bucket_reso_steps, args.token_warmup_min, args.token_warmup_step, args.dataset_repeats) == (
        ".caption", 0, 256, 1024, 64, 1, 0, 1)
    assert args.resolution is None and args.caption_extention is None and args.dataset_config is None


# ---------------------------------------------------------------------------------------- config errors


def test_unknown_key_names_file_index_and_key(tmp_path: Path, dirs: dict[str, Path]) -> None:
    message = config_error(tmp_path, one_subset(dirs["hoge"]) + f"""
[[datasets.subsets]]
image_dir = {q(dirs['fuga'])}
shufle_caption = true
banana = 1
""")
    assert "datasets[0].subsets[1]" in message
    assert "unknown key 'shufle_caption' (did you mean 'shuffle_caption'?)" in message
    assert "unknown key 'banana'" in message and "; " in message  # both reported together


def test_known_misplaced_keys_get_hints(tmp_path: Path, dirs: dict[str, Path]) -> None:
    message = config_error(tmp_path, f"""
[general]
train_batch_size = 2
prior_loss_weight = 1.0
network_multiplier = 1.0
[[datasets]]
resolution = 512
  [[datasets.subsets]]
  image_dir = {q(dirs['hoge'])}
""")
    assert "[general]: unknown key 'train_batch_size': the dataset config calls it 'batch_size'" in message
    assert "--prior_loss_weight" in message and "'network_multiplier'" in message


def test_key_at_wrong_level(tmp_path: Path, dirs: dict[str, Path]) -> None:
    message = config_error(tmp_path, f"""
[general]
image_dir = {q(dirs['hoge'])}
[[datasets]]
resolution = 512
is_reg = true
  [[datasets.subsets]]
  image_dir = {q(dirs['hoge'])}
  batch_size = 2
""")
    assert "[general]: 'image_dir' is not allowed in [general]; it is allowed only in [[datasets.subsets]]" in message
    assert "datasets[0]: 'is_reg' is not allowed in [[datasets]]" in message
    assert ("datasets[0].subsets[0]: 'batch_size' is not allowed in [[datasets.subsets]]; "
            "it is allowed only in [general] or [[datasets]]") in message


def test_top_level_key_outside_tables(tmp_path: Path, dirs: dict[str, Path]) -> None:
    message = config_error(tmp_path, f"resolution = 512\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = {q(dirs['hoge'])}\n")
    assert "'resolution' must be inside a table: [general] or [[datasets]]" in message


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("keep_tokens = '2'", "'keep_tokens' must be an integer, got string '2'"),
        ("flip_aug = 1", "'flip_aug' must be true or false, got integer 1"),
        ("num_repeats = 1.5", "'num_repeats' must be an integer, got float 1.5"),
        ("class_tokens = 3", "'class_tokens' must be a string, got integer 3"),
        ("caption_dropout_rate = 'high'", "'caption_dropout_rate' must be a number"),
        ("caption_tag_dropout_rate = 2.0", "'caption_tag_dropout_rate' must be a number between 0 and 1"),
        ("face_crop_aug_range = [3.0, 1.0]", "'face_crop_aug_range' must be [low, high]"),
        ("keep_tokens = true", "'keep_tokens' must be an integer, got boolean true"),
    ],
)
def test_wrong_type_in_subset(tmp_path: Path, dirs: dict[str, Path], line: str, expected: str) -> None:
    message = config_error(tmp_path, one_subset(dirs["hoge"], line))
    assert message.startswith(f"{tmp_path / 'bad.toml'}: datasets[0].subsets[0]: {expected}")


@pytest.mark.parametrize("value", ["[512]", "0", "'512'", "[512, -1]", "[512.0, 512.0]", "[1, 2, 3]"])
def test_invalid_resolution(tmp_path: Path, dirs: dict[str, Path], value: str) -> None:
    message = config_error(tmp_path, one_subset(dirs["hoge"], dataset_lines=f"resolution = {value}"))
    assert "datasets[0]: 'resolution' must be an int or [width, height] of positive ints" in message


def test_missing_and_nonexistent_image_dir(tmp_path: Path, dirs: dict[str, Path]) -> None:
    message = config_error(tmp_path, f"""
[[datasets]]
resolution = 512
  [[datasets.subsets]]
  class_tokens = 'sks'
[[datasets]]
resolution = 512
  [[datasets.subsets]]
  image_dir = {q(tmp_path / 'nope')}
""")
    assert "datasets[0].subsets[0]: required key 'image_dir' is missing" in message
    assert "datasets[1].subsets[0]: image_dir" in message and "nope' does not exist" in message


def test_missing_metadata_file(tmp_path: Path, dirs: dict[str, Path]) -> None:
    message = config_error(tmp_path, f"""
[[datasets]]
  [[datasets.subsets]]
  image_dir = {q(dirs['piyo'])}
  metadata_file = {q(tmp_path / 'absent.json')}
""")
    assert "datasets[0].subsets[0]: metadata_file" in message and "absent.json' does not exist" in message


def test_finetuning_only_script_requires_metadata_file(tmp_path: Path, dirs: dict[str, Path]) -> None:
    message = config_error(tmp_path, f"""
[general]
caption_extension = '.txt'
[[datasets]]
  [[datasets.subsets]]
  image_dir = {q(dirs['piyo'])}
""", support_dreambooth=False)
    assert "[general]: 'caption_extension' is a DreamBooth-style key" in message
    assert "datasets[0].subsets[0]: required key 'metadata_file' is missing" in message


def test_dreambooth_only_script_refuses_metadata_file(tmp_path: Path, dirs: dict[str, Path]) -> None:
    message = config_error(tmp_path, one_subset(dirs["piyo"], f"metadata_file = {q(dirs['md'])}"),
                           support_finetuning=False)
    assert "datasets[0].subsets[0]: 'metadata_file' is a fine-tuning-style key" in message
    assert "supports only DreamBooth" in message


def test_caption_dropout_refused_without_support(tmp_path: Path, dirs: dict[str, Path]) -> None:
    config = write(tmp_path / "bad.toml", "[general]\ncaption_dropout_rate = 0.1\n" + one_subset(dirs["hoge"]))
    with pytest.raises(UserError, match=r"\[general\]: 'caption_dropout_rate' is not supported by this training"):
        blueprint_from(parse([], dropout=False), config, support_caption_dropout=False)


def test_mixed_styles_in_one_dataset(tmp_path: Path, dirs: dict[str, Path]) -> None:
    message = config_error(tmp_path, f"""
[[datasets]]
resolution = 512
  [[datasets.subsets]]
  image_dir = {q(dirs['hoge'])}
  [[datasets.subsets]]
  image_dir = {q(dirs['piyo'])}
  metadata_file = {q(dirs['md'])}
""")
    assert "datasets[0]: DreamBooth-style subsets (no metadata_file: subsets [0])" in message
    assert "(with metadata_file: subsets [1]) cannot be mixed" in message


def test_dreambooth_key_in_finetuning_subset(tmp_path: Path, dirs: dict[str, Path]) -> None:
    message = config_error(tmp_path, f"""
[[datasets]]
  [[datasets.subsets]]
  metadata_file = {q(dirs['md'])}
  is_reg = true
""")
    assert "datasets[0].subsets[0]: 'is_reg' is a DreamBooth-style key, but this dataset is fine-tuning-style" in message


def test_toml_syntax_error_names_line(tmp_path: Path) -> None:
    message = config_error(tmp_path, "[general]\nflip_aug = true\nkeep_tokens = \n")
    assert "bad.toml: line 3: TOML syntax error" in message


def test_json_syntax_error_names_line(tmp_path: Path) -> None:
    config = write(tmp_path / "bad.json", '{\n"general": {,}\n}')
    with pytest.raises(UserError, match=r"bad\.json: line 2: JSON syntax error"):
        load(config)


def test_config_file_problems(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not found"):
        load(tmp_path / "absent.toml")
    with pytest.raises(UserError, match=r"must be a \.toml or \.json file"):
        load(write(tmp_path / "c.yaml", "a: 1"))
    message = config_error(tmp_path, "[general]\nflip_aug = true\n")
    assert "no [[datasets]] defined" in message
    message = config_error(tmp_path, "[[datasets]]\nresolution = 512\n")
    assert "datasets[0]: has no [[datasets.subsets]]" in message


def test_bucket_bounds_checked_against_resolution(tmp_path: Path, dirs: dict[str, Path]) -> None:
    message = config_error(tmp_path, f"""
[general]
enable_bucket = true
[[datasets]]
resolution = [512, 1536]
min_bucket_reso = 640
  [[datasets.subsets]]
  image_dir = {q(dirs['hoge'])}
""")
    assert "datasets[0]: min_bucket_reso 640 must be <=" in message
    assert "max_bucket_reso 1024 must be >= the larger side of resolution 512x1536" in message


def test_dreambooth_dataset_needs_resolution(tmp_path: Path, dirs: dict[str, Path]) -> None:
    message = config_error(tmp_path, one_subset(dirs["hoge"], dataset_lines=""))
    assert "datasets[0]: resolution is required for DreamBooth-style datasets" in message


# ---------------------------------------------------------------------------------------- via run_main


def test_run_main_reports_config_error_in_one_line(tmp_path: Path, dirs: dict[str, Path],
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    config = write(tmp_path / "bad.toml", one_subset(dirs["hoge"], "keep_tokens = 'two'"))

    def main(argv: Sequence[str] | None) -> int:
        args = parse(argv or [])
        blueprint_from(args, args.dataset_config)
        return 0

    assert run_main(main, ["--dataset_config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert "bad.toml: datasets[0].subsets[0]: 'keep_tokens' must be an integer" in err
    assert "Traceback" not in err
