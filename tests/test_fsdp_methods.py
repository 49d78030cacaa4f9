"""FSDP2 for Textual Inversion, XTI and fine_tune.py (docs/distributed.md): 2 CPU processes (gloo) under
`accelerate launch --config_file fsdp.yaml` against the plain 2-process run (the trainer's own all-reduce,
same data and noise per process), loadable files, exact resume, and the resume refusals."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tests.train_util import (FSDP_CONFIG, accelerate_launch, assert_embedding_loads_in_diffusers,
                              assert_fine_tune_runs_agree, assert_xti_runs_agree, embedding_args, launch_failure,
                              method_files, plain_launch)

REPO = Path(__file__).resolve().parent.parent

ATOL = 1e-6  # float32 round-off of a different reduction order
STATE = "zqx-step00000002-state"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(model files, TI dataset, fine-tuning folder and metadata json, fsdp.yaml)."""
    root = tmp_path_factory.mktemp("fsdp-methods")
    config = root / "fsdp.yaml"
    config.write_text(FSDP_CONFIG, encoding="utf-8")
    return {**method_files(root), "config": config}


def _launch(script: str, setup, out: Path, *extra: str, fsdp: bool) -> subprocess.CompletedProcess:
    how = ["--config_file", str(setup["config"])] if fsdp else plain_launch(2)
    args = ["--pretrained_model_name_or_path", setup["model"]["safetensors"], "--resolution", "64",
            "--output_dir", out, "--max_train_steps", "4", "--seed", "1", "--max_data_loader_n_workers", "0",
            "--train_batch_size", "2", *extra]
    res = accelerate_launch(how, REPO / script, args, out, timeout=600)
    assert res.returncode == 0, launch_failure(res)
    return res


def _embedding_args(setup, *extra: str) -> tuple[str, ...]:
    return embedding_args(setup["ti_data"], *extra)


def _three_runs(script: str, setup, root: Path, fmt: str, resume_fmt: str) -> tuple[Path, Path, Path, str]:
    """The FSDP run (a state at step 2), the plain 2-process run, and the FSDP run resumed from that state
    (saving as ``resume_fmt``); returns their folders and the FSDP run's log."""
    fsdp, plain, resumed = root / "fsdp", root / "plain", root / "resumed"
    log = _launch(script, setup, fsdp, *_embedding_args(setup, "--save_model_as", fmt, "--save_every_n_steps", "2",
                                                        "--save_state"), fsdp=True).stderr
    _launch(script, setup, plain, *_embedding_args(setup, "--save_model_as", fmt), fsdp=False)
    _launch(script, setup, resumed, *_embedding_args(setup, "--save_model_as", resume_fmt, "--resume",
                                                     str(fsdp / STATE)), fsdp=True)
    return fsdp, plain, resumed, log


def _base_table(setup) -> torch.Tensor:
    from library.methods.textual_inversion import token_embedding
    from library.models.load import load_model

    return token_embedding(load_model(setup["model"]["safetensors"]).text_encoder).weight.detach()


def _check_state(state_dir: Path, base: torch.Tensor) -> None:
    """The gathered state: the FSDP record, the whole token-embedding matrix whose old rows are still the base
    model's on both processes' shards (each restores its own rows), its AdamW moments by parameter name."""
    state = torch.load(state_dir / "state.pt", weights_only=False)
    assert state["extra"]["fsdp"] == {"version": 2, "world_size": 2}
    table = state["trainable"]["token_embedding.weight"]
    assert table.shape[0] > base.shape[0] and torch.equal(table[:base.shape[0]], base)
    assert set(state["optimizer"]["state"]) == {"token_embedding.weight"}


