"""OFT networks (networks.oft) end to end on tiny SD1 / SD2-v models.

Each case trains through train_network.py; its file is checked against the documented layout
(docs/train_network.md, OFT: written out again here), read back bit-identically, resumed exactly, and its
effect compared with the merge formula applied by hand and by merge_lora.py. The SD1 case uses a tight
constraint that binds, so the saved (constraint-applied) blocks and raised alphas are exercised too.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from library.errors import UserError
from networks import check_lora_weights, merge_lora, oft
from networks.lora_files import load_lora_file, model_lora_layers
from tests.lora_tools_util import assert_close, load, max_diff, one_error_line, outputs
from tests.train_util import make_dataset, run_script, runs_once
from tools import show_metadata
from train_network import main as train

# name: model, --network_dim (blocks), --network_alpha (constraint), conv blocks (None: no 3×3 modules), args
CASES = {
    "sd1": ("sd1", 4, 1e-3, 2, ["conv_dim=2", "module_dropout=0.1"]),
    "sd2": ("sd2", 8, 0.5, None, ["module_dropout=0.1"]),
}


def train_args(models, data, out, case, *extra, steps=4):
    """The command line of a case (4 steps, module dropout on)."""
    model, dim, alpha, _, network_args = CASES[case]
    flags = ["--v2", "--v_parameterization", "--gradient_checkpointing"] if model == "sd2" else []
    return [*flags, "--pretrained_model_name_or_path", models[model]["safetensors"], "--train_data_dir", data,
            "--resolution", "64", "--output_dir", out, "--network_module", "networks.oft", "--network_dim",
            str(dim), "--network_alpha", str(alpha), "--max_train_steps", str(steps), "--learning_rate", "2e-2",
            "--seed", "3", "--max_data_loader_n_workers", "0", "--network_args", *network_args, *extra]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data"), captions={0: "sks dog, grass"})


@pytest.fixture(scope="module")
def trained(models, data, tmp_path_factory):
    """``trained(case)`` → the output folder of that case's run (trained once per module)."""
    return runs_once(tmp_path_factory, train, lambda out, case: train_args(
        models, data, out, case, "--save_every_n_steps", "2", "--save_state"))


# ---------------------------------------------------------------------------------------------
# The maths, written out from the documentation and the two UIs' loaders


def per_module(tensors):
    grouped = {}
    for key, value in tensors.items():
        name, _, rest = key.partition(".")
        grouped.setdefault(name, {})[rest] = value
    return grouped


def cayley(q):
    eye = torch.eye(q.shape[1], dtype=q.dtype)
    return (eye + q) @ torch.linalg.inv(eye - q)


def a1111_weight(weight, blocks, alpha, strength=1.0):
    """AUTOMATIC1111 (network_oft.py) / kohya: ‖Q‖ clamped to alpha·out, W + s·(RᵀW − W)."""
    w, b = weight.double(), blocks.double()
    q = b - b.transpose(1, 2)
    norm = q.norm()
    q = q * ((norm.clamp(max=float(alpha) * w.shape[0]) + 1e-8) / (norm + 1e-8))
    r = cayley(q)
    k, n, _ = b.shape
    rotated = torch.einsum("knm,kn...->km...", r, w.reshape(k, n, *w.shape[1:])).reshape(w.shape)
    return w + strength * (rotated - w)


def comfy_weight(weight, blocks, alpha, strength=1.0):
    """ComfyUI (weight_adapter/oft.py): ‖Q‖ clamped to alpha itself, strength applied twice."""
    w, b = weight.double(), blocks.double()
    q = b - b.transpose(1, 2)
    q_norm = q.norm() + 1e-8
    if float(alpha) > 0 and q_norm > float(alpha):
        q = q * float(alpha) / q_norm
    r = cayley(q)
    k, n, _ = b.shape
    eye = torch.eye(n, dtype=r.dtype)
    diff = torch.einsum("knm,kn...->km...", r * strength - strength * eye, w.reshape(k, n, *w.shape[1:]))
    return w + strength * diff.reshape(w.shape)


