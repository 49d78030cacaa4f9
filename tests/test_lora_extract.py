"""LoRA utilities: extract_lora_from_models, extract_lora_from_dylora and lora_interrogator on tiny models."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from library.models.load import load_model
from library.models.save import save_model
from networks import dylora, lora
from networks import extract_lora_from_dylora as dysplit
from networks import extract_lora_from_models as extract
from networks import lora_interrogator as interrogator
from networks.lora_common import load_state_dict_file, model_hashes, network_metadata, save_state_dict_file
from networks.lora_extract import factorize, pair_modules
from tests.train_util import run_script

IDS = torch.tensor([[49406, 320, 1125, 539, 320, 2368, 49407] + [49407] * 70])
RANK = 4


# ---------------------------------------------------------------------------------------------
# helpers and fixtures


def randomize(modules, seed: int, std: float = 0.05) -> None:
    """Non-zero down and up weights for the given LoRA modules."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in modules:
            for p in module.parameters():
                p.normal_(0.0, std, generator=g)


def make_tuned(base_path, out_path, seed: int, conv: bool, te: bool = True) -> set[str]:
    """Merge a random rank-4 LoRA into a copy of the base model and save it; returns the LoRA's keys."""
    model = load_model(base_path)
    kwargs = {"conv_dim": str(RANK), "conv_alpha": "1"} if conv else {}
    network = lora.create_network(1.0, RANK, 2, None, model.text_encoder, model.unet, **kwargs)
    randomize(network.unet_loras + (network.text_encoder_loras if te else []), seed)
    keys = {k for k in network.state_dict() if te or k.startswith("lora_unet")}
    network.merge_to()  # W += m·(alpha/rank)·up@down in every wrapped layer (zero up: unchanged)
    save_model(model, out_path, "safetensors")
    return keys


@torch.no_grad()
def outputs(model) -> dict[str, torch.Tensor]:
    """Text-encoder hidden states and UNet noise prediction on fixed inputs."""
    g = torch.Generator().manual_seed(1)
    unet = model.unet
    sample = torch.randn(2, unet.config.in_channels, 8, 8, generator=g)
    ctx = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    return {"te": model.text_encoder(IDS)[0], "unet": unet(sample, torch.tensor([500, 20]), ctx).sample}


def outputs_with_lora(base_path, lora_path) -> dict[str, torch.Tensor]:
    """Outputs of the base model with the LoRA file applied (networks.lora, multiplier 1)."""
    model = load_model(base_path)
    network, sd = lora.create_network_from_weights(1.0, lora_path, None, model.text_encoder, model.unet)
    network.apply_to(model.text_encoder, model.unet)
    network.load_state_dict(sd)
    return outputs(model)


def mean_error(a: dict, b: dict) -> dict[str, float]:
    """Mean absolute difference per output."""
    return {k: float((a[k] - b[k]).abs().mean()) for k in a}


@pytest.fixture(scope="module")
def tuned(models, tmp_path_factory):
    """Tuned copies of the tiny models: SD1 with a conv LoRA, SD1 UNet-only, SD2 (all as ldm files)."""
    root = tmp_path_factory.mktemp("tuned")
    sd1, sd2 = models["sd1"]["safetensors"], models["sd2"]["safetensors"]
    result = {"sd1_conv": root / "sd1_conv.safetensors", "sd1_unet": root / "sd1_unet.safetensors",
              "sd2": root / "sd2.safetensors"}
    keys = {"sd1_conv": make_tuned(sd1, result["sd1_conv"], seed=0, conv=True),
            "sd1_unet": make_tuned(sd1, result["sd1_unet"], seed=1, conv=False, te=False),
            "sd2": make_tuned(sd2, result["sd2"], seed=2, conv=False)}
    base_out = {"sd1": outputs(load_model(sd1)), "sd2": outputs(load_model(sd2))}
    tuned_out = {name: outputs(load_model(path)) for name, path in result.items()}
    return {"paths": result, "keys": keys, "base_out": base_out, "tuned_out": tuned_out}


