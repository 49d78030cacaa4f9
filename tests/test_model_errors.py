"""Bad model inputs: one line on stderr naming the path and the problem, exit code 2, no traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from library.cli import run_main
from tests.models_util import make_model_files

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    return make_model_files(tmp_path_factory.mktemp("m"), "tiny-sd1", formats="safetensors,ckpt")


def _convert(argv, capsys) -> tuple[int, str]:
    from tools.convert_diffusers20_original_sd import main

    code = run_main(main, argv)
    err = capsys.readouterr().err.strip()
    return code, err


def _assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def test_missing_path(tmp_path, capsys):
    missing = tmp_path / "nope.safetensors"
    code, err = _convert([str(missing), str(tmp_path / "out")], capsys)
    _assert_one_line_error(code, err, str(missing), "no such file")


def test_truncated_safetensors(model_files, tmp_path, capsys):
    bad = tmp_path / "cut.safetensors"
    data = model_files["safetensors"].read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    code, err = _convert([str(bad), str(tmp_path / "out")], capsys)
    _assert_one_line_error(code, err, str(bad), "truncated")


def test_garbage_safetensors_header(tmp_path, capsys):
    bad = tmp_path / "junk.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!" + b"\x00" * 64)
    code, err = _convert([str(bad), str(tmp_path / "out")], capsys)
    _assert_one_line_error(code, err, str(bad), "corrupt")


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_ckpt(model_files, tmp_path, capsys, damage):
    bad = tmp_path / "bad.ckpt"
    data = model_files["ckpt"].read_bytes()
    bad.write_bytes({"truncate": data[: len(data) // 3], "garbage": b"\x80\x02garbage" * 100, "empty": b""}[damage])
    code, err = _convert([str(bad), str(tmp_path / "out")], capsys)
    _assert_one_line_error(code, err, str(bad))
    assert any(w in err for w in ("corrupt", "truncated", "empty", "cannot read"))


def test_lora_file_given_as_model(tmp_path, capsys, reference_fixtures):
    lora = reference_fixtures / "kohya_sd15_lora_unet.safetensors"
    code, err = _convert([str(lora), str(tmp_path / "out")], capsys)
    _assert_one_line_error(code, err, str(lora), "LoRA", "--network_weights")


def test_small_lora_file_given_as_model(tmp_path, capsys):
    lora = tmp_path / "my_lora.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(32, 4),
               "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(4.0)}, str(lora))
    code, err = _convert([str(lora), str(tmp_path / "out")], capsys)
    _assert_one_line_error(code, err, str(lora), "LoRA")


def test_sdxl_checkpoint(tmp_path, capsys):
    sdxl = tmp_path / "sdxl.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3),
               "model.diffusion_model.label_emb.0.0.weight": torch.zeros(4, 4),
               "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": torch.zeros(4),
               "conditioner.embedders.1.model.ln_final.weight": torch.zeros(4)}, str(sdxl))
    code, err = _convert([str(sdxl), str(tmp_path / "out")], capsys)
    _assert_one_line_error(code, err, str(sdxl), "SDXL")


def test_vae_only_file_given_as_model(model_files, tmp_path, capsys):
    from safetensors.torch import load_file

    vae = tmp_path / "vae.safetensors"
    save_file({k: v for k, v in load_file(str(model_files["safetensors"])).items()
               if k.startswith("first_stage_model.")}, str(vae))
    code, err = _convert([str(vae), str(tmp_path / "out")], capsys)
    _assert_one_line_error(code, err, str(vae), "--vae")


def test_folder_without_model_index(tmp_path, capsys):
    folder = tmp_path / "not_a_model"
    (folder / "unet").mkdir(parents=True)
    code, err = _convert([str(folder), str(tmp_path / "out.safetensors")], capsys)
    _assert_one_line_error(code, err, str(folder), "model_index.json")


def test_hub_id_offline(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, err = _convert(["someone/no-such-model-xyz", str(tmp_path / "out.safetensors")], capsys)
    _assert_one_line_error(code, err, "someone/no-such-model-xyz", "Hugging Face Hub")


def test_wrong_architecture_names_the_weight(model_files, tmp_path, capsys):
    """A file whose UNet does not match the inferred architecture is refused, naming a weight."""
    from safetensors.torch import load_file

    state = load_file(str(model_files["safetensors"]))
    state["model.diffusion_model.out.2.weight"] = torch.zeros(4, 64, 3, 3)  # expects 32 input channels
    bad = tmp_path / "mismatch.safetensors"
    save_file(state, str(bad))
    code, err = _convert([str(bad), str(tmp_path / "out")], capsys)
    _assert_one_line_error(code, err, str(bad), "conv_out.weight")


def test_refuses_to_overwrite_its_input(model_files, capsys):
    src = str(model_files["safetensors"])
    code, err = _convert([src, src], capsys)
    _assert_one_line_error(code, err, "refusing to overwrite")


def test_real_subprocess_exit_code_and_single_line(tmp_path):
    """The scripts as a user runs them: exit 2 and one stderr line."""
    res = subprocess.run([sys.executable, str(REPO / "tools" / "convert_diffusers20_original_sd.py"),
                          str(tmp_path / "missing.ckpt"), str(tmp_path / "o")], capture_output=True, text=True,
                         cwd=tmp_path)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [f"error: {tmp_path / 'missing.ckpt'}: no such file"] or \
        ("no such file" in res.stderr and len(res.stderr.strip().splitlines()) == 1), res.stderr


@pytest.fixture(scope="module")
def odd_model(tmp_path_factory):
    """A diffusers model whose UNet and VAE use 8 normalisation groups and 16-channel blocks (not SD's
    32 groups), converted to an ldm file by our own converter."""
    from library.models.presets import get_preset
    from library.models.random_model import build_random_model
    from library.models.save import save_model
    from tools.convert_diffusers20_original_sd import main as convert

    root = tmp_path_factory.mktemp("odd")
    configs = get_preset("tiny-sd1")
    configs.unet.update(block_out_channels=[16, 32], norm_num_groups=8)
    configs.vae.update(block_out_channels=[16, 16, 16, 16], norm_num_groups=8)
    save_model(build_random_model(configs, seed=3), root / "odd", "diffusers_safetensors")
    assert run_main(convert, [str(root / "odd"), str(root / "odd.safetensors")]) == 0
    return {"diffusers": root / "odd", "ldm": root / "odd.safetensors"}


def test_non_standard_ldm_file_asks_for_reference_model(odd_model, tmp_path, capsys):
    """Loading it back needs the architecture: without --reference_model one line says so (no GroupNorm
    traceback); with the original folder it loads the same weights as the folder itself."""
    from library.models.load import load_model
    from tests.models_util import assert_outputs_equal, component_outputs

    code, err = _convert([str(odd_model["ldm"]), str(tmp_path / "back")], capsys)
    _assert_one_line_error(code, err, str(odd_model["ldm"]), "cannot tell the architecture",
                           "16 channels wide", "--reference_model")
    code, err = _convert(["--reference_model", str(odd_model["diffusers"]), str(odd_model["ldm"]),
                          str(tmp_path / "back")], capsys)
    assert code == 0, err
    want = load_model(odd_model["diffusers"])
    got = load_model(tmp_path / "back")
    assert_outputs_equal(component_outputs(got.unet, got.vae, got.text_encoder),
                         component_outputs(want.unet, want.vae, want.text_encoder))


def test_training_from_non_standard_ldm_file(odd_model, tmp_path, capsys):
    """train_network.py from the converted file: exit 2 and the hint without --reference_model, trains with it."""
    from tests.train_util import make_dataset
    from train_network import main as train

    data = make_dataset(tmp_path / "data", count=2)
    argv = ["--pretrained_model_name_or_path", str(odd_model["ldm"]), "--train_data_dir", str(data),
            "--resolution", "64", "--output_dir", str(tmp_path / "out"), "--network_module", "networks.lora",
            "--network_dim", "4", "--max_train_steps", "2", "--learning_rate", "1e-3", "--seed", "1",
            "--max_data_loader_n_workers", "0"]
    code = run_main(train, argv)
    _assert_one_line_error(code, capsys.readouterr().err.strip(), str(odd_model["ldm"]), "--reference_model")
    assert not (tmp_path / "out" / "last.safetensors").exists()
    assert run_main(train, [*argv, "--reference_model", str(odd_model["diffusers"])]) == 0
    assert (tmp_path / "out" / "last.safetensors").is_file()
    capsys.readouterr()  # the progress bars of the run
    code = run_main(train, [*argv, "--reference_model", str(tmp_path / "nowhere")])
    _assert_one_line_error(code, capsys.readouterr().err.strip(), "--reference_model", "no such folder")
