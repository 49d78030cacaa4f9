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
