"""Guardrails (library/training/guard.py): the first non-finite loss or gradient stops the run with one line
naming the step, the images and the planted module; sampling during training does not grow memory."""

from __future__ import annotations

import gc
import textwrap

import pytest
import torch

from tests.train_util import make_dataset, run_script
from train_network import main as train

UNET_MODULE = "lora_unet_down_blocks_0_attentions_0_proj_in"
TE_MODULE = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"

# A network module that plants a fault in one named LoRA module: a gradient hook that turns its gradient
# into NaN (plant=grad), or NaN weights (plant=weight). Everything else is networks.lora.
PLANTED = '''
import torch
from networks import lora


def create_network(multiplier, network_dim, network_alpha, vae, text_encoder, unet, **kwargs):
    target, plant = kwargs.pop("plant_module"), kwargs.pop("plant")
    network = lora.create_network(multiplier, network_dim, network_alpha, vae, text_encoder, unet, **kwargs)
    module = next(m for m in network.text_encoder_loras + network.unet_loras if m.lora_name == target)
    if plant == "grad":
        module.lora_down.weight.register_hook(lambda grad: torch.full_like(grad, float("nan")))
    else:
        with torch.no_grad():
            module.lora_up.weight.fill_(float("nan"))
    return network
'''


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return make_dataset(root, folder="2_sks dog", count=3)


