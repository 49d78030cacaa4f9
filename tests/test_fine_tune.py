"""fine_tune.py end to end on tiny SD1 / SD2-v models: metadata json (--in_json and TOML metadata_file),
the text encoder frozen unless --train_text_encoder, output formats, exact resume, options."""

from __future__ import annotations

import importlib.util
import json
import shutil

import pytest
import torch

from fine_tune import main as train
from library.methods.full_model import resolve_save_format
from tests.full_model_util import all_equal, any_differs, assert_module_matches, ldm_parts, trained_weights
from tests.train_util import make_dataset, record_args, run_script


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """(image folder, metadata json): four images keyed by stem, with captions and tags."""
    root = tmp_path_factory.mktemp("data")
    folder = make_dataset(root, folder="images") / "images"
    meta = {f"img{i}": {"caption": f"a photo of sks dog number {i}", "tags": "dog, grass"} for i in range(4)}
    meta_path = root / "meta.json"
    meta_path.write_text(json.dumps(meta), encoding="utf-8")
    return folder, meta_path


def base_args(models, data, out, *extra, model="sd1", steps=3, source="safetensors"):
    flags = ["--v2", "--v_parameterization"] if model == "sd2" else []
    folder, meta = data
    return [*flags, "--pretrained_model_name_or_path", models[model][source], "--in_json", meta,
            "--train_data_dir", folder, "--resolution", "64", "--output_dir", out, "--max_train_steps", str(steps),
            "--learning_rate", "1e-3", "--seed", "1", "--max_data_loader_n_workers", "0", *extra]


@pytest.mark.parametrize("model", ["sd1", "sd2"])
def test_in_json_trains_only_the_unet_by_default(models, data, tmp_path, model):
    """--in_json legacy form; an ldm input gives last.ckpt; the text encoder comes back bit-identical."""
    out = tmp_path / "out"
    assert run_script(train, base_args(models, data, out, model=model)) == 0
    assert sorted(p.name for p in out.iterdir()) == ["last.ckpt"]
    unet, te = ldm_parts(out / "last.ckpt")
    base_unet, base_te = ldm_parts(models[model]["safetensors"])
    assert all_equal(te, base_te)
    assert unet.keys() == base_unet.keys() and any_differs(unet, base_unet)


