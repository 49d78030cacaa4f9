"""train_db.py (DreamBooth) end to end on tiny SD1 / SD2-v models: formats that reload in our loader and
diffusers', --stop_text_encoder_training, prior-loss weighting of reg images, exact resume, options."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from tests.full_model_util import all_equal, any_differs, assert_module_matches, ldm_parts, trained_weights
from tests.train_util import make_dataset, read_record, record_args, run_script, write_bucket_config
from train_db import main as train


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return make_dataset(root, captions={0: "sks dog, sitting, grass", 1: "sks dog, running"})


def base_args(models, data, out, *extra, model="sd1", steps=3):
    flags = ["--v2", "--v_parameterization"] if model == "sd2" else []
    return [*flags, "--pretrained_model_name_or_path", models[model]["safetensors"], "--train_data_dir", data,
            "--resolution", "64", "--output_dir", out, "--max_train_steps", str(steps), "--learning_rate", "1e-3",
            "--seed", "1", "--max_data_loader_n_workers", "0", *extra]


@pytest.mark.parametrize("model", ["sd1", "sd2"])
def test_folders_with_reg_images_default_format(models, data, tmp_path, model):
    """Legacy folders (+ --reg_data_dir): an ldm input is saved as last.ckpt by default; UNet and text
    encoder both trained."""
    reg = make_dataset(tmp_path / "reg", folder="1_dog", count=3)
    out = tmp_path / "out"
    assert run_script(train, base_args(models, data, out, "--reg_data_dir", reg, model=model)) == 0
    assert sorted(p.name for p in out.iterdir()) == ["last.ckpt"]
    unet, te = ldm_parts(out / "last.ckpt")
    base_unet, base_te = ldm_parts(models[model]["safetensors"])
    assert unet.keys() == base_unet.keys() and te.keys() == base_te.keys()
    assert any_differs(unet, base_unet) and any_differs(te, base_te)
    ckpt = torch.load(out / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 3


def test_sd2_v_from_toml_with_use_safetensors(models, data, tmp_path):
    from library.models.load import load_model

    config = write_bucket_config(tmp_path / "data.toml", data / "5_sks dog")
    out = tmp_path / "out"
    argv = ["--v2", "--v_parameterization", "--pretrained_model_name_or_path", models["sd2"]["safetensors"],
            "--dataset_config", config, "--output_dir", out, "--max_train_steps", "2", "--learning_rate", "1e-3",
            "--use_safetensors", "--output_name", "mydb", "--seed", "2", "--max_data_loader_n_workers", "0"]
    assert run_script(train, argv) == 0
    assert (out / "mydb.safetensors").is_file()
    with safe_open(str(out / "mydb.safetensors"), "pt") as f:
        assert f.metadata()["modelspec.prediction_type"] == "v"
    model = load_model(out / "mydb.safetensors")
    assert model.v2 and model.v_parameterization


@pytest.mark.parametrize("fmt", ["ckpt", "safetensors", "diffusers", "diffusers_safetensors"])
def test_each_format_reloads_with_the_trained_weights(models, data, tmp_path, fmt):
    """The saved model, loaded by our loader and by diffusers', holds exactly the in-memory trained UNet and
    text-encoder weights (the run's --record_training_dir record), which differ from the base model."""
    from diffusers import StableDiffusionPipeline

    from library.models.load import load_model

    record = tmp_path / "record"
    out = tmp_path / "out"
    assert run_script(train, base_args(models, data, out, "--save_model_as", fmt, *record_args(record))) == 0
    path = out / ("last" if fmt.startswith("diffusers") else f"last.{fmt}")
    assert path.exists()
    if fmt.startswith("diffusers"):
        suffix = ".safetensors" if fmt == "diffusers_safetensors" else ".bin"
        assert (path / "unet" / f"diffusion_pytorch_model{suffix}").is_file()
    unet_w, te_w = trained_weights(record)
    base = load_model(models["sd1"]["safetensors"])
    assert any_differs(base.unet.state_dict(), unet_w) and any_differs(base.text_encoder.state_dict(), te_w)

    ours = load_model(path)
    assert_module_matches(ours.unet, unet_w, "our UNet")
    assert_module_matches(ours.text_encoder, te_w, "our text encoder")
    if fmt.startswith("diffusers"):
        pipe = StableDiffusionPipeline.from_pretrained(str(path), local_files_only=True, safety_checker=None)
    else:
        pipe = StableDiffusionPipeline.from_single_file(str(path), config=str(models["sd1"]["diffusers"]),
                                                        local_files_only=True, safety_checker=None)
    assert_module_matches(pipe.unet, unet_w, "diffusers' UNet")
    assert_module_matches(pipe.text_encoder, te_w, "diffusers' text encoder")
    assert all_equal(pipe.vae.state_dict(), base.vae.state_dict())


def test_stop_text_encoder_training_freezes_it_from_that_step(models, data, tmp_path):
    out = tmp_path / "out"
    argv = base_args(models, data, out, "--stop_text_encoder_training", "2", "--save_every_n_steps", "1",
                     "--save_model_as", "safetensors", steps=4)
    assert run_script(train, argv) == 0
    parts = {step: ldm_parts(out / f"at-step{step:08d}.safetensors") for step in (1, 2, 3)}
    parts[4] = ldm_parts(out / "last.safetensors")
    base_te = ldm_parts(models["sd1"]["safetensors"])[1]
    # the text encoder trains in steps 1 and 2 ...
    assert any_differs(base_te, parts[1][1]) and any_differs(parts[1][1], parts[2][1])
    # ... and not afterwards, while the UNet keeps changing
    assert all_equal(parts[2][1], parts[3][1]) and all_equal(parts[2][1], parts[4][1])
    assert any_differs(parts[2][0], parts[3][0]) and any_differs(parts[3][0], parts[4][0])


def test_negative_stop_never_trains_the_text_encoder(models, data, tmp_path):
    out = tmp_path / "out"
    assert run_script(train, base_args(models, data, out, "--stop_text_encoder_training", "-1",
                                       "--save_model_as", "safetensors")) == 0
    unet, te = ldm_parts(out / "last.safetensors")
    base_unet, base_te = ldm_parts(models["sd1"]["safetensors"])
    assert all_equal(te, base_te) and any_differs(unet, base_unet)


def test_reg_images_are_weighted_by_prior_loss_weight(models, tmp_path, monkeypatch):
    """Two checks. (1) The per-sample loss weights that reach the loss are 1 for training images and
    prior_loss_weight for reg images (recorded at the loss call, matched with the batch's is_reg).
    (2) Behaviour: with prior_loss_weight 0 and plain SGD (no momentum, no weight decay), a step on a reg
    image changes no weight at all, while every step on a training image does. Batch size 1, one model
    save per step, and the trainer's record of which image each step used make this exact."""
    from library.methods.full_model import FullModelMethod
    from library.training import diffusion

    data = make_dataset(tmp_path / "train", folder="1_sks dog", count=2)
    reg = make_dataset(tmp_path / "reg", folder="1_dog", count=2)
    seen: list[tuple[list[bool], list[float]]] = []
    is_reg: list[list[bool]] = []
    real_conditioning, real_loss = FullModelMethod.conditioning, diffusion.diffusion_loss

    def conditioning(self, batch):
        is_reg.append(list(batch["is_reg"]))
        return real_conditioning(self, batch)

    def loss(*args, loss_weights, **kwargs):
        seen.append((is_reg[-1], loss_weights.tolist()))
        return real_loss(*args, loss_weights=loss_weights, **kwargs)

    monkeypatch.setattr(FullModelMethod, "conditioning", conditioning)
    monkeypatch.setattr(diffusion, "diffusion_loss", loss)
    argv = base_args(models, data, tmp_path / "a", "--reg_data_dir", reg, "--prior_loss_weight", "0.25",
                     "--train_batch_size", "2", steps=2)
    assert run_script(train, argv) == 0
    pairs = [(r, w) for flags, weights in seen for r, w in zip(flags, weights)]
    assert {True, False} == {r for r, _ in pairs}
    assert all(w == (0.25 if r else 1.0) for r, w in pairs), pairs

    monkeypatch.setattr(FullModelMethod, "conditioning", real_conditioning)
    monkeypatch.setattr(diffusion, "diffusion_loss", real_loss)
    record = tmp_path / "record"
    out = tmp_path / "b"
    argv = base_args(models, data, out, "--reg_data_dir", reg, "--prior_loss_weight", "0", "--optimizer_type",
                     "torch.optim.SGD", "--learning_rate", "0.5", "--save_every_n_steps", "1", "--save_model_as",
                     "safetensors", *record_args(record), steps=4)
    assert run_script(train, argv) == 0
    keys = read_record(record)["keys"][1]
    assert len(keys) == 4 and sum("1_dog" in str(k) for k in keys) == 2
    saved = [ldm_parts(models["sd1"]["safetensors"])]
    saved += [ldm_parts(out / f"at-step{s:08d}.safetensors") for s in (1, 2, 3)] + [ldm_parts(out / "last.safetensors")]
    for step, key in enumerate(keys, start=1):
        before, after = saved[step - 1], saved[step]
        if "1_dog" in str(key):
            assert all_equal(before[0], after[0]) and all_equal(before[1], after[1]), (step, key)
        else:
            assert any_differs(before[0], after[0]) and any_differs(before[1], after[1]), (step, key)


@pytest.mark.parametrize("stop_te", [1, 3])
def test_resume_is_bit_identical(models, data, tmp_path, stop_te):
    """4 steps straight == 2 steps, save state, resume to 4; the text encoder stops before (1) or after (3)
    the resume point, so its frozen state must survive the resume."""
    extra = ["--stop_text_encoder_training", str(stop_te), "--save_model_as", "safetensors", "--flip_aug",
             "--shuffle_caption", "--train_batch_size", "2", "--gradient_accumulation_steps", "2"]
    assert run_script(train, base_args(models, data, tmp_path / "a", *extra, steps=4)) == 0
    assert run_script(train, base_args(models, data, tmp_path / "b", *extra, "--save_every_n_steps", "2",
                                       "--save_state", steps=4)) == 0
    state = tmp_path / "b" / "at-step00000002-state"
    assert json.loads((state / "state.json").read_text())["global_step"] == 2
    (tmp_path / "b" / "last.safetensors").unlink()
    assert run_script(train, base_args(models, data, tmp_path / "b", *extra, "--resume", state, steps=4)) == 0
    a, b = ldm_parts(tmp_path / "a" / "last.safetensors"), ldm_parts(tmp_path / "b" / "last.safetensors")
    assert all_equal(a[0], b[0]) and all_equal(a[1], b[1])


def test_no_token_padding_pads_to_the_longest_caption(models):
    from library.methods.full_model import FullModelMethod
    from library.models.load import load_model

    model = load_model(models["sd1"]["safetensors"])
    method = FullModelMethod(model=model, text_encoder_steps=None, clip_skip=2, max_token_length=150,
                             weighted_captions=False, no_token_padding=True, save_format="ckpt", save_dtype=None,
                             device=torch.device("cpu"))
    captions = ["sks dog, sitting", "a dog"]
    longest = max(len(model.tokenizer(c).input_ids) for c in captions)  # BOS ... EOS
    cond = method.conditioning({"captions": captions, "input_ids": None})
    assert 4 < longest < 77 and cond.shape == (2, longest, 32)  # clip_skip and the long budget are bypassed
    assert cond.requires_grad


OPTION_CASES = {
    "no_token_padding": ["--no_token_padding"],
    "checkpointing_bf16": ["--gradient_checkpointing", "--mixed_precision", "bf16"],
    "full_bf16_fp16_file": ["--mixed_precision", "bf16", "--full_bf16", "--save_precision", "fp16",
                            "--save_model_as", "safetensors"],
    "cache_weighted_clip_skip": ["--cache_latents", "--weighted_captions", "--clip_skip", "2"],
    "long_captions_lion_cosine": ["--max_token_length", "225", "--optimizer_type", "Lion", "--lr_scheduler",
                                  "cosine", "--lr_warmup_steps", "1"],
    "epochs_retention": ["--max_train_epochs", "3", "--train_batch_size", "10", "--save_every_n_epochs", "1",
                         "--save_last_n_epochs", "1", "--output_name", "db", "--save_model_as", "diffusers"],
}


@pytest.mark.parametrize("case", sorted(OPTION_CASES))
def test_option(models, data, tmp_path, case):
    out = tmp_path / "out"
    assert run_script(train, base_args(models, data, out, *OPTION_CASES[case])) == 0
    names = sorted(p.name for p in out.iterdir())
    if case == "epochs_retention":  # 2 steps per epoch, 3 epochs: epoch 1 removed when 2 is written
        assert names == ["db", "db-000002"], names
        assert (out / "db" / "model_index.json").is_file()
        return
    if case == "full_bf16_fp16_file":
        unet, _ = ldm_parts(out / "last.safetensors")
        assert {v.dtype for v in unet.values()} == {torch.float16}
        return
    unet, _ = ldm_parts(out / "last.ckpt")
    assert all(torch.isfinite(v.float()).all() for v in unet.values())


def test_debug_dataset_and_one_line_errors(models, data, tmp_path, capsys):
    assert run_script(train, ["--train_data_dir", data, "--resolution", "64", "--debug_dataset",
                              "--debug_dataset_dir", tmp_path / "dbg", "--seed", "1"]) == 0
    assert list((tmp_path / "dbg").iterdir())
    capsys.readouterr()
    for extra, fragment in [(["--full_fp16"], "--full_fp16 needs"), (["--resume", tmp_path / "nope"], "--resume")]:
        code = run_script(train, base_args(models, data, tmp_path / "out", *extra))
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and fragment in err[0], (extra, err)