@pytest.fixture
def planted(tmp_path, monkeypatch):
    (tmp_path / "planted_lora.py").write_text(textwrap.dedent(PLANTED), encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    return "planted_lora"


def base_args(models, data, out, module, *extra, steps=3):
    return ["--pretrained_model_name_or_path", models["sd1"]["safetensors"], "--train_data_dir", data,
            "--resolution", "64", "--output_dir", out, "--network_module", module, "--max_train_steps", str(steps),
            "--learning_rate", "1e-3", "--seed", "1", "--max_data_loader_n_workers", "0", *extra]


def one_error(capsys) -> str:
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, errors
    return errors[0]


@pytest.mark.parametrize("target, clip", [(UNET_MODULE, "1.0"), (TE_MODULE, "0")])
def test_nan_gradient_names_the_planted_module(models, data, tmp_path, planted, capsys, target, clip):
    """A finite loss with a NaN gradient in one module stops before the optimizer step, naming it (with and
    without gradient clipping, which otherwise computes the norm)."""
    argv = base_args(models, data, tmp_path / "out", planted, "--network_args", f"plant_module={target}",
                     "plant=grad", "--max_grad_norm", clip, "--train_batch_size", "2")
    assert run_script(train, argv) == 2
    error = one_error(capsys)
    assert error.startswith("error: the gradient became non-finite at step 1 (epoch 1, images "), error
    assert f"first in {target}.lora_down.weight" in error
    assert "1 of " in error and error.count("img") == 2  # the two image keys of the batch
    assert not (tmp_path / "out" / "last.safetensors").exists()


def test_nan_weight_names_the_planted_module_at_the_loss(models, data, tmp_path, planted, capsys):
    argv = base_args(models, data, tmp_path / "out", planted, "--network_args", f"plant_module={UNET_MODULE}",
                     "plant=weight")
    assert run_script(train, argv) == 2
    error = one_error(capsys)
    assert error.startswith("error: the loss became nan at step 1 (epoch 1, images "), error
    assert f"trained weights are already non-finite in 1 tensor(s), first in {UNET_MODULE}.lora_up.weight" in error


def test_gradient_accumulation_reports_every_image_of_the_step(models, data, tmp_path, planted, capsys):
    """Two micro-batches make step 1: both images are named; the failure comes after the later one."""
    argv = base_args(models, data, tmp_path / "out", planted, "--network_args", f"plant_module={UNET_MODULE}",
                     "plant=grad", "--gradient_accumulation_steps", "2")
    assert run_script(train, argv) == 2
    error = one_error(capsys)
    assert "at step 1 (epoch 1" in error and error.count("img") == 2, error


def test_exploding_learning_rate_stops_with_the_last_save(models, data, tmp_path, capsys):
    """SGD at lr 1e30: after step 1 the weights are huge but finite and the forward pass overflows at step 2;
    the message names the largest weight and the file saved last (step 1)."""
    argv = base_args(models, data, tmp_path / "out", "networks.lora", "--optimizer_type", "SGDNesterov",
                     "--learning_rate", "1e30", "--max_grad_norm", "0", "--save_every_n_steps", "1", steps=20)
    assert run_script(train, argv) == 2
    error = one_error(capsys)
    assert error.startswith("error: the loss became nan at step 2 (epoch 1, images "), error
    assert "every trained weight is finite (largest |w| " in error and " in lora_" in error
    assert "last saved: " in error and "at-step00000001.safetensors" in error


def test_fp16_scaler_overflow_is_not_a_stop():
    """With a gradient scaler the guard leaves infinite gradients to it (the step is skipped there)."""
    from library.errors import UserError
    from library.training.guard import TrainingGuard

    from library.methods.base import MethodBase

    class Method(MethodBase):
        def __init__(self):
            self.p = torch.nn.Parameter(torch.zeros(3))

        def param_groups(self):
            return [{"params": [self.p]}]

    class Single:
        num_processes = 1

    method = Method()
    method.p.grad = torch.tensor([1.0, float("inf"), 0.0])
    guard = TrainingGuard(method, None, Single())
    guard.check_gradients([method.p], None, step=1, scaler_active=True)
    with pytest.raises(UserError, match="1 of 1 trained tensor.s., first in trained tensor #0"):
        guard.check_gradients([method.p], None, step=1, scaler_active=False)


@pytest.mark.slow
def test_sampling_does_not_grow_memory_over_20_rounds(models, tmp_path):
    """20 sampling rounds with the live tiny model: resident memory flat (within 2 MiB from round 5 on) and
    Python-level allocations growing by under 4 KiB a round (one leaked pipeline per round is about 7 KiB)."""
    import tracemalloc

    import psutil
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from library.models.load import load_model
    from library.training.sampling import SampleSettings, make_sampler

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("sks dog --n blurry --w 64 --h 64 --s 2 --d 5\n", encoding="utf-8")
    model = load_model(models["sd1"]["safetensors"])
    AcceleratorState._reset_state(reset_partial_state=True)
    accelerator = Accelerator(cpu=True)
    sampler = make_sampler(SampleSettings(prompts_file=prompts, every_n_steps=1), output_dir=tmp_path / "out",
                           clip_skip=None, unet=model.unet, vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer,
                           v_parameterization=False, seed=1, output_name=None)
    process = psutil.Process()
    rss, traced = [], []
    try:
        for step in range(20):
            if step == 14:  # Python allocations are traced over the last 6 rounds only (tracing is slow)
                tracemalloc.start()
            assert len(sampler.sample(accelerator, step=step)) == 1
            gc.collect()
            rss.append(process.memory_info().rss)
            if step >= 14:
                traced.append(tracemalloc.get_traced_memory()[0])
    finally:
        tracemalloc.stop()
    assert len(list((tmp_path / "out" / "sample").glob("*.png"))) == 20
    assert rss[-1] - rss[4] < 2 * 2**20, [r // 2**10 for r in rss]
    assert (traced[-1] - traced[0]) / 5 < 4 * 2**10, [t // 2**10 for t in traced]


@pytest.mark.slow
def test_two_processes_stop_together(models, data, tmp_path, planted):
    """With 2 processes a NaN gradient (identical on both after the all-reduce) stops both, neither waits."""
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    repo = Path(__file__).resolve().parent.parent
    argv = base_args(models, data, tmp_path / "out", planted, "--network_args", f"plant_module={UNET_MODULE}",
                     "plant=grad")
    cmd = [str(Path(sys.executable).with_name("accelerate")), "launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
           str(repo / "train_network.py"), *[str(a) for a in argv]]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", ACCELERATE_USE_CPU="1",
               SDTRAIN_CACHE_DIR=str(tmp_path / "cache"), PYTHONPATH=f"{tmp_path}{os.pathsep}{repo}")
    res = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode != 0
    assert res.stderr.count("error: the gradient became non-finite at step 1") == 2, res.stderr[-3000:]
    assert f"first in {UNET_MODULE}.lora_down.weight" in res.stderr
