"""LoRA tools: merge_lora, svd_merge_lora, resize_lora, check_lora_weights, show_metadata.

Everything runs end to end on tiny random SD1/SD2 models and on LoRAs made with networks.lora
(random non-zero up weights). The reference implementation's files: test_lora_tools_reference.py.
"""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from safetensors import safe_open

from networks import check_lora_weights, merge_lora, resize_lora, svd_merge_lora
from networks.lora_common import model_hashes
from networks.lora_files import load_lora_file
from networks.lora_svd import select_rank
from tests.lora_tools_util import (
    assert_close,
    delta_gap,
    factors,
    frob_sq,
    load,
    make_lora,
    max_diff,
    one_error_line,
    outputs,
    runtime_outputs,
)
from tests.train_util import run_script
from tools import show_metadata


@pytest.fixture(scope="module")
def loras(models, tmp_path_factory):
    """LoRA files for the tiny models: conv (C3Lier) and plain, SD1 and SD2, and a rank-8 one."""
    root = tmp_path_factory.mktemp("loras")
    sd1, sd2 = models["sd1"]["safetensors"], models["sd2"]["safetensors"]
    return {
        "sd1_conv": make_lora(sd1, root / "sd1_conv.safetensors", 1, dim=4, alpha=2.0, conv=(2, 1.0)),
        "sd1_plain": make_lora(sd1, root / "sd1_plain.safetensors", 2, dim=4, alpha=4.0),
        "sd1_rank2": make_lora(sd1, root / "sd1_rank2.safetensors", 3, dim=2, alpha=1.0),
        "sd1_rank8": make_lora(sd1, root / "sd1_rank8.safetensors", 4, dim=8, alpha=4.0, conv=(4, 2.0)),
        "sd1_pt": make_lora(sd1, root / "sd1_plain.pt", 5, dim=4, alpha=1.0),
        "sd2_conv": make_lora(sd2, root / "sd2_conv.safetensors", 6, dim=4, alpha=2.0, conv=(2, 1.0), v2=True),
        "sd2_plain": make_lora(sd2, root / "sd2_plain.safetensors", 7, dim=4, alpha=1.0, v2=True),
    }


# ---------------------------------------------------------------------------------------------
# merge_lora: into a checkpoint


@pytest.mark.parametrize("version,kind", [("sd1", "safetensors"), ("sd1", "diffusers"), ("sd2", "safetensors"),
                                          ("sd2", "diffusers")])
def test_merge_into_model_equals_runtime_lora(models, loras, tmp_path, version, kind):
    source = models[version][kind]
    conv, plain = loras[f"{version}_conv"], loras[f"{version}_plain"]
    save_to = tmp_path / ("merged.safetensors" if kind == "safetensors" else "merged")
    argv = ["--sd_model", source, "--save_to", save_to, "--models", conv, plain, "--ratios", "0.7", "-0.4"]
    if version == "sd2":
        argv.append("--v2")
    assert run_script(merge_lora.main, argv) == 0

    expected = runtime_outputs(source, [(conv, 0.7), (plain, -0.4)])
    base = outputs(load(source))
    merged_model = load(save_to)
    assert merged_model.source_format == ("ldm" if kind == "safetensors" else "diffusers")
    merged = outputs(merged_model)
    assert max_diff(expected, base) > 1e-2  # the LoRAs change both models noticeably
    assert_close(merged, expected, atol=2e-4)


def test_merge_into_ldm_keeps_template_keys_and_vae(models, loras, tmp_path):
    source = models["sd1"]["safetensors"]
    save_to = tmp_path / "merged.ckpt"
    assert run_script(merge_lora.main, ["--sd_model", source, "--save_to", save_to, "--models", loras["sd1_conv"],
                                        "--ratios", "1.0", "--save_precision", "fp16"]) == 0
    with safe_open(str(source), framework="pt") as f:
        original = {k: f.get_tensor(k) for k in f.keys()}
    written = torch.load(save_to, map_location="cpu", weights_only=True)["state_dict"]
    assert set(written) == set(original)
    vae_keys = [k for k in original if k.startswith("first_stage_model.")]
    assert vae_keys and all(written[k].dtype == torch.float16 for k in vae_keys)
    assert all(torch.equal(written[k], original[k].half()) for k in vae_keys)
    unet_key = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"  # down_blocks.0.resnets.0.conv1 (3×3)
    assert written[unet_key].dtype == torch.float16
    assert not torch.equal(written[unet_key], original[unet_key].half())  # the conv LoRA went in
    expected = runtime_outputs(source, [(loras["sd1_conv"], 1.0)])
    assert_close(outputs(load(save_to)), expected, atol=5e-2)


