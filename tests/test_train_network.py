"""train_network.py end to end on tiny SD1 / SD2-v models: files, metadata, options, exact resume."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tests.train_util import make_dataset, run_script, write_bucket_config
from train_network import main as train


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return make_dataset(root, captions={0: "sks dog, sitting, grass", 1: "sks dog, running"})


def base_args(models, data, out, *extra, model="sd1", steps=4):
    flags = ["--v2", "--v_parameterization"] if model == "sd2" else []
    return [*flags, "--pretrained_model_name_or_path", models[model]["safetensors"], "--train_data_dir", data,
            "--resolution", "64", "--output_dir", out, "--network_module", "networks.lora", "--network_dim", "4",
            "--max_train_steps", str(steps), "--learning_rate", "1e-3", "--seed", "1",
            "--max_data_loader_n_workers", "0", *extra]


def test_lora_file_keys_and_metadata(models, data, tmp_path):
    assert run_script(train, base_args(models, data, tmp_path / "out", "--training_comment", "hello")) == 0
    path = tmp_path / "out" / "last.safetensors"
    with safe_open(str(path), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in keys
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight" in keys
    assert "lora_unet_down_blocks_0_attentions_0_proj_in.alpha" in keys
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_dim"] == "4"
    assert meta["ss_network_alpha"] == "1" and meta["ss_training_comment"] == "hello"
    assert meta["ss_num_train_images"] == "20" and meta["ss_steps"] == "4" and meta["ss_v2"] == "False"
    assert json.loads(meta["ss_dataset_dirs"]) == {"5_sks dog": {"n_repeats": 5, "img_count": 4}}
    assert json.loads(meta["ss_tag_frequency"])["5_sks dog"]["sks dog"] == 4
    assert meta["ss_sd_model_name"] == "tiny-sd1.safetensors" and len(meta["ss_new_sd_model_hash"]) == 64
    assert len(meta["sshs_model_hash"]) == 64 and meta["ss_optimizer"] == "torch.optim.adamw.AdamW"


def test_sd2_v_prediction_from_toml(models, data, tmp_path):
    config = write_bucket_config(tmp_path / "data.toml", data / "5_sks dog")
    argv = ["--pretrained_model_name_or_path", models["sd2"]["safetensors"], "--dataset_config", config,
            "--output_dir", tmp_path / "out", "--network_module", "networks.lora", "--max_train_steps", "3",
            "--v2", "--v_parameterization", "--seed", "2", "--max_data_loader_n_workers", "0"]
    assert run_script(train, argv) == 0
    with safe_open(str(tmp_path / "out" / "last.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["ss_v2"] == "True" and "ss_datasets" in meta
    assert json.loads(meta["ss_datasets"])[0]["subsets"][0]["num_repeats"] == 2


def _weights(path):
    return load_file(str(path))


@pytest.mark.parametrize("stop", [5, 7])
def test_resume_is_bit_identical(models, data, tmp_path, stop):
    """12 steps straight == `stop` steps, save state, resume to 12 (with accumulation, dropout, shuffle, flip)."""
    extra = ["--train_batch_size", "2", "--gradient_accumulation_steps", "2", "--shuffle_caption", "--flip_aug",
             "--network_dropout", "0.1", "--max_train_steps", "12"]
    assert run_script(train, base_args(models, data, tmp_path / "a", *extra)) == 0
    assert run_script(train, base_args(models, data, tmp_path / "b", *extra, "--save_every_n_steps", str(stop),
                                       "--save_state")) == 0
    state = tmp_path / "b" / f"at-step{stop:08d}-state"
    assert (state / "state.pt").is_file() and json.loads((state / "state.json").read_text())["global_step"] == stop
    (tmp_path / "b" / "last.safetensors").unlink()
    resume_args = base_args(models, data, tmp_path / "b", *extra, "--resume", state)
    if stop == 7:  # without --seed the resumed run takes the saved seed
        i = resume_args.index("--seed")
        del resume_args[i:i + 2]
    assert run_script(train, resume_args) == 0
    a, b = _weights(tmp_path / "a" / "last.safetensors"), _weights(tmp_path / "b" / "last.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_trained_lora_loads_in_diffusers_with_no_unmatched_keys(models, data, tmp_path, caplog):
    pytest.importorskip("peft")
    from diffusers import StableDiffusionPipeline

    from library.models.load import load_model
    from networks.lora import create_network_from_weights

    assert run_script(train, base_args(models, data, tmp_path / "out", "--learning_rate", "5e-2")) == 0
    lora = tmp_path / "out" / "last.safetensors"
    pipe = StableDiffusionPipeline.from_pretrained(str(models["sd1"]["diffusers"]), safety_checker=None,
                                                   local_files_only=True)
    with caplog.at_level("WARNING"):
        pipe.load_lora_weights(str(lora))
    assert not [r for r in caplog.records if "unexpected" in r.message.lower() or "missing" in r.message.lower()]
    ours = load_model(models["sd1"]["safetensors"])
    network, weights = create_network_from_weights(1.0, str(lora), ours.vae, ours.text_encoder, ours.unet)
    network.apply_to(ours.text_encoder, ours.unet)
    network.load_state_dict(weights)
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 32, generator=g)
    ids = torch.tensor([[49406, 320, 1125, 49407] + [49407] * 73])
    with torch.no_grad():
        assert not torch.equal(pipe.unet(x, torch.tensor([10]), ctx).sample,
                               load_model(models["sd1"]["safetensors"]).unet(x, torch.tensor([10]), ctx).sample)
        torch.testing.assert_close(pipe.unet(x, torch.tensor([10]), ctx).sample,
                                   ours.unet(x, torch.tensor([10]), ctx).sample, atol=1e-4, rtol=0)
        torch.testing.assert_close(pipe.text_encoder(ids)[0], ours.text_encoder(ids)[0], atol=1e-4, rtol=0)


def _fixed_eval_loss(model, lora_path, image_dir) -> float:
    """Loss on the training image at fixed timesteps and fixed noise (lower = better fit)."""
    from library.data.images import load_image_rgb
    from library.data.tokens import encode_tokens, tokenize_caption
    from library.training import diffusion
    from networks.lora import create_network_from_weights

    if lora_path is not None:
        network, weights = create_network_from_weights(1.0, str(lora_path), model.vae, model.text_encoder, model.unet)
        network.apply_to(model.text_encoder, model.unet)
        network.load_state_dict(weights)
    image = torch.from_numpy(load_image_rgb(next(image_dir.glob("*.png")))).permute(2, 0, 1)[None].float() / 127.5 - 1
    sched = diffusion.make_noise_scheduler(False)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        latents = model.vae.encode(image).latent_dist.mean * 0.18215
        cond = encode_tokens(model.text_encoder, tokenize_caption(model.tokenizer, "sks dog", None)[None], None, None)
        losses = []
        for t in range(50, 1000, 100):
            noise = torch.randn(latents.shape, generator=g)
            ts = torch.tensor([t])
            pred = model.unet(diffusion.add_noise(sched, latents, noise, ts), ts, cond).sample
            losses.append(float(((pred - noise) ** 2).mean()))
    return sum(losses) / len(losses)


def test_loss_goes_down_on_a_tiny_overfit_run(models, tmp_path):
    from library.models.load import load_model

    data = make_dataset(tmp_path / "one", folder="1_sks dog", count=1)
    argv = base_args(models, data, tmp_path / "out", "--learning_rate", "1e-2", "--network_dim", "8",
                     "--network_alpha", "8", "--network_train_unet_only", steps=100)
    assert run_script(train, argv) == 0
    before = _fixed_eval_loss(load_model(models["sd1"]["safetensors"]), None, data / "1_sks dog")
    after = _fixed_eval_loss(load_model(models["sd1"]["safetensors"]), tmp_path / "out" / "last.safetensors",
                             data / "1_sks dog")
    assert after < 0.8 * before, (before, after)


def test_nan_loss_stops_and_names_the_step(models, data, tmp_path, capsys):
    assert run_script(train, base_args(models, data, tmp_path / "ok", steps=1)) == 0
    state = load_file(str(tmp_path / "ok" / "last.safetensors"))
    state = {k: (torch.full_like(v, float("nan")) if k.endswith("lora_up.weight") else v) for k, v in state.items()}
    save_file(state, str(tmp_path / "nan.safetensors"))
    code = run_script(train, base_args(models, data, tmp_path / "out", "--network_weights", tmp_path / "nan.safetensors"))
    err = capsys.readouterr().err
    assert code == 2 and "the loss became nan at step 1" in err and "img" in err


def test_save_cadence_retention_and_names(models, data, tmp_path):
    out = tmp_path / "out"
    argv = base_args(models, data, out, "--max_train_epochs", "4", "--save_every_n_epochs", "1",
                     "--save_last_n_epochs", "2", "--output_name", "mylora", "--train_batch_size", "10",
                     "--save_every_n_steps", "3", "--save_last_n_steps", "2", "--save_model_as", "pt",
                     "--save_precision", "fp16")
    assert run_script(train, argv) == 0
    names = sorted(p.name for p in out.iterdir())
    # 2 steps per epoch, 8 steps: epochs 1..3 saved (the 4th is the final), only the last 2 kept;
    # steps 3 and 6 saved; keeping the last 2 steps, step 3 is removed when 6 is written
    assert names == ["mylora-000002.pt", "mylora-000003.pt", "mylora-step00000006.pt", "mylora.pt"], names
    weights = torch.load(out / "mylora.pt", weights_only=True)
    assert {v.dtype for k, v in weights.items() if not k.endswith("alpha")} == {torch.float16}


OPTION_CASES = {
    "lion": ["--optimizer_type", "Lion"],
    "sgd_nesterov": ["--optimizer_type", "SGDNesterov"],
    "adafactor": ["--optimizer_type", "AdaFactor", "--optimizer_args", "relative_step=True"],
    "dadapt": ["--optimizer_type", "DAdaptAdam", "--learning_rate", "1.0"],
    "prodigy": ["--optimizer_type", "Prodigy", "--learning_rate", "1.0"],
    "custom_class": ["--optimizer_type", "torch.optim.RMSprop", "--optimizer_args", "momentum=0.5"],
    "cosine_restarts": ["--lr_scheduler", "cosine_with_restarts", "--lr_warmup_steps", "1",
                        "--lr_scheduler_num_cycles", "2"],
    "polynomial": ["--lr_scheduler", "polynomial", "--lr_scheduler_power", "2"],
    "custom_scheduler": ["--lr_scheduler_type", "torch.optim.lr_scheduler.StepLR", "--lr_scheduler_args",
                         "step_size=2"],
    "noise_offset": ["--noise_offset", "0.1", "--adaptive_noise_scale", "0.05"],
    "multires": ["--multires_noise_iterations", "3", "--multires_noise_discount", "0.3"],
    "min_snr": ["--min_snr_gamma", "5", "--max_grad_norm", "0"],
    "clip_skip_long": ["--clip_skip", "2", "--max_token_length", "150"],
    "weighted": ["--weighted_captions"],
    "checkpointing_accum": ["--gradient_checkpointing", "--gradient_accumulation_steps", "2"],
    "bf16": ["--mixed_precision", "bf16"],
    "full_bf16": ["--mixed_precision", "bf16", "--full_bf16"],
    "conv": ["--network_args", "conv_dim=2", "conv_alpha=1"],
    "block_lr": ["--network_args", "down_lr_weight=sine", "mid_lr_weight=0.5", "up_lr_weight=cosine+.25",
                 "block_lr_zero_threshold=0.1"],
    "block_dims": ["--network_args", "block_dims=" + ",".join(["2"] * 25), "block_alphas=" + ",".join(["1"] * 25)],
    "dylora": ["--network_module", "networks.dylora", "--network_args", "unit=2"],
    "te_only_lrs": ["--network_train_text_encoder_only", "--text_encoder_lr", "5e-4"],
    "unet_lr": ["--network_train_unet_only", "--unet_lr", "5e-4"],
    "cache_latents": ["--cache_latents", "--vae_batch_size", "2", "--flip_aug"],
    "no_metadata": ["--no_metadata"],
    "tensorboard": ["--logging_dir", "{tmp}/logs", "--log_prefix", "run_"],
    "mem_eff_attn": ["--mem_eff_attn"],
    "workers": ["--max_data_loader_n_workers", "2", "--persistent_data_loader_workers"],
}


@pytest.mark.parametrize("model", ["sd1", "sd2"])
@pytest.mark.parametrize("case", sorted(OPTION_CASES))
def test_option(models, data, tmp_path, case, model):
    """Every option through the CLI on tiny SD1 and tiny SD2 (v-prediction)."""
    extra = [a.replace("{tmp}", str(tmp_path)) for a in OPTION_CASES[case]]
    assert run_script(train, base_args(models, data, tmp_path / "out", *extra, model=model, steps=3)) == 0
    out = tmp_path / "out" / "last.safetensors"
    with safe_open(str(out), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    for key in keys:
        assert key.startswith(("lora_unet_", "lora_te_"))
    if case == "conv":
        assert any("resnets_0_conv1" in k for k in keys)
    if case == "no_metadata":
        assert set(meta) == {"ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args",
                             "sshs_model_hash", "sshs_legacy_hash"} - ({"ss_network_args"})
    if case == "te_only_lrs":
        assert all(k.startswith("lora_te_") for k in keys)
    if case == "tensorboard":
        runs = list((tmp_path / "logs").glob("run_*"))
        assert len(runs) == 1 and list(runs[0].rglob("events.out.tfevents*"))
    if case == "block_dims":
        with safe_open(str(out), "pt") as f:
            assert f.get_tensor("lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight").shape[0] == 2
    assert not any(math.isnan(float(v.float().sum())) for v in load_file(str(out)).values())


def test_bad_options_are_one_line_errors(models, data, tmp_path, capsys):
    cases = [
        (["--optimizer_type", "NoSuchOptimizer"], "NoSuchOptimizer"),
        (["--network_module", "networks.nosuch"], "--network_module networks.nosuch"),
        (["--noise_offset", "0.1", "--multires_noise_iterations", "3"], "cannot be combined"),
        (["--network_args", "conv_dim"], "--network_args"),
        (["--resume", tmp_path / "missing-state"], "--resume"),
        (["--lr_scheduler", "constant", "--lr_warmup_steps", "5"], "--lr_warmup_steps"),
        (["--network_train_unet_only", "--network_train_text_encoder_only"], "leave nothing to train"),
        (["--network_weights", tmp_path / "wide.safetensors"], "--network_weights"),
    ]
    assert run_script(train, base_args(models, data, tmp_path / "w", "--network_dim", "8", steps=1)) == 0
    (tmp_path / "w" / "last.safetensors").rename(tmp_path / "wide.safetensors")
    capsys.readouterr()
    for extra, fragment in cases:
        code = run_script(train, base_args(models, data, tmp_path / "out", *extra))
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and fragment in err[0], (extra, err)


def test_continue_from_network_weights(models, data, tmp_path):
    first = tmp_path / "first"
    assert run_script(train, base_args(models, data, first, "--network_args", "conv_dim=2", "conv_alpha=1")) == 0
    start = load_file(str(first / "last.safetensors"))
    # --dim_from_weights: dims (incl. conv) come from the file; training continues from its values
    argv = base_args(models, data, tmp_path / "second", "--network_weights", first / "last.safetensors",
                     "--dim_from_weights", "--learning_rate", "0", steps=2)
    argv.remove("--network_dim")
    argv.remove("4")
    assert run_script(train, argv) == 0
    again = load_file(str(tmp_path / "second" / "last.safetensors"))
    assert again.keys() == start.keys()
    assert all(torch.equal(again[k], start[k]) for k in start)  # lr 0: the loaded weights come back unchanged


def test_reg_images_and_prior_loss_weight(models, data, tmp_path):
    reg = make_dataset(tmp_path / "reg", folder="1_dog", count=6)
    argv = base_args(models, data, tmp_path / "out", "--reg_data_dir", reg, "--prior_loss_weight", "0.5")
    assert run_script(train, argv) == 0
    with safe_open(str(tmp_path / "out" / "last.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["ss_num_reg_images"] == "6" and meta["ss_prior_loss_weight"] == "0.5"
    assert json.loads(meta["ss_reg_dataset_dirs"]) == {"1_dog": {"n_repeats": 1, "img_count": 6}}


def test_sd2_model_without_v2_flag_uses_the_sd2_tokenizer(models, data, tmp_path, caplog):
    argv = base_args(models, data, tmp_path / "out", model="sd1", steps=2)
    argv[argv.index("--pretrained_model_name_or_path") + 1] = str(models["sd2"]["safetensors"])
    with caplog.at_level("WARNING"):
        assert run_script(train, argv) == 0
    assert any("--v2 was not given" in r.message for r in caplog.records)
    from library.models.load import peek_is_v2

    assert peek_is_v2(models["sd2"]["safetensors"]) is True and peek_is_v2(models["sd1"]["safetensors"]) is False


def test_log_with_all_writes_tensorboard_and_wandb_offline(models, data, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    argv = base_args(models, data, tmp_path / "out", "--logging_dir", tmp_path / "logs", "--log_with", "all",
                     "--log_tracker_name", "lora_test", steps=2)
    assert run_script(train, argv) == 0
    (run,) = list((tmp_path / "logs").iterdir())
    assert list((run / "lora_test").glob("events.out.tfevents*"))
    assert list((run / "wandb").glob("offline-run-*/run-*.wandb"))
