"""Model loading and saving: ldm single files, diffusers folders, round trips, diffusers' own loader."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from library.errors import UserError
from library.models.load import load_model
from library.models.save import save_model
from tests.models_util import assert_outputs_equal, component_outputs, make_model_files


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    return make_model_files(tmp_path_factory.mktemp("sd1"), "tiny-sd1", seed=1)


@pytest.fixture(scope="module")
def sd2(tmp_path_factory):
    return make_model_files(tmp_path_factory.mktemp("sd2"), "tiny-sd2", seed=2)


def _outputs(model):
    return component_outputs(model.unet, model.vae, model.text_encoder)


@pytest.mark.parametrize("which", ["sd1", "sd2"])
def test_diffusers_folder_and_ldm_files_give_identical_outputs(which, request):
    files = request.getfixturevalue(which)
    ref = _outputs(load_model(files["diffusers"]))
    for kind in ("safetensors", "ckpt"):
        model = load_model(files[kind])
        assert model.source_format == "ldm"
        assert model.v2 == (which == "sd2")
        assert_outputs_equal(ref, _outputs(model))


def test_detects_version_and_prediction_type(sd1, sd2, caplog):
    m1 = load_model(sd1["safetensors"])
    assert (m1.v2, m1.v_parameterization) == (False, False)
    m2 = load_model(sd2["safetensors"])  # modelspec header says v-prediction
    assert (m2.v2, m2.v_parameterization) == (True, True)
    m2d = load_model(sd2["diffusers"])  # scheduler config says v-prediction
    assert (m2d.v2, m2d.v_parameterization) == (True, True)
    assert m2d.scheduler_config["prediction_type"] == "v_prediction"
    with caplog.at_level(logging.WARNING):
        m = load_model(sd2["ckpt"], v2=False, v_parameterization=False)
    assert m.v2 is True and m.v_parameterization is False  # weights decide the version, the flag the target
    assert any("--v2 was not given" in r.message for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        load_model(sd2["diffusers"], v2=True, v_parameterization=False)
    assert any("--v_parameterization was not given" in r.message for r in caplog.records)
    assert load_model(sd1["ckpt"], v2=True).v2 is False


def test_tokenizer_comes_with_the_model(sd1, sd2):
    assert load_model(sd1["safetensors"]).tokenizer.pad_token_id == 49407
    assert load_model(sd2["safetensors"]).tokenizer.pad_token_id == 0


@pytest.mark.parametrize("which", ["sd1", "sd2"])
def test_ldm_keys_use_the_prefixed_text_encoder_layout(which, request):
    files = request.getfixturevalue(which)
    with safe_open(str(files["safetensors"]), "pt") as f:
        keys = set(f.keys())
        meta = f.metadata()
    if which == "sd1":
        assert "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight" in keys
        assert "cond_stage_model.transformer.text_model.final_layer_norm.weight" in keys
        assert meta["modelspec.architecture"] == "stable-diffusion-v1"
    else:
        assert "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight" in keys
        assert "cond_stage_model.model.transformer.resblocks.2.attn.in_proj_weight" in keys  # synthesised last layer
        assert "cond_stage_model.model.text_projection" in keys
        assert meta["modelspec.architecture"] == "stable-diffusion-v2-768-v"
    assert "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight" in keys
    assert "first_stage_model.encoder.mid.attn_1.q.weight" in keys
    te = load_file(str(files["diffusers"] / "text_encoder" / "model.safetensors"))
    assert all(k.startswith("text_model.") for k in te), "diffusers text encoder must use text_model. keys"


@pytest.mark.parametrize("which", ["sd1", "sd2"])
def test_ldm_diffusers_ldm_round_trip_is_bit_exact(which, request, tmp_path):
    from tools.convert_diffusers20_original_sd import main as convert

    files = request.getfixturevalue(which)
    src = files["safetensors"]
    assert convert([str(src), str(tmp_path / "folder")]) == 0
    assert convert([str(tmp_path / "folder"), str(tmp_path / "back.safetensors")]) == 0
    a, b = load_file(str(src)), load_file(str(tmp_path / "back.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    # and the diffusers folder written in between equals the original diffusers folder, weight for weight
    for sub, name in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"), ("text_encoder", "model")):
        x = load_file(str(files["diffusers"] / sub / f"{name}.safetensors"))
        y = torch.load(tmp_path / "folder" / sub / f"{name.replace('model', 'pytorch_model') if sub == 'text_encoder' else name}.bin")
        assert x.keys() == y.keys()
        assert all(torch.equal(x[k], y[k]) for k in x)


def test_ckpt_round_trip_keeps_template_keys_and_adds_epochs(sd1, tmp_path):
    from tools.convert_diffusers20_original_sd import main as convert

    state = load_file(str(sd1["safetensors"]))
    state["model_ema.decay"] = torch.tensor(0.9999)
    state["alphas_cumprod"] = torch.linspace(1, 0, 1000, dtype=torch.float64)
    src = tmp_path / "with_extras.ckpt"
    torch.save({"state_dict": state, "epoch": 3, "global_step": 100, "callbacks": None}, src)
    out = tmp_path / "out.ckpt"
    assert convert([str(src), str(out), "--epoch", "2", "--global_step", "5", "--fp16"]) == 0
    saved = torch.load(out, weights_only=True)
    assert saved["epoch"] == 5 and saved["global_step"] == 105
    sd = saved["state_dict"]
    assert sd.keys() == state.keys()
    assert sd["alphas_cumprod"].dtype == torch.float64 and torch.equal(sd["alphas_cumprod"], state["alphas_cumprod"])
    key = "model.diffusion_model.out.2.weight"
    assert sd[key].dtype == torch.float16 and torch.equal(sd[key], state[key].half())


@pytest.mark.parametrize("fmt", ["safetensors", "ckpt", "diffusers", "diffusers_safetensors"])
def test_save_precision_applies_to_every_format(sd1, tmp_path, fmt):
    model = load_model(sd1["safetensors"])
    target = tmp_path / (f"m.{fmt}" if fmt in ("safetensors", "ckpt") else "m")
    save_model(model, target, fmt, save_dtype=torch.bfloat16)
    if fmt == "safetensors":
        tensors = load_file(str(target))
    elif fmt == "ckpt":
        tensors = torch.load(target, weights_only=True)["state_dict"]
    elif fmt == "diffusers":
        tensors = torch.load(target / "unet" / "diffusion_pytorch_model.bin", weights_only=True)
    else:
        tensors = load_file(str(target / "unet" / "diffusion_pytorch_model.safetensors"))
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    reloaded = load_model(target)
    assert reloaded.unet.dtype == torch.float32  # loads back into fp32 for training
    ref = dict(model.unet.named_parameters())
    for name, p in reloaded.unet.named_parameters():
        assert torch.equal(p, ref[name].to(torch.bfloat16).float()), name


@pytest.mark.parametrize("which", ["sd1", "sd2"])
def test_our_checkpoint_loads_in_diffusers_single_file_loader(which, request):
    """diffusers' own from_single_file (offline, configs from our folder) gives the same outputs."""
    from diffusers import StableDiffusionPipeline

    files = request.getfixturevalue(which)
    ours = load_model(files["safetensors"])
    pipe = StableDiffusionPipeline.from_single_file(str(files["safetensors"]), config=str(files["diffusers"]),
                                                    local_files_only=True, safety_checker=None)
    theirs = component_outputs(pipe.unet, pipe.vae, pipe.text_encoder)
    assert_outputs_equal(_outputs(ours), theirs, atol=1e-5)
    assert pipe.scheduler.config.prediction_type == ("v_prediction" if which == "sd2" else "epsilon")


