"""--config_file / --output_config: precedence, tables, suffix, one-line errors, writing, and training runs
from kohya_ss-GUI-style files (tests/fixtures/config_*.toml) that give the same weights as the command line."""

from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path

import pytest
import toml
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from fine_tune import main as fine_tune_main
from library.cli import run_main
from library.config.option_file import parse_with_config_file
from tests.train_util import make_dataset, run_script
from train_db import main as db_main
from train_network import build_parser as network_parser
from train_network import main as network_main
from train_textual_inversion import main as ti_main
from train_textual_inversion_XTI import main as xti_main

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def parse(argv, parser=None):
    """train_network.py's options from ``argv`` (with --config_file applied)."""
    return parse_with_config_file(parser or network_parser(), [str(a) for a in argv])


def failure(argv, capsys, parser_factory=network_parser) -> str:
    """Run the parse as an entry script would; assert exit 2 and one line on stderr; return that line."""
    code = run_main(lambda a: parse_with_config_file(parser_factory(), a) and 0, [str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    return err


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# ---- parsing -------------------------------------------------------------------------------------------


def test_command_line_beats_file_beats_default(tmp_path):
    config = write(tmp_path / "run.toml", 'learning_rate = 1e-4\nnetwork_dim = 8\nflip_aug = true\n'
                                          'optimizer_args = ["weight_decay=0.1", "eps=1e-6"]\nmax_grad_norm = 2\n')
    args = parse(["--config_file", config, "--network_dim", "16", "--optimizer_args", "betas=0.9,0.99"])
    assert args.network_dim == 16                          # command line over file
    assert args.optimizer_args == ["betas=0.9,0.99"]       # a list on the command line replaces the file's
    assert args.learning_rate == 1e-4 and args.flip_aug is True  # file over default
    assert args.max_grad_norm == 2.0 and isinstance(args.max_grad_norm, float)  # a whole number for a float
    assert args.max_train_steps == 1600 and args.color_aug is False  # defaults where neither says
    assert args.config_file == str(config)


def test_without_config_file_it_is_plain_argparse():
    argv = ["--network_dim", "4", "--flip_aug", "--optimizer_args", "a=1", "b=2", "--dataset_config", "d.toml"]
    assert vars(parse(argv)) == vars(network_parser().parse_args(argv))


def test_false_flag_leaves_the_default(tmp_path):
    config = write(tmp_path / "run.toml", "flip_aug = false\nshuffle_caption = true\n")
    args = parse(["--config_file", config])
    assert args.flip_aug is False and args.shuffle_caption is True


def test_tables_are_flattened(tmp_path):
    config = write(tmp_path / "run.toml", 'seed = 3\n[model]\nv2 = true\nvae = "v.safetensors"\n'
                                          '[optimizer]\nlearning_rate = 0.5\nlr_scheduler = "cosine"\n')
    args = parse(["--config_file", config])
    assert (args.seed, args.v2, args.vae, args.learning_rate, args.lr_scheduler) == (
        3, True, "v.safetensors", 0.5, "cosine")


@pytest.mark.parametrize("method", ["lora", "db", "fine_tune", "ti"])
def test_fixture_tables_and_flat_files_are_the_same_options(method):
    parser = {"lora": network_parser, "db": _db_parser, "fine_tune": _ft_parser, "ti": _ti_parser}[method]
    flat = parse(["--config_file", FIXTURES / f"config_{method}_gui.toml"], parser())
    tables = parse(["--config_file", FIXTURES / f"config_{method}_tables.toml"], parser())
    assert {k: v for k, v in vars(flat).items() if k != "config_file"} == \
        {k: v for k, v in vars(tables).items() if k != "config_file"}


def test_toml_suffix_may_be_left_out(tmp_path):
    write(tmp_path / "run.toml", "network_dim = 8\n")
    assert parse(["--config_file", tmp_path / "run"]).network_dim == 8
    write(tmp_path / "other.cfg", "network_dim = 2\n")  # an exact name is read as it is
    assert parse(["--config_file", tmp_path / "other.cfg"]).network_dim == 2


def test_paths_stay_strings_and_path_options_get_their_type(tmp_path):
    config = write(tmp_path / "run.toml", 'output_dir = "out dir"\ndataset_config = "data.toml"\n')
    args = parse(["--config_file", config])
    assert args.output_dir == "out dir" and args.dataset_config == Path("data.toml")


def test_unknown_key_names_the_closest_option(tmp_path, capsys):
    config = write(tmp_path / "run.toml", "learnig_rate = 1e-4\n[net]\nnetwork_dimm = 4\nzzz_qqq = 1\n")
    err = failure(["--config_file", config], capsys)
    assert str(config) in err
    assert "unknown option 'learnig_rate' (did you mean 'learning_rate'?)" in err
    assert "unknown option 'network_dimm' in [net] (did you mean 'network_dim'?)" in err
    assert "unknown option 'zzz_qqq' in [net]" in err and "zzz_qqq' in [net] (" not in err


@pytest.mark.parametrize("line, expected", [
    ('network_dim = "8"', "'network_dim' takes an integer, got string '8'"),
    ("network_dim = 8.0", "'network_dim' takes an integer, got float 8.0"),
    ('learning_rate = "1e-4"', "'learning_rate' takes a number, got string '1e-4'"),
    ("learning_rate = true", "'learning_rate' takes a number, got boolean true"),
    ("output_name = 5", "'output_name' takes a string, got integer 5"),
    ("seed = [1]", "'seed' takes an integer, not array [1]"),
    ('optimizer_args = "weight_decay=0.1"', "'optimizer_args' takes an array of strings (nargs='*')"),
    ("optimizer_args = [1]", "'optimizer_args' takes a string, got integer 1"),
    ("flip_aug = 1", "'flip_aug' is a flag (--flip_aug): it takes true (as if typed) or false"),
    ('mixed_precision = "fp8"', "'mixed_precision' must be one of 'no', 'fp16', 'bf16', got 'fp8'"),
    ("[training]\nmax_train_steps = 1.5", "'max_train_steps' in [training] takes an integer, got float 1.5"),
])
def test_wrong_type_names_key_and_type(tmp_path, capsys, line, expected):
    config = write(tmp_path / "run.toml", line + "\n")
    err = failure(["--config_file", config], capsys)
    assert err.startswith(f"error: {config}: ") and expected in err


def test_file_values_go_through_the_options_own_type_and_action(tmp_path, capsys):
    """A parser with a custom type, nargs=2, append, count and --x/--no-x: each file value behaves like the
    same words typed on the command line, and bad ones fail with the type's own message."""
    def even(text):
        if int(text) % 2:
            raise argparse.ArgumentTypeError(f"{text} is odd")
        return int(text)

    def build():
        p = argparse.ArgumentParser(prog="demo")
        p.add_argument("--config_file")
        p.add_argument("--even", type=even)
        p.add_argument("--size", type=int, nargs=2)
        p.add_argument("--tag", action="append")
        p.add_argument("--verbose", "-v", action="count")
        p.add_argument("--color", action=argparse.BooleanOptionalAction, default=True)
        p.add_argument("--where", type=Path)
        return p

    good = write(tmp_path / "good.toml", 'even = 4\nsize = [64, 32]\ntag = ["a", "b"]\nverbose = 2\n'
                                         'color = false\nwhere = 7\n')
    args = parse_with_config_file(build(), ["--config_file", str(good), "--tag", "c"])
    assert (args.even, args.size, args.tag, args.verbose, args.color, args.where) == (
        4, [64, 32], ["c"], 2, False, Path("7"))
    cli = build().parse_args(["--even", "4", "--size", "64", "32", "--tag", "a", "--tag", "b", "-vv",
                              "--no-color", "--where", "7"])
    assert vars(parse_with_config_file(build(), ["--config_file", str(good)])) == {**vars(cli),
                                                                                  "config_file": str(good)}
    bad = write(tmp_path / "bad.toml", 'even = 3\nsize = [1]\ntag = "a"\n')
    err = failure(["--config_file", bad], capsys, build)
    assert "'even' is invalid: 3 is odd" in err and "'size' takes exactly 2 integers, got 1" in err
    assert "'tag' may be repeated: it takes an array" in err


def test_missing_file_is_one_line(tmp_path, capsys):
    err = failure(["--config_file", tmp_path / "nope"], capsys)
    assert "config file not found" in err and str(tmp_path / "nope.toml") in err
    err = failure(["--config_file", tmp_path / "nope.toml"], capsys)
    assert "config file not found" in err


@pytest.mark.parametrize("text, expected", [
    ("network_dim = [1\n", "TOML syntax error"),
    ('config_file = "other.toml"\n', "'config_file' cannot be set inside a config file"),
    ("output_config = true\n", "'output_config' cannot be set inside a config file"),
    ("seed = 1\n[a]\nseed = 2\n", "'seed' is set twice (at the top level and in [a])"),
    ("[a]\n[a.b]\nseed = 2\n", "[a.b] is a table inside a table"),
])
def test_bad_files_are_one_line(tmp_path, capsys, text, expected):
    config = write(tmp_path / "run.toml", text)
    assert expected in failure(["--config_file", config], capsys)


def test_output_config_needs_config_file(capsys):
    assert "--output_config needs --config_file" in failure(["--output_config"], capsys)


# ---- writing -------------------------------------------------------------------------------------------


def test_output_config_writes_only_the_non_defaults(tmp_path, capsys):
    argv = ["--config_file", tmp_path / "run", "--output_config", "--network_dim", "4", "--learning_rate", "1e-4",
            "--max_train_steps", "1600", "--flip_aug", "--optimizer_args", "weight_decay=0.1", "eps=1e-8",
            "--dataset_config", tmp_path / "data set.toml", "--wandb_api_key", "secret", "--output_name", 'a"b\\c']
    with pytest.raises(SystemExit) as stop:
        parse(argv)
    assert stop.value.code == 0 and str(tmp_path / "run.toml") in capsys.readouterr().out
    written = toml.loads((tmp_path / "run.toml").read_text(encoding="utf-8"))
    assert written == {"network_dim": 4, "learning_rate": 1e-4, "flip_aug": True,
                       "optimizer_args": ["weight_decay=0.1", "eps=1e-8"],
                       "dataset_config": str(tmp_path / "data set.toml"), "output_name": 'a"b\\c'}
    # and it reads back as the same options
    back = parse(["--config_file", tmp_path / "run.toml"])
    typed = parse([a for a in argv if a not in ("--output_config", "--wandb_api_key", "secret")])
    assert vars(back) == {**vars(typed), "config_file": str(tmp_path / "run.toml")}


def test_output_config_refuses_an_existing_file(tmp_path, capsys):
    target = write(tmp_path / "run.toml", "# mine\n")
    err = failure(["--config_file", tmp_path / "run", "--output_config", "--network_dim", "4"], capsys)
    assert "already exists" in err and str(target) in err
    assert target.read_text(encoding="utf-8") == "# mine\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.toml"]


# ---- training runs --------------------------------------------------------------------------------------


def _db_parser():
    from train_db import build_parser
    return build_parser()


def _ft_parser():
    from fine_tune import build_parser
    return build_parser()


def _ti_parser():
    from train_textual_inversion import build_parser
    return build_parser()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Image folders and a fine-tuning metadata file shared by the runs."""
    root = tmp_path_factory.mktemp("data")
    make_dataset(root / "db", captions={0: "sks dog, sitting, grass", 1: "sks dog, running"})
    make_dataset(root / "ti", folder="3_zqx", captions={0: "a zqx on grass", 1: "zqx, running"})
    folder = make_dataset(root / "ft", folder="images") / "images"
    meta = {f"img{i}": {"caption": f"a photo of sks dog number {i}", "tags": "dog, grass"} for i in range(4)}
    (root / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
    return {"db": root / "db", "ti": root / "ti", "ft": folder, "meta": root / "meta.json"}


def command_line(method, models, data, out):
    """The command line that says what tests/fixtures/config_<method>_*.toml say."""
    model = ["--pretrained_model_name_or_path", models["sd1"]["safetensors"], "--output_dir", out,
             "--max_data_loader_n_workers", "0", "--mixed_precision", "no", "--optimizer_type", "AdamW",
             "--save_model_as", "safetensors", "--seed", "1"]
    if method == "lora":
        return [*model, "--train_data_dir", data["db"], "--resolution", "64,64", "--caption_extension", ".caption",
                "--shuffle_caption", "--keep_tokens", "1", "--enable_bucket", "--min_bucket_reso", "64",
                "--max_bucket_reso", "128", "--bucket_reso_steps", "64", "--bucket_no_upscale", "--cache_latents",
                "--prior_loss_weight", "1", "--max_train_steps", "4", "--train_batch_size", "2",
                "--gradient_accumulation_steps", "1", "--multires_noise_discount", "0.3",
                "--optimizer_args", "weight_decay=0.01", "--learning_rate", "0.001", "--unet_lr", "0.001",
                "--text_encoder_lr", "0.0005", "--max_grad_norm", "1", "--lr_scheduler", "constant_with_warmup",
                "--lr_warmup_steps", "1", "--lr_scheduler_num_cycles", "1", "--lr_scheduler_power", "1",
                "--save_precision", "float", "--network_module", "networks.lora", "--network_dim", "4",
                "--network_alpha", "2", "--network_args"]
    if method == "db":
        return [*model, "--train_data_dir", data["db"], "--resolution", "64", "--caption_extension", ".caption",
                "--shuffle_caption", "--enable_bucket", "--min_bucket_reso", "64", "--max_bucket_reso", "128",
                "--prior_loss_weight", "1", "--output_name", "db", "--max_train_steps", "3",
                "--train_batch_size", "1", "--stop_text_encoder_training", "2", "--learning_rate", "0.001",
                "--max_grad_norm", "1", "--lr_scheduler", "cosine"]
    if method == "fine_tune":
        return [*model, "--in_json", data["meta"], "--train_data_dir", data["ft"], "--dataset_repeats", "2",
                "--resolution", "64", "--max_train_steps", "3", "--train_batch_size", "1", "--train_text_encoder",
                "--learning_rate", "0.001", "--max_grad_norm", "1"]
    return [*model, "--train_data_dir", data["ti"], "--resolution", "64", "--max_train_steps", "3",
            "--train_batch_size", "1", "--learning_rate", "0.01", "--lr_scheduler", "constant",
            "--token_string", "zqx", "--init_word", "dog", "--num_vectors_per_token", "2", "--use_object_template"]


def fill(template: Path, target: Path, **paths) -> Path:
    """Copy a fixture with its "@NAME@" strings replaced by (TOML-quoted) paths."""
    text = template.read_text(encoding="utf-8")
    for name, value in paths.items():
        text = text.replace(f'"@{name.upper()}@"', json.dumps(str(value)))
    assert not re.search(r'"@[A-Z]+@"', text), "a placeholder was left unfilled"
    return write(target, text)


def fixture_paths(method, models, data, out, model=None):
    key = {"lora": "db", "db": "db", "fine_tune": "ft", "ti": "ti"}[method]
    return dict(model=model or models["sd1"]["safetensors"], data=data[key], out=out, meta=data["meta"])


def weights(out: Path) -> dict[str, dict[str, torch.Tensor]]:
    files = sorted(out.glob("*.safetensors"))
    assert files, f"nothing was saved in {out}"
    return {f.name: load_file(str(f)) for f in files}


def assert_same(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].keys() == b[name].keys()
        for key in a[name]:
            assert torch.equal(a[name][key], b[name][key]), (name, key)


MAINS = {"lora": network_main, "db": db_main, "fine_tune": fine_tune_main, "ti": ti_main}


@pytest.mark.parametrize("method", ["lora", "db", "fine_tune", "ti"])
def test_gui_style_and_table_files_train_like_the_command_line(models, data, tmp_path, method):
    """Each script trains from the kohya_ss-GUI-style flat file and from the tables file, bit-identical to
    the same options typed on the command line."""
    main = MAINS[method]
    assert run_script(main, command_line(method, models, data, tmp_path / "cli")) == 0
    expected = weights(tmp_path / "cli")
    for style in ("gui", "tables"):
        out = tmp_path / style
        config = fill(FIXTURES / f"config_{method}_{style}.toml", tmp_path / f"{style}.toml",
                      **fixture_paths(method, models, data, out))
        assert run_script(main, ["--config_file", config]) == 0
        assert_same(weights(out), expected)


def test_command_line_overrides_the_file_in_a_run(models, data, tmp_path):
    """The run named without its .toml suffix; options typed beside it win over the file's."""
    paths = fixture_paths("lora", models, data, tmp_path / "out")
    fill(FIXTURES / "config_lora_gui.toml", tmp_path / "run.toml", **paths)
    assert run_script(network_main, ["--config_file", tmp_path / "run", "--output_name", "mine",
                                     "--max_train_steps", "2"]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["mine.safetensors"]
    with safe_open(str(tmp_path / "out" / "mine.safetensors"), "pt") as f:
        assert f.metadata()["ss_steps"] == "2"


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    """A random SD1 model with the real UNet block layout (XTI needs its 16 cross-attention layers)."""
    from tests.models_util import make_model_files

    return make_model_files(tmp_path_factory.mktemp("mini"), "mini-sd1", formats="safetensors")["safetensors"]


def test_xti_trains_from_a_config_file(mini, data, tmp_path):
    config = fill(FIXTURES / "config_ti_gui.toml", tmp_path / "xti.toml",
                  **fixture_paths("ti", None, data, tmp_path / "file", model=mini))
    assert run_script(xti_main, ["--config_file", config, "--max_train_steps", "2"]) == 0
    argv = command_line("ti", {"sd1": {"safetensors": mini}}, data, tmp_path / "cli")
    assert run_script(xti_main, [*argv, "--max_train_steps", "2"]) == 0
    from_file, typed = weights(tmp_path / "file"), weights(tmp_path / "cli")
    assert_same(from_file, typed)
    assert len(next(iter(typed.values()))) == 16  # one tensor per cross-attention layer: XTI, not plain TI


@pytest.mark.parametrize("method", ["lora", "ti"])
def test_output_config_reproduces_the_run(models, data, tmp_path, method):
    """--output_config, then train from the written file alone: the same weights as the command-line run."""
    extra = ["--flip_aug", "--noise_offset", "0.05", "--lr_scheduler", "cosine_with_restarts",
             "--lr_scheduler_num_cycles", "2", "--lr_warmup_steps", "1"]
    if method == "lora":
        extra += ["--network_args", "conv_dim=2", "conv_alpha=1", "--network_dropout", "0.1"]
    argv = [*command_line(method, models, data, tmp_path / "out"), *extra]
    with pytest.raises(SystemExit) as stop:
        run_script(MAINS[method], [*argv, "--config_file", tmp_path / "run", "--output_config"])
    assert stop.value.code == 0 and not (tmp_path / "out").exists()
    assert run_script(MAINS[method], ["--config_file", tmp_path / "run.toml"]) == 0
    from_file = weights(tmp_path / "out")
    shutil.move(tmp_path / "out", tmp_path / "from_file")
    assert run_script(MAINS[method], argv) == 0
    assert_same(from_file, weights(tmp_path / "out"))
