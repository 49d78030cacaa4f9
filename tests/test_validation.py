"""Validation loss (library/training/validation.py) end to end on tiny models: held-out images never train,
the loss is reproducible and blind to training options, validation never changes the trained weights, every
method gets it, and every mistake is a one-line error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from library.training.validation import held_out_keys, image_seed
from tests.train_util import make_dataset, read_record, record_args, run_script
from train_network import main as train


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return make_dataset(root, folder="2_sks dog", count=6, captions={0: "sks dog, sitting", 1: "sks dog, running"})


def base_args(models, data, out, *extra, steps=4):
    return ["--pretrained_model_name_or_path", models["sd1"]["safetensors"], "--train_data_dir", data,
            "--resolution", "64", "--output_dir", out, "--network_module", "networks.lora", "--network_dim", "4",
            "--max_train_steps", str(steps), "--learning_rate", "1e-3", "--seed", "1",
            "--max_data_loader_n_workers", "0", *extra]


def validation_curve(logs: Path) -> dict[int, float]:
    """``loss/validation`` as written to TensorBoard: {step: value}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs = [p for p in logs.rglob("events.out.tfevents.*")]
    assert runs, f"no TensorBoard events under {logs}"
    curve = {}
    for run in runs:
        events = EventAccumulator(str(run.parent))
        events.Reload()
        if "loss/validation" in events.Tags()["scalars"]:
            curve.update({e.step: e.value for e in events.Scalars("loss/validation")})
    return curve


def test_held_out_images_never_train_and_the_curve_repeats(models, data, tmp_path):
    """--validation_split 0.34 of 6 images holds out the 2 first by image_seed; they never appear in a
    training batch (the --record_training_dir record); two runs with the same seed log the same curve at
    steps 0, 2, 4."""
    extra = ["--validation_split", "0.34", "--validate_every_n_steps", "2", "--train_batch_size", "2",
             "--max_train_epochs", "2", "--flip_aug"]
    curves = []
    for name in ("a", "b"):
        assert run_script(train, base_args(models, data, tmp_path / name, *extra, "--logging_dir",
                                           tmp_path / f"logs_{name}", *record_args(tmp_path / f"record_{name}"))) == 0
        curves.append(validation_curve(tmp_path / f"logs_{name}"))
    # 4 training images x 2 repeats / batch 2 = 4 steps per epoch, 8 steps: every 2 steps and at epoch ends
    assert sorted(curves[0]) == [0, 2, 4, 6, 8]
    assert curves[0] == curves[1]
    assert all(v > 0 for v in curves[0].values()) and len(set(curves[0].values())) > 1
    images = sorted((data / "2_sks dog").glob("*.png"))
    held = sorted(images, key=lambda p: (image_seed(1, str(p)), str(p)))[:2]
    trained = {Path(k).name for keys in read_record(tmp_path / "record_b")["keys"].values() for k in keys}
    assert trained == {p.name for p in images} - {p.name for p in held}


def test_step0_loss_is_blind_to_training_options(models, data, tmp_path):
    """The learning rate, noise offset, min-SNR, loss type and the batch size change training, not the
    step-0 validation loss (fixed timesteps, fixed noise, plain MSE); later points do move."""
    common = ["--validation_split", "0.34", "--validate_every_n_steps", "2"]
    assert run_script(train, base_args(models, data, tmp_path / "a", *common, "--logging_dir", tmp_path / "la")) == 0
    assert run_script(train, base_args(models, data, tmp_path / "b", *common, "--logging_dir", tmp_path / "lb",
                                       "--learning_rate", "5e-3", "--noise_offset", "0.1", "--min_snr_gamma", "5",
                                       "--loss_type", "huber", "--train_batch_size", "2")) == 0
    a, b = validation_curve(tmp_path / "la"), validation_curve(tmp_path / "lb")
    assert a[0] == b[0]
    assert a[4] != b[4]


def test_text_encoder_cache_gives_the_same_curve(models, data, tmp_path):
    """With --cache_text_encoder_outputs the held-out captions come from the cache: the same curve."""
    common = ["--validation_split", "0.34", "--validate_every_n_steps", "2", "--network_train_unet_only"]
    assert run_script(train, base_args(models, data, tmp_path / "a", *common, "--logging_dir", tmp_path / "la",
                                       "--no_cache_text_encoder_outputs")) == 0
    assert run_script(train, base_args(models, data, tmp_path / "b", *common, "--logging_dir", tmp_path / "lb",
                                       "--cache_text_encoder_outputs")) == 0
    assert run_script(train, base_args(models, data, tmp_path / "c", *common, "--logging_dir", tmp_path / "lc")) == 0
    a, b, c = (validation_curve(tmp_path / f"l{x}") for x in "abc")
    assert sorted(a) == [0, 2, 4] and a == b == c