def test_our_diffusers_folder_loads_in_diffusers_pipeline(sd1):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(sd1["diffusers"]), local_files_only=True, safety_checker=None)
    ours = load_model(sd1["diffusers"])
    assert_outputs_equal(_outputs(ours), component_outputs(pipe.unet, pipe.vae, pipe.text_encoder))
    assert pipe.tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_reference_model_supplies_configs(sd1, tmp_path):
    """A tiny ldm file loads with configs from --reference_model; a reference of the wrong family is refused."""
    model = load_model(sd1["safetensors"], reference_model=str(sd1["diffusers"]))
    assert model.unet.config.sample_size == 8  # from the folder, not the shape-inferred default
    sd2_folder = make_model_files(tmp_path, "tiny-sd2", formats="diffusers_safetensors")["diffusers"]
    with pytest.raises(UserError, match="reference_model"):
        load_model(sd1["safetensors"], reference_model=str(sd2_folder))


def test_vae_variants(sd1, tmp_path):
    base = load_model(sd1["safetensors"])
    other = make_model_files(tmp_path, "tiny-sd1", seed=7)
    want = load_model(other["safetensors"]).vae.state_dict()
    vae_only = {k[len("first_stage_model."):]: v for k, v in load_file(str(other["safetensors"])).items()
                if k.startswith("first_stage_model.")}
    save_file(vae_only, str(tmp_path / "vae_only.safetensors"))
    for spec in (other["diffusers"], other["diffusers"] / "vae", other["ckpt"], tmp_path / "vae_only.safetensors",
                 other["diffusers"] / "vae" / "diffusion_pytorch_model.safetensors"):
        m = load_model(sd1["safetensors"], vae=str(spec))
        got = m.vae.state_dict()
        assert all(torch.equal(got[k], want[k]) for k in want), spec
        assert torch.equal(m.unet.conv_in.weight, base.unet.conv_in.weight)


