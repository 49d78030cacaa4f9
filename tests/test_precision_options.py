"""Precision and memory options of kohya HEAD: --no_half_vae, --fused_backward_pass, the --ddp_* options,
the DeepSpeed options (parsing and refusals; training with --deepspeed: tests/test_deepspeed.py) and
--fp16_master_weights_and_gradients."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import toml
import torch
from safetensors.torch import load_file
from transformers.optimization import Adafactor

import fine_tune
import train_db
import train_network
import train_textual_inversion
import train_textual_inversion_XTI
from library.config.option_file import parse_with_config_file
from library.training import session
from library.training.ddp_options import DdpSettings, GradientBuckets, process_group_kwargs
from library.training.fused_backward import FusedBackward
from library.training.precision_options import keep_vae_in_float32
from tests.train_util import make_dataset, run_script, free_port

REPO = Path(__file__).resolve().parent.parent
ACCELERATE = Path(sys.executable).with_name("accelerate")
SCRIPTS = {
    "train_network": (train_network.main, train_network.build_parser),
    "train_db": (train_db.main, train_db.build_parser),
    "fine_tune": (fine_tune.main, fine_tune.build_parser),
    "train_textual_inversion": (train_textual_inversion.main, train_textual_inversion.build_parser),
    "train_textual_inversion_XTI": (train_textual_inversion_XTI.main,
                                    lambda: train_textual_inversion.build_parser("train_textual_inversion_XTI.py")),
}
ADAFACTOR = ["--optimizer_type", "AdaFactor", "--optimizer_args", "relative_step=False", "scale_parameter=False",
             "warmup_init=False"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data"), count=2)


def script_args(script: str, models, data: Path, out: Path, *extra, steps: int = 2) -> list:
    """A tiny run of ``script`` (64 px, ``steps`` optimizer steps, no DataLoader workers)."""
    argv = ["--pretrained_model_name_or_path", models["sd1"]["safetensors"], "--resolution", "64", "--output_dir", out,
            "--max_train_steps", str(steps), "--learning_rate", "1e-3", "--seed", "1", "--max_data_loader_n_workers",
            "0"]
    if script == "fine_tune":
        meta = out.parent / f"{out.name}-meta.json"
        meta.write_text('{"img0": {"caption": "sks dog"}, "img1": {"caption": "sks dog"}}', encoding="utf-8")
        argv += ["--in_json", meta, "--train_data_dir", data / "5_sks dog"]
    else:
        argv += ["--train_data_dir", data]
    if script == "train_network":
        argv += ["--network_module", "networks.lora", "--network_dim", "4"]
    if script.startswith("train_textual_inversion"):
        argv += ["--token_string", "zqx", "--init_word", "dog"]
    return [*argv, *extra]


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err.strip()


class RunSpy:
    """Keeps the PreparedRun of the script's session (our own set-up function, called for real)."""

    def __init__(self, monkeypatch):
        self.run = None
        real = session.prepare_run

        def spy(*args, **kwargs):
            self.run = real(*args, **kwargs)
            return self.run

        monkeypatch.setattr(session, "prepare_run", spy)

    def vae_dtypes(self) -> set[torch.dtype]:
        return {p.dtype for p in self.run.model.vae.parameters()}


# ---- --no_half_vae --------------------------------------------------------------------------------------


def test_no_half_vae_is_an_option_where_kohya_has_it():
    have = {name for name, (_, build) in SCRIPTS.items() if "no_half_vae" in {a.dest for a in build()._actions}}
    assert have == {"train_network", "train_db", "fine_tune", "train_textual_inversion"}


def _latent_cache(data: Path) -> dict[str, np.ndarray]:
    return {p.name: np.load(p)["arr_0"] for p in sorted(data.rglob("*.npz"))}


