"""``--base_weights`` / ``--base_weights_multiplier``: merge network files into the base model before training.

kohya-ss/sd-scripts' train_network.py merges each file ``W ← W + m·ΔW`` through the network module's
``create_network_from_weights`` + ``merge_to``. Here the files are read and merged by the code of
``networks/merge_lora.py --sd_model`` (:mod:`networks.lora_files`), so every type it knows merges, whatever
``--network_module`` trains: LoRA and LoCon (3×3 convolutions), DoRA (``dora_scale``), LyCORIS LoHa and LoKr,
and whatever else that reader accepts.
A model trained with ``--base_weights a.safetensors --base_weights_multiplier 0.7`` starts from exactly the
weights of ``merge_lora.py --sd_model <model> --models a.safetensors --ratios 0.7``.
"""

from __future__ import annotations

import logging
from typing import Sequence

import torch
from torch import nn

from library.option_groups import NetworkOptions

logger = logging.getLogger(__name__)


def base_weight_multipliers(files: Sequence[str], multipliers: Sequence[float] | None) -> list[float]:
    """One multiplier per file: the given ones, or 1.0 each when none are given (counts were checked)."""
    return list(multipliers) if multipliers is not None else [1.0] * len(files)


@torch.no_grad()
def merge_network_files(files: Sequence[str], multipliers: Sequence[float], *, text_encoder: nn.Module,
                        unet: nn.Module, v2: bool) -> None:
    """Add ``multiplier · ΔW`` of every module of every file, in order, to the matching layers of the text
    encoder and U-Net (merged in float32, stored in the layers' dtype), exactly as ``merge_lora.py``
    merges into a model. UserError naming the file when it is unreadable, not a network file, made for
    another SD version or model, or holds NaN/inf weights."""
    from networks.lora_files import load_lora_file, match_lora_to_model, merge_module_into_layer, model_lora_layers

    option = "--base_weights"
    layers = model_lora_layers(text_encoder, unet)
    version = "sd2" if v2 else "sd1"
    for file, multiplier in zip(files, multipliers):
        lora = load_lora_file(file, option, allow_lycoris=True)
        if lora.extra_keys:
            logger.warning("%s %s: %d tensors are not LoRA/LoHa/LoKr modules and are not merged (e.g. %s)", option,
                           file, len(lora.extra_keys), lora.extra_keys[0])
        found = match_lora_to_model(lora, layers, version, "the base model", option)
        logger.info("merging base weights %s with multiplier %s: %d of %d modules", file, multiplier, len(found),
                    len(lora.modules))
        for name, layer in found.items():
            merge_module_into_layer(layer, lora.modules[name], multiplier, torch.float32)
    if files:
        logger.info("all base weights merged: %s", ", ".join(str(f) for f in files))


def merge_base_weights(network: NetworkOptions, *, text_encoder: nn.Module, unet: nn.Module, v2: bool) -> None:
    """Merge the ``--base_weights`` files of ``network`` into the text encoder and U-Net, each with its
    ``--base_weights_multiplier`` (1.0 each when none are given), with :func:`merge_network_files`; nothing
    without ``--base_weights``."""
    files = list(network.base_weights or [])
    merge_network_files(files, base_weight_multipliers(files, network.base_weights_multiplier),
                        text_encoder=text_encoder, unet=unet, v2=v2)
