"""Later sd-scripts caption options (issue 15): caption_prefix/suffix, caption_separator, keep_tokens_separator,
secondary_separator, enable_wildcard and custom_attributes, as config keys and command-line options; their
effect on the transform, on dataset batches, in --dry_run reports and the config schema (docs/datasets.md)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from library.config import load_dataset_blueprint
from library.data.caption_rules import expand_wildcards, split_caption
from library.data.captions import CaptionOptions, metadata_caption, process_caption, read_caption_file
from library.data.dataset import build_dataset_group
from library.dataset_debug import build_parser
from library.errors import UserError
from library.option_groups import Options
from tests.train_util import run_script
from train_network import main as train_network


def blueprint_from(args, config, **support):
    """``load_dataset_blueprint`` with the option groups of the parsed ``args``."""
    opts = Options.from_args(args)
    return load_dataset_blueprint(opts.data, opts.validation, config, given=opts.given, **support)


def outcomes(caption: str, options: CaptionOptions, seeds: int = 60, **kw) -> set[str]:
    """Every processed caption seen over ``seeds`` generators."""
    return {process_caption(caption, options, random.Random(s), **kw) for s in range(seeds)}


# ---- the transform, key by key -------------------------------------------------------------------------


def test_prefix_and_suffix_wrap_the_caption_before_keep_tokens_and_after_dropout():
    options = CaptionOptions(caption_prefix="masterpiece,", caption_suffix="| end")
    assert process_caption("sks dog, grass", options, random.Random(0)) == "masterpiece, sks dog, grass | end"
    # the prefix becomes part of the caption's parts: keep_tokens 2 keeps "masterpiece" and "sks dog"
    shuffled = CaptionOptions(caption_prefix="masterpiece,", shuffle_caption=True, keep_tokens=2)
    seen = outcomes("sks dog, a, b, c", shuffled)
    assert all(s.startswith("masterpiece, sks dog, ") for s in seen) and len(seen) == 6
    # dropout empties the whole caption, prefix included
    dropped = CaptionOptions(caption_prefix="masterpiece", caption_dropout_rate=1.0)
    assert process_caption("sks dog", dropped, random.Random(0)) == ""


def test_caption_separator_splits_and_rejoins_the_parts():
    options = CaptionOptions(caption_separator=";", shuffle_caption=True, keep_tokens=1)
    seen = outcomes("sks dog; red, shiny collar ;grass;sun", options)
    assert len(seen) == 6  # 3! orders of the 3 flexible parts; the comma stays inside its part
    assert all(s.startswith("sks dog; ") and "red, shiny collar" in s and s.count("; ") == 3 for s in seen)
    # tag dropout works on the same parts
    drop = CaptionOptions(caption_separator=";", caption_tag_dropout_rate=1.0, keep_tokens=1)
    assert process_caption("sks dog; a, b; c", drop, random.Random(0)) == "sks dog"
    # the default stays ","
    assert process_caption("a,b ,c", CaptionOptions(caption_tag_dropout_rate=1e-9), random.Random(0)) == "a, b, c"


def test_keep_tokens_separator_fixes_head_and_tail():
    options = CaptionOptions(keep_tokens_separator="|||", shuffle_caption=True, keep_tokens=5)
    seen = outcomes("1girl, frieren ||| a, b, c ||| best, , quality", options)
    assert len(seen) == 6  # only the middle moves; keep_tokens is not used; empty parts are dropped
    for caption in seen:
        head, middle, tail = caption[:15], caption[15:-15], caption[-15:]
        assert head == "1girl, frieren," and tail == ", best, quality"
        assert sorted(middle.strip(" ,").split(", ")) == ["a", "b", "c"]
    # one marker: everything after it is flexible; a third marker stays as text in the tail
    assert split_caption("a ||| b, c", ",", 0, "|||").tail == []
    assert split_caption("a ||| b ||| c ||| d", ",", 0, "|||").tail == ["c ||| d"]
    # tag dropout spares both fixed ends
    drop = CaptionOptions(keep_tokens_separator="|||", caption_tag_dropout_rate=1.0)
    assert process_caption("a ||| b, c ||| d", drop, random.Random(0)) == "a, d"
    # token warm-up counts the flexible parts only on this path
    warm = CaptionOptions(keep_tokens_separator="|||", token_warmup_step=10, token_warmup_min=1)
    assert process_caption("a, b ||| c, d, e, f", warm, random.Random(0), step=0) == "a, b, c"
    assert process_caption("a, b ||| c, d, e, f", warm, random.Random(0), step=7) == "a, b, c, d, e"
    # as in sd-scripts, the marker is left in the text when nothing splits the caption
    assert process_caption("a ||| b", CaptionOptions(keep_tokens_separator="|||"), random.Random(0)) == "a ||| b"


def test_secondary_separator_keeps_a_unit_together_and_becomes_the_separator():
    options = CaptionOptions(secondary_separator=";;;", shuffle_caption=True)
    seen = outcomes("a, b;;;c, d", options)
    assert len(seen) == 6 and all("b,c" in s for s in seen)  # "b;;;c" moved as one part
    drop = CaptionOptions(secondary_separator=";;;", caption_tag_dropout_rate=0.5)
    assert all(("b,c" in s) or ("b" not in s and "c" not in s) for s in outcomes("a, b;;;c, d", drop))
    # replaced even when no part is moved or dropped, with the custom separator
    assert process_caption("x;;;y", CaptionOptions(secondary_separator=";;;", caption_separator="|"),
                           random.Random(0)) == "x|y"


def test_wildcards_pick_one_alternative_per_use_reproducibly():
    options = CaptionOptions(enable_wildcard=True)
    caption = "a {red|blue|green} car, {{literal}}"
    seen = outcomes(caption, options)
    assert seen == {f"a {c} car, {{literal}}" for c in ("red", "blue", "green")}
    assert [process_caption(caption, options, random.Random(5)) for _ in range(3)] == [
        process_caption(caption, options, random.Random(5))] * 3
    assert expand_wildcards("{a|}x", random.Random(0)) in ("ax", "x")
    # without the option the braces stay and only the first line is used
    off = CaptionOptions()
    assert process_caption("a {red|blue} car\nsecond", off, random.Random(0)) == "a {red|blue} car"
    # several lines: one line per use, then its wildcards
    assert outcomes("one {x|y}\ntwo", options) == {"one x", "one y", "two"}


def test_caption_file_lines_and_metadata_with_wildcards(tmp_path: Path):
    path = tmp_path / "img.caption"
    path.write_text("\ufefffirst line \r\n\r\n  second line\n", encoding="utf-8")
    assert read_caption_file(path) == "first line"
    assert read_caption_file(path, enable_wildcard=True) == "first line\nsecond line"
    assert metadata_caption("a photo", "t1, t2") == "a photo, t1, t2"
    assert metadata_caption("a photo", "t1; t2", separator=";") == "a photo; t1; t2"
    assert metadata_caption("a photo\n\nanother", "t1\nt2", enable_wildcard=True) == \
        "a photo, t1,t2\nanother, t1,t2"
    assert metadata_caption(None, "x\ny", enable_wildcard=True) == "x\ny"


# ---- the dataset config ----------------------------------------------------------------------------------


def _images(folder: Path, count: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        rng = np.random.default_rng(i + 3)
        Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8)).save(folder / f"img{i}.png")
    return folder


def _parse(argv):
    args, unknown = build_parser("t.py", support_dreambooth=True, support_caption=True,
                                 support_caption_dropout=True).parse_known_args([str(a) for a in argv])
    assert not unknown
    return args


def _config(tmp_path: Path, subset_extra: str, general_extra: str = "") -> Path:
    folder = _images(tmp_path / "img", 2)
    (folder / "img0.caption").write_text("zkz {dog|cat}, grass\nzkz bird, sky\n", encoding="utf-8")
    path = tmp_path / "data.toml"
    path.write_text(f"""[general]