def expected_names(models, case):
    """The module names of networks.lora on the same model and options (conv modules with conv_dim)."""
    from networks.lora import create_network as create_lora

    model, _, _, conv, _ = CASES[case]
    base = load(models[model]["safetensors"])
    kwargs = {"conv_dim": str(conv)} if conv else {}
    return {m.lora_name for m in create_lora(1.0, 4, 1.0, None, base.text_encoder, base.unet, **kwargs).all_loras()}


# ---------------------------------------------------------------------------------------------
# Units


@pytest.mark.parametrize("layer", [nn.Linear(32, 64), nn.Conv2d(32, 64, 1), nn.Conv2d(32, 64, 3, padding=1)])
def test_fresh_module_changes_nothing_then_trains_and_stays_orthogonal(layer):
    torch.manual_seed(0)
    module = oft.OFTModule("m", layer, 1.0, 4, 1e-2)
    assert module.oft_blocks.shape == (4, 16, 16)
    module.apply_to()
    x = torch.randn(2, 32, 6, 6) if isinstance(layer, nn.Conv2d) else torch.randn(2, 5, 32)
    base = module.org_forward(x)
    y = layer(x)
    assert torch.equal(y, base)
    y.square().sum().backward()
    assert float(module.oft_blocks.grad.abs().max()) > 0
    with torch.no_grad():
        module.oft_blocks -= 0.1 * module.oft_blocks.grad
    rots = oft.rotations(module.oft_blocks, module.constraint)
    torch.testing.assert_close(rots.transpose(1, 2) @ rots, torch.eye(16).expand(4, 16, 16), atol=2e-6, rtol=0)
    changed = layer(x)
    assert not torch.equal(changed, base)
    # the hooked forward is the layer with W' = W + m·(RᵀW − W) (A1111's formula), at m = 1 and m = 0.4
    for m in (1.0, 0.4):
        module.set_multiplier(m)
        merged = a1111_weight(layer.weight.detach(), module.oft_blocks.detach(), module.alpha, m).float()
        op = nn.functional.conv2d if isinstance(layer, nn.Conv2d) else nn.functional.linear
        kw = {"padding": layer.padding} if isinstance(layer, nn.Conv2d) else {}
        torch.testing.assert_close(layer(x), op(x, merged, layer.bias, **kw), atol=2e-5, rtol=1e-5)


def test_chains_with_a_lora_on_the_same_layer():
    from networks.lora_module import LoRAModule

    torch.manual_seed(2)
    layer = nn.Linear(16, 32)
    lora = LoRAModule("a", layer, 1.0, 4, 4)
    with torch.no_grad():
        lora.lora_up.weight.normal_()
    lora.apply_to()
    module = oft.OFTModule("b", layer, 1.0, 4, 1.0)
    with torch.no_grad():
        module.oft_blocks.normal_(0, 0.1)
    module.apply_to()
    x = torch.randn(3, 16)
    w, b = layer.weight.detach(), module.oft_blocks.detach()
    rotated = a1111_weight(w, b, 1.0).float()
    want = x @ w.T + layer.bias + lora.lora_up(lora.lora_down(x)) + x @ (rotated - w).T
    torch.testing.assert_close(layer(x), want, atol=1e-5, rtol=1e-5)


