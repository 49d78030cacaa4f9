"""Helpers shared by the model tests: build tiny models on disk and compare model outputs."""

from __future__ import annotations

import copy
from pathlib import Path

import torch


def make_model_files(out: Path, preset: str, seed: int = 0,
                     formats: str = "diffusers_safetensors,safetensors,ckpt") -> dict[str, Path]:
    """Write a random model through the real tool; return {"diffusers": folder, "safetensors": file, "ckpt": file}."""
    from tools.make_tiny_model import main

    assert main([str(out), "--preset", preset, "--seed", str(seed), "--formats", formats]) == 0
    return {"diffusers": out / preset, "safetensors": out / f"{preset}.safetensors", "ckpt": out / f"{preset}.ckpt"}


@torch.no_grad()
def component_outputs(unet, vae, text_encoder, seed: int = 0) -> dict[str, torch.Tensor]:
    """Deterministic outputs of each component on fixed random inputs (fp32, eval mode).

    The components are deep-copied first: weights loaded from a file can be views into a memory map at any
    byte offset, and CPU matmul kernels round differently for unaligned data (a few 1e-7). Fresh copies are
    allocator-aligned, so bit-identical weights give bit-identical outputs whatever loaded them."""
    unet, vae, text_encoder = (copy.deepcopy(m) for m in (unet, vae, text_encoder))
    g = torch.Generator().manual_seed(seed)
    for m in (unet, vae, text_encoder):
        m.eval()
    ids = torch.tensor([[49406, 320, 1125, 539, 320, 2368, 49407] + [49407] * 70])
    hidden = text_encoder(ids).last_hidden_state
    sample = torch.randn(1, unet.config.in_channels, 8, 8, generator=g)
    ctx = torch.randn(1, 77, unet.config.cross_attention_dim, generator=g)
    noise_pred = unet(sample, torch.tensor([500]), ctx).sample
    image = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
    latents = vae.encode(image).latent_dist.mean
    decoded = vae.decode(latents).sample
    return {"text": hidden, "unet": noise_pred, "latents": latents, "decoded": decoded}


def assert_outputs_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 0.0) -> None:
    """Every named output equal (exactly, or within atol)."""
    assert a.keys() == b.keys()
    for name in a:
        if atol == 0.0:
            assert torch.equal(a[name], b[name]), f"{name} differs: max {float((a[name] - b[name]).abs().max())}"
        else:
            torch.testing.assert_close(a[name], b[name], atol=atol, rtol=0, msg=f"{name} differs")
