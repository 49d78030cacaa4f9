"""train_textual_inversion_XTI.py end to end: one vector set per cross-attention layer (16 on the real SD
block layout, checked on the mini model that has it), each layer really attends to its own states, only the
XTI rows train, the file layout, --weights, resume, samples, SD2-v."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from library.methods import xti
from tests.train_util import make_dataset, run_script
from train_textual_inversion_XTI import main as train


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    """A random SD1 model with the real 4-level, 2-layers-per-block UNet layout (16 cross-attention layers)."""
    from tests.models_util import make_model_files

    return make_model_files(tmp_path_factory.mktemp("mini"), "mini-sd1", formats="safetensors")["safetensors"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return make_dataset(root, folder="3_zqx", captions={0: "a zqx on grass", 1: "zqx, running"})


def base_args(model, data, out, *extra, v2=False, steps=3, vectors=2):
    flags = ["--v2", "--v_parameterization"] if v2 else []
    return [*flags, "--pretrained_model_name_or_path", model, "--train_data_dir", data, "--resolution", "64",
            "--output_dir", out, "--max_train_steps", str(steps), "--learning_rate", "1e-2", "--seed", "1",
            "--max_data_loader_n_workers", "0", "--token_string", "zqx", "--init_word", "dog",
            "--num_vectors_per_token", str(vectors), "--save_model_as", "safetensors", *extra]


@pytest.fixture
def captured(monkeypatch):
    """The method as it saves (after training)."""
    seen: dict = {}
    original = xti.XTIMethod.save

    def save(self, *args, **kwargs):
        seen["method"] = self
        return original(self, *args, **kwargs)

    monkeypatch.setattr(xti.XTIMethod, "save", save)
    return seen


def test_layers_of_the_sd_block_layout():
    from library.models.random_model import build_random_model

    unet = build_random_model("mini-sd1").unet
    layers = xti.cross_attention_layers(unet)
    assert tuple(name for name, _ in layers) == xti.SD_LAYER_NAMES
    assert layers[0] == ("IN01", "down_blocks.0.attentions.0")
    assert layers[6] == ("MID", "mid_block.attentions.0")
    assert layers[7] == ("OUT03", "up_blocks.1.attentions.0")
    assert layers[-1] == ("OUT11", "up_blocks.3.attentions.2")


def test_each_layer_attends_to_its_own_states():
    """Routing with every layer given the plain states is the plain UNet, exactly; changing one layer's
    states changes the output, and differently for different layers."""
    from library.models.random_model import build_random_model

    unet = build_random_model("mini-sd1").unet.eval()
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=generator)
    t = torch.tensor([500])
    cond = torch.randn(1, 77, 32, generator=generator)
    with torch.no_grad():
        plain = unet(x, t, cond).sample
        layers = xti.cross_attention_layers(unet)
        xti.install_layer_routing(unet, layers)
        states = cond.expand(len(layers), 1, 77, 32).clone()
        same = unet(x, t, cond, cross_attention_kwargs={"xti_states": states}).sample
        outs = []
        for index in (0, 6, 15):
            changed = states.clone()
            changed[index] = torch.randn(1, 77, 32, generator=generator)
            outs.append(unet(x, t, cond, cross_attention_kwargs={"xti_states": changed}).sample)
    assert torch.equal(plain, same)
    for out in outs:
        assert not torch.allclose(out, plain, atol=1e-4)
    assert not torch.allclose(outs[0], outs[1], atol=1e-4)


def test_layer_captions_and_tokens():
    from library.models.tokenizer import load_tokenizer

    names = ["IN01", "MID"]
    assert xti.layer_token_strings("zqx", 2, names) == ["zqx_IN01", "zqx1_IN01", "zqx_MID", "zqx1_MID"]
    assert xti.layer_captions(["a zqx zqx1 dog", "zqx zqx1"], "zqx", 2, names) == [
        "a zqx_IN01 zqx1_IN01 dog", "zqx_IN01 zqx1_IN01", "a zqx_MID zqx1_MID dog", "zqx_MID zqx1_MID"]
    tokenizer = load_tokenizer(False, None)
    before = len(tokenizer)
    tokenizer.add_tokens(["zqx", "zqx_IN01", "zqx_MID"])
    ids = tokenizer("a zqx_MID dog").input_ids
    assert ids[:5] == [tokenizer.bos_token_id, 320, before + 2, 1929, tokenizer.eos_token_id]


def test_only_the_xti_rows_train_and_every_layer_learns(mini, data, tmp_path, captured):
    """Rows below the first XTI id (incl. the plain zqx/zqx1 rows), the rest of the text encoder and the UNet
    are bit-identical to the base model; each of the 16 layers' vectors moved; the file holds them."""
    from library.methods.textual_inversion import token_embedding
    from library.models.load import load_model

    out = tmp_path / "out"
    assert run_script(train, base_args(mini, data, out)) == 0
    assert sorted(p.name for p in out.iterdir()) == ["zqx.safetensors"]
    method = captured["method"]
    base = load_model(mini)
    base_rows = token_embedding(base.text_encoder).weight
    rows = token_embedding(method.model.text_encoder).weight.detach()
    first = method.token_ids[0]
    assert first == 49408 + 2 and len(method.token_ids) == 32
    assert torch.equal(rows[:base_rows.shape[0]], base_rows.detach())
    dog = base_rows[base.tokenizer.encode("dog", add_special_tokens=False)[0]].detach()
    assert torch.equal(rows[49408], dog)  # plain token initialised and never trained
    saved = load_file(str(out / "zqx.safetensors"))
    assert list(saved) == list(xti.SD_LAYER_NAMES)
    for i, name in enumerate(xti.SD_LAYER_NAMES):
        assert saved[name].shape == (2, 32)
        assert torch.equal(saved[name], rows[first + 2 * i:first + 2 * i + 2])
        assert not torch.equal(saved[name][0], dog), name  # every layer got a gradient
    for key, value in base.unet.state_dict().items():
        assert torch.equal(value, method.model.unet.state_dict()[key]), key
    te_base = {k: v for k, v in base.text_encoder.state_dict().items() if "token_embedding" not in k}
    te_now = method.model.text_encoder.state_dict()
    assert all(torch.equal(v, te_now[k]) for k, v in te_base.items())