def test_saved_blocks_carry_the_constraint_and_look_the_same_in_both_uis():
    torch.manual_seed(1)
    layer = nn.Linear(16, 32)
    module = oft.OFTModule("m", layer, 1.0, 2, 1e-3)  # bound 1e-3 · 32
    with torch.no_grad():
        module.oft_blocks.normal_(0, 0.5)  # ‖Q‖ far above the bound: the constraint binds
    module.apply_to()
    x = torch.randn(3, 16)
    trained = layer(x)
    for dtype in (None, torch.float16):
        saved = module.file_tensors(dtype)
        blocks, alpha = saved["oft_blocks"], saved["alpha"]
        assert blocks.dtype == (dtype or torch.float32) and alpha.dtype == blocks.dtype and alpha.dim() == 0
        q = blocks.double() - blocks.double().transpose(1, 2)
        assert float(q.norm()) <= 1e-3 * 32 * (1 + 1e-3)  # the constraint is applied in the file
        assert float(alpha) > float(q.norm()) > 1e-3  # raised above ‖Q‖, so ComfyUI does not shrink it
        a, c = a1111_weight(layer.weight.detach(), blocks, alpha), comfy_weight(layer.weight.detach(), blocks, alpha)
        assert float((a - c).abs().max()) < 1e-7  # the same weight in both UIs
        if dtype is None:  # and the same as the module trained with
            torch.testing.assert_close(nn.functional.linear(x, a.float(), layer.bias), trained, atol=1e-6, rtol=0)
    loose = oft.OFTModule("n", nn.Linear(16, 32), 1.0, 2, 0.5)
    with torch.no_grad():
        loose.oft_blocks.normal_(0, 0.01)
    saved = loose.file_tensors()
    assert torch.equal(saved["oft_blocks"], loose.oft_blocks.detach()) and float(saved["alpha"]) == 0.5


@pytest.mark.parametrize("kwargs,needle", [
    ({"neuron_dropout": 0.1}, "--network_dropout 0.1: OFT has no neuron dropout"),
    ({"dropout": "0.1"}, "dropout=0.1: OFT supports module_dropout only"),
    ({"rank_dropout": "0.1"}, "rank_dropout=0.1: OFT supports module_dropout only"),
    ({"dora_wd": "true"}, "dora_wd=true: unknown key"),
    ({"module_dropout": "1"}, "module_dropout=1: a dropout probability"),
    ({"conv_dim": "0"}, "conv_dim=0: must be at least 1"),
])
def test_bad_network_args_are_refused(kwargs, needle):
    with pytest.raises(UserError, match=needle):
        oft.check_network_args(4, 1e-3, **kwargs)
    with pytest.raises(UserError, match="--network_alpha must be >= 0"):
        oft.check_network_args(4, -1.0)


def test_block_count_must_divide_every_layer(models, data, tmp_path, capsys):
    argv = train_args(models, data, tmp_path, "sd1")
    argv[argv.index("--network_dim") + 1] = "3"
    assert run_script(train, argv) == 2
    one_error_line(capsys, "OFT module lora_te_text_model_encoder_layers_0_self_attn_", "3 blocks",
                   "32 output channels", "1, 2, 4, 8, 16, 32")
    assert not list(tmp_path.glob("*.safetensors"))


def test_scale_weight_norms_is_refused(models, data, tmp_path, capsys):
    assert run_script(train, train_args(models, data, tmp_path, "sd2", "--scale_weight_norms", "1")) == 2
    one_error_line(capsys, "--scale_weight_norms", "networks.oft")
    assert not list(tmp_path.glob("*.safetensors"))


def test_module_rules_and_block_lrs_apply(models, tmp_path):
    rules = tmp_path / "rules.toml"
    rules.write_text('[[rule]]\npattern = "lora_te_.*_mlp_"\nexclude = true\n\n[[rule]]\npattern = "attn2"\n'
                     'dim = 2\nalpha = 0.02\nlr = 0.5\n', encoding="utf-8")
    base = load(models["sd1"]["safetensors"])
    network = oft.create_network(1.0, 4, 1e-3, None, base.text_encoder, base.unet, module_rules=str(rules),
                                 down_lr_weight="0,0,0,0,0,0,0,0,0,0,0,0")
    names = {m.lora_name: m for m in network.all_loras()}
    assert names and not any("_mlp_" in n for n in names) and not any("down_blocks" in n for n in names)
    attn2 = [m for n, m in names.items() if "attn2" in n]
    assert attn2 and all(m.oft_blocks.shape[0] == 2 and float(m.alpha) == pytest.approx(0.02) for m in attn2)
    groups = network.prepare_optimizer_params(1e-4, 1e-3, 1e-3)
    ruled = [g for g in groups if g.get("lr") == 0.5]
    assert len(ruled) == 1 and len(ruled[0]["params"]) == len(attn2)
    assert sum(len(g["params"]) for g in groups) == len(list(network.parameters()))
    assert not hasattr(network, "apply_max_norm_regularization")  # --scale_weight_norms is refused


