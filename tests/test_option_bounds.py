"""Every numeric option of every training script has its range checked before anything loads: a value
outside it is exit code 2 and one line naming the option and the range (docs/guardrails.md)."""

from __future__ import annotations

import json

import pytest

import fine_tune
import train_db
import train_network
import train_textual_inversion
import train_textual_inversion_XTI
from library.errors import UserError
from library.training.args import validate_training_args
from library.training.bounds import BOUNDS, CHECKED_ELSEWHERE, UNBOUNDED
from tests.train_util import make_dataset, run_script

SCRIPTS = {
    "train_network": (train_network.main, train_network.build_parser),
    "train_db": (train_db.main, train_db.build_parser),
    "fine_tune": (fine_tune.main, fine_tune.build_parser),
    "train_textual_inversion": (train_textual_inversion.main, train_textual_inversion.build_parser),
    "train_textual_inversion_XTI": (train_textual_inversion_XTI.main, train_textual_inversion.build_parser),
}
DESTS = {name: {a.dest for a in build()._actions} for name, (_, build) in SCRIPTS.items()}

# (option, value outside the range, what the message says, the edge value that is still allowed)
CASES = [
    ("seed", "-1", "--seed must be between 0 and 4294967295, got -1", "0"),
    ("seed", "4294967296", "--seed must be between 0 and 4294967295, got 4294967296", "4294967295"),
    ("train_batch_size", "0", "--train_batch_size must be at least 1, got 0", "1"),
    ("vae_batch_size", "0", "--vae_batch_size must be at least 1, got 0", "1"),
    ("max_data_loader_n_workers", "-1", "--max_data_loader_n_workers must be at least 0, got -1", "0"),
    ("prior_loss_weight", "-0.5", "--prior_loss_weight must be >= 0, got -0.5", "0"),
    ("keep_tokens", "-1", "--keep_tokens must be at least 0, got -1", "0"),
    ("min_bucket_reso", "0", "--min_bucket_reso must be at least 1, got 0", "1"),
    ("max_bucket_reso", "-64", "--max_bucket_reso must be at least 1, got -64", "1"),
    ("bucket_reso_steps", "0", "--bucket_reso_steps must be at least 1, got 0", "1"),
    ("token_warmup_min", "-1", "--token_warmup_min must be at least 0, got -1", "0"),
    ("token_warmup_step", "-2", "--token_warmup_step must be >= 0, got -2", "0"),
    ("caption_dropout_rate", "1.5", "--caption_dropout_rate must be between 0 and 1, got 1.5", "1"),
    ("caption_dropout_every_n_epochs", "-1", "--caption_dropout_every_n_epochs must be at least 0, got -1", "0"),
    ("caption_tag_dropout_rate", "-0.1", "--caption_tag_dropout_rate must be between 0 and 1, got -0.1", "0"),
    ("dataset_repeats", "0", "--dataset_repeats must be at least 1, got 0", "1"),
    ("max_train_epochs", "-1", "--max_train_epochs must be at least 0, got -1", "0"),
    ("max_train_steps", "0", "--max_train_steps must be at least 1, got 0", "1"),
    ("gradient_accumulation_steps", "0", "--gradient_accumulation_steps must be at least 1, got 0", "1"),
    ("clip_skip", "0", "--clip_skip must be at least 1, got 0", "1"),
    ("noise_offset", "-0.1", "--noise_offset must be >= 0, got -0.1", "0"),
    ("adaptive_noise_scale", "inf", "--adaptive_noise_scale must be a finite number, got inf", "-0.5"),
    ("multires_noise_iterations", "0", "--multires_noise_iterations must be at least 1, got 0", "1"),
    ("multires_noise_discount", "1.5", "--multires_noise_discount must be between 0 and 1, got 1.5", "1"),
    ("min_snr_gamma", "-5", "--min_snr_gamma must be >= 0, got -5", "0"),
    ("ddp_timeout", "-1", "--ddp_timeout must be at least 0, got -1", "0"),
    ("min_timestep", "-1", "--min_timestep must be between 0 and 999, got -1", "0"),
    ("max_timestep", "1001", "--max_timestep must be between 1 and 1000, got 1001", "1000"),
    ("v_pred_like_loss", "-0.1", "--v_pred_like_loss must be >= 0, got -0.1", "0"),
    ("initial_step", "-1", "--initial_step must be at least 0, got -1", "0"),
    ("initial_epoch", "0", "--initial_epoch must be at least 1, got 0", "1"),
    ("max_validation_steps", "0", "--max_validation_steps must be at least 1, got 0", "1"),
    ("scale_weight_norms", "-1", "--scale_weight_norms must be >= 0, got -1", "0"),
    ("learning_rate", "-1e-4", "--learning_rate must be >= 0, got -0.0001", "0"),
    ("learning_rate", "nan", "--learning_rate must be a finite number, got nan", "0"),
    ("max_grad_norm", "-1", "--max_grad_norm must be >= 0, got -1", "0"),
    ("lr_warmup_steps", "-1", "--lr_warmup_steps must be at least 0, got -1", "0"),
    ("lr_scheduler_num_cycles", "0", "--lr_scheduler_num_cycles must be at least 1, got 0", "1"),
    ("lr_scheduler_power", "0", "--lr_scheduler_power must be > 0, got 0", "0.5"),
    ("lr_decay_steps", "-5", "--lr_decay_steps must be at least 0, got -5", "0"),
    ("lr_scheduler_timescale", "0", "--lr_scheduler_timescale must be at least 1, got 0", "1"),
    ("lr_scheduler_min_lr_ratio", "1.5", "--lr_scheduler_min_lr_ratio must be between 0 and 1, got 1.5", "1"),
    ("learning_rate_te", "-1", "--learning_rate_te must be >= 0, got -1", "0"),
    ("save_every_n_epochs", "0", "--save_every_n_epochs must be at least 1, got 0", "1"),
    ("save_n_epoch_ratio", "-1", "--save_n_epoch_ratio must be at least 1, got -1", "1"),
    ("save_every_n_steps", "0", "--save_every_n_steps must be at least 1, got 0", "1"),
    ("save_last_n_epochs", "0", "--save_last_n_epochs must be at least 1, got 0", "1"),
    ("save_last_n_epochs_state", "0", "--save_last_n_epochs_state must be at least 1, got 0", "1"),
    ("save_last_n_steps", "0", "--save_last_n_steps must be at least 1, got 0", "1"),
    ("save_last_n_steps_state", "-3", "--save_last_n_steps_state must be at least 1, got -3", "1"),
    ("sample_every_n_steps", "0", "--sample_every_n_steps must be at least 1, got 0", "1"),
    ("sample_every_n_epochs", "0", "--sample_every_n_epochs must be at least 1, got 0", "1"),
    ("network_dim", "0", "--network_dim must be at least 1, got 0", "1"),
    ("network_alpha", "-1", "--network_alpha must be >= 0, got -1", "0"),
    ("network_dropout", "1", "--network_dropout must be at least 0 and below 1, got 1", "0"),
    ("unet_lr", "-1e-4", "--unet_lr must be >= 0, got -0.0001", "0"),
    ("text_encoder_lr", "-1", "--text_encoder_lr must be >= 0, got -1", "0"),
    ("num_vectors_per_token", "0", "--num_vectors_per_token 0: must be at least 1", "1"),
    # checked beside the other rules of their modules (same up-front check)
    ("ema_decay", "1", "--ema_decay must be between 0 and 1 (exclusive), got 1", "0.5"),
    ("ema_update_every", "0", "--ema_update_every must be at least 1, got 0", "1"),
    ("validation_split", "1", "--validation_split must be at least 0 and below 1, got 1", "0"),
    ("validation_seed", "-1", "--validation_seed must be at least 0, got -1", "0"),
    ("validate_every_n_steps", "0", "--validate_every_n_steps must be at least 1, got 0", None),
    ("validate_every_n_epochs", "0", "--validate_every_n_epochs must be at least 1, got 0", None),
    ("huber_c", "0", "--huber_c must be > 0, got 0", "0.1"),
    ("huber_c", "nan", "--huber_c must be a finite number, got nan", "0.1"),
    ("huber_scale", "-1", "--huber_scale must be > 0, got -1", "1"),
    ("ip_noise_gamma", "-0.1", "--ip_noise_gamma must be >= 0, got -0.1", "0"),
    ("resolution", "0", "--resolution: must be 'size' or 'width,height' with positive integers, got '0'", "64"),
    ("resolution", "64,x", "--resolution: must be 'size' or 'width,height'", "64,32"),
    ("face_crop_aug_range", "3,1", "--face_crop_aug_range: must be 'low,high' with two numbers, low <= high",
     "1,1"),
]
NETWORK_ARG_CASES = [
    ("conv_dim=0", "--network_args conv_dim=0: must be at least 1"),
    ("conv_alpha=-1", "--network_args conv_alpha=-1: must be >= 0"),
    ("dropout=1", "--network_args dropout=1: a dropout probability must be in [0, 1)"),
    ("rank_dropout=1.5", "--network_args rank_dropout=1.5: a dropout probability must be in [0, 1)"),
    ("module_dropout=-0.1", "--network_args module_dropout=-0.1: a dropout probability must be in [0, 1)"),
    ("block_lr_zero_threshold=-1", "--network_args block_lr_zero_threshold=-1: must be >= 0"),
    ("block_dims=" + ",".join(["4"] * 24 + ["-1"]), "ranks must not be negative"),
    ("block_dims=" + ",".join(["4"] * 25) + " block_alphas=" + ",".join(["1"] * 24 + ["-1"]),
     "--network_args block_alphas=1,"),
    ("conv_dim=abc", "--network_args conv_dim=abc: must be an integer"),
    ("conv_dims=4", "--network_args conv_dims=4: unknown key"),
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny SD1 checkpoint, a DreamBooth folder and a fine-tuning metadata json over the same images."""
    from tests.models_util import make_model_files

    root = tmp_path_factory.mktemp("bounds")
    model = make_model_files(root / "models", "tiny-sd1", formats="safetensors")["safetensors"]
    data = make_dataset(root / "data", count=2)
    meta = root / "meta.json"
    meta.write_text(json.dumps({f"img{i}": {"caption": "sks dog"} for i in range(2)}), encoding="utf-8")
    return {"model": model, "data": data, "meta": meta}


def base_args(script: str, setup, out, model=None) -> list:
    """Arguments with which ``script`` would train (see test_base_arguments_are_accepted)."""
    argv = ["--pretrained_model_name_or_path", model or setup["model"], "--resolution", "64", "--output_dir", out,
            "--max_train_steps", "1", "--max_data_loader_n_workers", "0"]
    if script == "fine_tune":
        return argv + ["--in_json", setup["meta"], "--train_data_dir", setup["data"] / "5_sks dog"]
    argv += ["--train_data_dir", setup["data"]]
    if script == "train_network":
        argv += ["--network_module", "networks.lora"]
    if script.startswith("train_textual_inversion"):
        argv += ["--token_string", "zqx", "--init_word", "dog"]
    return argv


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "Traceback" not in err, err
    return err.strip()


def test_every_numeric_option_has_a_range():
    """A new int/float option fails here until it is given a range (or listed as unbounded)."""
    known = set(BOUNDS) | set(CHECKED_ELSEWHERE) | set(UNBOUNDED)
    everywhere = set()
    for name, (_, build) in SCRIPTS.items():
        for action in build()._actions:
            everywhere.add(action.dest)
            if action.type in (int, float):
                assert action.dest in known, f"{name}: --{action.dest} has no range in library/training/bounds.py"
    assert known <= everywhere, known - everywhere  # no stale names in the tables
    # covered by argparse errors below and by tests/test_te_cache.py (it needs --cache_text_encoder_outputs)
    assert {case[0] for case in CASES} == set(BOUNDS) | set(CHECKED_ELSEWHERE) - {"max_token_length",
                                                                                "text_encoder_batch_size",
                                                                                "zero_stage"}


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_base_arguments_are_accepted(script, setup, tmp_path):
    """The control: the same arguments without a bad value pass every check (a dry run reads the data)."""
    assert run_script(SCRIPTS[script][0], base_args(script, setup, tmp_path / "out") + ["--dry_run"]) == 0


RUNS = [(script, *case) for case in CASES for script in SCRIPTS if case[0] in DESTS[script]]


@pytest.mark.parametrize("script, option, bad, message, edge", RUNS, ids=[f"{r[0]}-{r[1]}={r[2]}" for r in RUNS])
def test_value_outside_the_range_is_one_line_error(script, option, bad, message, edge, setup, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_script(SCRIPTS[script][0], base_args(script, setup, out) + [f"--{option}={bad}"]) == 2
    assert message in one_error_line(capsys)
    assert not out.exists()
    if edge is not None:  # the end of the range itself is allowed
        args = SCRIPTS[script][1]().parse_args([str(a) for a in base_args(script, setup, out)] + [f"--{option}={edge}"])
        try:
            validate_training_args(args)
        except UserError as exc:  # only a combination rule may speak (e.g. --adaptive_noise_scale needs ...)
            assert not [p for p in str(exc).split("; ") if p.startswith((f"--{option} must", f"--{option}:"))], exc


@pytest.mark.parametrize("network_arg, message", NETWORK_ARG_CASES, ids=[c[0][:20] for c in NETWORK_ARG_CASES])
def test_bad_network_args_are_refused_up_front(network_arg, message, setup, tmp_path, capsys):
    out = tmp_path / "out"
    argv = base_args("train_network", setup, out, model=tmp_path / "missing.safetensors")
    assert run_script(train_network.main, argv + ["--network_args", *network_arg.split()]) == 2
    assert message in one_error_line(capsys)
    assert not out.exists()


def test_checks_come_before_the_model_and_report_every_problem(setup, tmp_path, capsys):
    """With a model path that does not exist, the error names the options: nothing was loaded yet."""
    out = tmp_path / "out"
    argv = base_args("train_network", setup, out, model=tmp_path / "missing.safetensors")
    assert run_script(train_network.main, argv + ["--network_dim", "0", "--unet_lr=-1", "--seed=-2"]) == 2
    err = one_error_line(capsys)
    assert "--network_dim must be at least 1, got 0" in err and "--unet_lr must be >= 0, got -1" in err
    assert "--seed must be between 0" in err and "missing.safetensors" not in err


@pytest.mark.parametrize("option, bad", [("--network_dim", "0"), ("--network_alpha", "-1"),
                                         ("--network_dropout", "1.5")])
def test_a_network_option_out_of_range_is_said_once(option, bad, setup, tmp_path, capsys):
    """The network module's own check (which says the same) is skipped when the option's range failed, and
    runs when it did not (the bad --network_args key is then named)."""
    argv = base_args("train_network", setup, tmp_path / "out", model=tmp_path / "missing.safetensors")
    assert run_script(train_network.main, argv + [f"{option}={bad}", "--network_args", "conv_dim=0"]) == 2
    err = one_error_line(capsys)
    assert err.count(f"{option} must be") == 1 and "conv_dim" not in err
    assert run_script(train_network.main, argv + ["--network_args", "conv_dim=0"]) == 2
    assert "--network_args conv_dim=0: must be at least 1" in one_error_line(capsys)


@pytest.mark.parametrize("extra, message", [
    (["--seed", "abc"], "error: argument --seed: invalid int value: 'abc'"),
    (["--learning_rate", "1e-4x"], "error: argument --learning_rate: invalid float value: '1e-4x'"),
    (["--max_token_length", "100"], "error: argument --max_token_length: invalid choice: 100"),
    (["--no_such_option", "1"], "error: unrecognized arguments: --no_such_option 1"),
])
@pytest.mark.parametrize("script", list(SCRIPTS))
def test_argparse_errors_are_one_line_too(script, extra, message, setup, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        run_script(SCRIPTS[script][0], base_args(script, setup, tmp_path / "out") + extra)
    assert exc.value.code == 2
    err = one_error_line(capsys)
    assert err.startswith(message) and err.endswith(f"(see {script}.py --help)")


@pytest.mark.parametrize("key, value, message", [
    ("resolution", "0", "'resolution' must be an int or [width, height] of positive ints, got integer 0"),
    ("batch_size", "0", "'batch_size' must be an integer >= 1, got 0"),
    ("keep_tokens", "-1", "'keep_tokens' must be an integer >= 0, got -1"),
    ("caption_dropout_rate", "1.5", "'caption_dropout_rate' must be a number between 0 and 1, got 1.5"),
])
def test_dataset_config_values_are_checked_before_the_model(key, value, message, setup, tmp_path, capsys):
    """Values a dataset TOML gives (instead of the options) have the same ranges, also before the model."""
    config = tmp_path / "data.toml"
    config.write_text(f"[[datasets]]\n{key} = {value}\n" + ("resolution = 64\n" if key != "resolution" else "")
                      + f"[[datasets.subsets]]\nimage_dir = '{setup['data'] / '5_sks dog'}'\n", encoding="utf-8")
    out = tmp_path / "out"
    argv = base_args("train_network", setup, out, model=tmp_path / "missing.safetensors")
    assert run_script(train_network.main, argv + ["--dataset_config", config]) == 2
    assert message in one_error_line(capsys)
