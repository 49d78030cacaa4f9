"""networks.lora extras: DoRA (dora_wd), LoRA+ (loraplus_*), rsLoRA (rs_lora), module rules, lycoris.kohya."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from library.errors import UserError
from networks import lora
from networks.lora_files import model_lora_layers
from tests.train_util import make_dataset, run_script
from train_network import main as train

IDS = torch.tensor([[49406, 320, 1125, 539, 320, 2368, 49407] + [49407] * 70])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data"), captions={0: "sks dog, sitting", 1: "sks dog, running"})


def base_args(models, data, out, *extra, model="sd1", steps=4, network_args=()):
    flags = ["--v2", "--v_parameterization"] if model == "sd2" else []
    argv = [*flags, "--pretrained_model_name_or_path", models[model]["safetensors"], "--train_data_dir", data,
            "--resolution", "64", "--output_dir", out, "--network_module", "networks.lora", "--network_dim", "4",
            "--max_train_steps", str(steps), "--learning_rate", "1e-3", "--seed", "1",
            "--max_data_loader_n_workers", "0", *extra]
    return argv + (["--network_args", *network_args] if network_args else [])


def tiny_model(preset="tiny-sd1"):
    from library.models.random_model import build_random_model

    return build_random_model(preset, seed=0)


def shapes_of(path) -> dict[str, tuple]:
    with safe_open(str(path), framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def metadata_of(path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


# ---------------------------------------------------------------------------------------------
# the reference formulas, written out as AUTOMATIC1111 / ComfyUI compute them


def a1111_merged_weight(weight, down, up, alpha, magnitude, multiplier=1.0, axis="in"):
    """W + m·(W' − W) with W' = magnitude · (W + s·ΔW) / norm, the norm of the merged weight taken over
    every axis but 1 after a transpose (A1111's apply_weight_decompose), or per output row."""
    w = weight.double()
    delta = (up.double().flatten(1) @ down.double().flatten(1)).reshape(w.shape) * (float(alpha) / down.shape[0])
    merged = w + delta
    rest = [1] * (w.dim() - 1)
    if axis == "in":
        norm = merged.transpose(0, 1).reshape(w.shape[1], -1).norm(dim=1, keepdim=True)
        norm = norm.reshape(w.shape[1], *rest).transpose(0, 1)
    else:
        norm = merged.reshape(w.shape[0], -1).norm(dim=1).reshape(w.shape[0], *rest)
    dora = merged * (magnitude.double().reshape(norm.shape) / norm)
    return (w + multiplier * (dora - w)).float()


def randomize(network, seed=0):
    """Non-zero LoRA weights and magnitudes 0.8-1.2 × their start value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in network.named_parameters():
            if name.endswith("dora_scale"):
                p.mul_(0.8 + 0.4 * torch.rand(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (0.1 if "lora_up" in name else 0.2))


@torch.no_grad()
def outputs(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(2, model.unet.config.in_channels, 8, 8, generator=g)
    ctx = torch.randn(2, 77, model.unet.config.cross_attention_dim, generator=g)
    return {"te": model.text_encoder(IDS).last_hidden_state,
            "unet": model.unet(sample, torch.tensor([500, 20]), ctx).sample}


def hand_merge(model, tensors, multiplier, axis="in"):
    """Every DoRA module of ``tensors`` merged into ``model`` with :func:`a1111_merged_weight`."""
    layers = model_lora_layers(model.text_encoder, model.unet)
    names = {k.split(".")[0] for k in tensors}
    with torch.no_grad():
        for name in names:
            layer = layers[name]
            layer.weight.copy_(a1111_merged_weight(layer.weight, tensors[f"{name}.lora_down.weight"],
                                                   tensors[f"{name}.lora_up.weight"], tensors[f"{name}.alpha"],
                                                   tensors[f"{name}.dora_scale"], multiplier, axis))
    return len(names)


# ---------------------------------------------------------------------------------------------
# DoRA


@pytest.mark.parametrize("model", ["sd1", "sd2"])
def test_dora_trains_through_the_cli(models, data, tmp_path, model):
    out = tmp_path / "out"
    argv = base_args(models, data, out, "--learning_rate", "2e-2", model=model,
                     network_args=["dora_wd=true", "conv_dim=2"])
    assert run_script(train, argv) == 0
    path = out / "last.safetensors"
    shapes, weights = shapes_of(path), load_file(str(path))
    names = {k.split(".")[0] for k in shapes}
    assert all(f"{n}.dora_scale" in shapes and f"{n}.lora_down.weight" in shapes for n in names)
    assert json.loads(metadata_of(path)["ss_network_args"])["dora_wd"] == "true"
    base = tiny_model("tiny-sd2" if model == "sd2" else "tiny-sd1")
    layers = model_lora_layers(base.text_encoder, base.unet)
    moved = 0
    for name in names:
        weight = layers[name].weight
        expected = (1, weight.shape[1]) + (1,) * (weight.dim() - 2)  # [1, in] / [1, in, 1, 1], never 1-D
        assert shapes[f"{name}.dora_scale"] == expected, name
        norm = weight.detach().transpose(0, 1).reshape(weight.shape[1], -1).norm(dim=1)  # the start value
        moved += not torch.allclose(weights[f"{name}.dora_scale"].flatten(), norm, atol=1e-7)
    assert moved > len(names) // 2  # the magnitudes trained
    assert any(s == (1, 32, 1, 1) for k, s in shapes.items() if "resnets" in k and k.endswith("dora_scale"))


def test_dora_starts_at_the_weight_norm_and_changes_nothing():
    model, reference = tiny_model(), tiny_model()
    network = lora.create_network(1.0, 4, 2, None, model.text_encoder, model.unet, dora_wd="true", conv_dim="2")
    layers = model_lora_layers(model.text_encoder, model.unet)
    for module in network.all_loras():
        w = layers[module.lora_name].weight.detach()
        norm = w.transpose(0, 1).reshape(w.shape[1], -1).norm(dim=1)
        torch.testing.assert_close(module.dora_scale.detach().flatten(), norm, rtol=1e-6, atol=0)
    network.apply_to(model.text_encoder, model.unet)
    a, b = outputs(model), outputs(reference)
    assert all(torch.equal(a[k], b[k]) for k in a)  # W' = W exactly at the start


def test_dora_axis_out_shapes_and_non_square_layers():
    model = tiny_model()
    name = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k"  # a 32 → 64 Linear
    by_axis = {}
    for axis_args in ({}, {"dora_axis": "out"}):
        network = lora.create_network(1.0, 4, 1, None, model.text_encoder, model.unet, dora_wd="true",
                                      conv_dim="2", **axis_args)
        by_axis[axis_args.get("dora_axis", "in")] = {k: tuple(v.shape) for k, v in network.state_dict().items()}
    assert by_axis["in"][f"{name}.dora_scale"] == (1, 32) and by_axis["out"][f"{name}.dora_scale"] == (64, 1)
    conv = "lora_unet_down_blocks_1_resnets_0_conv1.dora_scale"  # 32 → 64, 3×3
    assert by_axis["in"][conv] == (1, 32, 1, 1) and by_axis["out"][conv] == (64, 1, 1, 1)
    assert all(len(s) in (2, 4) for axis in by_axis.values() for k, s in axis.items() if k.endswith("dora_scale"))


@pytest.mark.parametrize("axis", ["in", "out"])
@pytest.mark.parametrize("multiplier", [1.0, 0.6])
def test_dora_runtime_output_equals_the_hand_merged_weight(tmp_path, axis, multiplier):
    model, merged = tiny_model(), tiny_model()
    network = lora.create_network(multiplier, 4, 2, None, model.text_encoder, model.unet, dora_wd="true",
                                  dora_axis=axis, conv_dim="2", conv_alpha="1")
    randomize(network)
    network.apply_to(model.text_encoder, model.unet)
    network.eval()
    tensors = {k: v.detach().clone() for k, v in network.state_dict().items()}
    assert hand_merge(merged, tensors, multiplier, axis) == len(network.all_loras())
    ours, theirs, plain = outputs(model), outputs(merged), outputs(tiny_model())
    for key in ours:
        assert not torch.allclose(ours[key], plain[key], atol=1e-3)
        torch.testing.assert_close(ours[key], theirs[key], atol=2e-5, rtol=1e-5)
    # the file read back builds DoRA modules on the same axis and gives the same outputs
    network.save_weights(tmp_path / "d.safetensors")
    fresh = tiny_model()
    loaded, weights = lora.create_network_from_weights(multiplier, tmp_path / "d.safetensors", None,
                                                       fresh.text_encoder, fresh.unet)
    loaded.apply_to(fresh.text_encoder, fresh.unet)
    assert not loaded.load_state_dict(weights, strict=True).missing_keys
    assert {m.dora_axis for m in loaded.all_loras()} == {axis}
    again = outputs(fresh)
    assert all(torch.equal(again[k], ours[k]) for k in ours)
    loaded.merge_to(fresh.text_encoder, fresh.unet, weights)  # the network's own merge, same formula
    baked = outputs(fresh)
    assert all(torch.allclose(baked[k], theirs[k], atol=2e-5, rtol=1e-5) for k in ours)


def make_dora_file(path, seed=0, axis="in"):
    model = tiny_model()
    network = lora.create_network(1.0, 4, 2, None, model.text_encoder, model.unet, dora_wd="true",
                                  dora_axis=axis, conv_dim="2")
    randomize(network, seed)
    network.save_weights(path, metadata={"ss_network_module": "networks.lora", "ss_v2": "False",
                                         "ss_network_args": json.dumps({"dora_wd": "true"})})
    return path


def test_merge_lora_merges_dora_exactly(models, tmp_path):
    from library.models.load import load_model
    from networks.merge_lora import main as merge

    dora = make_dora_file(tmp_path / "dora.safetensors")
    out = tmp_path / "merged.safetensors"
    assert run_script(merge, ["--sd_model", models["sd1"]["safetensors"], "--save_to", out, "--models", dora,
                              "--ratios", "0.7"]) == 0
    merged, expected = load_model(out), load_model(models["sd1"]["safetensors"])
    tensors = load_file(str(dora))
    count = hand_merge(expected, tensors, 0.7)
    got, want = model_lora_layers(merged.text_encoder, merged.unet), model_lora_layers(expected.text_encoder,
                                                                                         expected.unet)
    assert count > 50 and not torch.equal(got["lora_unet_mid_block_attentions_0_proj_in"].weight,
                                          load_model(models["sd1"]["safetensors"]).unet.mid_block.attentions[0]
                                          .proj_in.weight)
    for name in {k.split(".")[0] for k in tensors}:
        torch.testing.assert_close(got[name].weight, want[name].weight, atol=1e-6, rtol=1e-6)


def test_tools_read_dora_files_and_refuse_what_they_cannot_keep(models, tmp_path, capsys):
    from networks.check_lora_weights import main as check
    from networks.merge_lora import main as merge
    from networks.resize_lora import main as resize
    from networks.svd_merge_lora import main as svd_merge
    from tools.show_metadata import main as show

    dora = make_dora_file(tmp_path / "dora.safetensors")
    capsys.readouterr()
    assert run_script(check, [dora, "-s"]) == 0
    out = capsys.readouterr().out
    assert "lora_unet_mid_block_attentions_0_proj_in.dora_scale,(1-64-1-1)," in out
    assert run_script(show, ["--model", dora]) == 0
    assert "dora_wd" in capsys.readouterr().out
    refusals = [(resize, ["--model", dora, "--save_to", tmp_path / "r.safetensors", "--new_rank", "2"]),
                (svd_merge, ["--models", dora, "--ratios", "1", "--save_to", tmp_path / "s.safetensors"]),
                (merge, ["--models", dora, "--ratios", "1", "--save_to", tmp_path / "m.safetensors"])]
    for tool, argv in refusals:
        assert run_script(tool, argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "DoRA" in err[0] and "dora_scale" in err[0], err
    assert not list(tmp_path.glob("[rsm].safetensors"))
    tensors = load_file(str(dora))  # a 1-D dora_scale is refused, never mis-broadcast
    key = "lora_unet_mid_block_attentions_0_proj_in.dora_scale"
    tensors[key] = tensors[key].flatten()
    save_file(tensors, str(tmp_path / "flat.safetensors"))
    assert run_script(check, [tmp_path / "flat.safetensors"]) == 2
    assert "[1, 64]" in capsys.readouterr().err
    model = tiny_model()
    with pytest.raises(UserError, match="dora_scale has shape"):
        lora.create_network_from_weights(1.0, tmp_path / "flat.safetensors", None, model.text_encoder, model.unet)


def test_dora_resume_is_bit_identical(models, data, tmp_path):
    extra = ["--train_batch_size", "2", "--max_train_steps", "6", "--learning_rate", "1e-2"]
    nargs = ["dora_wd=true", "rank_dropout=0.2", "module_dropout=0.1", "loraplus_lr_ratio=4"]
    assert run_script(train, base_args(models, data, tmp_path / "a", *extra, network_args=nargs)) == 0
    assert run_script(train, base_args(models, data, tmp_path / "b", *extra, "--save_every_n_steps", "3",
                                       "--save_state", network_args=nargs)) == 0
    (tmp_path / "b" / "last.safetensors").unlink()
    state = tmp_path / "b" / "at-step00000003-state"
    assert run_script(train, base_args(models, data, tmp_path / "b", *extra, "--resume", state,
                                       network_args=nargs)) == 0
    a, b = load_file(str(tmp_path / "a" / "last.safetensors")), load_file(str(tmp_path / "b" / "last.safetensors"))
    assert a.keys() == b.keys() and any(k.endswith("dora_scale") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_dora_option_errors(models, data, tmp_path, capsys):
    cases = [(["dora_wd=maybe"], "dora_wd=maybe"), (["dora_axis=out"], "only used with dora_wd=true"),
             (["dora_wd=true", "dora_axis=rows"], "dora_axis=rows"),
             (["dora_wd=true", "dropout=0.1"], "neuron dropout is not supported")]
    for network_args, fragment in cases:
        code = run_script(train, base_args(models, data, tmp_path / "out", network_args=network_args))
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and fragment in err[0], (network_args, err)


def test_diffusers_drops_dora_scale_and_loads_a_plain_lora(models, tmp_path, caplog):
    """diffusers' StableDiffusionPipeline.load_lora_weights warns and filters out ``dora_scale``: the file
    is applied as a plain LoRA (its down/up weights), not as DoRA."""
    pytest.importorskip("peft")
    from diffusers import StableDiffusionPipeline

    from library.models.load import load_model

    dora = make_dora_file(tmp_path / "dora.safetensors")
    pipe = StableDiffusionPipeline.from_pretrained(str(models["sd1"]["diffusers"]), safety_checker=None,
                                                   local_files_only=True)
    with caplog.at_level("WARNING"):
        pipe.load_lora_weights(str(dora))
    assert any("dora_scale" in r.getMessage() for r in caplog.records)
    plain = {k: v for k, v in load_file(str(dora)).items() if not k.endswith("dora_scale")}
    as_lora, as_dora = load_model(models["sd1"]["safetensors"]), load_model(models["sd1"]["safetensors"])
    for target, weights in ((as_lora, plain), (as_dora, load_file(str(dora)))):
        network, _ = lora.create_network_from_weights(1.0, None, None, target.text_encoder, target.unet,
                                                      weights_sd=weights)
        network.apply_to(target.text_encoder, target.unet)
        network.load_state_dict(weights)
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 32, generator=g)
    with torch.no_grad():
        theirs = pipe.unet(x, torch.tensor([10]), ctx).sample
        torch.testing.assert_close(theirs, as_lora.unet(x, torch.tensor([10]), ctx).sample, atol=1e-4, rtol=0)
        assert not torch.allclose(theirs, as_dora.unet(x, torch.tensor([10]), ctx).sample, atol=1e-3)


# ---------------------------------------------------------------------------------------------
# LoRA+, rsLoRA


def test_loraplus_param_groups_carry_ratio_times_lr():
    model = tiny_model()
    network = lora.create_network(1.0, 4, 1, None, model.text_encoder, model.unet, loraplus_lr_ratio="16",
                                  loraplus_unet_lr_ratio="8", dora_wd="true")
    groups = network.prepare_optimizer_params(1e-4, 2e-4, 1e-3)
    ids = lambda params: {id(p) for p in params}  # noqa: E731
    te_up = ids(m.lora_up.weight for m in network.text_encoder_loras)
    unet_up = ids(m.lora_up.weight for m in network.unet_loras)
    assert [g["lr"] for g in groups] == pytest.approx([1e-4, 16e-4, 2e-4, 16e-4])
    assert ids(groups[1]["params"]) == te_up and ids(groups[3]["params"]) == unet_up
    assert len(groups[0]["params"]) == 2 * len(network.text_encoder_loras)  # down + dora_scale
    assert sum(len(g["params"]) for g in groups) == len(list(network.parameters()))
    # no part lr: the ratio applies to the learning rate; block lr groups are split too
    groups = network.prepare_optimizer_params(None, None, 1e-3)
    assert [g["lr"] for g in groups] == pytest.approx([1e-3, 16e-3, 1e-3, 8e-3])
    blocks = lora.create_network(1.0, 4, 1, None, model.text_encoder, model.unet, loraplus_lr_ratio="2",
                                 up_lr_weight="0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5")
    lrs = [g["lr"] for g in blocks.prepare_optimizer_params(None, 1e-3, 1e-3)]
    assert 1e-3 in lrs and 2e-3 in lrs and 5e-4 in lrs and 1e-3 * 0.5 * 2 in lrs


def test_loraplus_lrs_reach_the_optimizer(models, data, tmp_path):
    argv = base_args(models, data, tmp_path / "out", "--unet_lr", "2e-4", "--text_encoder_lr", "1e-4",
                     "--save_state", steps=2,
                     network_args=["loraplus_lr_ratio=16", "loraplus_text_encoder_lr_ratio=4"])
    assert run_script(train, argv) == 0
    state = torch.load(tmp_path / "out" / "last-state" / "state.pt", weights_only=False)
    groups = state["optimizer"]["param_groups"]
    assert [g["initial_lr"] for g in groups] == pytest.approx([1e-4, 4e-4, 2e-4, 32e-4])
    weights = load_file(str(tmp_path / "out" / "last.safetensors"))
    n_te = len({k.split(".")[0] for k in weights if k.startswith("lora_te")})
    assert [len(g["params"]) for g in groups[:2]] == [n_te, n_te]


def test_rs_lora_stores_alpha_times_sqrt_rank(models, data, tmp_path):
    argv = base_args(models, data, tmp_path / "out", "--network_dim", "16", "--network_alpha", "2", steps=1,
                     network_args=["rs_lora=true", "conv_dim=4", "conv_alpha=3"])
    assert run_script(train, argv) == 0
    weights = load_file(str(tmp_path / "out" / "last.safetensors"))
    alphas = {k: float(v) for k, v in weights.items() if k.endswith(".alpha")}
    linear = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k.alpha"
    conv = "lora_unet_mid_block_resnets_0_conv1.alpha"
    assert alphas[linear] == pytest.approx(2 * 4) and alphas[conv] == pytest.approx(3 * 2)
    model = tiny_model()
    network, _ = lora.create_network_from_weights(1.0, tmp_path / "out" / "last.safetensors", None,
                                                  model.text_encoder, model.unet)
    scales = {m.lora_name: m.scale for m in network.all_loras()}
    assert scales[linear[:-6]] == pytest.approx(2 / math.sqrt(16))  # a standard loader's alpha'/r
    assert scales[conv[:-6]] == pytest.approx(3 / math.sqrt(4))
    assert json.loads(metadata_of(tmp_path / "out" / "last.safetensors")["ss_network_args"])["rs_lora"] == "true"


# ---------------------------------------------------------------------------------------------
# module rules


RULES = """
[[rule]]
pattern = "lora_unet_up_blocks_1_.*attn2"
dim = 8
alpha = 2

[[rule]]
pattern = "lora_te_.*mlp"
exclude = true

[[rule]]
pattern = "mid_block"
lr = 0.01
dim = 2
"""


def test_module_rules_shape_the_file_and_the_param_groups(models, data, tmp_path):
    rules = tmp_path / "rules.toml"
    rules.write_text(RULES, encoding="utf-8")
    argv = base_args(models, data, tmp_path / "out", "--save_state", steps=2,
                     network_args=[f"module_rules={rules}", "loraplus_unet_lr_ratio=4"])
    assert run_script(train, argv) == 0
    path = tmp_path / "out" / "last.safetensors"
    shapes, weights = shapes_of(path), load_file(str(path))
    attn2 = "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn2_to_q"
    assert shapes[f"{attn2}.lora_down.weight"][0] == 8 and float(weights[f"{attn2}.alpha"]) == 2
    mid = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q"
    assert shapes[f"{mid}.lora_down.weight"][0] == 2 and float(weights[f"{mid}.alpha"]) == 1
    other = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_q"
    assert shapes[f"{other}.lora_down.weight"][0] == 4
    assert not [k for k in shapes if k.startswith("lora_te") and "_mlp_" in k]
    assert [k for k in shapes if k.startswith("lora_te") and "_self_attn_" in k]
    network_args = json.loads(metadata_of(path)["ss_network_args"])
    assert network_args["module_rules"] == str(rules)
    assert json.loads(network_args["module_rules_content"])[1] == {"pattern": "lora_te_.*mlp", "exclude": True}
    groups = torch.load(tmp_path / "out" / "last-state" / "state.pt",
                        weights_only=False)["optimizer"]["param_groups"]
    n_mid = len({k.split(".")[0] for k in shapes if k.startswith("lora_unet_mid_block")})
    assert [g["initial_lr"] for g in groups] == pytest.approx([1e-3, 1e-3, 4e-3, 1e-2, 4e-2])
    assert [len(g["params"]) for g in groups[-2:]] == [n_mid, n_mid]


def test_module_rules_in_process_lr_and_first_match_wins(tmp_path, caplog):
    rules = tmp_path / "r.toml"
    rules.write_text('[[rule]]\npattern = "attn2_to_k"\nlr = 5e-4\n[[rule]]\npattern = "attn2"\ndim = 3\n'
                     '[[rule]]\npattern = "never_matches_anything"\ndim = 2\n', encoding="utf-8")
    model = tiny_model()
    with caplog.at_level("WARNING"):
        network = lora.create_network(1.0, 4, 1, None, model.text_encoder, model.unet, module_rules=str(rules))
    assert [r for r in caplog.records if "never_matches_anything" in r.getMessage()]
    assert not [r for r in caplog.records if "'attn2'" in r.getMessage()]
    dims = network.module_dims()
    assert all(d == 4 for n, (d, _) in dims.items() if n.endswith("attn2_to_k"))  # the first rule decided
    assert all(d == 3 for n, (d, _) in dims.items() if "attn2" in n and not n.endswith("attn2_to_k"))
    groups = network.prepare_optimizer_params(None, 1e-4, 1e-3)
    to_k = {id(p) for m in network.unet_loras if m.lora_name.endswith("attn2_to_k") for p in m.parameters()}
    assert groups[-1]["lr"] == 5e-4 and {id(p) for p in groups[-1]["params"]} == to_k
    assert to_k.isdisjoint(id(p) for g in groups[:-1] for p in g["params"])


@pytest.mark.parametrize("text, fragment", [
    (None, "no such file"),
    ("[[rule]\npattern = 'x'", "not valid TOML"),
    ("[[rule]]\npattern = 'x'\ndims = 4\n", "rule 1: unknown key 'dims'"),
    ("[[rule]]\npattern = 'attn('\n", "rule 1: 'pattern' 'attn(' is not a valid regular expression"),
    ("[[rule]]\npattern = 'a'\n[[rule]]\npattern = 'b'\ndim = 0\n", "rule 2: 'dim' must be an integer >= 1"),
    ("[[rule]]\npattern = 'a'\nlr = -1\n", "'lr' must be > 0"),
    ("[[rule]]\npattern = 'a'\nalpha = 'x'\n", "'alpha' must be a number"),
    ("[[rule]]\npattern = 'a'\nexclude = true\ndim = 4\n", "cannot be combined"),
    ("[[rule]]\ndim = 4\n", "'pattern'"),
    ("dim = 4\n", "top level: unknown key 'dim'"),
    ("", "no [[rule]] tables"),
])
def test_bad_module_rules_are_one_line_errors(models, data, tmp_path, capsys, text, fragment):
    rules = tmp_path / "bad.toml"
    if text is not None:
        rules.write_text(text, encoding="utf-8")
    code = run_script(train, base_args(models, data, tmp_path / "out", network_args=[f"module_rules={rules}"]))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and fragment in err[0] and str(rules) in err[0], err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# the external LyCORIS package


def test_lycoris_kohya_trains_and_names_modules_as_kohya(models, data, tmp_path):
    pytest.importorskip("lycoris.kohya")
    argv = base_args(models, data, tmp_path / "out", steps=3)
    argv[argv.index("networks.lora")] = "lycoris.kohya"
    assert run_script(train, argv + ["--network_args", "algo=lora", "preset=attn-mlp"]) == 0
    path = tmp_path / "out" / "last.safetensors"
    weights = load_file(str(path))
    te_names = {k.split(".")[0] for k in weights if k.startswith("lora_te")}
    assert te_names and all(n.startswith("lora_te_text_model_encoder_layers_") for n in te_names)
    assert metadata_of(path)["ss_network_module"] == "lycoris.kohya"
    assert any(float(v.abs().max()) > 0 for k, v in weights.items() if "lora_up" in k)
    model = tiny_model()  # kohya's module names: the file loads into networks.lora, bar LyCORIS's extra layers
    network, _ = lora.create_network_from_weights(1.0, path, None, model.text_encoder, model.unet)
    network.apply_to(model.text_encoder, model.unet)
    info = network.load_state_dict(weights, strict=False)
    assert not info.missing_keys and len(network.all_loras()) == 60
    assert {k.split(".")[0] for k in info.unexpected_keys} == {"lora_unet_time_embedding_linear_1",
                                                               "lora_unet_time_embedding_linear_2"}