def test_no_half_vae_caches_float32_latents_and_keeps_the_vae_float32(models, data, tmp_path, monkeypatch):
    """bf16 mixed precision on the CPU: with the flag the VAE stays float32 and the cached latents equal those
    of a float32 run; without it the VAE is bf16 and the latents differ."""
    caches, dtypes = {}, {}
    for name, extra in (("fp32", []), ("bf16", ["--mixed_precision", "bf16"]),
                        ("bf16-no-half", ["--mixed_precision", "bf16", "--no_half_vae"])):
        copy = tmp_path / f"data-{name}"
        shutil.copytree(data, copy)
        spy = RunSpy(monkeypatch)
        argv = script_args("train_network", models, copy, tmp_path / f"out-{name}", "--cache_latents_to_disk", *extra,
                           steps=1)
        assert run_script(train_network.main, argv) == 0
        caches[name], dtypes[name] = _latent_cache(copy), spy.vae_dtypes()
        assert len(caches[name]) == 2
    assert dtypes == {"fp32": {torch.float32}, "bf16": {torch.bfloat16}, "bf16-no-half": {torch.float32}}
    for key, value in caches["fp32"].items():
        np.testing.assert_array_equal(caches["bf16-no-half"][key], value)
    assert any(not np.array_equal(caches["bf16"][key], value) for key, value in caches["fp32"].items())


@pytest.mark.parametrize("script", ["train_db", "fine_tune", "train_textual_inversion"])
def test_no_half_vae_in_the_other_scripts(script, models, data, tmp_path, monkeypatch):
    """Encoding on the fly (no cache): the VAE is float32 with the flag, bf16 without."""
    for flag, expected in (([], torch.bfloat16), (["--no_half_vae"], torch.float32)):
        spy = RunSpy(monkeypatch)
        out = tmp_path / f"out{len(flag)}"
        argv = script_args(script, models, data, out, "--mixed_precision", "bf16", *flag, steps=1)
        assert run_script(SCRIPTS[script][0], argv) == 0
        assert spy.vae_dtypes() == {expected}


def test_float32_vae_decodes_in_float32_inside_autocast():
    """Sampling runs under autocast: a --no_half_vae VAE still decodes (and encodes) in float32 there."""
    from library.models.random_model import build_random_model

    vae = build_random_model("tiny-sd1").vae.eval()
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = vae.decode(latents).sample
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = vae.decode(latents).sample
        keep_vae_in_float32(vae)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            kept = vae.decode(latents.to(torch.bfloat16)).sample
            encoded = vae.encode(plain).latent_dist.mean
    assert half.dtype == torch.bfloat16 and kept.dtype == torch.float32 and encoded.dtype == torch.float32
    torch.testing.assert_close(kept, plain, rtol=1e-2, atol=1e-2)  # the input itself went through bf16
    assert not torch.equal(half.float(), plain)


# ---- --fused_backward_pass --------------------------------------------------------------------------------


