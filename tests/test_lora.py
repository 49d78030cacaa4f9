"""networks.lora: kohya key parity, maths, diffusers loading, files, block-wise settings."""

from __future__ import annotations

import copy
import io
import json
import logging
import math
import warnings

import pytest
import torch
from safetensors import safe_open

from library.errors import UserError
from networks import lora
from networks.lora_common import block_index, lr_weight_preset, model_hashes

IDS = torch.tensor([[49406, 320, 1125, 539, 320, 2368, 49407] + [49407] * 70])


# ---------------------------------------------------------------------------------------------
# fixtures and helpers


@pytest.fixture(scope="module")
def meta_sd15():
    """The full SD1.5 text encoder and UNet on the meta device (no memory)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from library.models.presets import get_preset

    configs = get_preset("sd1")
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(configs.unet)
        te = CLIPTextModel(CLIPTextConfig(**configs.text_encoder))
    return te, unet


@pytest.fixture(scope="module")
def tiny():
    """A tiny SD1 model with real (seeded random) weights."""
    from library.models.random_model import build_random_model

    return build_random_model("tiny-sd1", seed=0)


def fixture_shapes(path) -> dict[str, tuple]:
    """{key: shape} of a safetensors file."""
    with safe_open(str(path), framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def shapes(network) -> dict[str, tuple]:
    """{key: shape} of a network's state dict."""
    return {k: tuple(v.shape) for k, v in network.state_dict().items()}


