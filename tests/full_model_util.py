"""Helpers for the train_db.py / fine_tune.py tests: split saved ldm files, read the trained weights."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.train_util import read_record

UNET_PREFIX = "model.diffusion_model."
TE_PREFIXES = ("cond_stage_model.",)


def ldm_parts(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(UNet tensors, text-encoder tensors) of an ldm ``.safetensors`` or ``.ckpt`` file."""
    if Path(path).suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    unet = {k: v for k, v in state.items() if k.startswith(UNET_PREFIX)}
    te = {k: v for k, v in state.items() if k.startswith(TE_PREFIXES)}
    assert unet and te, f"{path}: no UNet or text-encoder keys"
    return unet, te


def all_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """Same keys and bit-identical tensors."""
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def any_differs(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """Some tensor present in both differs."""
    return any(not torch.equal(a[k], b[k]) for k in a.keys() & b.keys())


def trained_weights(record_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The in-memory weights at the end of a run (its ``--record_training_dir`` record): (UNet, text
    encoder), keyed as the modules name them; the text-encoder dict is empty when it never trained."""
    weights = read_record(record_dir)["weights"]
    unet = {k[len("unet."):]: v for k, v in weights.items() if k.startswith("unet.")}
    te = {k[len("text_encoder."):]: v for k, v in weights.items() if k.startswith("text_encoder.")}
    return unet, te


def assert_module_matches(module: torch.nn.Module, expected: dict[str, torch.Tensor], what: str) -> None:
    """Every parameter of ``module`` equals the expected tensor of the same name (exactly)."""
    state = module.state_dict()
    names = [name for name, _ in module.named_parameters()]
    assert names and set(names) <= expected.keys(), f"{what}: missing {sorted(set(names) - expected.keys())[:3]}"
    for name in names:
        assert torch.equal(state[name].float(), expected[name].float()), f"{what}: {name} differs"
