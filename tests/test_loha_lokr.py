"""LoHa and LoKr networks (networks.loha, networks.lokr) end to end on tiny SD1 / SD2-v models.

Every case trains through train_network.py; its file is checked against the documented layout
(docs/train_network.md, written out again here), read back bit-identically, resumed exactly, and its
run-time effect compared with ΔW merged by hand (formulas below) and by merge_lora.py.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from networks import check_lora_weights, loha, lokr, merge_lora, resize_lora, svd_merge_lora
from networks.lora_files import load_lora_file, model_lora_layers
from networks.lycoris_common import factorization
from tests.lora_tools_util import assert_close, load, max_diff, one_error_line, outputs
from tests.train_util import make_dataset, run_script, runs_once
from tools import show_metadata
from train_network import main as train

MODULES = {"networks.loha": loha, "networks.lokr": lokr}
DROPOUTS = ["rank_dropout=0.1", "module_dropout=0.1"]
# name: module, model, --network_dim, --network_alpha, the type's settings (as parsed), --network_args
CASES = {
    "loha-sd1": ("networks.loha", "sd1", 4, 2.0, {"conv_dim": 2, "conv_alpha": 3.0, "tucker": True},
                 ["conv_dim=2", "conv_alpha=3", "use_tucker=true"]),
    "loha-sd2": ("networks.loha", "sd2", 4, 4.0, {"conv_dim": 2, "conv_alpha": 1.0}, ["conv_dim=2"]),
    "lokr-sd1": ("networks.lokr", "sd1", 2, 1.0, {"conv_dim": 1, "conv_alpha": 0.5, "both": True, "tucker": True},
                 ["conv_dim=1", "conv_alpha=0.5", "decompose_both=true", "use_tucker=true"]),
    "lokr-sd2": ("networks.lokr", "sd2", 8, 16.0, {"conv_dim": 4, "conv_alpha": 1.0, "factor": 4},
                 ["conv_dim=4", "factor=4"]),
}


def train_args(models, data, out, case, *extra, steps=4):
    """The command line of a case (4 steps, dropouts on, a state saved at step 2)."""
    module, model, dim, alpha, _, network_args = CASES[case]
    flags = ["--v2", "--v_parameterization", "--gradient_checkpointing"] if model == "sd2" else []
    return [*flags, "--pretrained_model_name_or_path", models[model]["safetensors"], "--train_data_dir", data,
            "--resolution", "64", "--output_dir", out, "--network_module", module, "--network_dim", str(dim),
            "--network_alpha", str(alpha), "--max_train_steps", str(steps), "--learning_rate", "2e-2", "--seed", "3",
            "--max_data_loader_n_workers", "0", "--network_dropout", "0.1",
            "--network_args", *network_args, *DROPOUTS, *extra]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data"), captions={0: "sks dog, grass"})


@pytest.fixture(scope="module")
def trained(models, data, tmp_path_factory):
    """``trained(case)`` → the output folder of that case's run (trained once per module)."""
    return runs_once(tmp_path_factory, train, lambda out, case: train_args(
        models, data, out, case, "--save_every_n_steps", "2", "--save_state"))


# ---------------------------------------------------------------------------------------------
# The layout and ΔW, written out from the documentation


def expected_shapes(module, layer_shape, dim, settings):
    """{key: shape} of one module of rank ``dim`` on a layer of weight shape [out, in, *kernel]."""
    out, inp, *kernel = layer_shape
    k = math.prod(kernel)
    conv3 = bool(kernel) and tuple(kernel) != (1, 1)
    tucker = settings.get("tucker", False) and conv3
    r = dim
    if module == "networks.loha":
        if tucker:
            return {**{f"hada_w{i}_a": (r, out) for i in "12"}, **{f"hada_w{i}_b": (r, inp) for i in "12"},
                    **{f"hada_t{i}": (r, r, *kernel) for i in "12"}}
        return {**{f"hada_w{i}_a": (out, r) for i in "12"}, **{f"hada_w{i}_b": (r, inp * k) for i in "12"}}
    a, b = factorization(out, settings.get("factor", -1))
    c, d = factorization(inp, settings.get("factor", -1))
    if settings.get("both") and r < max(a, c) / 2:
        shapes = {"lokr_w1_a": (a, r), "lokr_w1_b": (r, c)}
    else:
        shapes = {"lokr_w1": (a, c)}
    if r >= max(b, d) / 2:
        shapes["lokr_w2"] = (b, d, *kernel)
    elif tucker:
        shapes.update(lokr_t2=(r, r, *kernel), lokr_w2_a=(r, b), lokr_w2_b=(r, d))
    else:
        shapes.update(lokr_w2_a=(b, r), lokr_w2_b=(r, d * k))
    return shapes