# ---------------------------------------------------------------------------------------------
# Trained through the CLI


@pytest.mark.parametrize("case", list(CASES))
def test_file_keys_shapes_and_metadata(models, trained, case):
    model, dim, alpha, conv, network_args = CASES[case]
    path = trained(case) / "last.safetensors"
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_module"] == "networks.oft" and meta["ss_network_dim"] == str(dim)
    assert float(meta["ss_network_alpha"]) == alpha and meta["ss_v2"] == str(model == "sd2")
    assert json.loads(meta["ss_network_args"]) == dict(a.split("=") for a in network_args)
    grouped = per_module(load_file(str(path)))
    assert set(grouped) == expected_names(models, case)  # the same layers and names as networks.lora
    assert {"lora_te_text_model_encoder_layers_0_self_attn_q_proj", "lora_te_text_model_encoder_layers_1_mlp_fc2",
            "lora_unet_down_blocks_0_attentions_0_proj_in", "lora_unet_up_blocks_1_attentions_0_proj_out",
            "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_2"} <= set(grouped)
    base = load(models[model]["safetensors"])
    layers = model_lora_layers(base.text_encoder, base.unet)
    raised = 0
    for name, parts in grouped.items():
        shape = tuple(layers[name].weight.shape)
        conv3 = len(shape) == 4 and shape[2:] != (1, 1)
        blocks = conv if conv3 else dim
        assert set(parts) == {"oft_blocks", "alpha"}, name
        assert tuple(parts["oft_blocks"].shape) == (blocks, shape[0] // blocks, shape[0] // blocks), name
        assert parts["alpha"].shape == () and parts["oft_blocks"].dtype == parts["alpha"].dtype == torch.float32
        assert float(parts["oft_blocks"].abs().max()) > 0, name  # trained
        b = parts["oft_blocks"].double()
        norm = float((b - b.transpose(1, 2)).norm())
        assert norm <= alpha * shape[0] * (1 + 1e-5), name  # the training constraint, applied in the file
        assert float(parts["alpha"]) >= max(norm, alpha * (1 - 1e-7)), name  # no UI clamps it further
        raised += float(parts["alpha"]) > alpha * (1 + 1e-6)
    raw = torch.load(trained(case) / "last-state" / "state.pt", map_location="cpu", weights_only=False)["trainable"]
    same = sum(torch.equal(raw[f"{n}.oft_blocks"], p["oft_blocks"]) for n, p in grouped.items())
    assert raised > 0  # ‖Q‖ > alpha somewhere: ComfyUI would have shrunk those modules
    if case == "sd1":  # the tight constraint binds: saved blocks = raw blocks scaled down
        assert same < len(grouped) and any("resnets" in n for n in grouped)
    else:  # the loose one never does: the raw blocks are saved as they are
        assert same == len(grouped)


@pytest.mark.parametrize("case", list(CASES))
def test_file_reads_back_identically(models, trained, case):
    model, dim, alpha, conv, network_args = CASES[case]
    path = trained(case) / "last.safetensors"
    tensors = load_file(str(path))
    base = load(models[model]["safetensors"])
    network, weights = oft.create_network_from_weights(1.0, path, None, base.text_encoder, base.unet)
    network.apply_to(base.text_encoder, base.unet)
    network.load_state_dict(weights)
    state = network.state_dict()
    assert state.keys() == tensors.keys()
    assert all(torch.equal(state[k], tensors[k]) and state[k].dtype == tensors[k].dtype for k in tensors)
    resaved = {f"{m.lora_name}.{k}": v for m in network.all_loras() for k, v in m.file_tensors().items()}
    assert all(torch.equal(resaved[k], tensors[k]) for k in tensors)  # saving again changes nothing
    other = load(models[model]["safetensors"])  # the network of the command line, then load_weights
    fresh = oft.create_network(1.0, dim, alpha, None, other.text_encoder, other.unet,
                               **dict(a.split("=") for a in network_args))
    fresh.apply_to(other.text_encoder, other.unet)
    info = fresh.load_weights(path)
    assert not info.missing_keys and not info.unexpected_keys
    assert all(torch.equal(fresh.state_dict()[k], tensors[k]) for k in tensors)
    lora_file = load_lora_file(path, allow_lycoris=True)  # the tools' reader
    layers = model_lora_layers(base.text_encoder, base.unet)
    for name, parts in per_module(tensors).items():
        weight = layers[name].weight
        got = lora_file.modules[name].delta(0.7, base=weight.detach())
        want = a1111_weight(weight.detach(), parts["oft_blocks"], parts["alpha"], 0.7) - weight.detach().double()
        torch.testing.assert_close(got, want.float(), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("case", list(CASES))
def test_runtime_equals_hand_merge_and_merge_lora(models, trained, tmp_path, case):
    model = CASES[case][0]
    path, source, ratio = trained(case) / "last.safetensors", models[model]["safetensors"], 0.7
    base = outputs(load(source))
    runtime_model = load(source)
    network, weights = oft.create_network_from_weights(ratio, path, None, runtime_model.text_encoder,
                                                       runtime_model.unet)
    network.apply_to(runtime_model.text_encoder, runtime_model.unet)
    network.load_state_dict(weights)
    network.eval()
    runtime = outputs(runtime_model)
    by_hand = load(source)
    layers = model_lora_layers(by_hand.text_encoder, by_hand.unet)
    with torch.no_grad():
        for name, parts in per_module(load_file(str(path))).items():
            w = layers[name].weight
            w.copy_(a1111_weight(w, parts["oft_blocks"], parts["alpha"], ratio).float())
    hand = outputs(by_hand)
    network_merged = load(source)  # LoRANetwork.merge_to with the file's tensors (what --network_merge uses)
    other, weights = oft.create_network_from_weights(ratio, path, None, network_merged.text_encoder,
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


def test_saved_file_acts_as_the_trained_network(models, trained):
    """The raw weights of the step-2 state (constraint binding) and the step-2 file give the same model."""
    folder = trained("sd1")
    state = torch.load(folder / "at-step00000002-state" / "state.pt", map_location="cpu", weights_only=False)
    source = models["sd1"]["safetensors"]
    raw_model = load(source)
    _, dim, alpha, _, network_args = CASES["sd1"]
    raw = oft.create_network(1.0, dim, alpha, None, raw_model.text_encoder, raw_model.unet,
                             **dict(a.split("=") for a in network_args))
    raw.apply_to(raw_model.text_encoder, raw_model.unet)
    raw.load_state_dict(state["trainable"])
    raw.eval()
    file_model = load(source)
    network, weights = oft.create_network_from_weights(1.0, folder / "at-step00000002.safetensors", None,
                                                       file_model.text_encoder, file_model.unet)
    network.apply_to(file_model.text_encoder, file_model.unet)
    network.load_state_dict(weights)
    network.eval()
    assert any(not torch.equal(state["trainable"][k], weights[k]) for k in weights if k.endswith("oft_blocks"))
    assert_close(outputs(raw_model), outputs(file_model), atol=1e-5)


@pytest.mark.parametrize("case", list(CASES))
def test_resume_is_bit_identical(models, data, trained, tmp_path, case):
    """4 steps (saving a state at step 2) == 2 steps + --resume (module dropout on)."""
    straight = trained(case)
    state = straight / "at-step00000002-state"
    assert json.loads((state / "state.json").read_text())["global_step"] == 2
    assert run_script(train, train_args(models, data, tmp_path / "resumed", case, "--resume", state)) == 0
    a, b = load_file(str(straight / "last.safetensors")), load_file(str(tmp_path / "resumed" / "last.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_dim_from_weights_rebuilds_the_file_layout(models, data, trained, tmp_path):
    start = trained("sd1") / "last.safetensors"
    argv = train_args(models, data, tmp_path / "again", "sd1", "--network_weights", start, "--dim_from_weights",
                      steps=1)
    argv[argv.index("--learning_rate") + 1] = "0"
    i = argv.index("--network_args")
    argv[i:i + 1 + len(CASES["sd1"][4])] = []
    assert run_script(train, argv) == 0
    a, b = load_file(str(start)), load_file(str(tmp_path / "again" / "last.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # lr 0: unchanged


def test_kohya_oft_unet_names_are_read(models, trained, tmp_path):
    tensors = {k.replace("lora_unet_", "oft_unet_"): v for k, v in load_file(str(trained("sd2") / "last.safetensors"))
               .items() if k.startswith("lora_unet_")}
    base = load(models["sd2"]["safetensors"])
    network, weights = oft.create_network_from_weights(1.0, None, None, base.text_encoder, base.unet,
                                                       weights_sd=tensors)
    assert not network.text_encoder_loras and {m.lora_name for m in network.unet_loras} == {
        k.partition(".")[0] for k in weights}
    assert all(k.startswith("lora_unet_") for k in weights)
    kohya_file = tmp_path / "kohya.safetensors"
    save_file(tensors, str(kohya_file))
    fresh = oft.create_network(1.0, 8, 0.5, None, base.text_encoder, base.unet, module_dropout="0.1")
    fresh.apply_to(base.text_encoder, base.unet)
    info = fresh.load_weights(kohya_file)
    assert not info.unexpected_keys and all(torch.equal(fresh.state_dict()[k], v) for k, v in weights.items())


# ---------------------------------------------------------------------------------------------
# The LoRA tools on these files


def test_check_lora_weights_and_show_metadata(trained, tmp_path, capsys):
    tensors = load_file(str(trained("sd2") / "last.safetensors"))
    zero = "lora_unet_down_blocks_0_attentions_0_proj_in.oft_blocks"
    tensors[zero] = torch.zeros_like(tensors[zero])
    path = tmp_path / "partly_untrained.safetensors"
    save_file(tensors, str(path), {"ss_network_module": "networks.oft"})
    capsys.readouterr()
    assert run_script(check_lora_weights.main, [path]) == 0
    lines = capsys.readouterr().out.splitlines()
    blocks = [k for k in tensors if k.endswith(".oft_blocks")]
    assert lines[1] == f"number of LoRA modules: {len(blocks)}"
    rows = {line.split(",")[0]: line.split(",") for line in lines[2:] if line.count(",") == 3}
    assert set(rows) == set(blocks) and rows[zero][2] == "0.0"
    assert lines[-1] == "1 module(s) have an all-zero oft_blocks weight (untrained: they change nothing)"
    assert run_script(show_metadata.main, ["--model", trained("sd1") / "last.safetensors"]) == 0
    assert json.loads(capsys.readouterr().out)["ss_network_module"] == "networks.oft"


# test_loha_lokr.py::test_tools_that_need_lora_factors_refuse_in_one_line covers the OFT files too.


def test_merge_refuses_a_file_for_another_model(models, trained, tmp_path, capsys):
    path, save_to = trained("sd2") / "last.safetensors", tmp_path / "out.safetensors"
    capsys.readouterr()
    argv = ["--sd_model", models["sd1"]["safetensors"], "--save_to", save_to, "--models", path, "--ratios", "1"]
    assert run_script(merge_lora.main, argv) == 2 and not save_to.exists()
    one_error_line(capsys, "last.safetensors", "SD2")
