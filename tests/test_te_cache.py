"""Text-encoder output cache (library/training/te_cache.py): a cached run trains the same weights as an
uncached one (LoRA, fine-tuning, DreamBooth; weighted captions, clip skip, long captions), the files of
--cache_text_encoder_outputs_to_disk are reused and recomputed when stale, and each refusal."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.full_model_util import ldm_parts
from tests.train_util import make_dataset, run_script
from train_network import main as train_network

CAPTIONS = {0: "sks dog, sitting, grass", 1: "sks dog, running", 2: "a (sks:1.3) dog [in the snow]"}
UNCACHED = "--no_cache_text_encoder_outputs"  # runs the text encoder at every step (no automatic reuse either)


@pytest.fixture()
def data(tmp_path):
    return make_dataset(tmp_path / "data", count=4, captions=CAPTIONS)


def lora_args(models, data, out, *extra, steps=4, model="sd1"):
    flags = ["--v2", "--v_parameterization"] if model == "sd2" else []
    return [*flags, "--pretrained_model_name_or_path", models[model]["safetensors"], "--train_data_dir", data,
            "--resolution", "64", "--output_dir", out, "--network_module", "networks.lora", "--network_dim", "4",
            "--network_train_unet_only", "--max_train_steps", str(steps), "--learning_rate", "1e-2", "--seed", "1",
            "--train_batch_size", "2", "--max_data_loader_n_workers", "0", *extra]


def same_files(a: Path, b: Path) -> bool:
    wa, wb = load_file(str(a)), load_file(str(b))
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("extra", [[], ["--weighted_captions"], ["--clip_skip", "2", "--max_token_length", "150"],
                                   ["--text_encoder_batch_size", "3", "--flip_aug", "--cache_latents"]],
                         ids=["plain", "weighted", "clip-skip-long", "te-batch-3"])
def test_lora_cached_equals_uncached(models, data, tmp_path, caplog, extra):
    assert run_script(train_network, lora_args(models, data, tmp_path / "a", *extra, UNCACHED)) == 0
    with caplog.at_level("INFO"):
        assert run_script(train_network, lora_args(models, data, tmp_path / "b", *extra,
                                                   "--cache_text_encoder_outputs")) == 0
    assert any("text-encoder cache: 4 distinct caption(s), 4 encoded" in r.message for r in caplog.records)
    assert same_files(tmp_path / "a" / "last.safetensors", tmp_path / "b" / "last.safetensors")
    assert not list(data.rglob("*_te_outputs.npz"))  # in memory only


def test_sd2_v_cached_equals_uncached(models, data, tmp_path):
    assert run_script(train_network, lora_args(models, data, tmp_path / "a", UNCACHED, model="sd2", steps=3)) == 0
    assert run_script(train_network, lora_args(models, data, tmp_path / "b", "--cache_text_encoder_outputs",
                                               model="sd2", steps=3)) == 0
    assert same_files(tmp_path / "a" / "last.safetensors", tmp_path / "b" / "last.safetensors")


def test_fine_tune_and_dreambooth_cached_equal_uncached(models, data, tmp_path):
    import json

    from fine_tune import main as fine_tune
    from train_db import main as train_db

    images = data / "5_sks dog"
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({f"img{i}": {"caption": CAPTIONS.get(i, "sks dog")} for i in range(4)}))
    common = ["--pretrained_model_name_or_path", models["sd1"]["safetensors"], "--resolution", "64",
              "--max_train_steps", "3", "--learning_rate", "1e-4", "--seed", "1", "--train_batch_size", "2",
              "--max_data_loader_n_workers", "0", "--save_model_as", "safetensors"]
    for name, main, extra in (("ft", fine_tune, ["--in_json", meta, "--train_data_dir", images]),
                              ("db", train_db, ["--train_data_dir", data, "--stop_text_encoder_training", "0"])):
        assert run_script(main, [*common, *extra, UNCACHED, "--output_dir", tmp_path / f"{name}-a"]) == 0
        assert run_script(main, [*common, *extra, "--output_dir", tmp_path / f"{name}-b",
                                 "--cache_text_encoder_outputs"]) == 0
        (unet_a, te_a), (unet_b, te_b) = (ldm_parts(tmp_path / f"{name}-{x}" / "last.safetensors") for x in "ab")
        assert all(torch.equal(unet_a[k], unet_b[k]) for k in unet_a) and all(torch.equal(te_a[k], te_b[k])
                                                                           for k in te_a)


REUSE_LINE = "text-encoder outputs are reused per caption"


def test_automatic_reuse_is_the_default_and_trains_the_same_weights(models, data, tmp_path, caplog):
    """A frozen text encoder with fixed captions reuses outputs without being asked: same weights as the
    run that encodes at every step; any caption option that changes captions keeps it off."""
    with caplog.at_level("INFO"):
        assert run_script(train_network, lora_args(models, data, tmp_path / "auto")) == 0
    assert any(REUSE_LINE in r.message for r in caplog.records)
    assert not any("text-encoder cache: " in r.message for r in caplog.records)  # no up-front pass
    caplog.clear()
    with caplog.at_level("INFO"):
        assert run_script(train_network, lora_args(models, data, tmp_path / "plain", UNCACHED)) == 0
        assert run_script(train_network, lora_args(models, data, tmp_path / "shuffled", "--shuffle_caption")) == 0
    assert not any(REUSE_LINE in r.message for r in caplog.records)
    assert same_files(tmp_path / "auto" / "last.safetensors", tmp_path / "plain" / "last.safetensors")


def test_dreambooth_reuses_outputs_once_the_text_encoder_stops(models, data, tmp_path, caplog):
    """--stop_text_encoder_training 2 of 4 steps: reuse starts at step 2; same weights as encoding every step."""
    from train_db import main as train_db

    common = ["--pretrained_model_name_or_path", models["sd1"]["safetensors"], "--train_data_dir", data,
              "--resolution", "64", "--max_train_steps", "4", "--learning_rate", "1e-4", "--seed", "1",
              "--train_batch_size", "2", "--max_data_loader_n_workers", "0", "--save_model_as", "safetensors",
              "--stop_text_encoder_training", "2"]
    with caplog.at_level("INFO"):
        assert run_script(train_db, [*common, "--output_dir", tmp_path / "auto"]) == 0
    assert any(REUSE_LINE + " once the text encoder stops training (step 2)" in r.message for r in caplog.records)
    assert run_script(train_db, [*common, UNCACHED, "--output_dir", tmp_path / "plain"]) == 0
    (unet_a, te_a), (unet_b, te_b) = (ldm_parts(tmp_path / x / "last.safetensors") for x in ("auto", "plain"))
    assert all(torch.equal(unet_a[k], unet_b[k]) for k in unet_a) and all(torch.equal(te_a[k], te_b[k]) for k in te_a)


def test_automatic_reuse_stays_within_its_budget(models, tmp_path):
    """Captions past the budget are encoded at every step and not kept; the states are those of a direct
    encoding either way."""
    from library.data.tokens import encode_tokens, tokenize_caption
    from library.models.load import load_model
    from library.training.te_cache import TextEncoderCache

    model = load_model(models["sd1"]["safetensors"])

    class Encoder:  # the method's conditioning: the text encoder's last hidden states (a frozen one)
        text_encoder_in_optimizer = text_encoder_training = False

        def conditioning(self, batch):
            return encode_tokens(model.text_encoder, batch["input_ids"], None, None)

    class Group:
        tokenizer, weighted_captions, max_token_length = model.tokenizer, False, None

    one_state = 77 * model.text_encoder.config.hidden_size * 4
    cache = TextEncoderCache(Encoder(), Group(), batch_size=2, budget_bytes=2 * one_state)
    captions = ["a dog", "a cat", "a dog", "a bird"]
    states = cache.conditioning({"captions": captions}, "cpu")
    assert sorted(cache.states) == ["a cat", "a dog"]  # "a bird" is past the budget
    ids = torch.stack([tokenize_caption(model.tokenizer, c, None) for c in captions])
    with torch.no_grad():
        direct = encode_tokens(model.text_encoder, ids, None, None)
    torch.testing.assert_close(states, direct, rtol=0, atol=1e-6)
    again = cache.conditioning({"captions": ["a bird", "a dog"]}, "cpu")
    torch.testing.assert_close(again, direct[[3, 0]], rtol=0, atol=1e-6)
    assert sorted(cache.states) == ["a cat", "a dog"]


def test_no_cache_conflicts_with_the_cache_options(models, data, tmp_path, capsys):
    assert run_script(train_network, lora_args(models, data, tmp_path / "out", UNCACHED,
                                               "--cache_text_encoder_outputs")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--no_cache_text_encoder_outputs cannot be combined" in err


def test_to_disk_files_are_written_reused_and_refreshed(models, data, tmp_path, caplog):
    folder = data / "5_sks dog"
    with caplog.at_level("INFO"):
        assert run_script(train_network, lora_args(models, data, tmp_path / "a",
                                                   "--cache_text_encoder_outputs_to_disk")) == 0
    files = sorted(folder.glob("*_te_outputs.npz"))
    assert [f.name for f in files] == [f"img{i}_te_outputs.npz" for i in range(4)]
    assert any("4 distinct caption(s), 4 encoded, 0 file(s) reused, 4 written" in r.message for r in caplog.records)
    with np.load(files[0]) as npz:
        assert str(npz["caption"]) == CAPTIONS[0] and npz["hidden_states"].shape == (77, 32)
        assert str(npz["dtype"]) == "float32" and len(str(npz["cache_key"])) == 64
    stamps = {f: f.stat().st_mtime_ns for f in files}

    caplog.clear()
    with caplog.at_level("INFO"):
        assert run_script(train_network, lora_args(models, data, tmp_path / "b",
                                                   "--cache_text_encoder_outputs_to_disk")) == 0
    assert any("4 distinct caption(s), 0 encoded, 4 file(s) reused, 0 written" in r.message for r in caplog.records)
    assert {f: f.stat().st_mtime_ns for f in files} == stamps
    assert run_script(train_network, lora_args(models, data, tmp_path / "c", UNCACHED)) == 0
    assert same_files(tmp_path / "a" / "last.safetensors", tmp_path / "b" / "last.safetensors")
    assert same_files(tmp_path / "a" / "last.safetensors", tmp_path / "c" / "last.safetensors")

    # a changed caption refreshes only its own file; another clip skip refreshes all
    (folder / "img1.caption").write_text("sks dog, jumping", encoding="utf-8")
    caplog.clear()
    with caplog.at_level("INFO"):
        assert run_script(train_network, lora_args(models, data, tmp_path / "d",
                                                   "--cache_text_encoder_outputs_to_disk")) == 0
    assert any("1 encoded, 3 file(s) reused, 1 written" in r.message for r in caplog.records)
    with np.load(folder / "img1_te_outputs.npz") as npz:
        assert str(npz["caption"]) == "sks dog, jumping"
    caplog.clear()
    with caplog.at_level("INFO"):
        assert run_script(train_network, lora_args(models, data, tmp_path / "e", "--clip_skip", "2",
                                                   "--cache_text_encoder_outputs_to_disk")) == 0
    assert any("4 encoded, 0 file(s) reused, 4 written" in r.message for r in caplog.records)


def test_to_disk_of_another_model_is_recomputed(models, data, tmp_path, caplog):
    assert run_script(train_network, lora_args(models, data, tmp_path / "a",
                                               "--cache_text_encoder_outputs_to_disk", steps=1)) == 0
    caplog.clear()
    with caplog.at_level("INFO"):
        assert run_script(train_network, lora_args(models, data, tmp_path / "b", "--cache_text_encoder_outputs_to_disk",
                                                   model="sd2", steps=1)) == 0
    assert any("4 encoded, 0 file(s) reused, 4 written" in r.message for r in caplog.records)


def test_corrupt_cache_file_is_recomputed(models, data, tmp_path, caplog):
    assert run_script(train_network, lora_args(models, data, tmp_path / "a",
                                               "--cache_text_encoder_outputs_to_disk", steps=1)) == 0
    (data / "5_sks dog" / "img2_te_outputs.npz").write_bytes(b"PK\x03\x04 not really a zip")
    caplog.clear()
    with caplog.at_level("INFO"):
        assert run_script(train_network, lora_args(models, data, tmp_path / "b",
                                                   "--cache_text_encoder_outputs_to_disk", steps=1)) == 0
    assert any("1 encoded, 3 file(s) reused, 1 written" in r.message for r in caplog.records)


# ---- refusals -----------------------------------------------------------------------------------


def refused(main, argv, capsys) -> str:
    assert run_script(main, argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: --cache_text_encoder_outputs: ")
    return err


@pytest.mark.parametrize("extra,message", [
    (["--shuffle_caption"], "these change them: shuffle_caption (--shuffle_caption or the dataset config; "
                            "datasets[0].subsets[0])"),
    (["--caption_dropout_rate", "0.1"], "caption_dropout_rate (--caption_dropout_rate"),
    (["--caption_dropout_every_n_epochs", "2"], "caption_dropout_every_n_epochs (--caption_dropout_every_n_epochs"),
    (["--caption_tag_dropout_rate", "0.2"], "caption_tag_dropout_rate (--caption_tag_dropout_rate"),
    (["--token_warmup_step", "2"], "token_warmup_step (--token_warmup_step"),
    (["--weighted_captions", "--max_token_length", "150"], "--weighted_captions with --max_token_length 150/225"),
    (["--text_encoder_batch_size", "0"], "--text_encoder_batch_size must be at least 1, got 0"),
])
def test_caption_options_are_refused(models, data, tmp_path, capsys, extra, message):
    err = refused(train_network, lora_args(models, data, tmp_path / "out", "--cache_text_encoder_outputs", *extra),
                  capsys)
    assert "needs fixed captions" in err or "--text_encoder_batch_size" in err
    assert message in err


def test_training_text_encoders_are_refused(models, data, tmp_path, capsys):
    from fine_tune import main as fine_tune
    from train_db import main as train_db
    from train_textual_inversion import main as train_ti
    from train_textual_inversion_XTI import main as train_xti

    argv = lora_args(models, data, tmp_path / "out", "--cache_text_encoder_outputs")
    argv.remove("--network_train_unet_only")
    assert "LoRA trains text-encoder modules unless --network_train_unet_only is given" in refused(
        train_network, argv, capsys)
    common = ["--pretrained_model_name_or_path", models["sd1"]["safetensors"], "--resolution", "64",
              "--output_dir", tmp_path / "out", "--max_train_steps", "1", "--max_data_loader_n_workers", "0",
              "--cache_text_encoder_outputs_to_disk"]
    assert "DreamBooth trains it unless --stop_text_encoder_training is 0 or negative" in refused(
        train_db, [*common, "--train_data_dir", data], capsys)
    assert "--no_token_padding (the padding depends on the batch)" in refused(
        train_db, [*common, "--train_data_dir", data, "--stop_text_encoder_training", "-1", "--no_token_padding"],
        capsys)
    meta = tmp_path / "meta.json"
    meta.write_text('{"img0": {"caption": "a dog"}}')
    assert "--train_text_encoder trains it" in refused(
        fine_tune, [*common, "--in_json", meta, "--train_data_dir", data / "5_sks dog", "--train_text_encoder"],
        capsys)
    for main in (train_ti, train_xti):
        err = refused(main, [*common, "--train_data_dir", data, "--token_string", "zqx", "--init_word", "dog"],
                      capsys)
        assert "Textual Inversion trains embeddings inside the text encoder" in err
    assert not list(data.rglob("*_te_outputs.npz"))
