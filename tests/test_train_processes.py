"""Runs that need real processes: 2-process DDP on CPU (gloo) and SIGTERM with --save_state."""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.models_util import make_model_files
from tests.train_util import make_dataset, read_record, record_args, free_port

REPO = Path(__file__).resolve().parent.parent
ACCELERATE = Path(sys.executable).with_name("accelerate")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("proc")
    model = make_model_files(root / "models", "tiny-sd1", formats="safetensors")["safetensors"]
    data = make_dataset(root / "data", folder="3_sks dog", count=5)
    return model, data


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", SDTRAIN_CACHE_DIR=str(tmp_path / "cache"))
    env.update(extra)
    return env


@pytest.mark.slow
def test_two_process_ddp_on_cpu(setup, tmp_path):
    """accelerate launch with 2 processes: identical final weights on both ranks; every sample once per epoch."""
    model, data = setup
    record = tmp_path / "ranks"
    record.mkdir()  # an existing empty folder is fine
    cmd = [str(ACCELERATE), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
           str(REPO / "train_network.py"), "--pretrained_model_name_or_path", str(model), "--train_data_dir", str(data),
           "--resolution", "64", "--output_dir", str(tmp_path / "out"), "--network_module", "networks.lora",
           "--max_train_epochs", "2", "--learning_rate", "1e-3", "--seed", "1", "--max_data_loader_n_workers", "0",
           "--train_batch_size", "2", "--shuffle_caption", *record_args(record)]
    res = subprocess.run(cmd, cwd=REPO, env=_env(tmp_path, ACCELERATE_USE_CPU="1"), capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    ranks = [read_record(record, rank) for rank in (0, 1)]
    for key, value in ranks[0]["weights"].items():
        assert torch.equal(value, ranks[1]["weights"][key]), key
    for epoch in (1, 2):
        seen = collections.Counter(ranks[0]["keys"][epoch] + ranks[1]["keys"][epoch])
        assert len(seen) == 5 and set(seen.values()) == {3}, seen  # 5 images x 3 repeats, each exactly once
        assert abs(len(ranks[0]["keys"][epoch]) - len(ranks[1]["keys"][epoch])) <= 2
    saved = load_file(str(tmp_path / "out" / "last.safetensors"))
    assert all(torch.equal(saved[k], ranks[0]["weights"][k].to(saved[k].dtype)) for k in saved)


@pytest.mark.slow
def test_sigterm_saves_state_and_the_run_resumes(setup, tmp_path):
    model, data = setup
    out = tmp_path / "out"
    cmd = [sys.executable, str(REPO / "train_network.py"), "--pretrained_model_name_or_path", str(model),
           "--train_data_dir", str(data), "--resolution", "64", "--output_dir", str(out), "--network_module",
           "networks.lora", "--max_train_steps", "100000", "--learning_rate", "1e-4", "--seed", "1",
           "--max_data_loader_n_workers", "0", "--save_every_n_steps", "5", "--save_last_n_steps", "5", "--save_state"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    deadline = time.time() + 180
    while time.time() < deadline and not list(out.glob("at-step*.safetensors")) and proc.poll() is None:
        time.sleep(0.2)  # wait until training is under way (a step save appeared)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output[-3000:]
    assert "resume with --resume" in output and "stopped by SIGTERM" in output
    states = sorted(out.glob("at-step*-state"))  # step saves' states, and the one written at the stop
    step = int(states[-1].name[len("at-step"):len("at-step") + 8])
    assert step >= 5 and f"--resume {states[-1]}" in output
    states = states[-1:]
    resume = cmd[:cmd.index("--max_train_steps") + 1] + [str(step + 2)] + cmd[cmd.index("--max_train_steps") + 2:]
    res = subprocess.run(resume + ["--resume", str(states[0])], cwd=REPO, env=_env(tmp_path), capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (out / "last.safetensors").is_file()