def read_file(path):
    """(tensors, metadata) of a safetensors file."""
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def error_of(capsys) -> str:
    """The one-line error printed by run_main."""
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: "), err
    return err[-1]


# ---------------------------------------------------------------------------------------------
# extract_lora_from_models


def test_extract_reproduces_merged_conv_lora(models, tuned, tmp_path, capsys):
    base = models["sd1"]["safetensors"]
    out = tmp_path / "sub" / "extracted.safetensors"
    assert run_script(extract.main, ["--model_org", base, "--model_tuned", tuned["paths"]["sd1_conv"],
                                     "--save_to", out, "--dim", RANK, "--conv_dim", RANK,
                                     "--clamp_quantile", "1"]) == 0
    tensors, meta = read_file(out)
    # exactly the modules networks.lora trains with conv_dim (same names and shapes)
    assert set(tensors) == tuned["keys"]["sd1_conv"]
    assert all(v.dtype == torch.float32 for v in tensors.values())
    assert all(float(v) == RANK for k, v in tensors.items() if k.endswith(".alpha"))
    assert any(v.dim() == 4 and v.shape[2:] == (3, 3) for v in tensors.values())
    assert meta["ss_network_module"] == "networks.lora"
    assert meta["ss_network_dim"] == meta["ss_network_alpha"] == str(RANK)
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": str(RANK), "conv_alpha": str(RANK)}
    assert meta["ss_v2"] == "False" and meta["ss_base_model_version"] == "sd_v1"
    assert (meta["sshs_model_hash"], meta["sshs_legacy_hash"]) == model_hashes(tensors, meta)
    got = outputs_with_lora(base, out)
    want = tuned["tuned_out"]["sd1_conv"]
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-4, rtol=0, msg=f"{k} differs")
    effect = mean_error(tuned["base_out"]["sd1"], want)
    assert min(effect.values()) > 1e-3  # the LoRA really changed both parts
    assert "12 text-encoder and 79 U-Net modules" in capsys.readouterr().out


def test_extract_clamp_and_lower_rank_approximate(models, tuned, tmp_path):
    base = models["sd1"]["safetensors"]
    want = tuned["tuned_out"]["sd1_conv"]
    effect = mean_error(tuned["base_out"]["sd1"], want)
    errors = {}
    for name, extra in (("clamped", ["--dim", RANK, "--conv_dim", RANK]),
                        ("rank3", ["--dim", 3, "--conv_dim", 3, "--clamp_quantile", "1"])):
        out = tmp_path / f"{name}.safetensors"
        assert run_script(extract.main, ["--model_org", base, "--model_tuned", tuned["paths"]["sd1_conv"],
                                         "--save_to", out, *extra]) == 0
        errors[name] = mean_error(outputs_with_lora(base, out), want)
        if name == "rank3":
            tensors, meta = read_file(out)
            assert {v.shape[0] for k, v in tensors.items() if k.endswith("lora_down.weight")} == {3}
    for k in effect:
        # rank 4 unclamped is exact (1e-6, previous test); the 0.99-quantile clamp costs a little, a
        # lower rank more (a random LoRA has a flat spectrum), but both stay well below the LoRA's effect
        assert 1e-5 < errors["clamped"][k] < 0.25 * effect[k], (k, errors, effect)
        assert 1e-3 < errors["rank3"][k] < 0.6 * effect[k], (k, errors, effect)


def test_extract_sd2_from_diffusers_folder_fp16(models, tuned, tmp_path):
    base_dir = models["sd2"]["diffusers"]
    out = tmp_path / "sd2.safetensors"
    assert run_script(extract.main, ["--v2", "--model_org", base_dir, "--model_tuned", tuned["paths"]["sd2"],
                                     "--save_to", out, "--dim", RANK, "--clamp_quantile", "1",
                                     "--save_precision", "fp16", "--no_metadata"]) == 0
    tensors, meta = read_file(out)
    assert set(tensors) == tuned["keys"]["sd2"]
    assert all(v.dtype == torch.float16 for v in tensors.values())
    assert set(meta) == {"ss_network_module", "ss_network_dim", "ss_network_alpha", "sshs_model_hash",
                         "sshs_legacy_hash"}
    got = outputs_with_lora(base_dir, out)
    for k, want in tuned["tuned_out"]["sd2"].items():
        torch.testing.assert_close(got[k], want, atol=2e-2, rtol=0, msg=f"{k} differs")  # fp16 factors