@pytest.mark.slow
def test_ti_fsdp_equals_the_plain_run_loads_everywhere_and_resumes(setup, tmp_path):
    from library.methods import textual_inversion as ti

    fsdp, plain, resumed, log = _three_runs("train_textual_inversion.py", setup, tmp_path, "safetensors", "pt")
    assert "FSDP2: token_embedding sharded over 2 processes" in log
    path = fsdp / "zqx.safetensors"
    with safe_open(str(path), "pt") as f, safe_open(str(plain / "zqx.safetensors"), "pt") as g:
        assert list(f.keys()) == list(g.keys()) == ["emb_params"]
        meta, plain_meta = f.metadata(), g.metadata()
    assert set(meta) == set(plain_meta) and meta["modelspec.architecture"] == "stable-diffusion-v1/textual-inversion"
    a, b = load_file(str(path))["emb_params"], load_file(str(plain / "zqx.safetensors"))["emb_params"]
    assert a.dtype == b.dtype == torch.float32 and a.shape == b.shape == (2, 32)
    assert torch.allclose(a, b, rtol=0, atol=ATOL), (a - b).abs().max()
    mid = ti.read_embedding_file(fsdp / "zqx-step00000002.safetensors")
    assert (a - mid).abs().max() > 1e-4  # it trained
    base = _base_table(setup)
    _check_state(fsdp / STATE, base)
    # resumed from the sharded state at step 2 (written as AUTOMATIC1111's .pt): the same vectors exactly
    pickle = torch.load(resumed / "zqx.pt", weights_only=True)
    assert set(pickle["string_to_param"]) == {"*"} and pickle["name"] == "zqx"
    assert torch.equal(ti.read_embedding_file(resumed / "zqx.pt"), a)
    assert_embedding_loads_in_diffusers(setup["model"]["diffusers"], path, a)


@pytest.mark.slow
def test_xti_fsdp_equals_the_plain_run_and_resumes(setup, tmp_path):
    fsdp, plain, resumed, log = _three_runs("train_textual_inversion_XTI.py", setup, tmp_path, "safetensors",
                                            "safetensors")
    assert "FSDP2: token_embedding sharded over 2 processes" in log
    assert_xti_runs_agree(setup["model"]["safetensors"], fsdp, plain, resumed, ATOL)
    _check_state(fsdp / STATE, _base_table(setup))


FINE_TUNE = ("--save_model_as", "diffusers_safetensors", "--optimizer_type", "SGDNesterov", "--learning_rate", "0.5")


@pytest.mark.slow
def test_fine_tune_fsdp_equals_the_plain_run_loads_in_diffusers_and_resumes(setup, tmp_path):
    """fine_tune.py trains the UNet only (by default): it alone is sharded; the text encoder stays frozen and
    replicated and comes back bit-identical. SGD: the weights differ from the plain run by round-off only."""
    folder, meta = setup["ft"]
    data = ("--in_json", str(meta), "--train_data_dir", str(folder), *FINE_TUNE)
    fsdp, plain, resumed = tmp_path / "fsdp", tmp_path / "plain", tmp_path / "resumed"
    log = _launch("fine_tune.py", setup, fsdp, *data, "--save_every_n_steps", "2", "--save_state", fsdp=True).stderr
    assert "FSDP2: unet sharded over 2 processes" in log
    _launch("fine_tune.py", setup, plain, *data, fsdp=False)
    _launch("fine_tune.py", setup, resumed, *data, "--resume", str(fsdp / "at-step00000002-state"), fsdp=True)
    assert sorted(p.name for p in (fsdp / "last").iterdir()) == sorted(p.name for p in (plain / "last").iterdir())
    assert_fine_tune_runs_agree(setup["model"]["diffusers"], fsdp, plain, resumed, ATOL)
    assert json.loads((fsdp / "last" / "unet" / "config.json").read_text()) == \
        json.loads((plain / "last" / "unet" / "config.json").read_text())


class _Recorded:
    """What :func:`library.training.sharding.check_state` reads of a run's sharding."""

    def __init__(self, world_size: int):
        self.world_size = world_size


@pytest.mark.parametrize("recorded, world, message", [
    (2, 3, "this state was written by 2 FSDP processes, this run has 3; resume with 2"),
    (2, None, "this state was written with accelerate's FSDP config by 2 processes"),
    (None, 2, "this state was written without FSDP; resume it without the FSDP config"),
])
def test_a_state_resumes_only_with_its_own_sharding(tmp_path, recorded, world, message):
    """An FSDP state with another number of processes, an FSDP state without FSDP, a plain state under FSDP:
    one line each (docs/distributed.md, Saving and resuming); the same number of processes is accepted."""
    from library.errors import UserError
    from library.training.sharding import STATE_KEY, check_state

    payload = {"extra": {STATE_KEY: {"version": 2, "world_size": recorded} if recorded else None}}
    with pytest.raises(UserError) as exc:
        check_state(payload, tmp_path, _Recorded(world) if world else None)
    assert message in str(exc.value) and "\n" not in str(exc.value)
    check_state(payload, tmp_path, _Recorded(recorded) if recorded else None)  # its own sharding resumes