@pytest.mark.parametrize("model", ["sd1", "sd2"])
def test_toml_metadata_file_from_diffusers_with_text_encoder(models, data, tmp_path, model):
    """TOML ``metadata_file`` + a diffusers input: the default output is a diffusers folder
    (``--use_safetensors`` → safetensors weights), holding the trained UNet and text encoder."""
    from diffusers import StableDiffusionPipeline

    from library.models.load import load_model

    folder, meta = data
    config = tmp_path / "data.toml"
    config.write_text(f"""[general]
resolution = 64
batch_size = 2
[[datasets]]
  [[datasets.subsets]]
  image_dir = '{folder}'
  metadata_file = '{meta}'
  num_repeats = 2
""", encoding="utf-8")
    record = tmp_path / "record"
    out = tmp_path / "out"
    flags = ["--v2", "--v_parameterization"] if model == "sd2" else []
    argv = [*flags, "--pretrained_model_name_or_path", models[model]["diffusers"], "--dataset_config", config,
            "--output_dir", out, "--max_train_steps", "2", "--learning_rate", "1e-3", "--train_text_encoder",
            "--use_safetensors", "--seed", "3", "--max_data_loader_n_workers", "0", *record_args(record)]
    assert run_script(train, argv) == 0
    assert (out / "last" / "text_encoder" / "model.safetensors").is_file()
    assert (out / "last" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    unet_w, te_w = trained_weights(record)
    base = load_model(models[model]["diffusers"])
    assert any_differs(base.unet.state_dict(), unet_w) and any_differs(base.text_encoder.state_dict(), te_w)
    ours = load_model(out / "last")
    assert ours.v2 == (model == "sd2") and ours.v_parameterization == (model == "sd2")
    assert_module_matches(ours.unet, unet_w, "our UNet")
    assert_module_matches(ours.text_encoder, te_w, "our text encoder")
    pipe = StableDiffusionPipeline.from_pretrained(str(out / "last"), local_files_only=True, safety_checker=None)
    assert_module_matches(pipe.unet, unet_w, "diffusers' UNet")
    assert_module_matches(pipe.text_encoder, te_w, "diffusers' text encoder")


@pytest.mark.parametrize("fmt", ["safetensors", "diffusers"])
def test_train_text_encoder_changes_it_and_formats_reload(models, data, tmp_path, fmt):
    from diffusers import StableDiffusionPipeline

    from library.models.load import load_model

    record = tmp_path / "record"
    out = tmp_path / "out"
    assert run_script(train, base_args(models, data, out, "--train_text_encoder", "--save_model_as", fmt,
                                       *record_args(record))) == 0
    path = out / ("last.safetensors" if fmt == "safetensors" else "last")
    unet_w, te_w = trained_weights(record)
    ours = load_model(path)
    assert_module_matches(ours.unet, unet_w, "our UNet")
    assert_module_matches(ours.text_encoder, te_w, "our text encoder")
    if fmt == "safetensors":
        pipe = StableDiffusionPipeline.from_single_file(str(path), config=str(models["sd1"]["diffusers"]),
                                                        local_files_only=True, safety_checker=None)
    else:
        pipe = StableDiffusionPipeline.from_pretrained(str(path), local_files_only=True, safety_checker=None)
    assert_module_matches(pipe.unet, unet_w, "diffusers' UNet")
    assert_module_matches(pipe.text_encoder, te_w, "diffusers' text encoder")
    base = load_model(models["sd1"]["safetensors"])
    assert any_differs(base.text_encoder.state_dict(), te_w) and any_differs(base.unet.state_dict(), unet_w)


@pytest.mark.parametrize("train_te", [False, True])
def test_resume_is_bit_identical(models, data, tmp_path, train_te):
    extra = ["--save_model_as", "safetensors", "--shuffle_caption", "--flip_aug", "--train_batch_size", "2",
             "--caption_dropout_rate", "0.3"] + (["--train_text_encoder"] if train_te else [])
    assert run_script(train, base_args(models, data, tmp_path / "a", *extra, steps=5)) == 0
    assert run_script(train, base_args(models, data, tmp_path / "b", *extra, "--save_every_n_steps", "3",
                                       "--save_state", steps=5)) == 0
    state = tmp_path / "b" / "at-step00000003-state"
    (tmp_path / "b" / "last.safetensors").unlink()
    assert run_script(train, base_args(models, data, tmp_path / "b", *extra, "--resume", state, steps=5)) == 0
    a, b = ldm_parts(tmp_path / "a" / "last.safetensors"), ldm_parts(tmp_path / "b" / "last.safetensors")
    assert all_equal(a[0], b[0]) and all_equal(a[1], b[1])


@pytest.mark.parametrize("given, safetensors, source, expected", [
    (None, False, "ldm", "ckpt"), (None, True, "ldm", "safetensors"),
    (None, False, "diffusers", "diffusers"), (None, True, "diffusers", "diffusers_safetensors"),
    ("ckpt", True, "diffusers", "safetensors"), ("diffusers", True, "ldm", "diffusers_safetensors"),
    ("safetensors", False, "diffusers", "safetensors"), ("diffusers_safetensors", False, "ldm", "diffusers_safetensors"),
])
def test_save_format_resolution(given, safetensors, source, expected):
    assert resolve_save_format(given, safetensors, source) == expected


OPTION_CASES = {
    "cache_to_disk_checkpointing": ["--cache_latents_to_disk", "--gradient_checkpointing", "--train_text_encoder"],
    "bf16_min_snr_noise_offset": ["--mixed_precision", "bf16", "--min_snr_gamma", "5", "--noise_offset", "0.1"],
    "full_bf16_te": ["--mixed_precision", "bf16", "--full_bf16", "--train_text_encoder", "--save_precision", "float"],
    "weighted_long": ["--weighted_captions", "--max_token_length", "150", "--clip_skip", "2"],
    "adafactor": ["--optimizer_type", "AdaFactor", "--optimizer_args", "relative_step=True"],
}


@pytest.mark.parametrize("case", sorted(OPTION_CASES))
def test_option(models, data, tmp_path, case):
    out = tmp_path / "out"
    extra = OPTION_CASES[case]
    if "--cache_latents_to_disk" in extra:  # it writes .npz files beside the images: use a copy of them
        shutil.copytree(data[0], tmp_path / "images")
        data = (tmp_path / "images", data[1])
    assert run_script(train, base_args(models, data, out, "--save_model_as", "safetensors", *extra)) == 0
    if "--cache_latents_to_disk" in extra:
        assert len(list(data[0].glob("*.npz"))) == 4
    unet, te = ldm_parts(out / "last.safetensors")
    assert all(torch.isfinite(v.float()).all() for v in unet.values())
    if case == "full_bf16_te":
        assert {v.dtype for v in unet.values()} == {torch.float32}
    if "--train_text_encoder" not in extra:  # frozen, and kept (so saved) in the --mixed_precision dtype
        dtype = torch.bfloat16 if "bf16" in extra else torch.float32
        assert all_equal(te, {k: v.to(dtype) for k, v in ldm_parts(models["sd1"]["safetensors"])[1].items()})


def test_debug_dataset_and_one_line_errors(models, data, tmp_path, capsys):
    folder, meta = data
    assert run_script(train, ["--in_json", meta, "--train_data_dir", folder, "--resolution", "64", "--debug_dataset",
                              "--debug_dataset_dir", tmp_path / "dbg", "--seed", "1"]) == 0
    assert list((tmp_path / "dbg").iterdir())
    cases = [(["--full_bf16"], "--full_bf16 needs")]
    if importlib.util.find_spec("xformers") is None:
        cases.append((["--diffusers_xformers"], "--diffusers_xformers needs the package"))
    capsys.readouterr()
    for extra, fragment in cases:
        code = run_script(train, base_args(models, data, tmp_path / "out", *extra))
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and fragment in err[0], (extra, err)
    argv = base_args(models, data, tmp_path / "out")
    del argv[argv.index("--in_json"):argv.index("--in_json") + 2]
    code = run_script(train, argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--in_json" in err[0], err