def test_same_text_encoder_gives_unet_only_lora_pt(models, tuned, tmp_path, capsys):
    out = tmp_path / "unet_only.pt"
    assert run_script(extract.main, ["--model_org", models["sd1"]["safetensors"],
                                     "--model_tuned", tuned["paths"]["sd1_unet"], "--save_to", out]) == 0
    assert "Text encoder is same. Extract U-Net only." in capsys.readouterr().out
    sd, meta = load_state_dict_file(out)
    assert meta == {} and sd
    assert all(k.startswith("lora_unet_") for k in sd)
    assert set(sd) == tuned["keys"]["sd1_unet"]
    assert not any(v.dim() == 4 and v.shape[2:] == (3, 3) for v in sd.values())  # no --conv_dim: LierLa only


def test_factorize_rank_and_clamp():
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(12, 3, generator=g) @ torch.randn(3, 5, generator=g)
    down, up, q = factorize(delta, 8, clamp_quantile=1.0)
    assert q == 5 and down.shape == (5, 5) and up.shape == (12, 5)  # capped at min(rank, in, out)
    torch.testing.assert_close(up @ down, delta, atol=1e-4, rtol=0)
    free_down, free_up, _ = factorize(delta, 3, clamp_quantile=1.0)
    h = float(torch.quantile(torch.cat([free_up.flatten(), free_down.flatten()]), 0.9))  # signed values
    down, up, q = factorize(delta, 3, clamp_quantile=0.9)
    assert torch.equal(up, free_up.clamp(-h, h)) and torch.equal(down, free_down.clamp(-h, h))
    assert float(up.abs().max()) == pytest.approx(h) and not torch.equal(up, free_up)
    conv = torch.randn(8, 4, 3, 3, generator=g)
    down, up, q = factorize(conv, 16, clamp_quantile=1.0)
    assert q == 4 and down.shape == (4, 4, 3, 3) and up.shape == (8, 4, 1, 1)


@pytest.mark.parametrize("argv, message", [
    ([], "--model_org is required"),
    (["--model_org", "{base}"], "--model_tuned is required"),
    (["--model_org", "{base}", "--model_tuned", "{base}"], "--save_to is required"),
    (["--model_org", "{tmp}/missing.safetensors", "--model_tuned", "{base}", "--save_to", "{tmp}/x.safetensors"],
     "missing.safetensors: no such file or folder"),
    (["--model_org", "{base}", "--model_tuned", "{base}", "--save_to", "{base}"],
     "is the same file as --model_org"),
    (["--model_org", "{base}", "--model_tuned", "{base}", "--save_to", "{tmp}/x.safetensors", "--dim", "0"],
     "--dim 0: the rank must be at least 1"),
    (["--model_org", "{base}", "--model_tuned", "{base}", "--save_to", "{tmp}/x.safetensors", "--conv_dim", "0"],
     "--conv_dim 0: the rank must be at least 1"),
    (["--model_org", "{base}", "--model_tuned", "{base}", "--save_to", "{tmp}/x.safetensors",
      "--clamp_quantile", "0"], "--clamp_quantile 0.0: must be in (0, 1]"),
    (["--model_org", "{base}", "--model_tuned", "{base}", "--save_to", "{tmp}/x.safetensors", "--min_diff", "-1"],
     "--min_diff -1.0: must not be negative"),
    (["--model_org", "{base}", "--model_tuned", "{base}", "--save_to", "{tmp}/x.safetensors", "--device", "nope"],
     "--device nope: not a torch device name"),
    (["--model_org", "{base}", "--model_tuned", "{base}", "--save_to", "{tmp}/x.safetensors"],
     "have the same U-Net and text-encoder weights"),
    (["--model_org", "{base}", "--model_tuned", "{sd2}", "--save_to", "{tmp}/x.safetensors"],
     "is SD1.x but --model_tuned"),
])
def test_extract_errors(models, tmp_path, capsys, argv, message):
    values = {"base": str(models["sd1"]["safetensors"]), "sd2": str(models["sd2"]["safetensors"]),
              "tmp": str(tmp_path)}
    assert run_script(extract.main, [a.format(**values) for a in argv]) == 2
    assert message in error_of(capsys)
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_extract_cuda_device_without_cuda(models, tmp_path, capsys):
    base = str(models["sd1"]["safetensors"])
    assert run_script(extract.main, ["--model_org", base, "--model_tuned", base, "--save_to", tmp_path / "x.pt",
                                     "--device", "cuda"]) == 2
    assert "--device cuda: CUDA is not available" in error_of(capsys)


