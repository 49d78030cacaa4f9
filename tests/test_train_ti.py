"""train_textual_inversion.py end to end on tiny SD1 / SD2-v models: only the new token rows train, the
saved files reload (ours, diffusers' load_textual_inversion, kohya's fixtures), --weights, errors, resume."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from library.methods import textual_inversion as ti
from tests.train_util import make_dataset, run_script
from train_textual_inversion import main as train



@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return make_dataset(root, folder="3_zqx", captions={0: "a zqx on grass", 1: "zqx, running"})


def base_args(models, data, out, *extra, model="sd1", steps=3, vectors=2):
    flags = ["--v2", "--v_parameterization"] if model == "sd2" else []
    return [*flags, "--pretrained_model_name_or_path", models[model]["safetensors"], "--train_data_dir", data,
            "--resolution", "64", "--output_dir", out, "--max_train_steps", str(steps), "--learning_rate", "1e-2",
            "--seed", "1", "--max_data_loader_n_workers", "0", "--token_string", "zqx", "--init_word", "dog",
            "--num_vectors_per_token", str(vectors), *extra]


@pytest.fixture
def captured(monkeypatch):
    """The model as the method saves it (after training)."""
    seen: dict = {}
    original = ti.TextualInversionMethod.save

    def save(self, *args, **kwargs):
        seen["model"], seen["ids"] = self.model, list(self.token_ids)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ti.TextualInversionMethod, "save", save)
    return seen


@pytest.mark.parametrize("model,hidden", [("sd1", 32), ("sd2", 32)])
def test_only_the_new_rows_train(models, data, tmp_path, captured, model, hidden):
    """Legacy folders with captions containing the token: every other embedding row, the rest of the text
    encoder and the UNet are bit-identical to the base model; the saved vectors are the trained rows."""
    from library.models.load import load_model

    out = tmp_path / "out"
    assert run_script(train, base_args(models, data, out, model=model)) == 0
    assert sorted(p.name for p in out.iterdir()) == ["zqx.pt"]
    trained, ids = captured["model"], captured["ids"]
    assert ids == [49408, 49409]
    base = load_model(models[model]["safetensors"])
    base_rows = base.text_encoder.get_input_embeddings().weight
    rows = trained.text_encoder.get_input_embeddings().weight.detach()
    assert rows.shape[0] == base_rows.shape[0] + 2
    assert torch.equal(rows[:49408], base_rows)
    dog = base.tokenizer.encode("dog", add_special_tokens=False)[0]
    assert not torch.equal(rows[49408], base_rows[dog]) and not torch.equal(rows[49409], base_rows[dog])
    te, base_te = trained.text_encoder.state_dict(), base.text_encoder.state_dict()
    for key, value in base_te.items():
        if "token_embedding" not in key:
            assert torch.equal(te[key], value), key
    for key, value in base.unet.state_dict().items():
        assert torch.equal(trained.unet.state_dict()[key], value), key
    saved = torch.load(out / "zqx.pt", weights_only=True)
    assert saved["name"] == "zqx" and saved["step"] == 3
    assert saved["string_to_param"]["*"].shape == (2, hidden)
    assert torch.equal(saved["string_to_param"]["*"], rows[49408:49410])


@pytest.mark.parametrize("template", ["--use_object_template", "--use_style_template"])
def test_templates_replace_captions(models, data, tmp_path, template):
    out = tmp_path / "out"
    assert run_script(train, base_args(models, data, out, template, "--output_name", "emb", steps=2)) == 0
    assert (out / "emb.pt").is_file()


def test_caption_replacements_and_prompt_expansion():
    assert ti.token_strings("zqx", 3) == ["zqx", "zqx1", "zqx2"]
    assert ti.caption_replacements("zqx", 3, object_template=False, style_template=False) == {"zqx": "zqx zqx1 zqx2"}
    assert ti.caption_replacements("zqx", 1, object_template=False, style_template=False) == {}
    both = ti.caption_replacements("zqx", 2, object_template=True, style_template=True)
    assert both[""][0] == "a photo of a zqx zqx1" and len(both[""]) == 27
    style = ti.caption_replacements("zqx", 1, object_template=False, style_template=True)
    assert style[""][0] == "a painting in the style of zqx" and len(style[""]) == 19
    assert ti.expand_prompt("zqx", 2)("a zqx, (zqx:1.2)") == "a zqx zqx1, (zqx zqx1:1.2)"


@pytest.mark.parametrize("fmt", ["safetensors", "pt", "ckpt"])
def test_saved_file_loads_in_ours_and_diffusers(models, data, tmp_path, fmt):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "out"
    assert run_script(train, base_args(models, data, out, "--save_model_as", fmt)) == 0
    path = out / f"zqx.{fmt}"
    if fmt == "safetensors":
        with safe_open(str(path), "pt") as f:
            assert list(f.keys()) == ["emb_params"]
            meta = f.metadata()
        assert meta["modelspec.architecture"] == "stable-diffusion-v1/textual-inversion"
        assert meta["modelspec.title"] == "zqx"
    else:
        assert "string_to_param" in torch.load(path, weights_only=True)
    vectors = ti.read_embedding_file(path)
    assert vectors.shape == (2, 32)
    pipe = StableDiffusionPipeline.from_pretrained(str(models["sd1"]["diffusers"]), local_files_only=True,
                                                   safety_checker=None)
    pipe.load_textual_inversion(str(path), token="zqx")
    ids = pipe.tokenizer.convert_tokens_to_ids(["zqx", "zqx_1"])
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[ids].detach(), vectors)


@pytest.mark.parametrize("name", ["kohya_sd15_ti_zqx.safetensors", "kohya_sd15_ti_zqx.pt"])
def test_kohya_fixtures_load(name, reference_fixtures):
    assert ti.read_embedding_file(reference_fixtures / name).shape == (2, 768)


def test_weights_continue_and_mismatch(models, data, tmp_path, capsys):
    first = tmp_path / "first"
    assert run_script(train, base_args(models, data, first, "--save_model_as", "safetensors", steps=1)) == 0
    start = ti.read_embedding_file(first / "zqx.safetensors")
    out = tmp_path / "cont"
    # lr 0: the continued run must keep exactly the loaded vectors
    assert run_script(train, base_args(models, data, out, "--weights", first / "zqx.safetensors",
                                       "--learning_rate", "0", steps=1)) == 0
    assert torch.equal(ti.read_embedding_file(out / "zqx.pt"), start)
    capsys.readouterr()
    assert run_script(train, base_args(models, data, tmp_path / "bad", "--weights", first / "zqx.safetensors",
                                       vectors=3)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "2 vector(s)" in err[0] and "--num_vectors_per_token is 3" in err[0]


@pytest.mark.parametrize("token", ["dog", "zqx,x", ""])
def test_bad_token_is_one_line_error(models, data, tmp_path, capsys, token):
    argv = base_args(models, data, tmp_path / "out")
    argv[argv.index("--token_string") + 1] = token
    assert run_script(train, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "token_string" in err[0]


def test_debug_dataset_expands_the_token(models, data, tmp_path, capsys):
    argv = base_args(models, data, tmp_path / "out", "--debug_dataset", "--debug_dataset_dir", tmp_path / "dbg",
                     vectors=3)
    assert run_script(train, argv) == 0
    assert "zqx zqx1 zqx2" in capsys.readouterr().out


def test_resume_is_bit_identical(models, data, tmp_path):
    """4 steps straight == 2 steps, save state, resume to 4."""
    extra = ["--save_model_as", "safetensors", "--flip_aug", "--train_batch_size", "2",
             "--gradient_accumulation_steps", "2"]
    assert run_script(train, base_args(models, data, tmp_path / "a", *extra, steps=4)) == 0
    assert run_script(train, base_args(models, data, tmp_path / "b", *extra, "--save_every_n_steps", "2",
                                       "--save_state", steps=4)) == 0
    state = tmp_path / "b" / "zqx-step00000002-state"
    assert json.loads((state / "state.json").read_text())["global_step"] == 2
    (tmp_path / "b" / "zqx.safetensors").unlink()
    assert run_script(train, base_args(models, data, tmp_path / "b", *extra, "--resume", state, steps=4)) == 0
    a = ti.read_embedding_file(tmp_path / "a" / "zqx.safetensors")
    b = ti.read_embedding_file(tmp_path / "b" / "zqx.safetensors")
    assert torch.equal(a, b)
    mid = ti.read_embedding_file(tmp_path / "b" / "zqx-step00000002.safetensors")
    assert not torch.equal(a, mid)


def test_sample_prompts_use_the_expanded_token(models, data, tmp_path, monkeypatch):
    """Sample prompts reach the encoder with every vector token; sampling leaves training bit-identical."""
    from library.training import sampling

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a zqx on grass --s 2 --w 64 --h 64\n", encoding="utf-8")
    seen: list[str] = []
    original = sampling.generate_image

    def spy(components, prompt, **kwargs):
        seen.append(prompt.prompt)
        return original(components, prompt, **kwargs)

    monkeypatch.setattr(sampling, "generate_image", spy)
    extra = ["--save_model_as", "safetensors"]
    assert run_script(train, base_args(models, data, tmp_path / "a", *extra, steps=2)) == 0
    assert run_script(train, base_args(models, data, tmp_path / "b", *extra, "--sample_every_n_steps", "1",
                                       "--sample_prompts", prompts, steps=2)) == 0
    assert seen == ["a zqx zqx1 on grass"] * 2
    samples = list((tmp_path / "b" / "sample").glob("*.png"))
    assert len(samples) == 2 and all(p.name.startswith("zqx_") for p in samples)  # named after the token
    assert torch.equal(ti.read_embedding_file(tmp_path / "a" / "zqx.safetensors"),
                       ti.read_embedding_file(tmp_path / "b" / "zqx.safetensors"))


def test_real_subprocess_without_token_string_exits_2():
    repo = Path(__file__).resolve().parents[1]
    res = subprocess.run([sys.executable, str(repo / "train_textual_inversion.py")], capture_output=True, text=True,
                         cwd=repo)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "--token_string is required" in lines[0], res.stderr


def test_captions_without_the_token_are_warned_about(models, tmp_path, caplog):
    data = make_dataset(tmp_path / "d", folder="2_dog", count=2, captions={0: "a zqx dog"})
    with caplog.at_level("WARNING"):
        assert run_script(train, base_args(models, data, tmp_path / "out", steps=1)) == 0
    assert any("1 of 2 training caption(s) do not contain 'zqx'" in r.message for r in caplog.records)


def dropout_config(path: Path, image_dir: Path, line: str, in_subset: bool) -> Path:
    """A one-subset TOML setting a caption-dropout key in [general] or in the subset."""
    general, subset = ("", line) if in_subset else (line, "")
    path.write_text(f"[general]\n{general}\n[[datasets]]\nresolution = 64\n  [[datasets.subsets]]\n"
                    f"  image_dir = '{image_dir}'\n  class_tokens = 'zqx'\n  {subset}\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("line, in_subset", [("caption_dropout_rate = 1.0", False),
                                             ("caption_dropout_every_n_epochs = 1", True),
                                             ("caption_tag_dropout_rate = 0.5", True)])
def test_caption_dropout_keys_are_refused(models, data, tmp_path, capsys, line, in_subset):
    """As in kohya, Textual Inversion has no caption dropout: the config keys are refused, not applied."""
    config = dropout_config(tmp_path / "ds.toml", data / "3_zqx", line, in_subset)
    argv = base_args(models, data, tmp_path / "out")
    i = argv.index("--train_data_dir")
    del argv[i:i + 2]
    assert run_script(train, [*argv, "--dataset_config", config]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    key = line.split(" =")[0]
    where = "datasets[0].subsets[0]" if in_subset else "[general]"
    assert len(err) == 1 and f"{where}: '{key}' is not supported by this training script" in err[0], err
    assert str(config) in err[0]
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


@pytest.mark.parametrize("option", ["--caption_dropout_rate", "--caption_dropout_every_n_epochs",
                                    "--caption_tag_dropout_rate"])
def test_caption_dropout_options_are_not_accepted(models, data, tmp_path, capsys, option):
    with pytest.raises(SystemExit) as exit_info:
        run_script(train, base_args(models, data, tmp_path / "out", option, "1"))
    assert exit_info.value.code == 2
    assert f"unrecognized arguments: {option} 1" in capsys.readouterr().err


def test_sdpa_and_lowram_are_accepted_and_change_nothing(models, data, tmp_path, captured, capsys):
    """--sdpa is the default attention (every UNet processor is PyTorch SDPA either way) and --lowram has
    nothing to do: the trained vectors are bit-identical; --help says so."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    results = []
    for name, extra in (("plain", []), ("flags", ["--sdpa", "--lowram"])):
        assert run_script(train, base_args(models, data, tmp_path / name, *extra, steps=2)) == 0
        processors = captured["model"].unet.attn_processors.values()
        assert processors and all(isinstance(p, AttnProcessor2_0) for p in processors)
        results.append(torch.load(tmp_path / name / "zqx.pt", weights_only=True)["string_to_param"]["*"])
    assert torch.equal(results[0], results[1])
    capsys.readouterr()
    with pytest.raises(SystemExit):
        run_script(train, ["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--sdpa PyTorch scaled-dot-product attention: what the UNet uses anyway" in text
    assert "--lowram accepted for kohya command lines (a LoRA records it as ss_lowram); changes nothing else" in text