def hand_delta(parts, layer_shape):
    """``scale · ΔW`` in the layer's shape: LoHa (w1a·w1b) ⊙ (w2a·w2b), LoKr kron(w1, w2), Tucker factors
    t ×₁ w_a ×₂ w_b; scale alpha/r, 1 for a LoKr module without a decomposed factor."""
    p = {k: v.double() for k, v in parts.items()}
    out, inp, *kernel = layer_shape
    kernel = kernel or [1, 1]

    def tucker(t, wa, wb):
        return torch.einsum("ijxy,ip,jq->pqxy", t, wa, wb)

    if "hada_w1_a" in p:
        if "hada_t1" in p:
            delta = tucker(p["hada_t1"], p["hada_w1_a"], p["hada_w1_b"]) * tucker(p["hada_t2"], p["hada_w2_a"],
                                                                                  p["hada_w2_b"])
        else:
            delta = (p["hada_w1_a"] @ p["hada_w1_b"]) * (p["hada_w2_a"] @ p["hada_w2_b"])
        rank = p["hada_w1_b"].shape[0]
    else:
        w1 = p["lokr_w1"] if "lokr_w1" in p else p["lokr_w1_a"] @ p["lokr_w1_b"]
        if "lokr_w2" in p:
            w2 = p["lokr_w2"]
        elif "lokr_t2" in p:
            w2 = tucker(p["lokr_t2"], p["lokr_w2_a"], p["lokr_w2_b"])
        else:
            w2 = p["lokr_w2_a"] @ p["lokr_w2_b"]
        (a, c), b = w1.shape, w2.shape[0]
        w2 = w2.reshape(b, inp // c, *kernel)
        delta = torch.einsum("ik,jlxy->ijklxy", w1, w2).reshape(a * b, inp, *kernel)  # row i·b+j, column k·d+l
        decomposed = [p[k] for k in ("lokr_w1_b", "lokr_w2_b") if k in p]
        rank = decomposed[0].shape[0] if decomposed else None
    alpha = float(p["alpha"]) if "alpha" in p else None
    scale = alpha / rank if alpha is not None and rank is not None else 1.0
    return (delta * scale).reshape(layer_shape).float()


def per_module(tensors):
    grouped = {}
    for key, value in tensors.items():
        name, _, rest = key.partition(".")
        grouped.setdefault(name, {})[rest] = value
    return grouped


# ---------------------------------------------------------------------------------------------
# Units


def test_factorization_is_lycoris_rule():
    table = {(128, -1): (8, 16), (128, 2): (2, 64), (128, 16): (8, 16), (250, -1): (10, 25), (250, 4): (2, 125),
             (360, -1): (18, 20), (360, 16): (15, 24), (360, 7): (6, 60), (768, -1): (24, 32), (768, 16): (16, 48),
             (1024, -1): (32, 32), (1280, 5): (5, 256), (320, -1): (16, 20), (127, -1): (1, 127), (77, 4): (1, 77),
             (77, 8): (7, 11), (32, 16): (2, 16), (12, 8): (3, 4), (1, -1): (1, 1)}
    assert {key: factorization(*key) for key in table} == table


@pytest.mark.parametrize("module,layer,kwargs", [
    (loha.LoHaModule, nn.Linear(32, 64), {}),
    (loha.LoHaModule, nn.Conv2d(32, 64, 3, padding=1), {"use_tucker": True}),
    (lokr.LoKrModule, nn.Linear(32, 64), {}),  # rank 4 ≥ max(8, 8)/2: both factors full, scale 1
    (lokr.LoKrModule, nn.Linear(32, 64), {"decompose_both": True}),
    (lokr.LoKrModule, nn.Conv2d(32, 64, 3, padding=1), {"use_tucker": True, "factor": 2}),
])
def test_fresh_module_changes_nothing_and_every_factor_trains(module, layer, kwargs):
    torch.manual_seed(0)
    lora = module("m", layer, 1.0, 1 if kwargs.get("decompose_both") else 4, 1.0, **kwargs)
    lora.apply_to()
    x = torch.randn(2, 32, 6, 6) if isinstance(layer, nn.Conv2d) else torch.randn(2, 5, 32)
    base = lora.org_forward(x)
    y = layer(x)
    assert torch.equal(y, base) and float(lora.delta_weight().detach().abs().max()) == 0.0
    y.square().sum().backward()
    assert any(float(p.grad.abs().max()) > 0 for p in lora.parameters())  # the zero factor moves first
    with torch.no_grad():
        for p in lora.parameters():
            p -= 0.1 * p.grad
            p.grad = None
    layer(x).square().sum().backward()
    assert all(float(p.grad.abs().max()) > 0 for p in lora.parameters())
    assert not torch.equal(layer(x), base)


def test_lokr_layout_rule():
    lay = lokr.lokr_layout(32, 32, (), dim=4)
    assert (lay.a, lay.b, lay.c, lay.d) == (4, 8, 4, 8) and not lay.w1_decomposed and not lay.w2_decomposed
    assert lokr.lokr_layout(32, 32, (), dim=3).w2_decomposed  # 3 < max(8, 8)/2
    assert not lokr.lokr_layout(32, 32, (), dim=1).w1_decomposed  # only with decompose_both
    assert lokr.lokr_layout(32, 32, (), dim=1, decompose_both=True).w1_decomposed
    assert lokr.lokr_layout(64, 32, (3, 3), dim=2, use_tucker=True).tucker
    assert not lokr.lokr_layout(64, 32, (1, 1), dim=2, use_tucker=True).tucker  # 1×1: flat factors
    assert not lokr.lokr_layout(64, 32, (3, 3), dim=8, use_tucker=True).tucker  # w2 full: no core
    lay = lokr.lokr_layout(640, 320, (3, 3), dim=8, factor=8)
    assert (lay.a, lay.b, lay.c, lay.d) == (8, 80, 8, 40)


@pytest.mark.parametrize("module,args,needle", [
    (lokr, {"factor": "0"}, "factor=0: must be -1"), (lokr, {"factor": "x"}, "factor=x: must be an integer"),
    (lokr, {"decompose_both": "maybe"}, "decompose_both=maybe: must be true or false"),
    (loha, {"use_tucker": "maybe"}, "use_tucker=maybe: must be true or false"),
    (loha, {"factor": "4"}, "factor=4: unknown key"), (lokr, {"dora_wd": "true"}, "dora_wd=true: unknown key"),
    (loha, {"conv_dim": "0"}, "conv_dim=0: must be at least 1"),
    (lokr, {"rank_dropout": "1"}, "rank_dropout=1: a dropout probability"),
])
def test_bad_network_args_are_refused(module, args, needle):
    from library.errors import UserError

    with pytest.raises(UserError, match=needle):
        module.check_network_args(4, 1.0, **args)


def test_bad_args_stop_the_cli_before_loading(models, data, tmp_path, capsys):
    argv = train_args(models, data, tmp_path, "lokr-sd1")
    argv[argv.index("decompose_both=true")] = "factor=-3"
    assert run_script(train, argv) == 2
    one_error_line(capsys, "--network_args factor=-3", "-1", "positive integer")
    assert not list(tmp_path.iterdir())


def test_same_shapes_and_alphas_as_lycoris():
    """Where the LyCORIS package is installed, its modules have exactly our keys, shapes and alpha."""
    lyco_lokr = pytest.importorskip("lycoris.modules.lokr")
    from lycoris.modules.loha import LohaModule

    layers = [nn.Linear(320, 768), nn.Conv2d(64, 32, 3, padding=1), nn.Conv2d(32, 64, 1), nn.Linear(77, 128)]
    for layer in layers:
        for dim, factor, both, tucker in ((1, -1, True, True), (4, 8, False, True), (16, -1, True, False),
                                          (64, 4, False, False)):
            ref = lyco_lokr.LokrModule("x", layer, 1.0, dim, 2.0, factor=factor, decompose_both=both,
                                       use_tucker=tucker)
            ours = lokr.LoKrModule("x", layer, 1.0, dim, 2.0, factor=factor, decompose_both=both, use_tucker=tucker)
            assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in
                                                                           ref.state_dict().items()}
            assert float(ours.alpha) == float(ref.alpha) and ours.scale == pytest.approx(ref.scale)
        for dim, tucker in ((2, True), (4, False)):
            ref, ours = LohaModule("x", layer, 1.0, dim, 2.0, use_tucker=tucker), loha.LoHaModule(
                "x", layer, 1.0, dim, 2.0, use_tucker=tucker)
            assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in
                                                                           ref.state_dict().items()}