def test_extract_different_architectures(tmp_path, models, capsys):
    from tests.models_util import make_model_files

    mini = make_model_files(tmp_path, "mini-sd1", formats="safetensors")["safetensors"]
    assert run_script(extract.main, ["--model_org", models["sd1"]["safetensors"], "--model_tuned", mini,
                                     "--save_to", tmp_path / "x.safetensors"]) == 2
    assert "have different architectures" in error_of(capsys)
    # same layer names, different shapes
    org = [("lora_unet_a", torch.nn.Linear(4, 8))]
    other = [("lora_unet_a", torch.nn.Linear(4, 6))]
    with pytest.raises(Exception, match=r"layer lora_unet_a has weight shape \(8, 4\) vs \(6, 4\)"):
        pair_modules(org, other, 4, None, "a", "b")


# ---------------------------------------------------------------------------------------------
# extract_lora_from_dylora


@pytest.fixture(scope="module")
def dylora_file(tmp_path_factory):
    """A rank-6, unit-2 DyLoRA (with 3×3 convs) of the tiny SD1 model, saved with metadata."""
    from library.models.random_model import build_random_model

    model = build_random_model("tiny-sd1", seed=0)
    network = dylora.create_network(1.0, 6, 3, None, model.text_encoder, model.unet, unit="2", conv_dim="6")
    randomize(network.all_loras(), seed=3)
    meta = network_metadata("networks.dylora", 6, 3, {"unit": "2", "conv_dim": "6"})
    meta["ss_training_comment"] = "my run"
    path = tmp_path_factory.mktemp("dylora") / "dy.safetensors"
    network.save_weights(path, None, meta)
    return path, network


