"""LoRA tools on the files the reference implementation wrote (shared/fixtures/reference)."""

from __future__ import annotations

import json

import pytest
import torch

from networks import check_lora_weights, merge_lora, resize_lora, svd_merge_lora
from networks.lora_files import LoRAModuleWeights, load_lora_file, lora_sd_version, match_lora_to_model, \
    model_lora_layers
from tests.lora_tools_util import delta_gap, factors, frob_sq, one_error_line, sum_factors
from tests.train_util import run_script
from tools import show_metadata


def test_reference_lora_into_sd2_model_is_refused(reference_fixtures, models, tmp_path, capsys):
    lora = reference_fixtures / "kohya_sd15_lora_unet.safetensors"
    code = run_script(merge_lora.main, ["--sd_model", models["sd2"]["safetensors"], "--save_to",
                                        tmp_path / "x.safetensors", "--models", lora, "--ratios", "1"])
    assert code == 2
    one_error_line(capsys, "mismatched SD versions", "cross-attention context width 768", "SD2.x")


def test_reference_loras_fit_the_sd15_architecture(reference_fixtures):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from library.models.presets import get_preset

    configs = get_preset("sd1")
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(configs.unet)
        te = CLIPTextModel(CLIPTextConfig(**configs.text_encoder))
    layers = model_lora_layers(te, unet)
    for name, count in (("kohya_sd15_lora_unet", 192), ("kohya_sd15_lora_te_conv", 350)):
        lora = load_lora_file(reference_fixtures / f"{name}.safetensors")
        assert len(lora.modules) == count
        assert lora_sd_version(lora)[0] == "sd1"
        assert len(match_lora_to_model(lora, layers, "sd1", "SD1.5")) == count


def test_reference_files_in_check_and_show(reference_fixtures, capsys):
    for name, modules in (("kohya_sd15_lora_unet", 192), ("kohya_sd15_lora_te_conv", 350)):
        path = reference_fixtures / f"{name}.safetensors"
        capsys.readouterr()
        assert run_script(check_lora_weights.main, [path]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert lines[1] == f"number of LoRA modules: {2 * modules}" and len(lines) == 2 + 2 * modules
        assert run_script(show_metadata.main, ["--model", path]) == 0
        assert json.loads(capsys.readouterr().out)["ss_base_model_version"] == "sd_v1"


def test_reference_files_resize(reference_fixtures, tmp_path):
    src = load_lora_file(reference_fixtures / "kohya_sd15_lora_te_conv.safetensors")
    save_to = tmp_path / "r.safetensors"
    assert run_script(resize_lora.main, ["--model", src.path, "--save_to", save_to, "--new_rank", "2"]) == 0
    out = load_lora_file(save_to)
    assert set(out.modules) == set(src.modules)
    assert out.metadata["ss_training_comment"] == "dimension is resized from 8 to 2; reference fixture"
    for name in ("lora_unet_down_blocks_0_resnets_0_conv1", "lora_te_text_model_encoder_layers_0_mlp_fc1",
                 "lora_unet_down_blocks_0_attentions_0_proj_in"):
        old, new = src.modules[name], out.modules[name]
        assert new.rank == 2 and new.down.shape[1:] == old.down.shape[1:]
        assert new.alpha_value == pytest.approx(old.scale * 2)
        up, down = old.factors()
        values = torch.linalg.svdvals(up.double() @ down.double())
        kept_sq = float((values[:2] ** 2).sum()) * old.scale ** 2
        assert frob_sq(*factors(new)) == pytest.approx(kept_sq, rel=1e-3)
    full = tmp_path / "full.safetensors"
    assert run_script(resize_lora.main, ["--model", src.path, "--save_to", full, "--new_rank", "8"]) == 0
    same = load_lora_file(full)  # rank 8 everywhere: the rank-4 3×3 modules are padded, nothing is lost
    assert max(delta_gap(factors(same.modules[n]), factors(m)) for n, m in src.modules.items()) < 1e-3
    assert {m.rank for m in same.modules.values()} == {8}


def test_reference_files_svd_merge_exact_and_merge_refused(reference_fixtures, tmp_path, capsys):
    a = load_lora_file(reference_fixtures / "kohya_sd15_lora_unet.safetensors")
    b = load_lora_file(reference_fixtures / "kohya_sd15_lora_te_conv.safetensors")
    tensors, ranks = svd_merge_lora.svd_merge([a, b], [0.5, 1.5], new_rank=12, new_conv_rank=4,
                                              clamp_quantile=None)
    assert len(ranks) == 350
    for name in ranks:
        merged = LoRAModuleWeights(name, tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"],
                                   tensors[f"{name}.alpha"])
        parts = [factors(f.modules[name], r) for f, r in ((a, 0.5), (b, 1.5)) if name in f.modules]
        assert delta_gap(factors(merged), sum_factors(parts)) < 1e-4, name
    capsys.readouterr()
    assert run_script(merge_lora.main, ["--save_to", tmp_path / "x.safetensors", "--models", a.path, b.path,
                                        "--ratios", "1", "1"]) == 2
    one_error_line(capsys, "rank 4", "rank 8")
    out = tmp_path / "svd.safetensors"
    assert run_script(svd_merge_lora.main, ["--save_to", out, "--models", a.path, b.path, "--ratios", "1", "1",
                                            "--new_rank", "4", "--save_precision", "fp16"]) == 0
    merged = load_lora_file(out)
    assert len(merged.modules) == 350 and all(t.dtype == torch.float16 for t in merged.tensors.values())