def test_module_rules_and_block_lrs_apply(models, tmp_path):
    rules = tmp_path / "rules.toml"
    rules.write_text('[[rule]]\npattern = "lora_te_.*_mlp_"\nexclude = true\n\n[[rule]]\npattern = "attn2"\n'
                     'dim = 2\nalpha = 2\nlr = 0.5\n', encoding="utf-8")
    base = load(models["sd1"]["safetensors"])
    network = loha.create_network(1.0, 4, 1.0, None, base.text_encoder, base.unet, module_rules=str(rules),
                                  down_lr_weight="0,0,0,0,0,0,0,0,0,0,0,0")
    names = {m.lora_name: m for m in network.all_loras()}
    assert names and not any("_mlp_" in n for n in names) and not any("down_blocks" in n for n in names)
    attn2 = [m for n, m in names.items() if "attn2" in n]
    assert attn2 and all(m.hada_w1_b.shape[0] == 2 and float(m.alpha) == 2 for m in attn2)
    groups = network.prepare_optimizer_params(1e-4, 1e-3, 1e-3)
    ruled = [g for g in groups if g.get("lr") == 0.5]
    assert len(ruled) == 1 and len(ruled[0]["params"]) == 4 * len(attn2)
    assert sum(len(g["params"]) for g in groups) == len(list(network.parameters()))


