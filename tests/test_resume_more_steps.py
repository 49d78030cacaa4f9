"""Resuming a final state with a larger --max_train_steps continues exactly where the run stopped."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.test_output_safety import fingerprint, lora_args
from tests.train_util import make_dataset, run_script
from train_network import main as train_network


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data"), captions={0: "sks dog, grass"})


def test_a_final_state_cut_mid_epoch_resumes_with_more_steps_exactly(models, data, tmp_path):
    """A run that stops at --max_train_steps inside an epoch keeps its position in the state, so resuming it
    with a larger --max_train_steps goes on from there: 2 steps + resume to 4 equals 4 steps straight."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert run_script(train_network, lora_args(models["sd1"]["safetensors"], data, straight, steps=4)) == 0
    assert run_script(train_network, lora_args(models["sd1"]["safetensors"], data, split, "--save_state",
                                               steps=2)) == 0
    resumed = lora_args(models["sd1"]["safetensors"], data, split, "--save_state", "--resume",
                        split / "last-state", steps=4)
    assert run_script(train_network, resumed) == 0
    assert fingerprint(straight / "last.safetensors") != {} and (
        load_weights(straight / "last.safetensors") == load_weights(split / "last.safetensors"))


def load_weights(path: Path) -> dict[str, bytes]:
    from safetensors.torch import load_file

    return {k: v.numpy().tobytes() for k, v in load_file(path).items()}


def test_a_state_of_another_number_of_processes_is_refused(models, data, tmp_path, capsys):
    """Every state records how many processes wrote it; resuming it with another number stops before the first
    step with one line and exit code 2 (the record is set to 2 here: a 2-process state resumed alone)."""
    import torch

    out = tmp_path / "run"
    assert run_script(train_network, lora_args(models["sd1"]["safetensors"], data, out, "--save_state",
                                               steps=1)) == 0
    state = out / "last-state" / "state.pt"
    payload = torch.load(state, weights_only=False)
    assert payload["extra"]["processes"] == 1
    payload["extra"]["processes"] = 2
    torch.save(payload, state)
    capsys.readouterr()
    resumed = tmp_path / "resumed"
    code = run_script(train_network, lora_args(models["sd1"]["safetensors"], data, resumed, "--resume",
                                               out / "last-state", steps=2))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "this state was written by 2 process(es), this run has 1; resume with 2" in err[0]
    assert not (resumed / "last.safetensors").exists()
