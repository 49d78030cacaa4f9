"""FSDP2 through accelerate's config (docs/distributed.md): 2 CPU processes (gloo) with batch 2 against the
one-process run with batch 4 (the same global batch: the same samples, augmentations and per-sample noise) and
against the plain 2-process run (the trainer's own all-reduce), exact resume, loadable exports, refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tests.models_util import make_model_files
from tests.train_util import FSDP_CONFIG, make_dataset, run_script, free_port

REPO = Path(__file__).resolve().parent.parent
ACCELERATE = Path(sys.executable).with_name("accelerate")

ATOL = 1e-6  # float32 round-off of a different reduction order


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    model = make_model_files(root / "models", "tiny-sd1", formats="safetensors")["safetensors"]
    data = make_dataset(root / "data", folder="3_sks dog", count=5)
    config = root / "fsdp.yaml"
    config.write_text(FSDP_CONFIG, encoding="utf-8")
    return model, data, config


def _launch(script: str, setup, out: Path, *extra: str, fsdp: bool | None, steps: int = 4
            ) -> subprocess.CompletedProcess:
    """2 processes with batch 2 (FSDP, or plain with ``fsdp=False``), or with ``fsdp=None`` one process (no
    accelerate launch) with batch 4: the same global batch. 15 samples: the 4th step is short (3 samples)."""
    model, data, config = setup
    how = ["--config_file", str(config)] if fsdp else ["--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                                                        "--mixed_precision", "no", "--dynamo_backend", "no"]
    launch = [sys.executable] if fsdp is None else \
        [str(ACCELERATE), "launch", *how, "--main_process_port", str(free_port())]
    cmd = [*launch, str(REPO / script),
           "--pretrained_model_name_or_path", str(model), "--train_data_dir", str(data), "--resolution", "64",
           "--output_dir", str(out), "--max_train_steps", str(steps), "--seed", "1", "--max_data_loader_n_workers",
           "0", "--train_batch_size", "4" if fsdp is None else "2", *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", ACCELERATE_USE_CPU="1",
               SDTRAIN_CACHE_DIR=str(out.parent / f"{out.name}-cache"))
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def _ok(res: subprocess.CompletedProcess) -> None:
    assert res.returncode == 0, res.stderr[-3000:]


# AdamW with eps 1e-3: with the default 1e-8 a gradient that is almost exactly zero (lora_down at step 2, while
# lora_up is still near 0) is divided by an equally tiny root of its second moment, which turns the round-off of
# a different summation order (one batch of 4 against two of 2) into steps of up to the learning rate (seen: 8e-6
# after 4 steps); FSDP and the plain 2-process run sum alike and agree bit for bit even then
LORA = ("--network_module", "networks.lora", "--learning_rate", "1e-3", "--optimizer_args", "eps=1e-3")


@pytest.fixture(scope="module")
def lora_runs(setup, tmp_path_factory):
    """The FSDP run (with a state at step 2), the plain 2-process run and the one-process run (batch 4) of the
    same LoRA training."""
    root = tmp_path_factory.mktemp("lora")
    fsdp, plain, single = root / "fsdp", root / "plain", root / "single"
    res = _launch("train_network.py", setup, fsdp, *LORA, "--save_every_n_steps", "2", "--save_state", fsdp=True)
    _ok(res)
    assert "FSDP2: network sharded over 2 processes" in res.stderr
    _ok(_launch("train_network.py", setup, plain, *LORA, fsdp=False))
    _ok(_launch("train_network.py", setup, single, *LORA, fsdp=None))
    return fsdp, plain, single


def _same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert list(a) == list(b)  # same keys, in the same order
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, (what, key)
        assert torch.allclose(a[key], b[key], rtol=0, atol=ATOL), (what, key, (a[key] - b[key]).abs().max())


@pytest.mark.slow
def test_lora_fsdp_and_plain_two_processes_equal_one_process_with_the_global_batch(lora_runs, setup):
    fsdp, plain, single = lora_runs
    a, b, c = (load_file(str(run / "last.safetensors")) for run in (fsdp, plain, single))
    _same_weights(a, c, "FSDP vs one process")
    _same_weights(b, c, "plain 2 processes vs one process")
    _same_weights(a, b, "FSDP vs plain")
    assert max(float(v.abs().max()) for k, v in a.items() if "lora_up" in k) > 1e-4  # it did train
    meta_a = safe_open(str(fsdp / "last.safetensors"), "pt").metadata()
    meta_b = safe_open(str(plain / "last.safetensors"), "pt").metadata()
    assert set(meta_a) == set(meta_b) and meta_a["ss_network_module"] == "networks.lora"
    from library.models.load import load_model
    from networks.lora import create_network_from_weights

    model = load_model(setup[0])
    network, _ = create_network_from_weights(1.0, fsdp / "last.safetensors", model.vae, model.text_encoder,
                                             model.unet)
    info = network.load_state_dict(a, strict=True)
    assert not info.missing_keys and not info.unexpected_keys
    state = torch.load(fsdp / "at-step00000002-state" / "state.pt", weights_only=False)
    assert state["extra"]["fsdp"] == {"version": 2, "world_size": 2}


@pytest.mark.slow
def test_lora_fsdp_resume_is_exact(lora_runs, setup, tmp_path):
    fsdp = lora_runs[0]
    out = tmp_path / "resumed"
    _ok(_launch("train_network.py", setup, out, *LORA, "--resume", str(fsdp / "at-step00000002-state"), fsdp=True))
    a, b = load_file(str(fsdp / "last.safetensors")), load_file(str(out / "last.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_an_fsdp_state_is_refused_without_fsdp(lora_runs, setup, tmp_path, capsys):
    """One line, exit code 2, naming the processes it needs."""
    from train_network import main as train

    fsdp = lora_runs[0]
    model, data, _ = setup
    code = run_script(train, ["--pretrained_model_name_or_path", model, "--train_data_dir", data, "--resolution", "64",
                              "--output_dir", tmp_path / "out", "--network_module", "networks.lora",
                              "--max_train_steps", "4", "--max_data_loader_n_workers", "0",
                              "--resume", fsdp / "at-step00000002-state"])
    err = capsys.readouterr().err
    assert code == 2 and "written with accelerate's FSDP config by 2 processes" in err, err[-2000:]


FULL = ("--save_model_as", "diffusers_safetensors", "--optimizer_type", "SGDNesterov", "--learning_rate", "0.5")


@pytest.mark.slow
def test_full_model_fsdp_equals_one_process_with_the_global_batch_loads_in_diffusers_and_resumes(setup, tmp_path):
    """DreamBooth (UNet and text encoder trained), 2 FSDP processes with batch 2 against one process with batch
    4. SGD: a step is linear in the gradient, so the weights differ by round-off only (AdamW divides by the root
    of tiny second moments, which magnifies round-off of near-zero gradients)."""
    from diffusers import UNet2DConditionModel

    fsdp, plain = tmp_path / "fsdp", tmp_path / "single"
    res = _launch("train_db.py", setup, fsdp, *FULL, "--save_every_n_steps", "2", "--save_state", fsdp=True)
    _ok(res)
    assert "FSDP2: unet + text_encoder sharded over 2 processes" in res.stderr
    _ok(_launch("train_db.py", setup, plain, *FULL, fsdp=None))
    for part, name in (("unet", "diffusion_pytorch_model"), ("text_encoder", "model")):
        files = sorted(p.name for p in (fsdp / "last" / part).iterdir())
        assert files == sorted(p.name for p in (plain / "last" / part).iterdir())
        a = load_file(str(fsdp / "last" / part / f"{name}.safetensors"))
        b = load_file(str(plain / "last" / part / f"{name}.safetensors"))
        assert list(a) == list(b)
        for key in a:
            assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
            assert torch.allclose(a[key], b[key], rtol=0, atol=ATOL), (part, key, (a[key] - b[key]).abs().max())
    assert json.loads((fsdp / "last" / "unet" / "config.json").read_text()) == \
        json.loads((plain / "last" / "unet" / "config.json").read_text())
    unet = UNet2DConditionModel.from_pretrained(str(fsdp / "last" / "unet"))
    trained = load_file(str(fsdp / "last" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(v, trained[k]) for k, v in unet.state_dict().items())
    from library.models.load import load_model

    base = load_model(setup[0])
    assert any(not torch.equal(v, base.unet.state_dict()[k]) for k, v in unet.state_dict().items())  # it trained
    resumed = tmp_path / "resumed"  # from the sharded state at step 2 (SGD momentum included): the same weights
    _ok(_launch("train_db.py", setup, resumed, *FULL, "--resume", str(fsdp / "at-step00000002-state"), fsdp=True))
    for part, name in (("unet", "diffusion_pytorch_model"), ("text_encoder", "model")):
        a = load_file(str(fsdp / "last" / part / f"{name}.safetensors"))
        b = load_file(str(resumed / "last" / part / f"{name}.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a), part


def _in_process_fsdp(monkeypatch, version: int) -> None:
    """The environment `accelerate launch --config_file fsdp.yaml` gives a process (one process here)."""
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", str(version))


@pytest.mark.slow
@pytest.mark.parametrize("module", ["networks.loha", "networks.lokr", "networks.oft"])
def test_lycoris_networks_under_fsdp_equal_the_plain_run(setup, tmp_path, module):
    """LoHa / LoKr / OFT as the root FSDP unit: gathered for the whole loss computation, as LoRA is."""
    args = ("--network_module", module, "--optimizer_type", "SGDNesterov", "--learning_rate", "0.05")
    fsdp, plain = tmp_path / "fsdp", tmp_path / "plain"
    res = _launch("train_network.py", setup, fsdp, *args, fsdp=True)
    _ok(res)
    assert "FSDP2: network sharded over 2 processes" in res.stderr
    _ok(_launch("train_network.py", setup, plain, *args, fsdp=False))
    _same_weights(load_file(str(fsdp / "last.safetensors")), load_file(str(plain / "last.safetensors")),
                  f"{module}: FSDP vs plain")


@pytest.mark.parametrize("extra, version, message", [
    ((), 1, "fsdp_version 1 is not supported; set fsdp_version: 2"),
    (("--fused_backward_pass", "--optimizer_type", "AdaFactor"), 2, "--fused_backward_pass is not supported with FSDP"),
    (("--optimizer_type", "Prodigy"), 2, "--optimizer_type Prodigy is not supported with FSDP yet"),
    (("--network_module", "networks.dylora"), 2, "--network_module networks.dylora is not supported with FSDP"),
])
def test_unsupported_fsdp_combinations_stop_with_one_line(setup, tmp_path, capsys, monkeypatch, extra, version,
                                                          message):
    from train_network import main as train

    _in_process_fsdp(monkeypatch, version)
    model, data, _ = setup
    argv = ["--pretrained_model_name_or_path", model, "--train_data_dir", data, "--resolution", "64", "--output_dir",
            tmp_path / "out", "--max_train_steps", "1", "--max_data_loader_n_workers", "0"]
    if "--network_module" not in extra:
        argv += ["--network_module", "networks.lora"]
    code = run_script(train, argv + list(extra))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and message in err[-1], err[-3:]
    assert not (tmp_path / "out" / "last.safetensors").exists()


def test_fsdp_config_with_one_process_trains_as_usual(setup, tmp_path, monkeypatch):
    from train_network import main as train

    _in_process_fsdp(monkeypatch, 2)
    model, data, _ = setup
    assert run_script(train, ["--pretrained_model_name_or_path", model, "--train_data_dir", data, "--resolution", "64",
                              "--output_dir", tmp_path / "out", "--network_module", "networks.lora",
                              "--max_train_steps", "1", "--max_data_loader_n_workers", "0"]) == 0
    assert (tmp_path / "out" / "last.safetensors").is_file()