def test_dylora_split_matches_state_dict_at_rank(dylora_file, tmp_path, capsys):
    path, network = dylora_file
    _, source_meta = read_file(path)
    assert run_script(dysplit.main, ["--model", path, "--save_to", tmp_path / "split.safetensors",
                                     "--unit", "2"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["split-0002.safetensors", "split-0004.safetensors"]
    for rank in (2, 4):
        tensors, meta = read_file(tmp_path / f"split-{rank:04d}.safetensors")
        want = network.state_dict_at_rank(rank)
        assert set(tensors) == set(want)
        for key, value in want.items():
            assert torch.equal(tensors[key], value), key
        assert meta["ss_training_comment"] == f"split from DyLoRA, rank 6 to {rank}; my run"
        assert meta["ss_network_dim"] == str(rank)
        assert meta["ss_network_module"] == "networks.dylora" and meta["ss_network_alpha"] == "3"
        assert (meta["sshs_model_hash"], meta["sshs_legacy_hash"]) == model_hashes(tensors, meta)
        assert meta["sshs_model_hash"] != source_meta["sshs_model_hash"]
    assert "writing ranks 2, 4" in capsys.readouterr().out


def test_dylora_unit_from_metadata_and_pt_files(dylora_file, tmp_path, capsys):
    path, network = dylora_file
    assert run_script(dysplit.main, ["--model", path, "--save_to", tmp_path / "a.pt"]) == 0
    sd = torch.load(tmp_path / "a-0004.pt", weights_only=True)
    assert all(torch.equal(sd[k], v) for k, v in network.state_dict_at_rank(4).items())
    # a .pt input has no metadata: --unit must be given
    assert run_script(dysplit.main, ["--model", tmp_path / "a-0004.pt", "--save_to", tmp_path / "b.pt"]) == 2
    assert "--unit is required" in error_of(capsys)
    assert run_script(dysplit.main, ["--model", tmp_path / "a-0004.pt", "--save_to", tmp_path / "b.safetensors",
                                     "--unit", "2"]) == 0
    tensors, meta = read_file(tmp_path / "b-0002.safetensors")
    assert meta["ss_network_dim"] == "2" and meta["ss_training_comment"] == "split from DyLoRA, rank 4 to 2; "


def test_dylora_unit_mismatch_warns(dylora_file, tmp_path, caplog):
    path, _ = dylora_file
    with caplog.at_level(logging.WARNING):
        assert run_script(dysplit.main, ["--model", path, "--save_to", tmp_path / "c.safetensors",
                                         "--unit", "3"]) == 0
    assert "differs from the unit=2 recorded" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c-0003.safetensors"]


def test_dylora_errors(dylora_file, tmp_path, capsys):
    path, network = dylora_file
    plain = tmp_path / "plain.safetensors"
    save_state_dict_file(network.state_dict(), plain, network_metadata("networks.lora", 6, 3))
    junk = tmp_path / "junk.safetensors"
    save_file({"weight": torch.zeros(2)}, str(junk))
    clash = tmp_path / "x-0002.safetensors"
    clash.write_bytes(path.read_bytes())
    cases = [
        ([], "--model is required"),
        (["--model", path], "--save_to is required"),
        (["--model", plain, "--save_to", tmp_path / "o.safetensors", "--unit", "2"],
         "is not a DyLoRA file: its ss_network_module is 'networks.lora'"),
        (["--model", junk, "--save_to", tmp_path / "o.safetensors", "--unit", "2"],
         "junk.safetensors is not a LoRA file"),
        (["--model", path, "--save_to", tmp_path / "o.safetensors", "--unit", "4"],
         "the rank 6 of lora_te_text_model_encoder_layers_0_mlp_fc1"),
        (["--model", path, "--save_to", tmp_path / "o.safetensors", "--unit", "6"], "no smaller rank to split out"),
        (["--model", path, "--save_to", tmp_path / "o.safetensors", "--unit", "0"], "--unit 0: must be at least 1"),
        (["--model", clash, "--save_to", tmp_path / "x.safetensors"], "would overwrite --model"),
    ]
    for argv, message in cases:
        assert run_script(dysplit.main, argv) == 2, argv
        assert message in error_of(capsys), argv
    assert not list(tmp_path.glob("o-*"))


# ---------------------------------------------------------------------------------------------
# lora_interrogator


@pytest.fixture(scope="module")
def interrogator_model(models, tmp_path_factory):
    """A tiny SD1 model in which only the token 'dog</w>' has a component along a direction u at layer 0,
    and a LoRA (layer 0 v_proj, down = u) that therefore changes only that token's encoding."""
    model = load_model(models["sd1"]["safetensors"])
    te = model.text_encoder
    token = model.tokenizer.convert_tokens_to_ids("dog</w>")
    hidden = te.config.hidden_size
    u = torch.zeros(hidden)
    u[0], u[1] = 1.0, -1.0
    u = u / u.norm()  # zero mean: layer norm keeps the component along u
    layer0 = te.text_model.encoder.layers[0] if hasattr(te, "text_model") else te.encoder.layers[0]
    emb = te.get_input_embeddings().weight
    pos = (te.text_model.embeddings if hasattr(te, "text_model") else te.embeddings).position_embedding.weight
    with torch.no_grad():
        emb -= (emb @ u)[:, None] * u[None, :]
        pos -= (pos @ u)[:, None] * u[None, :]
        emb[token] += 0.5 * u
        layer0.layer_norm1.weight.fill_(1.0)
        layer0.layer_norm1.bias.zero_()
    root = tmp_path_factory.mktemp("interrogate")
    model_path = save_model(model, root / "model.safetensors", "safetensors")
    name = "lora_te_text_model_encoder_layers_0_self_attn_v_proj"
    g = torch.Generator().manual_seed(0)
    lora_path = root / "lora.safetensors"
    save_state_dict_file({f"{name}.lora_down.weight": u[None, :].clone(),
                          f"{name}.lora_up.weight": torch.randn(hidden, 1, generator=g),
                          f"{name}.alpha": torch.tensor(1.0)}, lora_path)
    return model_path, lora_path, token


def test_interrogator_ranks_the_affected_token_first(interrogator_model, capsys):
    model_path, lora_path, token = interrogator_model
    assert run_script(interrogator.main, ["--sd_model", model_path, "--model", lora_path,
                                          "--batch_size", "8192"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[")]
    assert len(lines) == 100
    assert lines[0].startswith(f"[  0]: {token:5d} dog</w>")
    top, second = float(lines[0].rsplit(":", 1)[1]), float(lines[1].rsplit(":", 1)[1])
    assert top > 1e-3 and second < 1e-4 * top


def test_interrogator_clip_skip_and_unet_only_lora(interrogator_model, tuned, tmp_path, capsys):
    model_path, lora_path, token = interrogator_model
    assert run_script(interrogator.main, ["--sd_model", model_path, "--model", lora_path, "--batch_size", "8192",
                                          "--clip_skip", "2"]) == 0
    assert capsys.readouterr().out.splitlines()[-100].startswith(f"[  0]: {token:5d} dog</w>")
    unet_only = tmp_path / "unet.safetensors"
    save_state_dict_file({"lora_unet_x.lora_down.weight": torch.zeros(1, 4),
                          "lora_unet_x.lora_up.weight": torch.zeros(4, 1)}, unet_only)
    assert run_script(interrogator.main, ["--sd_model", model_path, "--model", unet_only]) == 0
    assert "has no text-encoder modules" in capsys.readouterr().out


def test_interrogator_errors(interrogator_model, tmp_path, capsys):
    model_path, lora_path, _ = interrogator_model
    stray = tmp_path / "stray.safetensors"
    save_state_dict_file({"lora_te_text_model_encoder_layers_9_mlp_fc1.lora_down.weight": torch.zeros(1, 32),
                          "lora_te_text_model_encoder_layers_9_mlp_fc1.lora_up.weight": torch.zeros(64, 1)}, stray)
    wrong = tmp_path / "wrong.safetensors"
    name = "lora_te_text_model_encoder_layers_0_mlp_fc1"
    save_state_dict_file({f"{name}.lora_down.weight": torch.zeros(1, 48),
                          f"{name}.lora_up.weight": torch.zeros(64, 1)}, wrong)
    half = tmp_path / "half.safetensors"
    save_state_dict_file({f"{name}.lora_down.weight": torch.zeros(1, 32)}, half)
    cases = [
        ([], "--sd_model is required"),
        (["--sd_model", model_path], "--model is required"),
        (["--sd_model", model_path, "--model", lora_path, "--batch_size", "0"], "--batch_size 0: must be at least 1"),
        (["--sd_model", model_path, "--model", lora_path, "--clip_skip", "0"], "--clip_skip 0: must be at least 1"),
        (["--sd_model", model_path, "--model", stray], "have no matching layer"),
        (["--sd_model", model_path, "--model", wrong], "does not fit the text encoder"),
        (["--sd_model", model_path, "--model", model_path], "is not a LoRA file: it is a Stable Diffusion checkpoint"),
        (["--sd_model", model_path, "--model", half], f"LoRA module {name} has lora_down.weight but no lora_up"),
    ]
    for argv, message in cases:
        assert run_script(interrogator.main, argv) == 2, argv
        assert message in error_of(capsys), argv