resolution = 64
caption_prefix = 'general prefix'
{general_extra}
[[datasets]]
caption_separator = ','
  [[datasets.subsets]]
  image_dir = '{folder}'
  class_tokens = 'zkz {{dog|cat}}'
{subset_extra}
""", encoding="utf-8")
    return path


def test_config_keys_cascade_and_transform_the_batches(tmp_path: Path, caplog):
    config = _config(tmp_path, """  caption_prefix = 'photo of'
  caption_suffix = ';;;end'
  enable_wildcard = true
  secondary_separator = ';;;'
  custom_attributes = { weight = 2, tags = ['a'] }
""", general_extra="keep_tokens_separator = '|||'")
    caplog.set_level("INFO")
    blueprint = blueprint_from(_parse([]), config)
    (subset,) = blueprint.datasets[0].subsets
    assert (subset.caption_prefix, subset.caption_suffix, subset.enable_wildcard) == ("photo of", ";;;end", True)
    assert subset.keep_tokens_separator == "|||" and subset.caption_separator == ","  # from [general] / default
    assert subset.custom_attributes == {"weight": 2, "tags": ["a"]}
    assert "caption_prefix 'photo of'" in blueprint.summary() and "custom_attributes" in blueprint.summary()

    group = build_dataset_group(blueprint, seed=3)
    (ds,) = group.datasets
    assert ds.entries[0].caption == "zkz {dog|cat}, grass\nzkz bird, sky"  # every line kept with wildcards
    seen = set()
    for epoch in range(1, 9):
        for position, spec in enumerate(group.epoch_batches(epoch)):
            batch = group.load_batch(spec, epoch, position)
            assert batch["custom_attributes"] == [{"weight": 2, "tags": ["a"]}]
            seen.add((batch["keys"][0][-8:], batch["captions"][0]))
            again = group.load_batch(spec, epoch, position)  # a resumed run rebuilds the same batch
            assert again["captions"] == batch["captions"]
    file_captions = {c for k, c in seen if k == "img0.png"}
    class_captions = {c for k, c in seen if k == "img1.png"}
    # as in sd-scripts the prefix and suffix wrap the whole text: the first line gets the prefix, the last
    # the suffix (whose ";;;" became the separator)
    assert file_captions <= {"photo of zkz dog, grass", "photo of zkz cat, grass", "zkz bird, sky ,end"}
    assert len(file_captions) >= 2
    assert class_captions == {"photo of zkz dog ,end", "photo of zkz cat ,end"}


def test_command_line_options_are_the_fallback(tmp_path: Path):
    config = _config(tmp_path, "  caption_suffix = 'subset'")
    args = _parse(["--caption_suffix", "cli", "--caption_separator", ";", "--enable_wildcard",
                   "--keep_tokens_separator", "###", "--secondary_separator", "+"])
    (subset,) = blueprint_from(args, config).datasets[0].subsets
    assert subset.caption_suffix == "subset" and subset.caption_prefix == "general prefix"
    assert subset.caption_separator == "," and subset.enable_wildcard is True  # [[datasets]] beats the option
    assert (subset.keep_tokens_separator, subset.secondary_separator) == ("###", "+")


@pytest.mark.parametrize("line, message", [
    ("caption_separator = 1", "datasets[0].subsets[0]: 'caption_separator' must be a string, got integer 1"),
    ("caption_separator = ''", "'caption_separator' must be a non-empty string, got an empty string"),
    ("enable_wildcard = 'yes'", "'enable_wildcard' must be true or false, got string 'yes'"),
    ("custom_attributes = 'x'", "'custom_attributes' must be a table"),
    ("keep_tokens_separator = ['|']", "'keep_tokens_separator' must be a string, got array ['|']"),
    ("caption_prefix = true", "'caption_prefix' must be a string, got boolean true"),
])
def test_wrong_types_are_one_line_naming_the_key(tmp_path: Path, line: str, message: str):
    config = _config(tmp_path, "  " + line)
    with pytest.raises(UserError) as err:
        blueprint_from(_parse([]), config)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_bad_option_value_exits_2_with_one_line(tmp_path: Path, tiny_model: Path, capsys):
    _images(tmp_path / "train" / "1_zkz", 1)
    code = run_script(train_network, ["--pretrained_model_name_or_path", tiny_model,
                                      "--train_data_dir", tmp_path / "train", "--resolution", "64",
                                      "--output_dir", tmp_path / "out", "--network_module", "networks.lora",
                                      "--caption_separator", "", "--dry_run"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.splitlines()[-1].endswith("--caption_separator: must be a non-empty string, got an "
                                                       "empty string")


def test_fine_tuning_subset_repeats_follow_dataset_repeats(tmp_path: Path):
    folder = _images(tmp_path / "ft", 2)
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"img0": {"caption": "a {b|c}\nd", "tags": "t1, t2"}, "img1": {"tags": "x"}}),
                    encoding="utf-8")
    config = tmp_path / "ft.toml"
    config.write_text(f"""[[datasets]]
