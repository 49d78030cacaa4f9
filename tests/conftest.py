"""Shared fixtures: tiny random-weight Stable Diffusion models written to disk once per session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_OFFLINE", "1")


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", default=False, help="also run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def reference_fixtures() -> Path:
    """The folder of files made by the reference implementation (shared/fixtures/reference)."""
    path = REPO.parent / "shared" / "fixtures" / "reference"
    if not path.is_dir():
        pytest.skip("shared/fixtures/reference is not present beside the repository")
    return path


def pytest_configure(config):
    """One torch thread per test process: two xdist workers on two cores must not oversubscribe them, and
    the bit-identity tests need it (multi-threaded CPU convolution / attention backward passes may sum in a
    different order from run to run, a 1e-5 difference)."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Every test gets its own toolkit cache folder (size index, file hashes)."""
    monkeypatch.setenv("SDTRAIN_CACHE_DIR", str(tmp_path / "sdtrain-cache"))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Tiny SD1 and SD2 (v-prediction) models as ldm .safetensors files and diffusers folders."""
    from tests.models_util import make_model_files

    root = tmp_path_factory.mktemp("models")
    return {name: make_model_files(root, preset, formats="safetensors,diffusers_safetensors")
            for name, preset in (("sd1", "tiny-sd1"), ("sd2", "tiny-sd2"))}
