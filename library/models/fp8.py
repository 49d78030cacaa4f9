"""``--fp8_base`` / ``--fp8_base_unet``: the frozen base model's weights kept in ``torch.float8_e4m3fn``.

As in kohya-ss/sd-scripts' train_network.py: ``--fp8_base`` stores the U-Net and the text encoder in fp8,
``--fp8_base_unet`` only the U-Net; both need mixed precision. Every layer's weights (Linear, Conv, the
normalisation layers; not the embeddings, which kohya keeps in the mixed-precision dtype) stay in fp8 between
forwards; for a layer's forward a copy in the compute dtype is made and dropped afterwards, so about one byte
per weight is held instead of two or four. The U-Net computes in the mixed-precision dtype (under autocast,
as kohya's does); the text encoder in the dtype it is otherwise run in (float32 here). Works on the CPU too
(``--mixed_precision bf16``).

The other training scripts accept ``--fp8_base`` and ignore it, as kohya's SD1/SD2 DreamBooth,
fine-tuning and Textual Inversion scripts do.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

FP8_DTYPE = getattr(torch, "float8_e4m3fn", None)


@dataclass(frozen=True)
class Fp8Parts:
    """Which parts of the base model are stored in fp8."""

    unet: bool = False
    text_encoder: bool = False


def fp8_parts(fp8_base: bool, fp8_base_unet: bool) -> Fp8Parts:
    """kohya's rule: either option puts the U-Net in fp8; the text encoder only with ``--fp8_base`` alone."""
    return Fp8Parts(unet=bool(fp8_base or fp8_base_unet), text_encoder=bool(fp8_base and not fp8_base_unet))


def store_in_fp8(module: nn.Module, compute_dtype: torch.dtype) -> int:
    """Keep the weights of every layer of ``module`` (embeddings excepted) in float8_e4m3fn; for each
    layer's own forward a ``compute_dtype`` copy of them is made and dropped afterwards. Call after the
    module's final placement (a later ``module.to(dtype=…)`` would undo the storage). Returns the number of
    parameter bytes now held in fp8."""
    for layer in module.modules():
        if isinstance(layer, nn.Embedding) or getattr(layer, "_fp8_names", None):
            continue
        names = [n for n, p in layer.named_parameters(recurse=False) if p.is_floating_point()]
        if names:
            _hold_in_fp8(layer, names, compute_dtype)
    return fp8_bytes(module)


def _hold_in_fp8(layer: nn.Module, names: list[str], compute_dtype: torch.dtype) -> None:
    """Replace ``layer``'s parameters ``names`` by fp8 copies and hook its forward: before it, the parameters
    are swapped for fresh ``compute_dtype`` tensors (what the layer computes with and autograd keeps, so
    gradient checkpointing recomputes the same), after it (even on error) the fp8 ones come back."""
    for name in names:
        layer._parameters[name] = nn.Parameter(layer._parameters[name].detach().to(FP8_DTYPE), requires_grad=False)
    layer._fp8_names = tuple(names)
    layer._fp8_held = {}

    def cast_in(module: nn.Module, args: Any) -> None:
        for name in module._fp8_names:
            stored = module._parameters[name]
            module._fp8_held[name] = stored
            module._parameters[name] = stored.to(compute_dtype)

    def restore(module: nn.Module, args: Any, output: Any) -> None:
        module._parameters.update(module._fp8_held)
        module._fp8_held.clear()

    layer.register_forward_pre_hook(cast_in)
    layer.register_forward_hook(restore, always_call=True)


def fp8_bytes(module: nn.Module) -> int:
    """Bytes of ``module``'s parameters that are stored as float8_e4m3fn."""
    return sum(p.numel() * p.element_size() for p in module.parameters() if p.dtype == FP8_DTYPE)


def module_dtype(module: nn.Module) -> torch.dtype:
    """The dtype of ``module``'s first floating-point parameter (float32 when it has none)."""
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)


def apply_fp8_storage(parts: Fp8Parts, unet: nn.Module, text_encoder: nn.Module,
                      unet_compute_dtype: torch.dtype) -> None:
    """Store the chosen parts in fp8 (the U-Net computing in ``unet_compute_dtype``, the text encoder in its
    current dtype) and log how much of each is now held in fp8."""
    for name, module, wanted, compute in (("U-Net", unet, parts.unet, unet_compute_dtype),
                                          ("text encoder", text_encoder, parts.text_encoder, None)):
        if not wanted:
            continue
        compute = compute or module_dtype(module)
        held = store_in_fp8(module, compute)
        total = sum(p.numel() * p.element_size() for p in module.parameters())
        logger.info("fp8: %s weights in %s: %.2f of %.2f MiB of parameters (the rest: embeddings), "
                    "computed in %s", name, FP8_DTYPE, held / 2**20, total / 2**20, compute)
