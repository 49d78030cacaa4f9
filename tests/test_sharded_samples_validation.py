"""Sample images and validation under sharding (docs/distributed.md#sample-images-and-validation-under-sharding):
2 CPU processes (gloo). With DeepSpeed ZeRO-3 and FSDP2 every process generates the images inside the sharded
root's forward (its hooks gather the weights) and the main process writes them, and every process makes one
validation forward pass per round of held-out images (3 images: in the second round process 1 runs a
stand-in); with ZeRO-2 the main process samples alone. The images, the validation losses and the trained
weights equal those of the plain 2-process run with the same options."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file

from tests.train_util import (FSDP_CONFIG, accelerate_launch, assert_same_tensors, embedding_args, launch_failure,
                              make_dataset, method_files, plain_launch)

REPO = Path(__file__).resolve().parent.parent
ATOL = 1e-6  # float32 round-off of another reduction order
PROMPTS = "a sks dog --s 2 --w 64 --h 64\nzqx on grass --s 2 --w 64 --h 64 --d 7\n"
SAMPLES = ("--sample_every_n_steps", "2", "--sample_at_first", "--sample_sampler", "euler_a")
VALIDATION = ("--validation_split", "0.6", "--validate_every_n_steps", "2")  # 3 of the 5 images held out
LORA_SGD = ("--network_module", "networks.lora", "--optimizer_type", "SGDNesterov", "--learning_rate", "0.05")
FULL_SGD = ("--save_model_as", "safetensors", "--optimizer_type", "SGDNesterov", "--learning_rate", "0.5")
NAMES = ["000000_00.png", "000000_01_7.png", "000002_00.png", "000002_01_7.png", "000004_00.png",
         "000004_01_7.png"]
needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                     reason="needs the optional package deepspeed")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharded-sampling")
    files = method_files(root)
    files["data"] = make_dataset(root / "data", folder="3_sks dog", count=5)
    files["prompts"] = root / "prompts.txt"
    files["prompts"].write_text(PROMPTS, encoding="utf-8")
    files["fsdp"] = root / "fsdp.yaml"
    files["fsdp"].write_text(FSDP_CONFIG, encoding="utf-8")
    return files


def _launch(script: str, setup, out: Path, *extra: str, fsdp: bool = False) -> str:
    """``script`` in 2 processes with samples at steps 0, 2 and 4; returns its log."""
    args = ["--pretrained_model_name_or_path", setup["model"]["safetensors"], "--resolution", "64",
            "--output_dir", out, "--max_train_steps", "4", "--seed", "1", "--max_data_loader_n_workers", "0",
            "--train_batch_size", "2", "--sample_prompts", setup["prompts"], *SAMPLES, *VALIDATION, *extra]
    how = ["--config_file", str(setup["fsdp"])] if fsdp else plain_launch(2)
    res = accelerate_launch(how, REPO / script, args, out)
    assert res.returncode == 0, launch_failure(res)
    return res.stderr


def _samples(out: Path) -> dict[str, np.ndarray]:
    """The sample images by ``<step>_<line>[_<seed>].png`` (without the output name and the time stamp)."""
    files = sorted((out / "sample").iterdir())
    return {re.search(r"\d{6}_\d{2}(_\d+)?\.png$", p.name).group(0): np.asarray(Image.open(p), dtype=np.int16)
            for p in files}


def _validation_losses(log: str) -> dict[int, float]:
    found = re.findall(r"validation loss at step (\d+): ([0-9.]+)", log)
    return {int(step): float(loss) for step, loss in found}


def _assert_same_validation(sharded_log: str, plain_log: str) -> None:
    a, b = _validation_losses(sharded_log), _validation_losses(plain_log)
    assert sorted(a) == sorted(b) and len(a) >= 3, (a, b)  # before the first step, at step 2, at the end
    for step in a:
        assert a[step] == pytest.approx(b[step], rel=1e-5), (step, a[step], b[step])


def _assert_same_samples(sharded: Path, plain: Path) -> None:
    a, b = _samples(sharded), _samples(plain)
    assert sorted(a) == sorted(b) == NAMES  # one file per prompt and point: written once, by the main process
    for name in a:
        assert a[name].shape == (64, 64, 3)
        assert np.abs(a[name] - b[name]).max() <= 1, name  # round-off of the weights may move a level
    assert np.abs(a["000000_00.png"] - a["000004_00.png"]).max() > 1  # the trained weights show


@pytest.fixture(scope="module")
def plain_lora(setup, tmp_path_factory):
    out = tmp_path_factory.mktemp("plain-lora") / "run"
    return out, _launch("train_network.py", setup, out, "--train_data_dir", setup["data"], *LORA_SGD)


@pytest.mark.slow
@needs_deepspeed
@pytest.mark.parametrize("stage", ["2", "3"])
def test_lora_deepspeed_samples_equal_the_plain_run(setup, plain_lora, tmp_path, stage):
    out, (plain, plain_log) = tmp_path / "ds", plain_lora
    log = _launch("train_network.py", setup, out, "--train_data_dir", setup["data"], *LORA_SGD,
                  "--deepspeed", "--zero_stage", stage)
    _assert_same_samples(out, plain)
    _assert_same_validation(log, plain_log)
    assert_same_tensors(load_file(str(out / "last.safetensors")), load_file(str(plain / "last.safetensors")), ATOL)


@pytest.mark.slow
def test_dreambooth_fsdp_samples_equal_the_plain_run(setup, tmp_path):
    """The UNet and text encoder sharded in units (blocks, layers): every unit gathers as it runs."""
    fsdp, plain = tmp_path / "fsdp", tmp_path / "plain"
    log = _launch("train_db.py", setup, fsdp, "--train_data_dir", setup["data"], *FULL_SGD, fsdp=True)
    assert "FSDP2: unet + text_encoder sharded over 2 processes" in log
    plain_log = _launch("train_db.py", setup, plain, "--train_data_dir", setup["data"], *FULL_SGD)
    _assert_same_samples(fsdp, plain)
    _assert_same_validation(log, plain_log)
    assert_same_tensors(load_file(str(fsdp / "last.safetensors")), load_file(str(plain / "last.safetensors")), ATOL)


@pytest.mark.slow
@needs_deepspeed
def test_textual_inversion_zero3_samples_equal_the_plain_run(setup, tmp_path):
    """The token-embedding matrix partitioned; the prompts use the new token."""
    ds, plain = tmp_path / "ds", tmp_path / "plain"
    args = embedding_args(setup["ti_data"], "--save_model_as", "safetensors")
    log = _launch("train_textual_inversion.py", setup, ds, *args, "--deepspeed", "--zero_stage", "3")
    plain_log = _launch("train_textual_inversion.py", setup, plain, *args)
    _assert_same_samples(ds, plain)
    _assert_same_validation(log, plain_log)
    assert_same_tensors(load_file(str(ds / "zqx.safetensors")), load_file(str(plain / "zqx.safetensors")), ATOL)