def randomize(network, seed: int = 0, std: float = 0.05) -> None:
    """Give every module non-zero up (and fresh down) weights."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in network.parameters():
            p.normal_(0.0, std, generator=g)


@torch.no_grad()
def outputs(te, unet, seed: int = 1) -> dict[str, torch.Tensor]:
    """Text-encoder hidden states and UNet noise prediction on fixed inputs."""
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(2, unet.config.in_channels, 8, 8, generator=g)
    ctx = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    return {"te": te(IDS).last_hidden_state, "unet": unet(sample, torch.tensor([500, 20]), ctx).sample}


def assert_close(a: dict, b: dict, atol: float) -> None:
    """Every named output equal within ``atol``."""
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=f"{k} differs")


def layer_map(te, unet) -> dict:
    """{lora name: layer}, computed here independently of networks.lora_common."""
    result = {}
    for path, mod in te.named_modules():
        full = path if path.startswith("text_model.") else "text_model." + path
        result["lora_te_" + full.replace(".", "_")] = mod
    for path, mod in unet.named_modules():
        result["lora_unet_" + path.replace(".", "_")] = mod
    return result


@torch.no_grad()
def hand_merged(te, unet, network, multiplier: float):
    """Copies of te/unet with W + m·(alpha/rank)·(up ∘ down) written into every wrapped layer."""
    te2, unet2 = copy.deepcopy(te), copy.deepcopy(unet)
    layers = layer_map(te2, unet2)
    sd = network.state_dict()
    names = {k.split(".")[0] for k in sd}
    for name in names:
        down, up = sd[f"{name}.lora_down.weight"].double(), sd[f"{name}.lora_up.weight"].double()
        scale = float(sd[f"{name}.alpha"]) / down.shape[0]
        out_ch = up.shape[0]
        delta = (up.reshape(out_ch, -1) @ down.reshape(down.shape[0], -1))  # [out, in·k·k]
        w = layers[name].weight
        w.copy_((w.double() + multiplier * scale * delta.reshape(w.shape)).float())
    return te2, unet2


# ---------------------------------------------------------------------------------------------
# 1. key-name parity with kohya (full SD1.5 architecture on the meta device)


def test_unet_only_names_match_kohya(meta_sd15, reference_fixtures):
    te, unet = meta_sd15
    network = lora.create_network(1.0, 4, 1, None, te, unet)
    network.apply_to(te, unet, apply_text_encoder=False, apply_unet=True)
    try:
        ref = fixture_shapes(reference_fixtures / "kohya_sd15_lora_unet.safetensors")
        ours = shapes(network)
        assert set(ours) == set(ref)
        assert ours == ref
        assert len({k.split(".")[0] for k in ours}) == 192
        # default --network_alpha 1 is an int: the alpha buffer is int64 (file_formats.md §1.4)
        assert all(v.dtype == torch.int64 for k, v in network.state_dict().items() if k.endswith(".alpha"))
    finally:
        network.restore()


def test_te_conv_names_match_kohya(meta_sd15, reference_fixtures):
    te, unet = meta_sd15
    network = lora.create_network(1.0, 8, 4.0, None, te, unet, conv_dim="4", conv_alpha="1")
    ref = fixture_shapes(reference_fixtures / "kohya_sd15_lora_te_conv.safetensors")
    ours = shapes(network)
    assert set(ours) == set(ref)
    assert ours == ref
    assert len(network.text_encoder_loras) == 72 and len(network.unet_loras) == 278
    dims = network.module_dims()
    assert dims["lora_unet_down_blocks_0_downsamplers_0_conv"] == (4, 1.0)
    assert dims["lora_unet_down_blocks_1_resnets_0_conv_shortcut"] == (8, 4.0)  # 1×1: normal rank
    assert dims["lora_unet_up_blocks_0_resnets_0_time_emb_proj"] == (8, 4.0)


@pytest.mark.parametrize("name", ["kohya_sd15_lora_unet", "kohya_sd15_lora_te_conv"])
def test_kohya_files_load_on_sd15(meta_sd15, reference_fixtures, name):
    te, unet = meta_sd15
    path = reference_fixtures / f"{name}.safetensors"
    network, sd = lora.create_network_from_weights(1.0, path, None, te, unet, for_inference=True)
    info = network.load_state_dict(sd, strict=False)
    assert not info.missing_keys and not info.unexpected_keys
    for lora_name, (dim, alpha) in network.module_dims().items():
        assert dim == sd[f"{lora_name}.lora_down.weight"].shape[0]
        assert alpha == float(sd[f"{lora_name}.alpha"])


@pytest.mark.parametrize("name", ["kohya_sd15_lora_unet", "kohya_sd15_lora_te_conv"])
def test_model_hash_matches_kohya(reference_fixtures, name):
    path = reference_fixtures / f"{name}.safetensors"
    with safe_open(str(path), framework="pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    model_hash, legacy_hash = model_hashes(sd, meta)
    assert model_hash == meta["sshs_model_hash"]
    assert legacy_hash == meta["sshs_legacy_hash"]  # the ss_* header serializes byte-identically


# ---------------------------------------------------------------------------------------------
# 2. maths on real weights


@pytest.mark.parametrize("conv", [False, True])
def test_applied_equals_hand_merge(tiny, conv):
    te, unet = copy.deepcopy(tiny.text_encoder), copy.deepcopy(tiny.unet)
    base = outputs(te, unet)
    unet_keys = list(unet.state_dict())
    args = {"conv_dim": "3", "conv_alpha": "1.5"} if conv else {}
    network = lora.create_network(1.0, 4, 2.0, None, te, unet, **args)
    assert outputs(te, unet)["unet"].equal(base["unet"])  # creating hooks nothing
    network.apply_to(te, unet)
    assert_close(outputs(te, unet), base, atol=0)  # fresh network: up = 0, an exact no-op
    randomize(network)
    if conv:
        assert any(m.is_conv3x3 for m in network.unet_loras)
    applied = outputs(te, unet)
    assert (applied["te"] - base["te"]).abs().max() > 1e-2
    assert (applied["unet"] - base["unet"]).abs().max() > 1e-2
    assert_close(applied, outputs(*hand_merged(tiny.text_encoder, tiny.unet, network, 1.0)), atol=1e-5)
    assert list(unet.state_dict()) == unet_keys  # LoRA weights stay out of the base model

    network.set_multiplier(0.5)
    assert_close(outputs(te, unet), outputs(*hand_merged(tiny.text_encoder, tiny.unet, network, 0.5)), atol=1e-5)
    network.set_multiplier(0)
    assert_close(outputs(te, unet), base, atol=0)

    network.set_multiplier(0.5)
    half = outputs(te, unet)
    network.merge_to(te, unet, network.state_dict())  # bakes in and unhooks
    assert_close(outputs(te, unet), half, atol=1e-5)
    network.restore()
    assert_close(outputs(te, unet), half, atol=1e-5)


def test_restore_and_train_flags(tiny):
    te, unet = copy.deepcopy(tiny.text_encoder), copy.deepcopy(tiny.unet)
    base = outputs(te, unet)
    network = lora.create_network(1.0, 4, 1, None, te, unet)
    network.apply_to(te, unet, apply_text_encoder=False)
    assert not network.text_encoder_loras and all(k.startswith("lora_unet") for k in network.state_dict())
    randomize(network)
    assert not outputs(te, unet)["unet"].equal(base["unet"])
    assert outputs(te, unet)["te"].equal(base["te"])
    network.restore()
    assert_close(outputs(te, unet), base, atol=0)
    params = list(network.get_trainable_params())
    assert params and all(p.requires_grad for p in params)


def test_dropouts_only_in_training(tiny):
    te, unet = copy.deepcopy(tiny.text_encoder), copy.deepcopy(tiny.unet)
    network = lora.create_network(1.0, 4, 4, None, te, unet, neuron_dropout=0.5, rank_dropout="0.5",
                                  module_dropout="0.2")
    network.apply_to(te, unet)
    randomize(network)
    network.eval()
    first = outputs(te, unet)
    assert_close(outputs(te, unet), first, atol=0)
    network.train()
    torch.manual_seed(0)
    assert not torch.equal(outputs(te, unet)["te"], first["te"])
    with pytest.raises(UserError, match="rank_dropout"):
        lora.create_network(1.0, 4, 4, None, te, unet, rank_dropout="1.5")


# ---------------------------------------------------------------------------------------------
# 3. diffusers loads our files


def _pipeline(tiny):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    return StableDiffusionPipeline(vae=tiny.vae, text_encoder=copy.deepcopy(tiny.text_encoder),
                                   tokenizer=tiny.tokenizer, unet=copy.deepcopy(tiny.unet),
                                   scheduler=DDIMScheduler(**tiny.scheduler_config), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def _load_in_diffusers(pipe, path) -> str:
    """load_lora_weights, returning every warning and log line of diffusers/transformers/peft."""
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.setLevel(logging.WARNING)
    loggers = [logging.getLogger(n) for n in ("diffusers", "transformers", "peft")]
    for lg in loggers:
        lg.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pipe.load_lora_weights(str(path))
    finally:
        for lg in loggers:
            lg.removeHandler(handler)
    return buf.getvalue() + "\n".join(str(w.message) for w in caught)


@pytest.mark.parametrize("args", [{}, {"conv_dim": "2", "conv_alpha": "1"}], ids=["linear", "conv"])
def test_diffusers_loads_our_lora(tiny, tmp_path, args):
    pytest.importorskip("peft")
    te, unet = copy.deepcopy(tiny.text_encoder), copy.deepcopy(tiny.unet)
    network = lora.create_network(1.0, 4, 2, None, te, unet, **args)  # int alpha: int64 in the file
    network.apply_to(te, unet)
    randomize(network, seed=3)
    ours = outputs(te, unet)
    path = tmp_path / "lora.safetensors"
    network.save_weights(path, None, {"ss_network_module": "networks.lora"})

    pipe = _pipeline(tiny)
    base = outputs(pipe.text_encoder, pipe.unet)
    log = _load_in_diffusers(pipe, path)
    assert "unexpected" not in log.lower() and "missing" not in log.lower(), log
    theirs = outputs(pipe.text_encoder, pipe.unet)
    assert (theirs["te"] - base["te"]).abs().max() > 1e-2  # the TE LoRA did land (transformers 5 names)
    assert_close(theirs, ours, atol=1e-4)


def test_diffusers_log_capture_sees_bad_keys(tiny, tmp_path):
    """Negative control for the test above: an unknown module is reported in the captured log."""
    pytest.importorskip("peft")
    te, unet = copy.deepcopy(tiny.text_encoder), copy.deepcopy(tiny.unet)
    network = lora.create_network(1.0, 2, 1.0, None, te, unet)
    sd = network.state_dict()
    bad = {k.replace("attn1_to_q", "attn1_to_zz"): v.clone() for k, v in sd.items() if "attn1_to_q" in k}
    from safetensors.torch import save_file

    save_file({**{k: v.contiguous() for k, v in sd.items()}, **bad}, str(tmp_path / "bad.safetensors"))
    log = _load_in_diffusers(_pipeline(tiny), tmp_path / "bad.safetensors")
    assert "unexpected" in log.lower()


# ---------------------------------------------------------------------------------------------
# 4. files


def test_safetensors_round_trip(tiny, tmp_path):
    te, unet = copy.deepcopy(tiny.text_encoder), copy.deepcopy(tiny.unet)
    network = lora.create_network(1.0, 4, 1, None, te, unet, conv_dim="2", conv_alpha="0.5")
    network.apply_to(te, unet)
    randomize(network)
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": "4", "user_note": "x"}
    path = tmp_path / "a.safetensors"
    network.save_weights(path, None, meta)
    assert "sshs_model_hash" not in meta  # the caller's dict is left alone
    with safe_open(str(path), framework="pt") as f:
        stored_meta = f.metadata()
        sd = {k: f.get_tensor(k) for k in f.keys()}
    assert {k: stored_meta[k] for k in meta} == meta
    assert (stored_meta["sshs_model_hash"], stored_meta["sshs_legacy_hash"]) == model_hashes(sd, stored_meta)
    alphas = {k: v for k, v in sd.items() if k.endswith(".alpha")}
    assert all(v.dim() == 0 for v in alphas.values())
    assert alphas["lora_te_text_model_encoder_layers_0_mlp_fc1.alpha"].dtype == torch.int64  # int network_alpha
    assert alphas["lora_unet_down_blocks_0_resnets_0_conv1.alpha"].dtype == torch.float32  # conv_alpha float
    assert float(alphas["lora_unet_down_blocks_0_resnets_0_conv1.alpha"]) == 0.5

    half = tmp_path / "b.safetensors"
    network.save_weights(half, torch.float16, None)
    with safe_open(str(half), framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
        assert "sshs_model_hash" in f.metadata()

    te2, unet2 = copy.deepcopy(tiny.text_encoder), copy.deepcopy(tiny.unet)
    other, sd2 = lora.create_network_from_weights(1.0, path, None, te2, unet2)
    assert other.module_dims() == network.module_dims()
    other.apply_to(te2, unet2)
    info = other.load_weights(path)
    assert not info.missing_keys and not info.unexpected_keys
    assert_close(outputs(te2, unet2), outputs(te, unet), atol=1e-6)


@pytest.mark.parametrize("ext", [".pt", ".ckpt"])
def test_torch_file_round_trip(tiny, tmp_path, ext):
    te, unet = copy.deepcopy(tiny.text_encoder), copy.deepcopy(tiny.unet)
    network = lora.create_network(1.0, 3, 1.5, None, te, unet)
    randomize(network)
    path = tmp_path / f"n{ext}"
    network.save_weights(path, torch.bfloat16, {"ss_x": "ignored"})
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert set(raw) == set(network.state_dict())
    assert {v.dtype for v in raw.values()} == {torch.bfloat16}
    other, _ = lora.create_network_from_weights(1.0, path, None, te, unet)
    other.load_weights(path)
    for k, v in other.state_dict().items():
        assert torch.equal(v.to(torch.bfloat16), raw[k])


def test_from_weights_rebuilds_block_dims(meta_sd15):
    te, unet = meta_sd15
    dims = ",".join(str(1 + i % 4) for i in range(25))
    conv_dims = ",".join(str(i % 3) for i in range(25))  # some 0: no conv module in that block
    network = lora.create_network(1.0, 4, 1, None, te, unet, block_dims=dims, conv_block_dims=conv_dims)
    rebuilt, _ = lora.create_network_from_weights(1.0, None, None, te, unet, weights_sd=network.state_dict(),
                                                  for_inference=True)
    assert rebuilt.module_dims() == network.module_dims()
    assert shapes(rebuilt) == shapes(network)


def test_old_file_without_alpha_and_sd2_projection_shapes(tiny):
    """Pre-alpha files: alpha = rank; 4-D proj_in/out LoRAs load onto Linear projections (SD2)."""
    from library.models.random_model import build_random_model

    sd2 = build_random_model("tiny-sd2", seed=0)
    network = lora.create_network(1.0, 2, 1, None, sd2.text_encoder, sd2.unet)
    randomize(network)
    sd = {k: v for k, v in network.state_dict().items() if not k.endswith(".alpha")}
    for k in list(sd):
        if "proj_in" in k or "proj_out" in k:
            assert sd[k].dim() == 2
            sd[k] = sd[k][:, :, None, None]
    other, _ = lora.create_network_from_weights(1.0, None, None, sd2.text_encoder, sd2.unet, weights_sd=sd)
    assert all(alpha == dim for dim, alpha in other.module_dims().values())
    info = other.load_state_dict(sd, strict=False)
    assert not info.unexpected_keys and all(k.endswith(".alpha") for k in info.missing_keys)
    name = "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"
    assert torch.equal(other.state_dict()[name], network.state_dict()[name])


def test_missing_or_bad_file(tmp_path, tiny):
    with pytest.raises(UserError, match="not found"):
        lora.create_network_from_weights(1.0, tmp_path / "none.safetensors", None, tiny.text_encoder, tiny.unet)
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(UserError, match="junk.safetensors"):
        lora.create_network_from_weights(1.0, tmp_path / "junk.safetensors", None, tiny.text_encoder, tiny.unet)


# ---------------------------------------------------------------------------------------------
# 5. block-wise settings


def test_block_index_table():
    cases = {
        "lora_unet_down_blocks_0_attentions_0_proj_in": 1, "lora_unet_down_blocks_0_resnets_1_conv1": 2,
        "lora_unet_down_blocks_0_downsamplers_0_conv": 3, "lora_unet_down_blocks_1_attentions_0_proj_in": 4,
        "lora_unet_down_blocks_3_resnets_1_conv2": 11, "lora_unet_mid_block_attentions_0_proj_out": 12,
        "lora_unet_up_blocks_0_resnets_0_conv1": 13, "lora_unet_up_blocks_0_upsamplers_0_conv": 15,
        "lora_unet_up_blocks_1_attentions_2_proj_in": 18, "lora_unet_up_blocks_3_attentions_2_proj_out": 24,
        "lora_te_text_model_encoder_layers_0_mlp_fc1": -1,
    }
    assert {k: block_index(k) for k in cases} == cases


def test_lr_weight_presets():
    xs = range(12)
    assert lr_weight_preset("k", "sine") == pytest.approx([math.sin(math.pi / 2 * x / 11) for x in xs])
    assert lr_weight_preset("k", "cosine") == pytest.approx([math.sin(math.pi / 2 * (11 - x) / 11) for x in xs])
    assert lr_weight_preset("k", "linear") == pytest.approx([x / 11 for x in xs])
    assert lr_weight_preset("k", "reverse_linear+1") == pytest.approx([(11 - x) / 11 + 1 for x in xs])
    assert lr_weight_preset("k", "zeros+.25") == pytest.approx([0.25] * 12)


def test_block_lr_param_groups(meta_sd15):
    te, unet = meta_sd15
    network = lora.create_network(1.0, 4, 1, None, te, unet, down_lr_weight="0,0,0,0,0,0,1,,0.5,1,1,1",
                                  mid_lr_weight="0.5", up_lr_weight="sine")
    assert network.block_lr
    blocks = {block_index(m.lora_name) for m in network.unet_loras}
    assert blocks == {8, 12, 16, 17, 18, 19, 20, 21, 22, 23, 24}  # 7 (empty item = 0) and zero weights gone
    groups = network.prepare_optimizer_params(5e-5, 1e-4, 1e-3)
    assert groups[0]["lr"] == 5e-5 and len(groups[0]["params"]) == 72 * 2
    sine = [math.sin(math.pi / 2 * x / 11) for x in range(12)]
    weight = {8: 0.5, 12: 0.5, **{i: sine[i - 13] for i in range(16, 25)}}
    order = list(dict.fromkeys(block_index(m.lora_name) for m in network.unet_loras))  # first appearance
    assert [g["lr"] for g in groups[1:]] == pytest.approx([1e-4 * weight[i] for i in order])
    assert sum(len(g["params"]) for g in groups[1:]) == 2 * len(network.unet_loras)
    # no unet_lr: learning_rate × weight; neither: no "lr" key
    assert network.prepare_optimizer_params(None, None, 1e-3)[1]["lr"] == pytest.approx(1e-3 * weight[order[0]])
    assert all("lr" not in g for g in network.prepare_optimizer_params(None, None, None))


def test_plain_param_groups(meta_sd15):
    te, unet = meta_sd15
    network = lora.create_network(1.0, 4, 1, None, te, unet)
    groups = network.prepare_optimizer_params(None, 2e-4, 1e-3)
    assert len(groups) == 2 and "lr" not in groups[0] and groups[1]["lr"] == 2e-4


def test_block_lr_zero_threshold(meta_sd15):
    te, unet = meta_sd15
    network = lora.create_network(1.0, 4, 1, None, te, unet, up_lr_weight="linear", block_lr_zero_threshold="0.3",
                                  conv_dim="2")
    blocks = {block_index(m.lora_name) for m in network.unet_loras}
    assert not blocks & set(range(13, 17))  # linear x/11 ≤ 0.3 for x = 0…3
    assert {17, 24, 1, 3, 12} <= blocks
    lrs = [g["lr"] for g in network.prepare_optimizer_params(None, 1.0)[1:]]
    assert min(lrs) == pytest.approx(4 / 11) and max(lrs) == pytest.approx(1.0)


def test_block_dims_and_alphas(meta_sd15):
    te, unet = meta_sd15
    dims = [0] + [i % 5 + 1 for i in range(1, 25)]
    alphas = [float(i) / 2 + 0.5 for i in range(25)]
    conv_dims = [i % 3 + 1 for i in range(25)]
    network = lora.create_network(1.0, 8, 2, None, te, unet, block_dims=",".join(map(str, dims)),
                                  block_alphas=",".join(map(str, alphas)),
                                  conv_block_dims=",".join(map(str, conv_dims)))
    assert not network.block_lr  # ranks only; one UNet group
    for name, (dim, alpha) in network.module_dims().items():
        if name.startswith("lora_te"):
            assert (dim, alpha) == (8, 2.0)
            continue
        idx = block_index(name)
        conv3 = name.endswith(("conv1", "conv2", "downsamplers_0_conv", "upsamplers_0_conv"))
        assert (dim, alpha) == ((conv_dims[idx], 1.0) if conv3 else (dims[idx], alphas[idx])), name
    assert "lora_unet_down_blocks_0_downsamplers_0_conv" in network.module_dims()


@pytest.mark.parametrize("kwargs, match", [
    ({"no_such_arg": "1"}, "no_such_arg"),
    ({"conv_dim": "four"}, "conv_dim"),
    ({"block_dims": "1,2,3"}, "block_dims"),
    ({"block_dims": ",".join(["4"] * 24 + ["x"])}, "block_dims"),
    ({"down_lr_weight": "1.0"}, "down_lr_weight"),
    ({"up_lr_weight": "sine+abc"}, "up_lr_weight"),
    ({"up_lr_weight": "1,x"}, "up_lr_weight"),
    ({"mid_lr_weight": "half"}, "mid_lr_weight"),
    ({"mid_lr_weight": "1", "block_lr_zero_threshold": "?"}, "block_lr_zero_threshold"),
])
def test_bad_network_args(meta_sd15, kwargs, match):
    te, unet = meta_sd15
    with pytest.raises(UserError, match=f"--network_args {match}"):
        lora.create_network(1.0, 4, 1, None, te, unet, **kwargs)


def test_lr_weight_lists_are_padded(meta_sd15):
    te, unet = meta_sd15
    network = lora.create_network(1.0, 4, 1, None, te, unet, down_lr_weight="0.5,0.5",
                                  up_lr_weight=",".join(["2"] * 14))
    assert network.down_lr_weight == [0.5, 0.5] + [1.0] * 10
    assert network.up_lr_weight == [2.0] * 12


def test_network_metadata_helper():
    from networks.lora_common import network_metadata

    meta = network_metadata("networks.lora", None, 1, {"conv_dim": "4"})
    assert meta == {"ss_network_module": "networks.lora", "ss_network_dim": "None", "ss_network_alpha": "1",
                    "ss_network_args": json.dumps({"conv_dim": "4"})}


def test_names_under_both_transformers_layouts():
    from networks.lora_common import lora_module_name

    for path in ("encoder.layers.3.self_attn.q_proj", "text_model.encoder.layers.3.self_attn.q_proj"):
        assert lora_module_name("lora_te", path) == "lora_te_text_model_encoder_layers_3_self_attn_q_proj"
    assert lora_module_name("lora_unet", "mid_block.attentions.0.proj_in") == "lora_unet_mid_block_attentions_0_proj_in"


def test_sd2_module_counts_on_meta():
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from library.models.presets import get_preset

    configs = get_preset("sd2")
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(configs.unet)
        te = CLIPTextModel(CLIPTextConfig(**configs.text_encoder))
    network = lora.create_network(1.0, 4, 1, None, te, unet)
    assert len(network.text_encoder_loras) == 138 and len(network.unet_loras) == 192
    sd = network.state_dict()
    assert sd["lora_te_text_model_encoder_layers_22_mlp_fc1.lora_down.weight"].shape == (4, 1024)
    assert sd["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"].shape == (4, 320)  # Linear
    assert len(lora.create_network(1.0, 4, 1, None, te, unet, conv_dim="2").unet_loras) == 192 + 86