# ---------------------------------------------------------------------------------------------
# Trained through the CLI


@pytest.mark.parametrize("case", list(CASES))
def test_file_keys_shapes_and_metadata(models, trained, case):
    module, model, dim, alpha, settings, network_args = CASES[case]
    path = trained(case) / "last.safetensors"
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    assert meta["ss_network_module"] == module and meta["ss_network_dim"] == str(dim)
    assert json.loads(meta["ss_network_args"]) == dict(a.split("=") for a in network_args + DROPOUTS)
    assert meta["ss_v2"] == str(model == "sd2")
    base = load(models[model]["safetensors"])
    layers = model_lora_layers(base.text_encoder, base.unet)
    from networks.lora import create_network as create_lora

    lora_names = {m.lora_name for m in create_lora(1.0, dim, alpha, None, base.text_encoder, base.unet,
                                                   conv_dim=str(settings["conv_dim"])).all_loras()}
    grouped = per_module(tensors)
    assert set(grouped) == lora_names  # the same layers and names as networks.lora
    assert {"lora_te_text_model_encoder_layers_0_self_attn_q_proj", "lora_unet_down_blocks_0_attentions_0_proj_in",
            "lora_unet_down_blocks_0_resnets_0_conv1", "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_2"
            } <= set(grouped)
    for name, parts in grouped.items():
        shape = tuple(layers[name].weight.shape)
        conv3 = len(shape) == 4 and shape[2:] != (1, 1)
        rank, module_alpha = (settings["conv_dim"], settings["conv_alpha"]) if conv3 else (dim, alpha)
        expected = expected_shapes(module, shape, rank, settings)
        assert {k: tuple(v.shape) for k, v in parts.items() if k != "alpha"} == expected, name
        unscaled = "lokr_w1" in expected and "lokr_w2" in expected  # saved alpha = rank: scale 1
        assert float(parts["alpha"]) == (rank if unscaled else module_alpha), name
        assert float(parts["lokr_w2" if unscaled else next(iter(parts))].abs().max()) > 0  # trained
    if case == "lokr-sd2":  # both kinds occur: full factors (alpha = rank) and a decomposed w2 (alpha given)
        assert any("lokr_w2" in p for p in grouped.values()) and any("lokr_w2_a" in p for p in grouped.values())
    if case == "lokr-sd1":
        assert any("lokr_t2" in p and "lokr_w1_a" in p for p in grouped.values())


