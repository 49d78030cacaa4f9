"""Approximate the weight difference of two Stable Diffusion models by a LoRA (tools spec §2.4).

The modules are exactly those :mod:`networks.lora` trains (file_formats.md §1.2): Linear and 1×1
convs inside the text encoder's ``CLIPAttention``/``CLIPMLP`` and the UNet's ``Transformer2DModel``,
plus — with a conv rank — every layer of ``ResnetBlock2D``/``Downsample2D``/``Upsample2D`` (3×3 convs
at the conv rank, their 1×1 shortcuts and time projections at the normal rank).

Per module the difference ΔW = W_tuned − W_org (float32) is factorised by SVD into
``up = U[:, :q]·diag(S[:q])`` and ``down = Vᵀ[:q]`` with q = min(rank, in, out); both are clamped to
± the ``clamp_quantile`` quantile of their signed entries (0.99 as in the reference; 1 = no clamp);
``alpha = q`` (scale 1). The SVD, truncation and clamp are those of :mod:`networks.lora_svd`, the
target layers those of :func:`networks.lora_files.target_layers`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from library.errors import UserError
from networks.lora_common import is_conv3x3
from networks.lora_svd import CLAMP_QUANTILE, clamp_to_quantile, dense_svd, layer_shaped, truncate

logger = logging.getLogger(__name__)

DEFAULT_MIN_DIFF = 1e-6


@dataclass
class ModulePair:
    """One target layer of both models, with the rank it gets."""

    lora_name: str
    org: nn.Module
    tuned: nn.Module
    rank: int


def pair_modules(org_layers: list[tuple[str, nn.Module]], tuned_layers: list[tuple[str, nn.Module]],
                 dim: int, conv_dim: int | None, org_name: str, tuned_name: str) -> list[ModulePair]:
    """Match the layers of the two models by name and check they have the same shapes.

    Raises UserError naming the first layer that exists in only one model or whose weight shape
    differs (different architectures). SD2 ``proj_in``/``proj_out`` stored as Linear in one and
    as 1×1 conv in the other count as the same shape.
    """
    tuned_by_name = dict(tuned_layers)
    org_names = [name for name, _ in org_layers]
    missing = [n for n in org_names if n not in tuned_by_name]
    extra = sorted(set(tuned_by_name) - set(org_names))
    if missing or extra:
        name, where = (missing[0], tuned_name) if missing else (extra[0], org_name)
        raise UserError(f"--model_org {org_name} and --model_tuned {tuned_name} have different architectures "
                        f"({len(org_names)} vs {len(tuned_by_name)} LoRA target layers; {where} has no layer for "
                        f"{name}); both must be the same Stable Diffusion version and size")
    pairs = []
    for name, org in org_layers:
        tuned = tuned_by_name[name]
        a, b = tuple(org.weight.shape), tuple(tuned.weight.shape)
        if _squeezed(a) != _squeezed(b):
            raise UserError(f"--model_org {org_name} and --model_tuned {tuned_name} have different architectures: "
                            f"layer {name} has weight shape {a} vs {b}")
        rank = conv_dim if is_conv3x3(org) else dim
        pairs.append(ModulePair(name, org, tuned, int(rank)))
    return pairs


def _squeezed(shape: tuple[int, ...]) -> tuple[int, ...]:
    """A 1×1-conv weight shape [o, i, 1, 1] as the Linear shape [o, i]."""
    return shape[:2] if len(shape) == 4 and shape[2:] == (1, 1) else shape


@torch.no_grad()
def weight_delta(pair: ModulePair, device: torch.device | None = None) -> torch.Tensor:
    """``W_tuned − W_org`` in float32, shaped like the original layer's weight."""
    org = pair.org.weight.detach().to(device=device, dtype=torch.float32)
    tuned = pair.tuned.weight.detach().to(device=device, dtype=torch.float32).reshape(org.shape)
    return tuned - org


def max_abs_delta(pairs: list[ModulePair]) -> float:
    """The largest ``|W_tuned − W_org|`` over all given modules (0 for none)."""
    return max((float(weight_delta(p).abs().max()) for p in pairs), default=0.0)


@torch.no_grad()
def factorize(delta: torch.Tensor, rank: int, clamp_quantile: float = CLAMP_QUANTILE
              ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Rank-``q`` LoRA factors ``(down, up, q)`` of one weight difference.

    ``delta`` is [out, in] (Linear) or [out, in, k, k] (conv); q = min(rank, in, out) with ``in`` the
    channel count. Returns down [q, in(, k, k)] and up [out, q(, 1, 1)] on the delta's device, in
    float32, with ``up @ down ≈ delta``. Entries are clamped to ±h, h = the ``clamp_quantile``
    quantile of the signed entries of both factors; ``clamp_quantile`` ≥ 1 disables the clamp.
    """
    out_dim, in_dim = delta.shape[0], delta.shape[1]
    q = max(1, min(int(rank), in_dim, out_dim))
    up, down = truncate(dense_svd(delta.reshape(out_dim, -1).to(torch.float32)), q)
    if clamp_quantile < 1.0:
        up, down = clamp_to_quantile(up, down, clamp_quantile)
    up, down = layer_shaped(up, down, tuple(delta.shape[2:]) if delta.dim() == 4 else None)
    return down.contiguous(), up.contiguous(), q


def extract_state_dict(pairs: list[ModulePair], clamp_quantile: float = CLAMP_QUANTILE,
                       device: torch.device | None = None, progress: bool = True) -> dict[str, torch.Tensor]:
    """The LoRA state dict (float32, CPU) approximating every pair's difference.

    Keys ``<name>.lora_down.weight``, ``<name>.lora_up.weight`` and ``<name>.alpha`` (= q, so the
    module's scale is 1).
    """
    state: dict[str, torch.Tensor] = {}
    for pair in _progress(pairs, progress):
        down, up, q = factorize(weight_delta(pair, device), pair.rank, clamp_quantile)
        state[f"{pair.lora_name}.lora_down.weight"] = down.cpu()
        state[f"{pair.lora_name}.lora_up.weight"] = up.cpu()
        state[f"{pair.lora_name}.alpha"] = torch.tensor(float(q))
    return state


def _progress(pairs: list[ModulePair], enabled: bool) -> Iterator[ModulePair]:
    if not enabled:
        yield from pairs
        return
    from tqdm import tqdm

    yield from tqdm(pairs, desc="extracting LoRA", unit="module")
