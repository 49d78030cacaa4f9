"""--deepspeed (docs/distributed.md#deepspeed): 2 CPU processes (gloo, accelerate launch --multi_gpu) with the
DeepSpeed ZeRO engine against the plain 2-process run, exact resume, exports that load, refusals.

Needs the optional package (requirements-deepspeed.txt, ``make setup-deepspeed``); skipped without it. The
first DeepSpeed start on a machine JIT-compiles DeepSpeed's shared-memory communication op with g++ (cached in
~/.cache/torch_extensions afterwards)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tests.models_util import make_model_files
from tests.train_util import accelerate_launch, launch_failure, make_dataset, plain_launch, run_script

pytest.importorskip("deepspeed")

REPO = Path(__file__).resolve().parent.parent
ATOL = 1e-6  # float32 round-off of another reduction order

LORA = ("--network_module", "networks.lora", "--learning_rate", "1e-3")
# ZeRO-3 runs with gradient checkpointing: the engine gathers the LoRA weights again in the recomputed forward
LORA_SGD = ("--network_module", "networks.lora", "--optimizer_type", "SGDNesterov", "--learning_rate", "0.05",
            "--gradient_checkpointing")
FULL = ("--save_model_as", "diffusers_safetensors", "--optimizer_type", "SGDNesterov", "--learning_rate", "0.5")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("deepspeed")
    model = make_model_files(root / "models", "tiny-sd1", formats="safetensors")["safetensors"]
    data = make_dataset(root / "data", folder="3_sks dog", count=5)
    return model, data


def _launch(script: str, setup, out: Path, *extra: str, processes: int = 2, steps: int = 4
            ) -> subprocess.CompletedProcess:
    model, data = setup
    args = ["--pretrained_model_name_or_path", model, "--train_data_dir", data, "--resolution", "64",
            "--output_dir", out, "--max_train_steps", str(steps), "--seed", "1", "--max_data_loader_n_workers", "0",
            "--train_batch_size", "2", *extra]
    return accelerate_launch(plain_launch(processes), REPO / script, args, out)


def _ok(res: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert res.returncode == 0, launch_failure(res)
    return res


def _close(a: dict, b: dict, atol: float = ATOL) -> None:
    assert list(a) == list(b)  # same keys, in the same order
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
        assert torch.allclose(a[key], b[key], rtol=0, atol=atol), (key, (a[key] - b[key]).abs().max())


@pytest.fixture(scope="module")
def lora_runs(setup, tmp_path_factory):
    """Plain 2-process runs (AdamW, SGD) and DeepSpeed runs with a state at step 2: ZeRO-2 with AdamW,
    ZeRO-3 with SGDNesterov (a step linear in the gradient: round-off stays round-off)."""
    root = tmp_path_factory.mktemp("lora")
    runs = {name: root / name for name in ("plain", "plain_sgd", "zero2", "zero3")}
    _ok(_launch("train_network.py", setup, runs["plain"], *LORA))
    _ok(_launch("train_network.py", setup, runs["plain_sgd"], *LORA_SGD))
    state = ("--save_every_n_steps", "2", "--save_state")
    res = _ok(_launch("train_network.py", setup, runs["zero2"], *LORA, "--deepspeed", "--zero_stage", "2", *state))
    assert "DeepSpeed ZeRO-2: network in the engine over 2 process(es)" in res.stderr
    res = _ok(_launch("train_network.py", setup, runs["zero3"], *LORA_SGD, "--deepspeed", "--zero_stage", "3", *state))
    assert "DeepSpeed ZeRO-3: network in the engine over 2 process(es)" in res.stderr
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("stage,plain", [("zero2", "plain"), ("zero3", "plain_sgd")])
def test_lora_equals_the_plain_run_and_the_file_loads(lora_runs, setup, stage, plain):
    a = load_file(str(lora_runs[stage] / "last.safetensors"))
    _close(a, load_file(str(lora_runs[plain] / "last.safetensors")))
    assert max(float(v.abs().max()) for k, v in a.items() if "lora_up" in k) > 1e-4  # it did train
    meta_a = safe_open(str(lora_runs[stage] / "last.safetensors"), "pt").metadata()
    meta_b = safe_open(str(lora_runs[plain] / "last.safetensors"), "pt").metadata()
    assert set(meta_a) == set(meta_b) and meta_a["ss_network_module"] == "networks.lora"
    from library.models.load import load_model
    from networks.lora import create_network_from_weights

    model = load_model(setup[0])
    network, _ = create_network_from_weights(1.0, lora_runs[stage] / "last.safetensors", model.vae,
                                             model.text_encoder, model.unet)
    info = network.load_state_dict(a, strict=True)
    assert not info.missing_keys and not info.unexpected_keys
    state = lora_runs[stage] / "at-step00000002-state"
    payload = torch.load(state / "state.pt", weights_only=False)
    assert payload["extra"]["deepspeed"] == {"zero_stage": int(stage[-1]), "world_size": 2}
    ranks = sorted(p.name for p in (state / "deepspeed" / "engine").glob("*optim_states.pt"))
    assert len(ranks) == 2, ranks  # each process wrote its partition of the optimizer state


@pytest.mark.slow
@pytest.mark.parametrize("stage,args", [("zero2", LORA), ("zero3", LORA_SGD)])
def test_lora_resume_is_exact(lora_runs, setup, tmp_path, stage, args):
    out = tmp_path / "resumed"
    _ok(_launch("train_network.py", setup, out, *args, "--deepspeed", "--zero_stage", stage[-1],
                "--resume", str(lora_runs[stage] / "at-step00000002-state")))
    a, b = load_file(str(lora_runs[stage] / "last.safetensors")), load_file(str(out / "last.safetensors"))
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_another_number_of_processes_is_refused(lora_runs, setup, tmp_path):
    res = _launch("train_network.py", setup, tmp_path / "one", *LORA, "--deepspeed", "--zero_stage", "2",
                  "--resume", str(lora_runs["zero2"] / "at-step00000002-state"), processes=1)
    assert res.returncode != 0  # the script exits 2; accelerate launch then reports its child's failure
    lines = {line for line in res.stderr.splitlines() if line.startswith("error: --resume")}  # accelerate echoes it
    assert len(lines) == 1 and "this state was written by 2 DeepSpeed processes, this run has 1; resume with 2" \
        in lines.pop(), res.stderr[-3000:]


@pytest.mark.slow
def test_a_deepspeed_state_is_refused_without_deepspeed(lora_runs, setup, tmp_path, capsys):
    from train_network import main as train

    model, data = setup
    code = run_script(train, ["--pretrained_model_name_or_path", model, "--train_data_dir", data, "--resolution", "64",
                              "--output_dir", tmp_path / "out", "--network_module", "networks.lora",
                              "--max_train_steps", "4", "--max_data_loader_n_workers", "0",
                              "--resume", lora_runs["zero2"] / "at-step00000002-state"])
    err = capsys.readouterr().err
    assert code == 2 and "written with --deepspeed --zero_stage 2 by 2 processes" in err, err[-2000:]


@pytest.mark.slow
def test_optimizer_cpu_offload_equals_the_plain_run_and_resumes(lora_runs, setup, tmp_path):
    """ZeRO-2 with the optimizer state and step on the CPU: AdamW there is DeepSpeedCPUAdam (the same update
    within round-off); an explicit torch.optim.AdamW keeps torch's (bit for bit the plain run)."""
    out, resumed, explicit = tmp_path / "offload", tmp_path / "resumed", tmp_path / "torch"
    offload = ("--deepspeed", "--zero_stage", "2", "--offload_optimizer_device", "cpu")
    res = _ok(_launch("train_network.py", setup, out, *LORA, *offload, "--save_every_n_steps", "2", "--save_state"))
    assert "optimizer offloaded to the CPU" in res.stderr and "the optimizer is DeepSpeedCPUAdam" in res.stderr
    plain = load_file(str(lora_runs["plain"] / "last.safetensors"))
    _close(load_file(str(out / "last.safetensors")), plain)
    meta = safe_open(str(out / "last.safetensors"), "pt").metadata()
    assert meta["ss_optimizer"].startswith("deepspeed.ops.adam.cpu_adam.DeepSpeedCPUAdam"), meta["ss_optimizer"]
    _ok(_launch("train_network.py", setup, resumed, *LORA, *offload, "--resume", str(out / "at-step00000002-state")))
    a, b = load_file(str(out / "last.safetensors")), load_file(str(resumed / "last.safetensors"))
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    res = _ok(_launch("train_network.py", setup, explicit, *LORA, *offload, "--optimizer_type", "torch.optim.AdamW"))
    assert "DeepSpeedCPUAdam" not in res.stderr
    a = load_file(str(explicit / "last.safetensors"))
    assert all(torch.equal(a[k], plain[k]) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("module", ["networks.loha", "networks.lokr", "networks.oft"])
def test_lycoris_networks_under_zero3_equal_the_plain_run(setup, tmp_path, module):
    """LoHa / LoKr / OFT keep their factors on the wrapping module itself: ZeRO-3 gathers them because the
    wrapped layer calls that module (its hooks run), not only its forward."""
    args = ("--network_module", module, "--optimizer_type", "SGDNesterov", "--learning_rate", "0.05")
    ds, plain = tmp_path / "ds", tmp_path / "plain"
    _ok(_launch("train_network.py", setup, ds, *args, "--deepspeed", "--zero_stage", "3"))
    _ok(_launch("train_network.py", setup, plain, *args))
    a, b = load_file(str(ds / "last.safetensors")), load_file(str(plain / "last.safetensors"))
    _close(a, b)
    assert safe_open(str(ds / "last.safetensors"), "pt").metadata()["ss_network_module"] == module


@pytest.mark.slow
def test_ema_under_zero2_equals_the_plain_run_and_resumes(setup, tmp_path):
    """--ema --save_ema at ZeRO-2 (whole weights on every process; the main process keeps the EMA)."""
    ema = ("--ema", "--save_ema", "--ema_decay", "0.5")
    ds, plain, resumed = tmp_path / "ds", tmp_path / "plain", tmp_path / "resumed"
    _ok(_launch("train_network.py", setup, ds, *LORA, *ema, "--deepspeed", "--zero_stage", "2",
                "--save_every_n_steps", "2", "--save_state"))
    _ok(_launch("train_network.py", setup, plain, *LORA, *ema))
    a = load_file(str(ds / "last.safetensors"))
    _close(a, load_file(str(plain / "last.safetensors")))
    _ok(_launch("train_network.py", setup, resumed, *LORA, *ema, "--deepspeed", "--zero_stage", "2",
                "--resume", str(ds / "at-step00000002-state")))
    b = load_file(str(resumed / "last.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_full_model_zero3_equals_the_plain_run_and_loads_in_diffusers(setup, tmp_path):
    """DreamBooth (UNet and text encoder in the engine), ZeRO-3 with weights and optimizer offloaded and gradient
    checkpointing (the memory-saving set a 12 GB card needs)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    ds, plain = tmp_path / "ds", tmp_path / "plain"
    res = _ok(_launch("train_db.py", setup, ds, *FULL, "--gradient_checkpointing", "--deepspeed", "--zero_stage", "3",
                      "--offload_optimizer_device", "cpu", "--offload_param_device", "cpu"))
    assert "DeepSpeed ZeRO-3: unet + text_encoder in the engine over 2 process(es)" in res.stderr
    _ok(_launch("train_db.py", setup, plain, *FULL, "--gradient_checkpointing"))
    for part, name in (("unet", "diffusion_pytorch_model"), ("text_encoder", "model")):
        files = sorted(p.name for p in (ds / "last" / part).iterdir())
        assert files == sorted(p.name for p in (plain / "last" / part).iterdir())
        _close(load_file(str(ds / "last" / part / f"{name}.safetensors")),
               load_file(str(plain / "last" / part / f"{name}.safetensors")))
    unet = UNet2DConditionModel.from_pretrained(ds / "last", subfolder="unet")
    te = CLIPTextModel.from_pretrained(ds / "last", subfolder="text_encoder")
    saved = load_file(str(ds / "last" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(v, saved[k]) for k, v in unet.state_dict().items())
    saved = load_file(str(ds / "last" / "text_encoder" / "model.safetensors"))
    loaded = {k.removeprefix("text_model."): v for k, v in te.state_dict().items()}  # transformers 5 drops it
    saved = {k.removeprefix("text_model."): v for k, v in saved.items()}
    assert saved and all(torch.equal(loaded[k], v) for k, v in saved.items())


# ---- refusals: one line, exit code 2, before anything loads --------------------------------------

def _refused(setup, tmp_path, capsys, script_main, *extra) -> str:
    model, data = setup
    out = tmp_path / "out"
    code = run_script(script_main, ["--pretrained_model_name_or_path", model, "--train_data_dir", data,
                                    "--resolution", "64", "--output_dir", out, "--max_train_steps", "1",
                                    "--deepspeed", *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert not out.exists()
    return err


@pytest.mark.parametrize("extra,expected", [
    (("--zero3_init_flag", "--zero_stage", "3"), "--zero3_init_flag is not supported"),
    (("--offload_optimizer_device", "cpu", "--zero_stage", "1"),
     "--offload_optimizer_device cpu needs --zero_stage 2 or 3"),
    (("--offload_param_device", "cpu"), "--offload_param_device cpu needs --zero_stage 3 (got 2)"),
    (("--offload_optimizer_nvme_path", "/nvme"), "--offload_optimizer_nvme_path: NVMe offload is not supported"),
    (("--mixed_precision", "fp16"), "--mixed_precision fp16 is not supported"),
    (("--ema", "--zero_stage", "3"), "--ema with --zero_stage 3 is not supported"),
    (("--fp16_master_weights_and_gradients",), "--fp16_master_weights_and_gradients is not supported"),
    (("--optimizer_type", "Prodigy"), "--optimizer_type Prodigy is not supported yet"),
    (("--network_module", "networks.lora", "--network_args", "rank_dropout=0.1"), "--network_args rank_dropout"),
    (("--network_module", "networks.dylora"), "--network_module networks.dylora is not supported yet"),
])
def test_unsupported_combinations_stop_with_one_line(setup, tmp_path, capsys, extra, expected):
    from train_network import main as train

    extra = extra if "--network_module" in extra else ("--network_module", "networks.lora", *extra)
    assert expected in _refused(setup, tmp_path, capsys, train, *extra)


def test_the_help_says_what_is_supported():
    import train_network

    text = train_network.build_parser().format_help()
    assert "not available yet" not in text and "DeepSpeed ZeRO" in text