@pytest.mark.parametrize("case", list(CASES))
def test_file_reads_back_identically(models, trained, case):
    module, model, dim, alpha, _, network_args = CASES[case]
    path = trained(case) / "last.safetensors"
    tensors = load_file(str(path))
    base = load(models[model]["safetensors"])
    network, weights = MODULES[module].create_network_from_weights(1.0, path, None, base.text_encoder, base.unet)
    network.apply_to(base.text_encoder, base.unet)
    network.load_state_dict(weights)
    state = network.state_dict()
    assert state.keys() == tensors.keys()
    assert all(torch.equal(state[k], tensors[k]) and state[k].dtype == tensors[k].dtype for k in tensors)
    other = load(models[model]["safetensors"])  # the network of the command line, then load_weights
    kwargs = dict(a.split("=") for a in network_args)
    fresh = MODULES[module].create_network(1.0, dim, alpha, None, other.text_encoder, other.unet, **kwargs)
    fresh.apply_to(other.text_encoder, other.unet)
    info = fresh.load_weights(path)
    assert not info.missing_keys and not info.unexpected_keys
    assert all(torch.equal(fresh.state_dict()[k], tensors[k]) for k in tensors)
    lora_file = load_lora_file(path, allow_lycoris=True)  # the tools' reader
    layers = model_lora_layers(base.text_encoder, base.unet)
    for name, parts in per_module(tensors).items():
        layer = layers[name]
        got = lora_file.modules[name].delta().reshape(layer.weight.shape)
        torch.testing.assert_close(got, hand_delta(parts, tuple(layer.weight.shape)), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("case", list(CASES))
def test_runtime_equals_hand_merge_and_merge_lora(models, trained, tmp_path, case):
    module, model, *_ = CASES[case]
    path, source, ratio = trained(case) / "last.safetensors", models[model]["safetensors"], 0.7
    base = outputs(load(source))
    runtime_model = load(source)
    network, weights = MODULES[module].create_network_from_weights(ratio, path, None, runtime_model.text_encoder,
                                                                   runtime_model.unet)
    network.apply_to(runtime_model.text_encoder, runtime_model.unet)
    network.load_state_dict(weights)
    network.eval()
    runtime = outputs(runtime_model)
    by_hand = load(source)
    layers = model_lora_layers(by_hand.text_encoder, by_hand.unet)
    with torch.no_grad():
        for name, parts in per_module(load_file(str(path))).items():
            layers[name].weight += ratio * hand_delta(parts, tuple(layers[name].weight.shape))
    hand = outputs(by_hand)
    network_merged = load(source)  # LoRANetwork.merge_to with the file's tensors (what --network_merge uses)
    other, weights = MODULES[module].create_network_from_weights(ratio, path, None, network_merged.text_encoder,
                                                                 network_merged.unet, for_inference=True)
    other.merge_to(network_merged.text_encoder, network_merged.unet, weights)
    assert_close(outputs(network_merged), hand, atol=2e-5)
    merged_path = tmp_path / "merged.safetensors"
    argv = ["--sd_model", source, "--save_to", merged_path, "--models", path, "--ratios", str(ratio)]
    assert run_script(merge_lora.main, argv + (["--v2"] if model == "sd2" else [])) == 0
    merged = outputs(load(merged_path))
    assert max_diff(runtime, base) > 1e-3  # the network changes both models noticeably
    assert_close(runtime, hand, atol=2e-5)
    assert_close(merged, hand, atol=2e-5)


@pytest.mark.parametrize("case", list(CASES))
def test_resume_is_bit_identical(models, data, trained, tmp_path, case):
    """4 steps (saving a state at step 2) == 2 steps + --resume (dropouts on)."""
    straight = trained(case)
    state = straight / "at-step00000002-state"
    assert json.loads((state / "state.json").read_text())["global_step"] == 2
    assert run_script(train, train_args(models, data, tmp_path / "resumed", case, "--resume", state)) == 0
    a, b = load_file(str(straight / "last.safetensors")), load_file(str(tmp_path / "resumed" / "last.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if case == "loha-sd1":  # and equal to a run that saved nothing
        assert run_script(train, train_args(models, data, tmp_path / "plain", case)) == 0
        c = load_file(str(tmp_path / "plain" / "last.safetensors"))
        assert all(torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize("case", ["loha-sd1", "lokr-sd1"])
def test_dim_from_weights_rebuilds_the_file_layout(models, data, trained, tmp_path, case):
    start = trained(case) / "last.safetensors"
    argv = train_args(models, data, tmp_path / "again", case, "--network_weights", start, "--dim_from_weights",
                      steps=1)
    argv[argv.index("--learning_rate") + 1] = "0"
    i = argv.index("--network_args")  # the file decides the layout; only the dropouts are read
    argv[i + 1:i + 1 + len(CASES[case][5])] = []
    assert run_script(train, argv) == 0
    a, b = load_file(str(start)), load_file(str(tmp_path / "again" / "last.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # lr 0: unchanged


# ---------------------------------------------------------------------------------------------
# The LoRA tools on these files


def test_check_lora_weights_and_show_metadata(trained, tmp_path, capsys):
    tensors = load_file(str(trained("loha-sd1") / "last.safetensors"))
    zero = "lora_unet_down_blocks_0_attentions_0_proj_in.hada_w2_a"
    tensors[zero] = torch.zeros_like(tensors[zero])
    path = tmp_path / "partly_untrained.safetensors"
    save_file(tensors, str(path), {"ss_network_module": "networks.loha"})
    capsys.readouterr()
    assert run_script(check_lora_weights.main, [path]) == 0
    lines = capsys.readouterr().out.splitlines()
    factors = [k for k in tensors if not k.endswith(".alpha")]
    assert lines[1] == f"number of LoRA modules: {len(factors)}"
    rows = {line.split(",")[0]: line.split(",") for line in lines[2:] if line.count(",") == 3}
    assert set(rows) == set(factors) and rows[zero][2] == "0.0"
    assert lines[-1] == "1 module(s) have an all-zero hada_w2_a weight (untrained: they change nothing)"
    assert run_script(show_metadata.main, ["--model", trained("lokr-sd2") / "last.safetensors"]) == 0
    assert json.loads(capsys.readouterr().out)["ss_network_module"] == "networks.lokr"


# What the tools that need lora_down/lora_up factors say of each other network type's file.
REFUSALS = {"networks.loha": "LyCORIS LoHa/LoKr", "networks.lokr": "LyCORIS LoHa/LoKr", "networks.oft": "OFT file"}


@pytest.fixture(scope="module")
def network_files(models, tmp_path_factory):
    """``{network module: a fresh SD1 network of it saved as <folder>/last.safetensors}`` (made once)."""
    import importlib

    base = load(models["sd1"]["safetensors"])
    files = {}
    for name in REFUSALS:
        network = importlib.import_module(name).create_network(1.0, 4, None, None, base.text_encoder, base.unet,
                                                               conv_dim="2")
        files[name] = tmp_path_factory.mktemp(name.replace(".", "_")) / "last.safetensors"
        network.save_weights(files[name], metadata={"ss_network_module": name})
    return files


@pytest.mark.parametrize("network_module", list(REFUSALS))
@pytest.mark.parametrize("tool", ["resize", "svd_merge", "merge_into_lora"])
def test_tools_that_need_lora_factors_refuse_in_one_line(network_files, tmp_path, capsys, tool, network_module):
    path, save_to = network_files[network_module], tmp_path / "out.safetensors"
    runs = {"resize": (resize_lora.main, ["--model", path, "--save_to", save_to, "--new_rank", "2"]),
            "svd_merge": (svd_merge_lora.main, ["--models", path, "--ratios", "1", "--save_to", save_to]),
            "merge_into_lora": (merge_lora.main, ["--models", path, "--ratios", "1", "--save_to", save_to])}
    main, argv = runs[tool]
    capsys.readouterr()
    assert run_script(main, argv) == 2 and not save_to.exists()
    one_error_line(capsys, "last.safetensors", REFUSALS[network_module], "merge_lora.py --sd_model")


def test_diffusers_pipeline_does_not_load_these_files(models, trained):
    """diffusers' StableDiffusionPipeline.load_lora_weights converts only lora_down/lora_up kohya keys (its
    LoKr support is for other pipelines): documented in docs/train_network.md."""
    pytest.importorskip("peft")
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(models["sd1"]["diffusers"]), safety_checker=None,
                                                   local_files_only=True)
    for case in ("loha-sd1", "lokr-sd1"):
        with pytest.raises(ValueError, match="not been correctly renamed"):
            pipe.load_lora_weights(str(trained(case) / "last.safetensors"))
