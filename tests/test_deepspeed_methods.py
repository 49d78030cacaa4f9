"""--deepspeed for Textual Inversion, XTI and fine_tune.py (docs/distributed.md#deepspeed): 2 CPU processes
(gloo, accelerate launch --multi_gpu) with the DeepSpeed ZeRO engine against the plain 2-process run, exact
resume from a state, exports that load. LoRA and DreamBooth are in tests/test_deepspeed.py.

Needs the optional package (requirements-deepspeed.txt, ``make setup-deepspeed``); skipped without it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tests.train_util import (accelerate_launch, assert_embedding_loads_in_diffusers, assert_fine_tune_runs_agree,
                              assert_xti_runs_agree, embedding_args, launch_failure, method_files,
                              plain_launch)

pytest.importorskip("deepspeed")

REPO = Path(__file__).resolve().parent.parent
ATOL = 1e-6  # float32 round-off of another reduction order
STATE = "zqx-step00000002-state"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(model files, TI dataset, fine-tuning folder and metadata json)."""
    return method_files(tmp_path_factory.mktemp("deepspeed-methods"))


def _launch(script: str, setup, out: Path, *extra: str) -> str:
    """Run ``script`` in 2 plain processes (add ``--deepspeed`` in ``extra``); returns its log."""
    args = ["--pretrained_model_name_or_path", setup["model"]["safetensors"], "--resolution", "64",
            "--output_dir", out, "--max_train_steps", "4", "--seed", "1", "--max_data_loader_n_workers", "0",
            "--train_batch_size", "2", *extra]
    res = accelerate_launch(plain_launch(2), REPO / script, args, out)
    assert res.returncode == 0, launch_failure(res)
    return res.stderr


def _embedding_args(setup, *extra: str) -> tuple[str, ...]:
    return embedding_args(setup["ti_data"], "--save_model_as", "safetensors", *extra)


def _three_runs(script: str, setup, root: Path, stage: str) -> tuple[Path, Path, Path, str]:
    """The DeepSpeed run (a state at step 2), the plain 2-process run, and the DeepSpeed run resumed from that
    state; returns their folders and the DeepSpeed run's log."""
    ds, plain, resumed = root / "ds", root / "plain", root / "resumed"
    engine = ("--deepspeed", "--zero_stage", stage)
    log = _launch(script, setup, ds, *_embedding_args(setup, *engine, "--save_every_n_steps", "2", "--save_state"))
    _launch(script, setup, plain, *_embedding_args(setup))
    _launch(script, setup, resumed, *_embedding_args(setup, *engine, "--resume", str(ds / STATE)))
    return ds, plain, resumed, log


def _check_state(state_dir: Path, stage: int) -> None:
    payload = torch.load(state_dir / "state.pt", weights_only=False)
    assert payload["extra"]["deepspeed"] == {"zero_stage": stage, "world_size": 2}
    ranks = sorted(p.name for p in (state_dir / "deepspeed" / "engine").glob("*optim_states.pt"))
    assert len(ranks) == 2, ranks  # each process wrote its partition of the optimizer state


@pytest.mark.slow
def test_ti_zero2_equals_the_plain_run_loads_in_diffusers_and_resumes(setup, tmp_path):
    from library.methods import textual_inversion as ti

    ds, plain, resumed, log = _three_runs("train_textual_inversion.py", setup, tmp_path, "2")
    assert "DeepSpeed ZeRO-2: token_embedding in the engine over 2 process(es)" in log
    path = ds / "zqx.safetensors"
    with safe_open(str(path), "pt") as f, safe_open(str(plain / "zqx.safetensors"), "pt") as g:
        assert list(f.keys()) == list(g.keys()) == ["emb_params"]
        assert set(f.metadata()) == set(g.metadata())
    a, b = load_file(str(path))["emb_params"], load_file(str(plain / "zqx.safetensors"))["emb_params"]
    assert a.dtype == b.dtype == torch.float32 and a.shape == b.shape == (2, 32)
    assert torch.allclose(a, b, rtol=0, atol=ATOL), (a - b).abs().max()
    assert (a - ti.read_embedding_file(ds / "zqx-step00000002.safetensors")).abs().max() > 1e-4  # it trained
    _check_state(ds / STATE, 2)
    assert torch.equal(ti.read_embedding_file(resumed / "zqx.safetensors"), a)  # exact resume
    assert_embedding_loads_in_diffusers(setup["model"]["diffusers"], path, a)


@pytest.mark.slow
def test_xti_zero3_equals_the_plain_run_and_resumes(setup, tmp_path):
    """ZeRO-3 partitions the embedding matrix: the old rows are restored through a gather after every step
    (were they not, the captions' other tokens would drift and the new rows would differ from the plain run)."""
    ds, plain, resumed, log = _three_runs("train_textual_inversion_XTI.py", setup, tmp_path, "3")
    assert "DeepSpeed ZeRO-3: token_embedding in the engine over 2 process(es)" in log
    assert_xti_runs_agree(setup["model"]["safetensors"], ds, plain, resumed, ATOL)
    _check_state(ds / STATE, 3)


FINE_TUNE = ("--save_model_as", "diffusers_safetensors", "--optimizer_type", "SGDNesterov", "--learning_rate", "0.5")


@pytest.mark.slow
def test_fine_tune_zero2_equals_the_plain_run_loads_in_diffusers_and_resumes(setup, tmp_path):
    """fine_tune.py trains the UNet only (by default): it alone is in the engine; the text encoder stays
    frozen and comes back bit-identical."""
    folder, meta = setup["ft"]
    data = ("--in_json", str(meta), "--train_data_dir", str(folder), *FINE_TUNE)
    engine = ("--deepspeed", "--zero_stage", "2")
    ds, plain, resumed = tmp_path / "ds", tmp_path / "plain", tmp_path / "resumed"
    log = _launch("fine_tune.py", setup, ds, *data, *engine, "--save_every_n_steps", "2", "--save_state")
    assert "DeepSpeed ZeRO-2: unet in the engine over 2 process(es)" in log
    _launch("fine_tune.py", setup, plain, *data)
    _launch("fine_tune.py", setup, resumed, *data, *engine, "--resume", str(ds / "at-step00000002-state"))
    assert_fine_tune_runs_agree(setup["model"]["diffusers"], ds, plain, resumed, ATOL)
    _check_state(ds / "at-step00000002-state", 2)