def _tiny_model_and_loss(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    x, y = torch.randn(4, 6), torch.randn(4, 3)
    return model, lambda: torch.nn.functional.mse_loss(model(x), y)


@pytest.mark.parametrize("clip", [0.0, 0.05])
def test_fused_step_equals_the_ordinary_step_and_frees_every_gradient(clip):
    """Three steps with the hooks give the weights of three ordinary AdaFactor steps (with --max_grad_norm:
    each parameter's gradient clipped on its own, as kohya), and backward leaves no gradient behind."""
    results = []
    for fused in (False, True):
        model, loss_fn = _tiny_model_and_loss()
        params = list(model.parameters())
        opt = Adafactor([{"params": params[:2], "lr": 1e-2}, {"params": params[2:], "lr": 3e-3}], relative_step=False,
                        scale_parameter=False, warmup_init=False)
        hooks = FusedBackward(opt, params, clip) if fused else None
        for _ in range(3):
            loss_fn().backward()
            if hooks is not None:
                assert all(p.grad is None for p in params)  # stepped and freed during backward
            else:
                for p in params:
                    if clip:
                        torch.nn.utils.clip_grad_norm_([p], clip)
                opt.step()
                opt.zero_grad(set_to_none=True)
        results.append([p.detach().clone() for p in params])
    for ordinary, fused in zip(*results):
        torch.testing.assert_close(fused, ordinary, rtol=0, atol=1e-7)
    assert not torch.equal(results[1][0], _tiny_model_and_loss()[0][0].weight)  # it did train


@pytest.mark.parametrize("script", ["train_network", "train_textual_inversion"])
def test_fused_backward_run_trains_the_same_weights(script, models, data, tmp_path, caplog):
    """A CLI run with --fused_backward_pass saves the weights of the same run without it (AdaFactor,
    --max_grad_norm 0)."""
    saved = []
    caplog.set_level("INFO")
    # TI: templates so the token is trained; LoRA: with gradient checkpointing (backward recomputes the blocks)
    template = ["--use_object_template"] if script == "train_textual_inversion" else ["--gradient_checkpointing"]
    for flag in ([], ["--fused_backward_pass"], ["--learning_rate", "0"]):
        out = tmp_path / f"out{len(saved)}"
        argv = script_args(script, models, data, out, *ADAFACTOR, *template, "--max_grad_norm", "0",
                           "--save_model_as", "safetensors", *flag, steps=3)
        caplog.clear()
        assert run_script(SCRIPTS[script][0], argv) == 0
        is_fused = flag[:1] == ["--fused_backward_pass"]
        assert ("fused backward pass: AdaFactor steps" in caplog.text) == is_fused
        (path,) = out.glob("*.safetensors")  # last.safetensors, or <token>.safetensors for an embedding
        saved.append(load_file(str(path)))
    plain, fused, untrained = saved
    assert plain.keys() == fused.keys() and plain
    for key in plain:
        torch.testing.assert_close(fused[key], plain[key], rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(plain[key], untrained[key]) for key in plain)  # the runs did train


def test_fused_backward_full_model_run_trains_the_same_weights(models, data, tmp_path):
    saved = []
    for flag in ([], ["--fused_backward_pass"]):
        out = tmp_path / f"out{len(flag)}"
        argv = script_args("train_db", models, data, out, *ADAFACTOR, "--max_grad_norm", "0",
                           "--save_model_as", "safetensors", *flag, steps=2)
        assert run_script(train_db.main, argv) == 0
        saved.append(load_file(str(out / "last.safetensors")))
    for key in saved[0]:
        torch.testing.assert_close(saved[1][key], saved[0][key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("extra, message", [
    ([], "--fused_backward_pass needs --optimizer_type AdaFactor, got AdamW"),
    (["--optimizer_type", "Lion"], "--fused_backward_pass needs --optimizer_type AdaFactor, got Lion"),
    ([*ADAFACTOR, "--gradient_accumulation_steps", "2"],
     "--fused_backward_pass cannot be combined with --gradient_accumulation_steps 2"),
    ([*ADAFACTOR, "--mixed_precision", "fp16"], "--fused_backward_pass cannot be combined with --mixed_precision fp16"),
])
@pytest.mark.parametrize("script", list(SCRIPTS))
def test_fused_backward_refusals_are_one_line(script, extra, message, models, data, tmp_path, capsys):
    out = tmp_path / "out"
    argv = script_args(script, models, data, out, "--fused_backward_pass", *extra)
    assert run_script(SCRIPTS[script][0], argv) == 2
    assert message in one_error_line(capsys)
    assert not out.exists()


# ---- --ddp_* ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("minutes", [7, 10])
def test_ddp_timeout_reaches_init_process_group_kwargs(minutes):
    """accelerate passes on only non-default values: 10 minutes (its nccl default) must still reach gloo."""
    (handler,) = process_group_kwargs(DdpSettings(timeout_minutes=minutes))
    assert handler.to_kwargs() == {"timeout": __import__("datetime").timedelta(minutes=minutes)}
    assert process_group_kwargs(DdpSettings()) == [] and process_group_kwargs(DdpSettings(timeout_minutes=0)) == []


def test_gradient_buckets_are_the_gradients():
    """After attach, backward accumulates straight into the flat buckets (no copy), and a zero_grad followed
    by attach starts from zeros again."""
    model, loss_fn = _tiny_model_and_loss()
    params = list(model.parameters())
    buckets = GradientBuckets(params, bucket_elements=40)  # two buckets: 30+5 | 15+3
    assert [sum(p.numel() for p, _ in members) for _, members in buckets.buckets] == [35, 18]
    buckets.attach()
    loss_fn().backward()
    loss_fn().backward()  # accumulates in place
    flat = torch.cat([f for f, _ in buckets.buckets])
    model2, loss_fn2 = _tiny_model_and_loss()
    (2 * loss_fn2()).backward()
    torch.testing.assert_close(flat, torch.cat([p.grad.reshape(-1) for p in model2.parameters()]))
    for f, members in buckets.buckets:
        for p, offset in members:
            assert p.grad.data_ptr() == f[offset:].data_ptr()
    for p in params:
        p.grad = None
    buckets.attach()
    assert all(float(f.abs().sum()) == 0 for f, _ in buckets.buckets)


def _launch(args: list, tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    cmd = [str(ACCELERATE), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()), *args]
    environ = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", ACCELERATE_USE_CPU="1",
                   SDTRAIN_CACHE_DIR=str(tmp_path / "cache"), PYTHONPATH=str(REPO), **env)
    return subprocess.run(cmd, cwd=REPO, env=environ, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_ddp_timeout_is_the_process_group_timeout(tmp_path):
    """Two CPU processes: the gloo group gets --ddp_timeout (10 minutes too); without it torch's 30."""
    probe = tmp_path / "probe.py"
    probe.write_text("import sys\nfrom train_network import build_parser\n"
                     "from library.training.session import make_accelerator\n"
                     "from library.option_groups import Options\n"
                     "from library.training.ddp_options import process_group_timeout\n"
                     "from library.training.ddp_options import ddp_settings\n"
                     "opts = Options.from_args(build_parser().parse_args(sys.argv[1:]))\n"
                     "acc, _ = make_accelerator(opts.logging, opts.training, ddp_settings(opts.distributed))\n"
                     "print(f'rank {acc.process_index} timeout {process_group_timeout()}')\n", encoding="utf-8")
    for flag, expected in ((["--ddp_timeout", "10"], "0:10:00"), ([], "0:30:00")):
        res = _launch([str(probe), *flag], tmp_path)
        assert res.returncode == 0, res.stderr[-3000:]
        # both processes write to one pipe: their lines may run together, so match the records, not lines
        assert sorted(re.findall(r"rank \d timeout [0-9:]+", res.stdout)) == [
            f"rank 0 timeout {expected}", f"rank 1 timeout {expected}"], res.stdout


@pytest.mark.slow
def test_gradient_as_bucket_view_trains_the_same_weights_on_two_processes(models, data, tmp_path):
    saved = []
    for flag in ([], ["--ddp_gradient_as_bucket_view", "--ddp_static_graph", "--ddp_timeout", "7"]):
        out = tmp_path / f"out{len(flag)}"
        argv = script_args("train_network", models, data, out, "--train_batch_size", "1", *flag, steps=2)
        res = _launch([str(REPO / "train_network.py"), *[str(a) for a in argv]], tmp_path)
        assert res.returncode == 0, res.stderr[-3000:]
        if flag:
            assert "distributed: 2 processes, backend gloo, timeout 0:07:00" in res.stderr, res.stderr[-3000:]
            assert "gradients are views of 1 all-reduce bucket(s)" in res.stderr
        saved.append(load_file(str(out / "last.safetensors")))
    assert saved[0].keys() == saved[1].keys()
    for key in saved[0]:
        assert torch.equal(saved[0][key], saved[1][key]), key


# ---- DeepSpeed options -----------------------------------------------------------------------------------

DEEPSPEED_VALUES = ["--zero_stage", "3", "--offload_optimizer_device", "nvme", "--offload_optimizer_nvme_path",
                    "/nvme", "--offload_param_device", "cpu", "--offload_param_nvme_path", "/local_nvme",
                    "--zero3_init_flag", "--zero3_save_16bit_model", "--fp16_master_weights_and_gradients"]


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_deepspeed_options_parse_with_kohyas_defaults(script):
    parser = SCRIPTS[script][1]()
    defaults = parser.parse_args([])
    assert (defaults.deepspeed, defaults.zero_stage, defaults.offload_optimizer_device,
            defaults.offload_optimizer_nvme_path, defaults.offload_param_device, defaults.offload_param_nvme_path,
            defaults.zero3_init_flag, defaults.zero3_save_16bit_model,
            defaults.fp16_master_weights_and_gradients) == (False, 2, None, None, None, None, False, False, False)
    given = parser.parse_args(DEEPSPEED_VALUES)
    assert (given.zero_stage, given.offload_optimizer_device, given.offload_param_nvme_path) == (3, "nvme",
                                                                                               "/local_nvme")
    assert given.zero3_init_flag and given.zero3_save_16bit_model and given.fp16_master_weights_and_gradients
    with pytest.raises(SystemExit):
        parser.parse_args(["--zero_stage", "4"])
    with pytest.raises(SystemExit):
        parser.parse_args(["--offload_param_device", "gpu"])


def test_deepspeed_options_round_trip_through_a_config_file(tmp_path, capsys):
    argv = ["--config_file", tmp_path / "run", "--output_config", *DEEPSPEED_VALUES, "--ddp_timeout", "5",
            "--fused_backward_pass", "--no_half_vae"]
    with pytest.raises(SystemExit) as stop:
        parse_with_config_file(train_network.build_parser(), [str(a) for a in argv])
    assert stop.value.code == 0
    written = toml.loads((tmp_path / "run.toml").read_text(encoding="utf-8"))
    assert written["zero_stage"] == 3 and written["offload_optimizer_device"] == "nvme" and written["ddp_timeout"] == 5
    back = parse_with_config_file(train_network.build_parser(), ["--config_file", str(tmp_path / "run.toml")])
    direct = train_network.build_parser().parse_args([str(a) for a in DEEPSPEED_VALUES] + [
        "--ddp_timeout", "5", "--fused_backward_pass", "--no_half_vae"])
    assert vars(back) == {**vars(direct), "config_file": str(tmp_path / "run.toml")}


DEEPSPEED_INSTALLED = importlib.util.find_spec("deepspeed") is not None
NOT_INSTALLED = "--deepspeed needs the package 'deepspeed', which is not installed"


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_deepspeed_nvme_offload_stops_with_one_line(script, models, data, tmp_path, capsys):
    """NVMe offload is refused before anything loads (without the package: the line that says how to install it)."""
    out = tmp_path / "out"
    argv = script_args(script, models, data, out, "--deepspeed", "--zero_stage", "3", "--offload_param_device", "nvme")
    assert run_script(SCRIPTS[script][0], argv) == 2
    line = one_error_line(capsys)
    assert ("--deepspeed: --offload_param_device nvme: NVMe offload is not supported" in line if DEEPSPEED_INSTALLED
            else NOT_INSTALLED in line), line
    assert not out.exists()


def test_deepspeed_from_a_config_file_is_checked_too(models, data, tmp_path, capsys):
    config = tmp_path / "run.toml"
    config.write_text('deepspeed = true\nzero_stage = 1\noffload_optimizer_device = "cpu"\n', encoding="utf-8")
    argv = script_args("train_network", models, data, tmp_path / "out", "--config_file", config)
    assert run_script(train_network.main, argv) == 2
    line = one_error_line(capsys)
    assert ("--offload_optimizer_device cpu needs --zero_stage 2 or 3 (got 1)" in line if DEEPSPEED_INSTALLED
            else NOT_INSTALLED in line), line


def test_fp16_master_weights_without_deepspeed_changes_nothing(models, data, tmp_path):
    """kohya reads it only inside its DeepSpeed plugin: a run with it saves the same weights as without."""
    saved = []
    for flag in ([], ["--fp16_master_weights_and_gradients"]):
        out = tmp_path / f"out{len(flag)}"
        assert run_script(train_network.main, script_args("train_network", models, data, out, *flag, steps=1)) == 0
        saved.append(load_file(str(out / "last.safetensors")))
    assert all(torch.equal(saved[0][k], saved[1][k]) for k in saved[0])