# ---------------------------------------------------------------------------------------------
# merge_lora: LoRAs into one


def test_merge_loras_follows_documented_formula(loras, tmp_path):
    a, b = load_lora_file(loras["sd1_conv"]), load_lora_file(loras["sd1_plain"])
    save_to = tmp_path / "ab.safetensors"
    assert run_script(merge_lora.main, ["--save_to", save_to, "--models", a.path, b.path,
                                        "--ratios", "0.6", "0.3"]) == 0
    out = load_lora_file(save_to)
    assert set(out.modules) == set(a.modules) | set(b.modules)  # union: conv modules only in a are kept
    assert len(out.modules) > len(b.modules)
    for name, m in out.modules.items():
        base = a.modules[name]  # a comes first and has every module: alpha₀ = a's alpha
        assert m.alpha_value == base.alpha_value
        c_a = 0.6
        down, up = c_a * base.down, c_a * base.up
        if name in b.modules:
            c_b = 0.3 * math.sqrt(b.modules[name].alpha_value / base.alpha_value)
            down, up = down + c_b * b.modules[name].down, up + c_b * b.modules[name].up
        torch.testing.assert_close(m.down, down, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(m.up, up, atol=1e-6, rtol=1e-6)
    assert out.metadata["ss_network_dim"] == "4"
    assert out.metadata["ss_network_alpha"] == "2.0"
    assert out.metadata["ss_v2"] == "False" and out.metadata["ss_base_model_version"] == "sd_v1"
    assert (out.metadata["sshs_model_hash"], out.metadata["sshs_legacy_hash"]) == \
        model_hashes(out.tensors, out.metadata)


@pytest.mark.parametrize("ratio", [1.0, -1.0])
def test_merge_single_lora_into_one_is_the_same_lora(models, loras, tmp_path, ratio):
    """Ratio ±1 on one file: c² = 1, so the merged LoRA applies exactly like the input (sign kept)."""
    save_to = tmp_path / "one.safetensors"
    assert run_script(merge_lora.main, ["--save_to", save_to, "--models", loras["sd1_conv"],
                                        "--ratios", str(ratio)]) == 0
    source = models["sd1"]["safetensors"]
    assert_close(runtime_outputs(source, [(save_to, 1.0)]), runtime_outputs(source, [(loras["sd1_conv"], ratio)]),
                 atol=1e-5)


def test_merge_loras_ratio_acts_squared(loras, tmp_path):
    save_to = tmp_path / "half.safetensors"
    assert run_script(merge_lora.main, ["--save_to", save_to, "--models", loras["sd1_plain"],
                                        "--ratios", "0.5"]) == 0
    src, out = load_lora_file(loras["sd1_plain"]), load_lora_file(save_to)
    for name, m in out.modules.items():
        assert delta_gap(factors(m), factors(src.modules[name], 0.25)) < 1e-6


def test_merge_loras_of_different_ranks_is_refused(loras, tmp_path, capsys):
    save_to = tmp_path / "x.safetensors"
    code = run_script(merge_lora.main, ["--save_to", save_to, "--models", loras["sd1_plain"], loras["sd1_rank8"],
                                        "--ratios", "0.5", "0.5"])
    assert code == 2 and not save_to.exists()
    one_error_line(capsys, "sd1_plain.safetensors", "sd1_rank8.safetensors", "rank 4", "rank 8", "svd_merge_lora")


def test_merge_loras_of_different_sd_versions_is_refused(loras, tmp_path, capsys):
    code = run_script(merge_lora.main, ["--save_to", tmp_path / "x.safetensors", "--models", loras["sd1_plain"],
                                        loras["sd2_plain"], "--ratios", "0.5", "0.5"])
    assert code == 2
    one_error_line(capsys, "mismatched SD versions", "sd1_plain", "sd2_plain", "SD1.x", "SD2.x")


def test_precisions_and_files_without_alpha(loras, tmp_path):
    """Baseline bugs fixed: merge_lora --precision bf16 (crashed reading alpha), svd_merge_lora --device
    with a file lacking alpha keys, and fp16 merge precision before the SVD."""
    src = load_lora_file(loras["sd1_plain"])  # rank 4, alpha 4: the same deltas with or without alpha keys
    no_alpha = tmp_path / "no_alpha.pt"
    torch.save({k: v for k, v in src.tensors.items() if not k.endswith(".alpha")}, no_alpha)
    results = {}
    for precision in ("bf16", "float"):
        out = tmp_path / f"{precision}.safetensors"
        assert run_script(merge_lora.main, ["--save_to", out, "--models", src.path, no_alpha,
                                            "--ratios", "0.5", "0.5", "--precision", precision]) == 0
        results[precision] = load_lora_file(out)
    assert all(t.dtype == torch.bfloat16 for t in results["bf16"].tensors.values())
    for key, value in results["float"].tensors.items():
        torch.testing.assert_close(results["bf16"].tensors[key].float(), value, atol=2e-3, rtol=2e-2)
    svd = {}
    for name, extra in (("float", []), ("fp16", ["--device", "cpu", "--precision", "fp16"])):
        out = tmp_path / f"svd_{name}.safetensors"
        source = src.path if name == "float" else no_alpha
        assert run_script(svd_merge_lora.main, ["--save_to", out, "--models", source, "--ratios", "1",
                                                "--new_rank", "4", *extra]) == 0
        svd[name] = load_lora_file(out)
    assert all(t.dtype == torch.float16 for t in svd["fp16"].tensors.values())
    for name, m in svd["float"].modules.items():
        assert delta_gap(factors(svd["fp16"].modules[name]), factors(m)) < 5e-3


# ---------------------------------------------------------------------------------------------
# merge_lora: bad input


def test_sd1_lora_into_sd2_model_is_refused(models, loras, tmp_path, capsys):
    save_to = tmp_path / "x.safetensors"
    code = run_script(merge_lora.main, ["--sd_model", models["sd2"]["safetensors"], "--save_to", save_to,
                                        "--models", loras["sd1_conv"], "--ratios", "1"])
    assert code == 2 and not save_to.exists()
    one_error_line(capsys, "mismatched SD versions", "sd1_conv.safetensors", "SD1.x", "SD2.x",
                   "ss_base_model_version=sd_v1")


def test_checkpoint_given_as_lora_is_refused(models, tmp_path, capsys):
    ckpt = models["sd1"]["safetensors"]
    code = run_script(merge_lora.main, ["--save_to", tmp_path / "x.safetensors", "--models", ckpt, "--ratios", "1"])
    assert code == 2
    one_error_line(capsys, str(ckpt), "is not a LoRA file", "Stable Diffusion checkpoint")
    assert run_script(resize_lora.main, ["--model", ckpt, "--save_to", tmp_path / "y.safetensors"]) == 2
    one_error_line(capsys, "--model", "is not a LoRA file")


def test_ratio_count_must_match(loras, tmp_path, capsys):
    for script in (merge_lora, svd_merge_lora):
        code = run_script(script.main, ["--save_to", tmp_path / "x.safetensors", "--models", loras["sd1_plain"],
                                        loras["sd1_conv"], "--ratios", "0.5"])
        assert code == 2
        one_error_line(capsys, "--ratios", "2 value(s) needed", "1 given")


def test_output_equal_to_an_input_is_refused(models, loras, tmp_path, capsys):
    lora = tmp_path / "mine.safetensors"
    lora.write_bytes(loras["sd1_plain"].read_bytes())
    before = lora.read_bytes()
    runs = [
        (merge_lora, ["--save_to", lora, "--models", lora, loras["sd1_conv"], "--ratios", "1", "1"]),
        (svd_merge_lora, ["--save_to", lora, "--models", loras["sd1_conv"], lora, "--ratios", "1", "1"]),
        (resize_lora, ["--save_to", lora, "--model", lora, "--new_rank", "2"]),
    ]
    for script, argv in runs:
        assert run_script(script.main, argv) == 2
        one_error_line(capsys, "--save_to", "is the same file as", "mine.safetensors")
    assert lora.read_bytes() == before
    model = models["sd1"]["safetensors"]
    assert run_script(merge_lora.main, ["--sd_model", model, "--save_to", model, "--models", lora,
                                        "--ratios", "1"]) == 2
    one_error_line(capsys, "--sd_model")


def test_overwrite_input_replaces_the_file_with_the_result(models, loras, tmp_path, capsys):
    """--overwrite_input: the input file is replaced by exactly what a separate output would hold."""
    lora = tmp_path / "mine.safetensors"
    lora.write_bytes(loras["sd1_plain"].read_bytes())
    elsewhere = tmp_path / "elsewhere.safetensors"
    assert run_script(resize_lora.main, ["--save_to", elsewhere, "--model", lora, "--new_rank", "2"]) == 0
    assert run_script(resize_lora.main, ["--save_to", lora, "--model", lora, "--new_rank", "2",
                                         "--overwrite_input"]) == 0
    assert load_lora_file(lora).tensors.keys() == load_lora_file(elsewhere).tensors.keys()
    for key, value in load_lora_file(elsewhere).tensors.items():
        assert torch.equal(load_lora_file(lora).tensors[key], value), key
    folder = models["sd1"]["diffusers"]
    assert run_script(merge_lora.main, ["--sd_model", folder, "--save_to", folder, "--models", lora,
                                        "--ratios", "1", "--overwrite_input"]) == 2
    one_error_line(capsys, "--save_to", "same folder", "never replaced in place")


# ---------------------------------------------------------------------------------------------
# svd_merge_lora


def test_svd_merge_without_clamp_is_the_exact_sum(models, loras, tmp_path):
    """At rank ≥ the sum of the input ranks the re-factorised sum is exact (library call, clamp off)."""
    from networks.lora_files import save_lora_file

    a, b = load_lora_file(loras["sd1_conv"]), load_lora_file(loras["sd1_rank2"])
    tensors, ranks = svd_merge_lora.svd_merge([a, b], [0.7, 0.5], new_rank=6, new_conv_rank=2, clamp_quantile=None)
    path = tmp_path / "exact.safetensors"
    save_lora_file(tensors, path, {}, None)
    source = models["sd1"]["safetensors"]
    expected = runtime_outputs(source, [(a.path, 0.7), (b.path, 0.5)])
    assert_close(runtime_outputs(source, [(path, 1.0)]), expected, atol=1e-4)
    assert max_diff(expected, outputs(load(source))) > 1e-2


def test_svd_merge_cli_truncates_and_clamps_as_documented(loras, tmp_path):
    a, b = load_lora_file(loras["sd1_conv"]), load_lora_file(loras["sd1_rank2"])
    save_to = tmp_path / "svd.safetensors"
    assert run_script(svd_merge_lora.main, ["--save_to", save_to, "--models", a.path, b.path,
                                            "--ratios", "0.7", "0.5", "--new_rank", "5", "--new_conv_rank", "1",
                                            "--save_precision", "float"]) == 0
    out = load_lora_file(save_to)
    assert set(out.modules) == set(a.modules) | set(b.modules)
    clamped_total = entries_total = 0
    for name, m in out.modules.items():
        want = min(1 if m.is_conv3x3 else 5, m.in_features, m.out_features)
        assert m.rank == want and m.alpha_value == want
        # Independent reference: SVD of the explicit exact sum, in float64.
        full = sum(mod.delta(r).double() for mod, r in ((a.modules.get(name), 0.7), (b.modules.get(name), 0.5))
                   if mod is not None).reshape(m.out_features, -1)
        u, s, vh = torch.linalg.svd(full, full_matrices=False)
        up, down = m.factors()
        h = float(torch.cat([up.flatten(), down.flatten()]).abs().max())
        for j in range(want):
            if s[j] <= 1e-6 * s[0]:  # beyond the rank of the sum: no direction to compare, up must be 0
                assert float(up[:, j].abs().max()) < 1e-6
                continue
            ref_up, ref_down = u[:, j] * s[j], vh[j]
            sign = 1.0 if float(down[j].double() @ ref_down) >= 0 else -1.0
            for got, ref in ((up[:, j].double(), sign * ref_up), (down[j].double(), sign * ref_down)):
                inside = got.abs() < h - 1e-6
                torch.testing.assert_close(got[inside], ref[inside], atol=2e-5, rtol=1e-4)
                assert bool((ref[~inside].abs() >= h - 1e-5).all())  # only values beyond h were clamped
                clamped_total += int((~inside).sum())
                entries_total += got.numel()
    assert 0 < clamped_total <= 0.03 * entries_total
    assert out.metadata["ss_network_dim"] == "5" and out.metadata["ss_network_alpha"] == "5.0"
    assert json.loads(out.metadata["ss_network_args"]) == {"conv_dim": "1", "conv_alpha": "1.0"}


def test_svd_merge_of_different_models_is_refused(loras, tmp_path, capsys):
    """An SD1 and an SD2 LoRA (told apart by their metadata: the tiny models have equal widths)."""
    code = run_script(svd_merge_lora.main, ["--save_to", tmp_path / "x.safetensors", "--models", loras["sd1_conv"],
                                            loras["sd2_conv"], "--ratios", "1", "1"])
    assert code == 2
    one_error_line(capsys, "mismatched SD versions")


# ---------------------------------------------------------------------------------------------
# resize_lora


def test_resize_to_full_rank_is_identity(loras, tmp_path):
    src = load_lora_file(loras["sd1_conv"])
    save_to = tmp_path / "same.safetensors"
    assert run_script(resize_lora.main, ["--model", src.path, "--save_to", save_to, "--new_rank", "4"]) == 0
    out = load_lora_file(save_to)
    assert set(out.modules) == set(src.modules)
    for name, m in out.modules.items():
        old = src.modules[name]
        assert m.rank == 4  # conv modules of rank 2 are padded with zero singular values
        assert m.alpha_value == pytest.approx(old.scale * 4)
        assert m.down.shape[1:] == old.down.shape[1:] and m.up.shape[0] == old.up.shape[0]
        assert delta_gap(factors(m), factors(old)) < 1e-5
    last_alpha = out.modules[sorted(out.modules)[-1]].alpha_value
    assert out.metadata["ss_training_comment"] == "dimension is resized from 4 to 4; test lora"
    assert out.metadata["ss_network_dim"] == "4" and out.metadata["ss_network_alpha"] == str(last_alpha)
    assert out.metadata["ss_base_model_version"] == "sd_v1"  # other keys kept
    assert (out.metadata["sshs_model_hash"], out.metadata["sshs_legacy_hash"]) == \
        model_hashes(out.tensors, {k: v for k, v in out.metadata.items()})


def spec_rank(values: list[float], method: str, param: float, max_rank: int) -> int:
    """The documented rank rule, written out independently of networks.lora_svd."""
    if values[0] <= 1e-6:
        return 1
    if method == "sv_ratio":
        i = sum(v > values[0] / param for v in values)
    else:
        parts = values if method == "sv_cumulative" else [v * v for v in values]
        target = param if method == "sv_cumulative" else param ** 2
        cumulative = [sum(parts[: j + 1]) / sum(parts) for j in range(len(parts))]
        i = 1 + next((j for j, c in enumerate(cumulative) if c >= target), len(parts))
    i = max(1, min(i, len(values) - 1))
    return min(i + 1, max_rank)


LINE = re.compile(r"^(\S+)\s+\| sum\(S\) retained: ([\d.]+)%, fro retained: ([\d.]+)%, max\(S\) ratio: ([\d.inf]+)"
                  r", dynamic \| dim: (\d+), alpha: ([\d.]+)$")


@pytest.mark.parametrize("method,param", [("sv_fro", 0.9), ("sv_cumulative", 0.7), ("sv_ratio", 3.0)])
def test_resize_dynamic_rank_follows_rule_and_verbose_numbers(loras, tmp_path, capsys, method, param):
    src = load_lora_file(loras["sd1_rank8"])
    save_to = tmp_path / "dyn.safetensors"
    capsys.readouterr()
    assert run_script(resize_lora.main, ["--model", src.path, "--save_to", save_to, "--new_rank", "6",
                                         "--dynamic_method", method, "--dynamic_param", str(param),
                                         "--verbose"]) == 0
    stdout = capsys.readouterr().out
    lines = {m.group(1): m for m in map(LINE.match, stdout.splitlines()) if m}
    assert set(lines) == set(src.modules)
    out = load_lora_file(save_to)
    ranks, fros = set(), []
    for name, old in src.modules.items():
        up, down = old.factors()
        full = (up.double() @ down.double())
        values = [float(v) for v in torch.linalg.svdvals(full)]
        want = spec_rank(values, method, param, 6)
        printed = lines[name]
        assert int(printed.group(5)) == want == out.modules[name].rank
        ranks.add(want)
        kept = math.sqrt(sum(v * v for v in values[:want]) / sum(v * v for v in values))
        assert float(printed.group(3)) == pytest.approx(100 * kept, abs=0.051)
        assert float(printed.group(2)) == pytest.approx(100 * sum(values[:want]) / sum(values), abs=0.051)
        assert float(printed.group(6)) == pytest.approx(old.scale * want)
        # The file really keeps that share: ‖ΔW_new‖ / ‖ΔW‖ = fro retained (same scale).
        new = out.modules[name]
        assert math.sqrt(frob_sq(*factors(new)) / frob_sq(*factors(old))) == pytest.approx(kept, rel=1e-4)
        if method == "sv_fro" and want < 6:
            assert kept >= param  # the documented share is reached (one value more than needed)
        fros.append(kept)
    assert len(ranks) > 1  # the rule picked different ranks for different modules
    average = re.search(r"Average Frobenius norm retention: ([\d.]+)%", stdout)
    assert float(average.group(1)) == pytest.approx(100 * sum(fros) / len(fros), abs=0.006)
    assert out.metadata["ss_network_dim"] == "Dynamic" == out.metadata["ss_network_alpha"]
    assert out.metadata["ss_training_comment"] == f"Dynamic resize with {method}: {param} from 8; test lora"


def test_resize_new_conv_rank_and_pt_files(loras, tmp_path):
    save_to = tmp_path / "small.pt"
    assert run_script(resize_lora.main, ["--model", loras["sd1_rank8"], "--save_to", save_to, "--new_rank", "3",
                                         "--new_conv_rank", "2", "--save_precision", "fp16"]) == 0
    out = load_lora_file(save_to)
    assert not out.metadata and out.tensors and all(t.dtype == torch.float16 for t in out.tensors.values())
    for name, m in out.modules.items():
        assert m.rank == (2 if m.is_conv else 3), name  # every 4-D module, 1×1 included, gets the conv rank
    pt_out = tmp_path / "from_pt.safetensors"
    assert run_script(resize_lora.main, ["--model", loras["sd1_pt"], "--save_to", pt_out, "--new_rank", "2"]) == 0
    assert load_lora_file(pt_out).metadata["ss_training_comment"] == "dimension is resized from 4 to 2; "


def test_broken_weights_are_refused(loras, tmp_path, capsys):
    from networks.lora_files import save_lora_file

    tensors = dict(load_lora_file(loras["sd1_plain"]).tensors)
    key = next(k for k in tensors if k.endswith("lora_up.weight"))
    tensors[key] = tensors[key].clone()
    tensors[key][0, 0] = float("nan")
    broken = tmp_path / "broken.safetensors"
    save_lora_file(tensors, broken, {}, None)
    for script, argv in ((resize_lora, ["--model", broken]), (svd_merge_lora, ["--models", broken, "--ratios", "1"])):
        assert run_script(script.main, [*argv, "--save_to", tmp_path / "x.safetensors"]) == 2
        one_error_line(capsys, "broken.safetensors", key.split(".")[0], "NaN")
    assert run_script(check_lora_weights.main, [broken]) == 0  # the checker shows it instead
    assert any(line.startswith(key) and ",nan," in line for line in capsys.readouterr().out.splitlines())


def test_resize_zero_module_and_rank_rule_edges():
    assert select_rank([0.0, 0.0, 0.0], 4) == 1
    assert select_rank([3.0, 2.0, 1.0, 0.0], 8) == 4  # capped at L instead of failing
    assert select_rank([3.0, 2.0, 1.0, 0.0], 8, "sv_ratio", 1.0) == 2  # i = 0 → clamped to 1 → q = 2


@pytest.mark.parametrize("extra,needle", [
    (["--dynamic_method", "sv_fro"], "needs --dynamic_param"),
    (["--dynamic_method", "sv_fro", "--dynamic_param", "0"], "needs --dynamic_param"),
    (["--dynamic_method", "sv_fro", "--dynamic_param", "1.5"], "fraction in (0, 1]"),
    (["--dynamic_method", "sv_ratio", "--dynamic_param", "0.5"], "at least 1"),
    (["--new_rank", "0"], "--new_rank 0: the rank must be at least 1"),
    (["--new_conv_rank", "0"], "--new_conv_rank 0: the rank must be at least 1"),
    (["--device", "nonsense"], "--device nonsense"),
])
def test_resize_bad_options(loras, tmp_path, capsys, extra, needle):
    assert run_script(resize_lora.main, ["--model", loras["sd1_plain"], "--save_to", tmp_path / "x.safetensors",
                                         *extra]) == 2
    one_error_line(capsys, needle)


def test_resize_and_svd_merge_need_their_inputs(loras, tmp_path, capsys):
    assert run_script(resize_lora.main, ["--save_to", tmp_path / "x.safetensors"]) == 2
    one_error_line(capsys, "--model is required (the LoRA file to resize)")
    assert run_script(svd_merge_lora.main, ["--save_to", tmp_path / "x.safetensors", "--models", loras["sd1_plain"],
                                            "--ratios", "1", "--new_rank", "0"]) == 2
    one_error_line(capsys, "--new_rank 0: the rank must be at least 1")
    assert run_script(svd_merge_lora.main, ["--models", loras["sd1_plain"], "--ratios", "1"]) == 2
    one_error_line(capsys, "--save_to is required")
    assert not (tmp_path / "x.safetensors").exists()


# ---------------------------------------------------------------------------------------------
# check_lora_weights and show_metadata


def test_check_lora_weights_lists_modules_and_zero_ups(loras, tmp_path, capsys):
    src = load_lora_file(loras["sd1_plain"])
    tensors = dict(src.tensors)
    zero_key = next(k for k in tensors if k.endswith("lora_up.weight"))
    tensors[zero_key] = torch.zeros_like(tensors[zero_key])
    from networks.lora_files import save_lora_file

    path = tmp_path / "partly_untrained.safetensors"
    save_lora_file(tensors, path, {}, None)
    capsys.readouterr()
    assert run_script(check_lora_weights.main, [path]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == f"number of LoRA modules: {2 * len(src.modules)}"
    rows = {line.split(",")[0]: line.split(",") for line in lines[2:] if line.count(",") == 3}
    assert len(rows) == 2 * len(src.modules)
    assert rows[zero_key][2] == "0.0"
    some_down = next(k for k in rows if k.endswith("lora_down.weight"))
    assert float(rows[some_down][2]) == pytest.approx(float(tensors[some_down].abs().mean()))
    assert rows[some_down][1] == "(" + "-".join(str(s) for s in tensors[some_down].shape) + ")"
    assert lines[-1].startswith("1 module(s) have an all-zero lora_up weight")
    assert run_script(check_lora_weights.main, [path, "-s"]) == 0
    assert any(line.split(",")[0].endswith(".alpha") for line in capsys.readouterr().out.splitlines())


def test_check_lora_weights_refuses_a_checkpoint(models, capsys):
    assert run_script(check_lora_weights.main, [models["sd1"]["safetensors"]]) == 2
    one_error_line(capsys, "is not a LoRA file", "Stable Diffusion checkpoint")


def test_show_metadata(loras, models, tmp_path, capsys):
    capsys.readouterr()
    assert run_script(show_metadata.main, ["--model", loras["sd1_conv"]]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown == load_lora_file(loras["sd1_conv"]).metadata and "sshs_model_hash" in shown
    assert run_script(show_metadata.main, [loras["sd1_conv"], "--readable"]) == 0
    readable = capsys.readouterr().out
    assert "ss_training_comment: test lora" in readable and "ss_v2: False" in readable
    plain = tmp_path / "no_meta.safetensors"
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(plain))
    assert run_script(show_metadata.main, ["--model", plain]) == 0
    assert "No metadata found" in capsys.readouterr().err
    assert run_script(show_metadata.main, ["--model", loras["sd1_pt"]]) == 2
    one_error_line(capsys, "sd1_plain.pt", "is not a .safetensors file")