resolution = 64
enable_wildcard = true
  [[datasets.subsets]]
  metadata_file = '{meta}'
  image_dir = '{folder}'
  [[datasets.subsets]]
  metadata_file = '{tmp_path / "meta2.json"}'
  image_dir = '{folder}'
  num_repeats = 1
""", encoding="utf-8")
    (tmp_path / "meta2.json").write_text(json.dumps({"img1": {"caption": "solo"}}), encoding="utf-8")
    blueprint = blueprint_from(_parse(["--dataset_repeats", "3"]), config)
    assert [s.num_repeats for s in blueprint.datasets[0].subsets] == [3, 1]
    group = build_dataset_group(blueprint, seed=1)
    (ds,) = group.datasets
    assert ds.num_samples == 2 * 3 + 1
    assert ds.entries[0].caption == "a {b|c}, t1, t2\nd, t1, t2"


# ---- command-line runs: --dry_run shows the transformed captions ---------------------------------------


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from tests.models_util import make_model_files

    return make_model_files(tmp_path_factory.mktemp("m"), "tiny-sd1", formats="safetensors")["safetensors"]


def _dry(tmp_path: Path, model: Path, *extra) -> dict:
    report = tmp_path / "report.json"
    argv = ["--pretrained_model_name_or_path", model, "--output_dir", tmp_path / "out", "--network_module",
            "networks.lora", "--network_dim", "4", "--max_train_steps", "4", "--seed", "11",
            "--max_data_loader_n_workers", "0", "--dry_run_json", report, *extra]
    assert run_script(train_network, argv) == 0
    return json.loads(report.read_text(encoding="utf-8"))


def test_dry_run_from_the_command_line_shows_the_options(tmp_path: Path, tiny_model: Path, capsys):
    folder = _images(tmp_path / "train" / "2_zkz {dog|cat}", 3)
    (folder / "img0.caption").write_text("zkz dog ||| b, c;;;d ||| last", encoding="utf-8")
    report = _dry(tmp_path, tiny_model, "--train_data_dir", tmp_path / "train", "--resolution", "64",
                  "--caption_prefix", "pre", "--caption_suffix", "post", "--enable_wildcard",
                  "--keep_tokens_separator", "|||", "--secondary_separator", ";;;", "--shuffle_caption")
    text = capsys.readouterr().out
    captions = {c["key"].rsplit("/", 1)[-1]: c["caption"] for c in report["captions"]}
    assert captions and all(k in ("img0.png", "img1.png", "img2.png") for k in captions)
    for key, caption in captions.items():
        if key == "img0.png":
            assert caption in ("pre zkz dog, b, c,d, last post", "pre zkz dog, c,d, b, last post")
        else:
            assert caption in ("pre zkz dog post", "pre zkz cat post")
    assert "subset 0 captions: caption_prefix 'pre', caption_suffix 'post', keep_tokens_separator '|||', " \
           "secondary_separator ';;;', enable_wildcard" in text
    assert report["datasets"][0]["caption_settings"][0]["enable_wildcard"] is True


def test_dry_run_from_a_dataset_config(tmp_path: Path, tiny_model: Path):
    config = _config(tmp_path, "  enable_wildcard = true\n  caption_separator = ';'\n  shuffle_caption = true\n"
                               "  custom_attributes = { source = 'web' }")
    (tmp_path / "img" / "img0.caption").write_text("zkz; {x|y}; z", encoding="utf-8")
    report = _dry(tmp_path, tiny_model, "--dataset_config", config)
    captions = {c["key"].rsplit("/", 1)[-1]: c["caption"] for c in report["captions"]}
    assert set(captions) == {"img0.png", "img1.png"}
    img0 = captions["img0.png"]
    assert sorted(img0.replace("general prefix ", "").split("; ")) in (["x", "z", "zkz"], ["y", "z", "zkz"])
    assert captions["img1.png"] in ("general prefix zkz dog", "general prefix zkz cat")
    assert report["datasets"][0]["caption_settings"][0]["custom_attributes"] == {"source": "web"}


def test_options_round_trip_through_output_config(tmp_path: Path):
    from library.config.option_file import parse_with_config_file
    from train_network import build_parser

    argv = ["--caption_separator", ";", "--enable_wildcard", "--keep_tokens_separator", "|||",
            "--caption_prefix", 'say "hi"']
    with pytest.raises(SystemExit):
        parse_with_config_file(build_parser(), ["--config_file", str(tmp_path / "run"), "--output_config", *argv])
    back = parse_with_config_file(build_parser(), ["--config_file", str(tmp_path / "run.toml")])
    assert (back.caption_separator, back.enable_wildcard, back.keep_tokens_separator, back.caption_prefix) == (
        ";", True, "|||", 'say "hi"')
    assert back.caption_suffix is None and back.secondary_separator is None


# ---- a training run: the options reach the text encoder and the LoRA metadata --------------------------


def _train(tmp_path: Path, model: Path, name: str, subset_extra: str) -> tuple[dict, dict]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    folder = _images(tmp_path / "train_img", 2)
    (folder / "img0.caption").write_text("zkz dog, grass", encoding="utf-8")
    config = tmp_path / f"{name}.toml"
    config.write_text(f"""[[datasets]]