def test_make_tiny_model_is_deterministic(tmp_path):
    a = make_model_files(tmp_path / "a", "tiny-sd1", seed=5, formats="safetensors")["safetensors"]
    b = make_model_files(tmp_path / "b", "tiny-sd1", seed=5, formats="safetensors")["safetensors"]
    c = make_model_files(tmp_path / "c", "tiny-sd1", seed=6, formats="safetensors")["safetensors"]
    ta, tb, tc = load_file(str(a)), load_file(str(b)), load_file(str(c))
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    assert not torch.equal(ta["model.diffusion_model.out.2.weight"], tc["model.diffusion_model.out.2.weight"])
    assert oct(a.stat().st_mode & 0o777) != oct(0o600)


def test_failed_save_leaves_nothing_behind(sd1, tmp_path):
    """A save that fails half-way (here: at the tokenizer, after the weights) leaves the old output as it was."""
    model = load_model(sd1["safetensors"])
    target = tmp_path / "keep"
    target.mkdir()
    (target / "user.txt").write_text("user's file")
    model.tokenizer = None
    with pytest.raises(Exception):
        save_model(model, target, "diffusers", save_dtype=None)
    assert [p.name for p in target.iterdir()] == ["user.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep"]


def test_diffusers_folder_scheduler_and_index(sd2):
    index = json.loads((sd2["diffusers"] / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    sched = json.loads((sd2["diffusers"] / "scheduler" / "scheduler_config.json").read_text())
    assert sched["prediction_type"] == "v_prediction" and sched["beta_schedule"] == "scaled_linear"
    assert (sd2["diffusers"] / "tokenizer" / "vocab.json").is_file()
    assert (sd2["diffusers"] / "tokenizer" / "merges.txt").is_file()


def test_ckpt_without_state_dict_wrapper_and_symlink(sd1, tmp_path):
    flat = tmp_path / "flat.ckpt"
    torch.save(load_file(str(sd1["safetensors"])), flat)
    link = tmp_path / "link.ckpt"
    link.symlink_to(flat)
    ref = _outputs(load_model(sd1["safetensors"]))
    assert_outputs_equal(ref, _outputs(load_model(flat)))
    assert_outputs_equal(ref, _outputs(load_model(link)))


def test_sd1_text_encoder_keys_without_text_model_level(sd1, tmp_path):
    """Some SD1 files lack the text_model. level in their text-encoder keys; they load the same."""
    state = {k.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."): v
             for k, v in load_file(str(sd1["safetensors"])).items()}
    odd = tmp_path / "odd.safetensors"
    save_file(state, str(odd))
    assert_outputs_equal(_outputs(load_model(sd1["safetensors"])), _outputs(load_model(odd)))
