"""Helpers of the LoRA tool tests: tiny LoRA files, model outputs with LoRAs applied, delta comparisons."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from networks.lora import create_network, create_network_from_weights

IDS = torch.tensor([[49406, 320, 1125, 539, 320, 2368, 49407] + [49407] * 70])


def load(path):
    """A model (ldm file or diffusers folder) in float32."""
    from library.models.load import load_model

    return load_model(path)


def make_lora(model_path, out: Path, seed: int, dim: int = 4, alpha: float = 2.0, conv: tuple | None = None,
              metadata: dict | None = None, v2: bool = False) -> Path:
    """A LoRA for the model with random non-zero weights, saved with kohya-style metadata."""
    model = load(model_path)
    kwargs = {"conv_dim": str(conv[0]), "conv_alpha": str(conv[1])} if conv else {}
    network = create_network(1.0, dim, alpha, None, model.text_encoder, model.unet, **kwargs)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in network.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.1 if "lora_up" in name else 0.2))
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(dim), "ss_network_alpha": str(alpha),
            "ss_v2": str(v2), "ss_base_model_version": "sd_v2" if v2 else "sd_v1",
            "ss_training_comment": "test lora"}
    if metadata is not None:
        meta = metadata
    network.save_weights(out, metadata=meta if out.suffix == ".safetensors" else None)
    return out


@torch.no_grad()
def outputs(model, seed: int = 1) -> dict[str, torch.Tensor]:
    """Text-encoder hidden states and UNet noise prediction on fixed inputs."""
    g = torch.Generator().manual_seed(seed)
    unet, te = model.unet, model.text_encoder
    sample = torch.randn(2, unet.config.in_channels, 8, 8, generator=g)
    ctx = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    return {"te": te(IDS).last_hidden_state.float(),
            "unet": unet(sample.to(unet.dtype), torch.tensor([500, 20]), ctx.to(unet.dtype)).sample.float()}


def runtime_outputs(model_path, loras: list[tuple[Path, float]]) -> dict[str, torch.Tensor]:
    """Outputs with the LoRAs applied at run time (LoRANetwork.apply_to hooks, chained)."""
    model = load(model_path)
    for path, ratio in loras:
        network, sd = create_network_from_weights(ratio, path, None, model.text_encoder, model.unet)
        network.apply_to(model.text_encoder, model.unet)
        network.load_state_dict(sd)
    return outputs(model)


def assert_close(a: dict, b: dict, atol: float) -> None:
    """Every named output equal within ``atol``."""
    for key in a:
        diff = float((a[key] - b[key]).abs().max())
        assert diff <= atol, f"{key} differs by {diff}"


def max_diff(a: dict, b: dict) -> float:
    """Largest difference over all outputs."""
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def one_error_line(capsys, *needles: str) -> str:
    """The single stderr line of a refused run; it must contain every needle."""
    err = [line for line in capsys.readouterr().err.strip().splitlines() if "it/s]" not in line and line.strip()]
    assert len(err) == 1 and err[0].startswith("error: "), err
    for needle in needles:
        assert needle in err[0], (needle, err[0])
    return err[0]


def factors(module, multiplier: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(up [out, r] · multiplier·scale, down [r, n]) in float64 for delta comparisons."""
    up, down = module.factors()
    return up.double() * (multiplier * module.scale), down.double()


def frob_sq(up: torch.Tensor, down: torch.Tensor) -> float:
    """‖up @ down‖_F² without forming the product."""
    return float(torch.trace((up.T @ up) @ (down @ down.T)))


def delta_gap(a: tuple, b: tuple) -> float:
    """‖A − B‖_F / ‖B‖_F of two factorised deltas."""
    diff = (torch.cat([a[0], -b[0]], 1), torch.cat([a[1], b[1]], 0))
    return math.sqrt(max(frob_sq(*diff), 0.0)) / math.sqrt(frob_sq(*b))


def sum_factors(parts: list[tuple]) -> tuple[torch.Tensor, torch.Tensor]:
    """The factorised sum of several factorised deltas."""
    return torch.cat([p[0] for p in parts], 1), torch.cat([p[1] for p in parts], 0)
