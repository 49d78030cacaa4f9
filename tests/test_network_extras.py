"""train_network.py's later kohya options: --base_weights (+ multipliers), --scale_weight_norms, --fp8_base /
--fp8_base_unet and --cpu_offload_checkpointing, each through the CLI on the tiny models (and the maths beside)."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from library.models.load import load_model
from networks import loha, merge_lora
from networks.lora import create_network
from networks.lora_common import lora_delta
from tests.lora_tools_util import make_lora, one_error_line
from tests.train_util import make_dataset, run_script
from train_network import main as train


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data"))


def args_for(model, data, out, *extra, steps=2):
    return ["--pretrained_model_name_or_path", model, "--train_data_dir", data, "--resolution", "64",
            "--output_dir", out, "--network_module", "networks.lora", "--network_dim", "4",
            "--max_train_steps", str(steps), "--learning_rate", "1e-3", "--seed", "3",
            "--max_data_loader_n_workers", "0", *extra]


def _randomized(network, seed, out, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in network.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    network.save_weights(str(out), None, {"ss_base_model_version": "sd_v1"})
    return out


@pytest.fixture(scope="module")
def base_files(models, tmp_path_factory):
    """A LoCon file (3×3 convs too), a LoHa file and a DoRA file with random non-zero weights."""
    root = tmp_path_factory.mktemp("base")
    sd1 = models["sd1"]["safetensors"]
    locon = make_lora(sd1, root / "locon.safetensors", seed=5, conv=(2, 1.0))
    model = load_model(sd1)
    hada = _randomized(loha.create_network(1.0, 4, 2.0, None, model.text_encoder, model.unet, conv_dim="2"), 6,
                       root / "loha.safetensors")
    dora = _randomized(create_network(1.0, 4, 4.0, None, model.text_encoder, model.unet, dora_wd="true"), 7,
                       root / "dora.safetensors")
    return [locon, hada, dora]


MULTIPLIERS = ["0.7", "1.0", "-0.5"]


def test_base_weights_are_the_model_merge_lora_makes(models, base_files, data, tmp_path):
    """Merged at load == merge_lora.py's merged model, bit for bit (LoCon, LoHa and DoRA files, negative
    multiplier included); training on either gives the same LoRA."""
    from library.methods.network_base_weights import merge_base_weights
    from library.option_groups import NetworkOptions

    sd1 = models["sd1"]["safetensors"]
    merged = tmp_path / "merged.safetensors"
    assert run_main_tool(["--sd_model", sd1, "--save_to", merged, "--models", *base_files,
                          "--ratios", *MULTIPLIERS]) == 0
    ours = load_model(sd1)
    network = NetworkOptions(base_weights=tuple(str(f) for f in base_files),
                             base_weights_multiplier=tuple(float(m) for m in MULTIPLIERS))
    merge_base_weights(network, text_encoder=ours.text_encoder, unet=ours.unet, v2=False)
    theirs, plain = load_model(merged), load_model(sd1)
    for part in ("unet", "text_encoder"):
        a, b, c = (getattr(m, part).state_dict() for m in (ours, theirs, plain))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
        assert any(not torch.equal(a[k], c[k]) for k in a), part  # the files did change the model

    extra = ["--base_weights", *base_files, "--base_weights_multiplier", *MULTIPLIERS]
    assert run_script(train, args_for(sd1, data, tmp_path / "a", *extra)) == 0
    assert run_script(train, args_for(merged, data, tmp_path / "b")) == 0
    assert run_script(train, args_for(sd1, data, tmp_path / "c")) == 0
    a, b, c = (load_file(str(tmp_path / x / "last.safetensors")) for x in "abc")
    # equal up to the CPU kernels' last bits (they depend on where the weights lie in memory: merely
    # re-allocating unchanged U-Net weights moves a trained LoRA by ~1e-6); without the files ~1e-3 apart
    assert a.keys() == b.keys() == c.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 2e-5
    assert max(float((a[k] - c[k]).abs().max()) for k in a) > 1e-3


def run_main_tool(argv):
    from library.cli import run_main

    return run_main(merge_lora.main, [str(a) for a in argv])


@pytest.mark.parametrize("extra, needles", [
    (["--base_weights_multiplier", "0.5"], ["--base_weights_multiplier: 1 value(s) for 2 --base_weights"]),
    (["--base_weights_multiplier", "0.5", "1", "2"], ["3 value(s) for 2"]),
])
def test_base_weights_multiplier_count_must_match(models, base_files, data, tmp_path, capsys, extra, needles):
    argv = args_for(models["sd1"]["safetensors"], data, tmp_path / "o", "--base_weights", *base_files[:2], *extra)
    assert run_script(train, argv) == 2
    one_error_line(capsys, *needles)


def test_missing_base_weights_file_is_named(models, data, tmp_path, capsys):
    missing = tmp_path / "nope.safetensors"
    assert run_script(train, args_for(models["sd1"]["safetensors"], data, tmp_path / "o",
                                      "--base_weights", missing)) == 2
    one_error_line(capsys, f"--base_weights {missing}: no such file")


def test_base_weights_for_another_model_are_refused(models, data, tmp_path, capsys):
    sd2_lora = make_lora(models["sd2"]["safetensors"], tmp_path / "sd2.safetensors", seed=1, v2=True)
    assert run_script(train, args_for(models["sd1"]["safetensors"], data, tmp_path / "o",
                                      "--base_weights", sd2_lora)) == 2
    one_error_line(capsys, f"--base_weights {sd2_lora}", "SD2.x LoRA")


def test_base_weights_round_trip_through_output_config(tmp_path, capsys):
    from library.config.option_file import parse_with_config_file
    from train_network import build_parser

    argv = ["--base_weights", "a.safetensors", "b.safetensors", "--base_weights_multiplier", "0.5", "-1",
            "--scale_weight_norms", "1", "--fp8_base_unet"]
    with pytest.raises(SystemExit):
        parse_with_config_file(build_parser(), ["--config_file", str(tmp_path / "run"), "--output_config", *argv])
    back = parse_with_config_file(build_parser(), ["--config_file", str(tmp_path / "run.toml")])
    assert back.base_weights == ["a.safetensors", "b.safetensors"] and back.base_weights_multiplier == [0.5, -1.0]
    assert back.scale_weight_norms == 1.0 and back.fp8_base_unet


# ---- max-norm regularisation ------------------------------------------------------------------------------


def _module_norms(tensors):
    """‖alpha/rank · up∘down‖ of every module of a saved LoRA."""
    norms = {}
    for key, down in tensors.items():
        if key.endswith(".lora_down.weight"):
            name = key[:-len(".lora_down.weight")]
            up, rank = tensors[f"{name}.lora_up.weight"], down.shape[0]
            scale = float(tensors[f"{name}.alpha"]) / rank
            norms[name] = float((lora_delta(down.float(), up.float()) * scale).norm())
    return norms


def test_scale_weight_norms_bounds_every_module_and_logs(models, data, tmp_path):
    from tests.test_kohya_schedule_loss import scalars

    bound = 0.02
    extra = ["--network_args", "conv_dim=2", "conv_alpha=2", "--learning_rate", "2e-2", "--network_alpha", "4",
             "--logging_dir", tmp_path / "logs"]
    sd1 = models["sd1"]["safetensors"]
    assert run_script(train, args_for(sd1, data, tmp_path / "free", *extra, steps=3)) == 0
    assert run_script(train, args_for(sd1, data, tmp_path / "max", *extra, "--scale_weight_norms", str(bound),
                                      "--logging_dir", tmp_path / "logs-max", steps=3)) == 0
    free = _module_norms(load_file(str(tmp_path / "free" / "last.safetensors")))
    bounded = _module_norms(load_file(str(tmp_path / "max" / "last.safetensors")))
    assert any("conv1" in k for k in bounded) and free.keys() == bounded.keys()
    assert max(free.values()) > 2 * bound  # without the option the updates grow past the bound
    assert all(n <= bound * (1 + 1e-5) for n in bounded.values()), max(bounded.values())
    scaled = scalars(tmp_path / "logs-max", "max_norm/keys_scaled")
    top = scalars(tmp_path / "logs-max", "max_norm/max_key_norm")
    mean = scalars(tmp_path / "logs-max", "norm/avg_key_norm")
    assert sorted(scaled) == [1, 2, 3] and scaled[3] > 0
    assert top[3] == pytest.approx(max(bounded.values()), rel=1e-4)
    assert mean[3] == pytest.approx(sum(bounded.values()) / len(bounded), rel=1e-4)
    with safe_open(str(tmp_path / "max" / "last.safetensors"), "pt") as f:
        assert f.metadata()["ss_scale_weight_norms"] == str(bound)


def test_max_norm_rule_is_kohyas_and_covers_dora(models):
    """Below max/2 and between max/2 and max nothing changes; above, the pair is scaled to norm = max (DoRA's
    low-rank update too, its magnitude untouched)."""
    from networks.lora_common import max_norm_scale_

    g = torch.Generator().manual_seed(0)
    down, up = torch.randn(4, 8, generator=g), torch.randn(6, 4, generator=g)
    norm = float(lora_delta(down, up).norm())
    for bound, expect_scaled in ((norm * 3, False), (norm * 1.5, False), (norm / 2, True)):
        d, u = down.clone(), up.clone()
        scaled, after = max_norm_scale_(d, u, 1.0, bound)
        assert scaled == expect_scaled
        assert after == pytest.approx(min(norm, bound), rel=1e-5)
        assert float(lora_delta(d, u).norm()) == pytest.approx(min(norm, bound), rel=1e-5)
    model = load_model(models["sd1"]["safetensors"])
    network = create_network(1.0, 4, 2.0, None, model.text_encoder, model.unet, dora_wd="true", conv_dim="2")
    with torch.no_grad():
        for p in network.parameters():
            p.add_(torch.randn(p.shape, generator=g))
    magnitudes = {k: v.clone() for k, v in network.state_dict().items() if k.endswith("dora_scale")}
    count, mean, top = network.apply_max_norm_regularization(0.5, "cpu")
    norms = _module_norms(network.state_dict())
    assert count == len(norms) and top == pytest.approx(max(norms.values()), rel=1e-5) and top <= 0.5 * (1 + 1e-5)
    assert mean == pytest.approx(sum(norms.values()) / len(norms), rel=1e-5)
    assert all(torch.equal(v, network.state_dict()[k]) for k, v in magnitudes.items())


def test_scale_weight_norms_is_refused_for_networks_without_it(models, data, tmp_path, capsys):
    argv = args_for(models["sd1"]["safetensors"], data, tmp_path / "o", "--scale_weight_norms", "1")
    argv[argv.index("networks.lora")] = "networks.loha"
    assert run_script(train, argv) == 2
    one_error_line(capsys, "--scale_weight_norms", "networks.loha", "apply_max_norm_regularization")


# ---- fp8 base weights -------------------------------------------------------------------------------------


def test_fp8_layers_compute_as_kohya_from_fp8_weights(models):
    """The weights are float8 in memory; each layer computes in bf16 from exactly those values (the same
    numbers as a model whose weights were rounded to fp8 and kept in bf16), through forward and backward."""
    from library.models.fp8 import FP8_DTYPE, fp8_bytes, store_in_fp8

    ours, ref = load_model(models["sd1"]["safetensors"]), load_model(models["sd1"]["safetensors"])
    for module in (ours.unet, ref.unet):
        module.requires_grad_(False)
        module.to(dtype=torch.bfloat16)
    with torch.no_grad():
        for p in ref.unet.parameters():
            p.copy_(p.to(FP8_DTYPE).to(torch.bfloat16))
    held = store_in_fp8(ours.unet, torch.bfloat16)
    kinds = {type(m).__name__ for m in ours.unet.modules() if any(p.dtype == FP8_DTYPE for p in m.parameters(False))}
    assert {"Linear", "Conv2d", "GroupNorm", "LayerNorm"} <= kinds
    assert all(p.dtype == FP8_DTYPE for p in ours.unet.parameters())
    assert held == fp8_bytes(ours.unet) == sum(p.numel() for p in ours.unet.parameters())
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g)
    outs = []
    for unet in (ours.unet, ref.unet):
        unet.enable_gradient_checkpointing()
        unet.train()
        xi = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = unet(xi, torch.tensor([10, 500]), ctx).sample
        out.float().square().mean().backward()
        outs.append((out, xi.grad))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    assert all(p.dtype == FP8_DTYPE for p in ours.unet.parameters())  # still fp8 after the forward


@pytest.mark.parametrize("option, te_fp8", [("--fp8_base", True), ("--fp8_base_unet", False)])
def test_fp8_base_trains_the_lora(models, data, tmp_path, caplog, option, te_fp8):
    argv = args_for(models["sd1"]["safetensors"], data, tmp_path / "o", option, "--mixed_precision", "bf16",
                    "--learning_rate", "1e-2", steps=3)
    with caplog.at_level("INFO", logger="library.models.fp8"):
        assert run_script(train, argv) == 0
    held = {}
    for record in caplog.records:
        if record.name == "library.models.fp8":
            words = record.getMessage().split()
            held[words[1]] = (float(words[words.index("of") - 1]), float(words[words.index("of") + 1]))
    assert held["U-Net"][0] > 0.95 * held["U-Net"][1]  # practically every U-Net weight is held in fp8
    assert ("text" in held) == te_fp8 and (not te_fp8 or held["text"][0] > 0)
    path = tmp_path / "o" / "last.safetensors"
    tensors = load_file(str(path))
    ups = [v for k, v in tensors.items() if k.endswith("lora_up.weight")]
    assert all(torch.isfinite(v).all() for v in tensors.values()) and all(v.abs().sum() > 0 for v in ups)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["ss_fp8_base"] == str(option == "--fp8_base") and meta["ss_fp8_base_unet"] == str(not te_fp8)


def test_fp8_needs_mixed_precision(models, data, tmp_path, capsys):
    assert run_script(train, args_for(models["sd1"]["safetensors"], data, tmp_path / "o", "--fp8_base")) == 2
    one_error_line(capsys, "--fp8_base needs --mixed_precision fp16 or bf16")


def test_fp8_base_is_accepted_and_ignored_by_the_other_scripts(caplog):
    import train_db
    from library.training.args import validate_training_args

    args = train_db.build_parser().parse_args(["--fp8_base", "--output_dir", "x"])
    with caplog.at_level("WARNING"):
        validate_training_args(args)
    assert any("--fp8_base has no effect in this script" in r.getMessage() for r in caplog.records)


# ---- cpu offload checkpointing ----------------------------------------------------------------------------


def test_cpu_offload_checkpointing_is_refused_with_gradient_checkpointing(models, data, tmp_path, capsys):
    argv = args_for(models["sd1"]["safetensors"], data, tmp_path / "o", "--cpu_offload_checkpointing",
                    "--gradient_checkpointing")
    assert run_script(train, argv) == 2
    one_error_line(capsys, "--cpu_offload_checkpointing", "SD1/SD2 U-Net")
    assert not (tmp_path / "o" / "last.safetensors").exists()


def test_cpu_offload_checkpointing_alone_changes_nothing(caplog):
    from library.training.args import validate_training_args
    from train_network import build_parser

    args = build_parser().parse_args(["--cpu_offload_checkpointing", "--output_dir", "x",
                                      "--network_module", "networks.lora"])
    with caplog.at_level("WARNING"):
        validate_training_args(args)
    assert any("no effect without --gradient_checkpointing" in r.getMessage() for r in caplog.records)