resolution = 64
  [[datasets.subsets]]
  image_dir = '{folder}'
  class_tokens = 'zkz dog'
{subset_extra}
""", encoding="utf-8")
    out = tmp_path / name
    argv = ["--pretrained_model_name_or_path", model, "--dataset_config", config, "--output_dir", out,
            "--network_module", "networks.lora", "--network_dim", "4", "--max_train_steps", "2",
            "--learning_rate", "1e-2", "--seed", "4", "--max_data_loader_n_workers", "0"]
    assert run_script(train_network, argv) == 0
    with safe_open(str(out / "last.safetensors"), "pt") as f:
        meta = f.metadata()
    return load_file(str(out / "last.safetensors")), json.loads(meta["ss_datasets"])[0]["subsets"][0]


def test_training_uses_the_transformed_captions(tmp_path: Path, tiny_model: Path):
    import torch

    plain, plain_meta = _train(tmp_path, tiny_model, "plain", "")
    again, _ = _train(tmp_path, tiny_model, "again", "")
    wrapped, meta = _train(tmp_path, tiny_model, "wrapped", "  caption_prefix = 'masterpiece'\n"
                                                            "  enable_wildcard = true\n"
                                                            "  keep_tokens_separator = '|||'")
    te_keys = [k for k in plain if k.startswith("lora_te_") and k.endswith("lora_up.weight")]
    assert te_keys and all(torch.equal(plain[k], again[k]) for k in te_keys)  # the run itself is deterministic
    assert any(not torch.equal(plain[k], wrapped[k]) for k in te_keys)  # the prefix changed what was trained
    assert (meta["caption_prefix"], meta["enable_wildcard"], meta["keep_tokens_separator"]) == (
        "masterpiece", True, "|||")
    assert plain_meta["caption_prefix"] is None and plain_meta["enable_wildcard"] is False


def test_wildcards_count_as_changing_captions_for_the_text_encoder_cache(tmp_path: Path):
    from library.training.te_cache import caption_conflicts

    config = _config(tmp_path, "  enable_wildcard = true")
    args = _parse([])
    group = build_dataset_group(blueprint_from(args, config), seed=1)
    opts = Options.from_args(args)
    assert any(c.startswith("enable_wildcard (--enable_wildcard")
               for c in caption_conflicts(group, opts.data, opts.dreambooth))
    plain = build_dataset_group(blueprint_from(args, _config(tmp_path / "p", "")), seed=1)
    assert caption_conflicts(plain, opts.data, opts.dreambooth) == []