@pytest.mark.parametrize("fmt", ["pt", "ckpt"])
def test_pickle_formats_hold_the_same_dict(mini, data, tmp_path, fmt):
    argv = base_args(mini, data, tmp_path / "out", steps=1)
    argv[argv.index("--save_model_as") + 1] = fmt
    assert run_script(train, argv) == 0
    loaded = xti.read_xti_file(tmp_path / "out" / f"zqx.{fmt}", xti.SD_LAYER_NAMES)
    assert all(loaded[name].shape == (2, 32) for name in xti.SD_LAYER_NAMES)


def test_weights_continue_and_bad_files(mini, data, tmp_path, capsys):
    first = tmp_path / "first"
    assert run_script(train, base_args(mini, data, first, steps=1)) == 0
    out = tmp_path / "cont"
    assert run_script(train, base_args(mini, data, out, "--weights", first / "zqx.safetensors",
                                       "--learning_rate", "0", steps=1)) == 0
    a, b = load_file(str(first / "zqx.safetensors")), load_file(str(out / "zqx.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in xti.SD_LAYER_NAMES)
    capsys.readouterr()
    assert run_script(train, base_args(mini, data, tmp_path / "bad", "--weights", first / "zqx.safetensors",
                                       vectors=3)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "(2, 32)" in err[0] and "(3, 32)" in err[0]
    # a plain Textual Inversion embedding is not an XTI file
    plain = tmp_path / "plain.safetensors"
    from safetensors.torch import save_file

    save_file({"emb_params": torch.zeros(2, 32)}, str(plain))
    assert run_script(train, base_args(mini, data, tmp_path / "bad2", "--weights", plain)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not an XTI embedding" in err[0] and "IN01" in err[0]


def test_resume_is_bit_identical(mini, data, tmp_path):
    """4 steps straight == 2 steps, save state, resume to 4."""
    extra = ["--train_batch_size", "2", "--flip_aug"]
    assert run_script(train, base_args(mini, data, tmp_path / "a", *extra, steps=4)) == 0
    assert run_script(train, base_args(mini, data, tmp_path / "b", *extra, "--save_every_n_steps", "2",
                                       "--save_state", steps=4)) == 0
    state = tmp_path / "b" / "zqx-step00000002-state"
    assert json.loads((state / "state.json").read_text())["global_step"] == 2
    (tmp_path / "b" / "zqx.safetensors").unlink()
    assert run_script(train, base_args(mini, data, tmp_path / "b", *extra, "--resume", state, steps=4)) == 0
    a, b = load_file(str(tmp_path / "a" / "zqx.safetensors")), load_file(str(tmp_path / "b" / "zqx.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in xti.SD_LAYER_NAMES)


def test_samples_use_the_per_layer_conditioning(mini, data, tmp_path, monkeypatch):
    """Sample prompts are encoded per layer; the image differs from one made with the plain token, and
    sampling leaves training bit-identical."""
    from library.training import sampling

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a zqx on grass --s 2 --w 64 --h 64 --d 5\n", encoding="utf-8")
    seen: list = []
    original = sampling.generate_image

    def spy(components, prompt, **kwargs):
        seen.append((prompt.prompt, components.layer_encoder is not None))
        return original(components, prompt, **kwargs)

    monkeypatch.setattr(sampling, "generate_image", spy)
    assert run_script(train, base_args(mini, data, tmp_path / "a", steps=2)) == 0
    assert run_script(train, base_args(mini, data, tmp_path / "b", "--sample_every_n_steps", "1",
                                       "--sample_prompts", prompts, steps=2)) == 0
    assert seen == [("a zqx zqx1 on grass", True)] * 2
    assert len(list((tmp_path / "b" / "sample").glob("*.png"))) == 2
    a, b = load_file(str(tmp_path / "a" / "zqx.safetensors")), load_file(str(tmp_path / "b" / "zqx.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in xti.SD_LAYER_NAMES)


def test_tiny_sd2_v_with_toml_config(models, data, tmp_path):
    """SD2 v-prediction, dataset from a TOML file, gradient checkpointing: the tiny UNet's own (3) layers are named by ldm block."""
    from tests.train_util import write_bucket_config

    config = write_bucket_config(tmp_path / "ds.toml", data / "3_zqx")
    argv = base_args(models["sd2"]["safetensors"], data, tmp_path / "out", v2=True, steps=2)
    i = argv.index("--train_data_dir")
    del argv[i:i + 2]
    assert run_script(train, [*argv, "--dataset_config", config, "--gradient_checkpointing"]) == 0
    saved = load_file(str(tmp_path / "out" / "zqx.safetensors"))
    from library.models.random_model import build_random_model

    names = [n for n, _ in xti.cross_attention_layers(build_random_model("tiny-sd2").unet)]
    assert list(saved) == sorted(names) and all(v.shape == (2, 32) for v in saved.values())


def test_validation_and_ema_use_the_per_layer_conditioning(mini, data, tmp_path, caplog):
    """The validation loss runs the UNet through XTI's per-layer routing, and --save_ema saves averaged
    per-layer vectors."""
    with caplog.at_level("INFO"):
        assert run_script(train, base_args(mini, data, tmp_path / "out", "--validation_split", "0.25",
                                           "--validate_every_n_steps", "1", "--save_ema", steps=2)) == 0
    losses = [r.getMessage() for r in caplog.records if r.getMessage().startswith("validation loss at step")]
    assert len(losses) >= 2
    saved = load_file(str(tmp_path / "out" / "zqx.safetensors"))
    assert list(saved) == list(xti.SD_LAYER_NAMES)


def test_caption_dropout_key_is_refused(mini, data, tmp_path, capsys):
    """XTI, like Textual Inversion, has no caption dropout: caption_dropout_rate = 1.0 is refused, not applied."""
    from tests.test_train_ti import dropout_config

    config = dropout_config(tmp_path / "ds.toml", data / "3_zqx", "caption_dropout_rate = 1.0", in_subset=True)
    argv = base_args(mini, data, tmp_path / "out")
    i = argv.index("--train_data_dir")
    del argv[i:i + 2]
    assert run_script(train, [*argv, "--dataset_config", config]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'caption_dropout_rate' is not supported by this training script" in err[0], err
    with pytest.raises(SystemExit) as exit_info:
        run_script(train, [*argv, "--dataset_config", config, "--caption_dropout_rate", "0.5"])
    assert exit_info.value.code == 2
