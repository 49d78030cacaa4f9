"""``--torch_compile`` / ``--dynamo_backend`` / ``--dynamo_mode``: the UNet forward through torch.compile,
with the same weights (eager backends: bit for bit) and the same file layout as without it."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tests.train_util import make_dataset, run_script
from train_db import main as train_db
from train_network import main as train_network


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data"), count=2, captions={0: "sks dog"})


def lora_args(models, data, out, *extra):
    return ["--pretrained_model_name_or_path", models["sd1"]["safetensors"], "--train_data_dir", data,
            "--resolution", "64", "--output_dir", out, "--network_module", "networks.lora", "--network_dim", "2",
            "--max_train_steps", "3", "--learning_rate", "1e-2", "--seed", "4", "--max_data_loader_n_workers", "0",
            *extra]


def assert_same(a: dict, b: dict, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), rtol=0, atol=atol), key


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_eager_backends_give_the_same_lora(models, data, tmp_path, backend):
    assert run_script(train_network, lora_args(models, data, tmp_path / "plain")) == 0
    argv = lora_args(models, data, tmp_path / "compiled", "--torch_compile", "--dynamo_backend", backend)
    assert run_script(train_network, argv) == 0
    plain = load_file(tmp_path / "plain" / "last.safetensors")
    compiled = load_file(tmp_path / "compiled" / "last.safetensors")
    assert_same(plain, compiled, atol=0.0 if backend == "eager" else 1e-6)
    assert not any("_orig_mod" in key for key in compiled)


def test_compiled_unet_is_saved_under_its_own_names(models, data, tmp_path):
    out = tmp_path / "db"
    argv = ["--pretrained_model_name_or_path", models["sd1"]["safetensors"], "--train_data_dir", data,
            "--resolution", "64", "--output_dir", out, "--max_train_steps", "1", "--learning_rate", "1e-5",
            "--seed", "1", "--max_data_loader_n_workers", "0", "--save_model_as", "safetensors",
            "--torch_compile", "--dynamo_backend", "eager"]
    assert run_script(train_db, argv) == 0
    saved = load_file(out / "last.safetensors")
    base = load_file(models["sd1"]["safetensors"])
    assert saved.keys() == base.keys()


def test_unknown_backend_is_one_line(models, data, tmp_path, capsys):
    argv = lora_args(models, data, tmp_path / "x", "--torch_compile", "--dynamo_backend", "onnxrt")
    assert run_script(train_network, argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(err) == 1 and "--dynamo_backend onnxrt is not available" in err[0] and "inductor" in err[0]
    assert not (tmp_path / "x").exists()


def test_inductor_on_the_cpu_is_refused_before_loading(models, data, tmp_path, capsys):
    """Measured here (torch 2.13 CPU): the inductor-compiled UNet's backward gives gradients that differ from
    eager ones by their own size, so a run would silently train wrong; it needs a CUDA GPU."""
    if torch.cuda.is_available():
        pytest.skip("inductor is allowed on a CUDA machine")
    argv = lora_args(models, data, tmp_path / "x", "--torch_compile")  # inductor is the default backend
    assert run_script(train_network, argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(err) == 1 and "needs a CUDA GPU" in err[0] and "aot_eager" in err[0]
    assert not (tmp_path / "x").exists()