def _config(path: Path, train_dir: Path, validation_dir: Path | None, *, extra: str = "") -> Path:
    text = f"""[general]
flip_aug = true
shuffle_caption = true
[[datasets]]
resolution = 64
batch_size = 2
  [[datasets.subsets]]
  image_dir = '{train_dir}'
  class_tokens = 'sks dog'
  num_repeats = 2
"""
    if validation_dir is not None:
        text += f"""[[datasets]]
resolution = 64
is_validation = true
{extra}
  [[datasets.subsets]]
  image_dir = '{validation_dir}'
  class_tokens = 'sks dog'
"""
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("cache", [False, True])
def test_validation_dataset_leaves_the_trained_weights_bit_identical(models, data, tmp_path, cache):
    """A run with an is_validation dataset checked at every step trains exactly the weights of the same
    run without it (with flips, caption shuffle, LoRA dropout, accumulation; with cached latents too)."""
    held = make_dataset(tmp_path / "held", folder="val", count=3)
    extra = ["--network_dropout", "0.1", "--gradient_accumulation_steps", "2", "--max_train_steps", "5"]
    if cache:
        extra.append("--cache_latents")
    plain = _config(tmp_path / "plain.toml", data / "2_sks dog", None)
    with_val = _config(tmp_path / "val.toml", data / "2_sks dog", held / "val")
    argv = ["--pretrained_model_name_or_path", models["sd1"]["safetensors"], "--network_module", "networks.lora",
            "--learning_rate", "1e-3", "--seed", "3", "--max_data_loader_n_workers", "0", *extra]
    assert run_script(train, [*argv, "--dataset_config", plain, "--output_dir", tmp_path / "a"]) == 0
    assert run_script(train, [*argv, "--dataset_config", with_val, "--output_dir", tmp_path / "b",
                              "--validate_every_n_steps", "1", "--logging_dir", tmp_path / "logs"]) == 0
    a, b = load_file(str(tmp_path / "a" / "last.safetensors")), load_file(str(tmp_path / "b" / "last.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    curve = validation_curve(tmp_path / "logs")
    assert sorted(curve) == [0, 1, 2, 3, 4, 5] and all(v > 0 for v in curve.values())


def test_validation_seed_picks_other_images():
    """held_out_keys: the pick depends on the seed and the file names only, not on the folder or order."""
    from library.data.entries import ImageEntry

    entries = [ImageEntry(key=f"/a/img{i}.png", path=None, caption="", subset_index=0) for i in range(20)]
    moved = [ImageEntry(key=f"/elsewhere/img{i}.png", path=None, caption="", subset_index=0)
             for i in reversed(range(20))]
    reg = [ImageEntry(key=f"/r/reg{i}.png", path=None, caption="", subset_index=1, is_reg=True) for i in range(5)]
    first = held_out_keys(entries + reg, 0.2, 7, "dataset 0")
    assert len(first) == 4 and all(k.startswith("/a/") for k in first)
    assert {Path(k).name for k in held_out_keys(moved, 0.2, 7, "x")} == {Path(k).name for k in first}
    assert held_out_keys(entries, 0.2, 8, "x") != first


@pytest.mark.parametrize("script", ["db", "ft", "ti", "xti"])
def test_every_method_logs_a_validation_loss(models, data, tmp_path, script):
    """DreamBooth, fine-tuning, Textual Inversion and XTI compute it too (epoch ends, and the start)."""
    logs = tmp_path / "logs"
    common = ["--pretrained_model_name_or_path", models["sd1"]["safetensors"], "--resolution", "64", "--output_dir",
              tmp_path / "out", "--max_train_steps", "2", "--seed", "1", "--max_data_loader_n_workers", "0",
              "--validation_split", "0.34", "--logging_dir", logs, "--train_batch_size", "4"]
    if script == "db":
        from train_db import main
        argv = [*common, "--train_data_dir", data, "--learning_rate", "1e-4"]
    elif script == "ft":
        from fine_tune import main
        meta = {f"img{i}": {"caption": f"a photo of sks dog {i}"} for i in range(6)}
        (tmp_path / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
        argv = [*common, "--train_data_dir", data / "2_sks dog", "--in_json", tmp_path / "meta.json",
                "--learning_rate", "1e-4"]
    else:
        if script == "ti":
            from train_textual_inversion import main
        else:
            from train_textual_inversion_XTI import main
        argv = [*common, "--train_data_dir", data, "--learning_rate", "1e-2", "--token_string", "zqx",
                "--init_word", "dog", "--use_object_template"]
    assert run_script(main, argv) == 0
    curve = validation_curve(logs)
    # 4 training images x 2 repeats (fine-tuning: 1) at batch 4: 2 steps = 1 or 2 epochs
    assert 0 in curve and 2 in curve and all(v > 0 and v == v for v in curve.values())


def _toml(path: Path, body: str) -> Path:
    path.write_text(body, encoding="utf-8")
    return path


@pytest.mark.parametrize("case, expected", [
    (["--validation_split", "1.5"], "--validation_split must be at least 0 and below 1, got 1.5"),
    (["--validate_every_n_steps", "0"], "--validate_every_n_steps must be at least 1, got 0"),
    (["--validate_every_n_epochs", "2"], "--validate_every_n_steps / --validate_every_n_epochs need a validation "
                                         "set"),
    (["--validation_split", "0.99"], "dataset 0: validation_split 0.99 would hold out all 6 training image(s)"),
    (["--validation_seed", "-1"], "--validation_seed must be at least 0, got -1"),
])
def test_option_mistakes_are_one_line_errors(models, data, tmp_path, capsys, case, expected):
    assert run_script(train, base_args(models, data, tmp_path / "out", *case)) == 2
    err = capsys.readouterr().err
    assert expected in err and err.count("\n") == 1, err


@pytest.mark.parametrize("body, expected", [
    ("[general]\nis_validation = true\n[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = '{d}'\n",
     "'is_validation' is not allowed in [general]; it is allowed only in [[datasets]]"),
    ("[[datasets]]\nresolution = 64\nis_validation = true\n[[datasets.subsets]]\nimage_dir = '{d}'\n",
     "every dataset is marked is_validation = true; at least one dataset must train"),
    ("[[datasets]]\nresolution = 64\nvalidation_split = 1.2\n[[datasets.subsets]]\nimage_dir = '{d}'\n",
     "'validation_split' must be a number between 0 and 1, got 1.2"),
    ("[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = '{d}'\nvalidation_seed = 3\n",
     "'validation_seed' is not allowed in [[datasets.subsets]]"),
])
def test_config_mistakes_are_one_line_errors(models, data, tmp_path, capsys, body, expected):
    config = _toml(tmp_path / "c.toml", body.format(d=data / "2_sks dog"))
    argv = ["--pretrained_model_name_or_path", models["sd1"]["safetensors"], "--dataset_config", config,
            "--output_dir", tmp_path / "out", "--network_module", "networks.lora", "--max_data_loader_n_workers", "0"]
    assert run_script(train, argv) == 2
    err = capsys.readouterr().err
    assert expected in err and err.count("\n") == 1, err


def test_dataset_keys_split_per_dataset_with_their_own_seed(models, data, tmp_path, caplog):
    """validation_split / validation_seed in [[datasets]] override the command line for that dataset."""
    body = (f"[general]\nvalidation_split = 0.5\n[[datasets]]\nresolution = 64\nvalidation_seed = 11\n"
            f"[[datasets.subsets]]\nimage_dir = '{data / '2_sks dog'}'\n")
    config = _toml(tmp_path / "c.toml", body)
    argv = ["--pretrained_model_name_or_path", models["sd1"]["safetensors"], "--dataset_config", config,
            "--output_dir", tmp_path / "out", "--network_module", "networks.lora", "--max_train_steps", "1",
            "--max_data_loader_n_workers", "0", "--validation_split", "0.1", "--seed", "1"]
    with caplog.at_level("INFO"):
        assert run_script(train, argv) == 0
    assert "dataset 0: 3 image(s) held out for the validation loss (validation_split 0.5, seed 11)" in caplog.text


@pytest.mark.slow
def test_two_processes_give_the_single_process_curve(models, data, tmp_path):
    """accelerate launch with 2 CPU processes (gloo): each computes every other validation batch and the sums
    are all-reduced, so the curve matches the single-process one at step 0 (same weights); with --save_ema."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    repo = Path(__file__).resolve().parent.parent
    extra = ["--validation_split", "0.5", "--validate_every_n_steps", "1", "--save_ema", "--save_state"]
    assert run_script(train, base_args(models, data, tmp_path / "one", *extra, "--logging_dir", tmp_path / "l1",
                                       steps=2)) == 0
    cmd = [str(Path(sys.executable).with_name("accelerate")), "launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
           str(repo / "train_network.py"),
           *[str(a) for a in base_args(models, data, tmp_path / "two", *extra, "--logging_dir", tmp_path / "l2",
                                       steps=2)]]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", ACCELERATE_USE_CPU="1",
               SDTRAIN_CACHE_DIR=str(tmp_path / "cache"))
    res = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    one, two = validation_curve(tmp_path / "l1"), validation_curve(tmp_path / "l2")
    assert sorted(one) == sorted(two) == [0, 1, 2]
    assert two[0] == pytest.approx(one[0], rel=1e-6)
    state = torch.load(tmp_path / "two" / "last-state" / "state.pt", map_location="cpu", weights_only=False)
    assert state["extra"]["ema"]["updates"] == 2 and state["extra"]["validation"]["step"] == 2
    saved = load_file(str(tmp_path / "two" / "last.safetensors"))
    assert any(not torch.equal(saved[k], state["trainable"][k]) for k in saved if not k.endswith("alpha"))
