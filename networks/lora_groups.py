"""Optimizer parameter groups of a :class:`networks.lora.LoRANetwork`.

In order: the text-encoder modules, then the UNet modules (one group, or one per UNet block in
block-lr mode), then, per part, the modules whose module rule sets an ``lr`` (one group per lr value).
With LoRA+ each of these is split in two, as kohya does: the ``lora_up`` weights get ratio × the
group's lr, everything else (``lora_down``, ``dora_scale``) the lr itself.
"""

from __future__ import annotations

import logging
from typing import Any, Iterable

from networks.lora_common import block_index

logger = logging.getLogger(__name__)


def _split(loras: Iterable[Any], lr: float | None, ratio: float | None) -> list[dict]:
    """One group of the modules' parameters at ``lr`` (no ``lr`` key when None), or with a LoRA+
    ``ratio`` two: the rest at ``lr`` and the ``lora_up`` weights at ``ratio × lr``."""
    loras = list(loras)
    if ratio is None:
        group: dict = {"params": [p for lora in loras for p in lora.parameters()]}
        if lr is not None:
            group["lr"] = lr
        return [group] if group["params"] else []
    plain, plus = [], []
    for lora in loras:
        for name, param in lora.named_parameters():
            (plus if name.startswith("lora_up.") else plain).append(param)
    groups = []
    for params, factor in ((plain, 1.0), (plus, ratio)):
        if not params:
            continue
        group = {"params": params}
        if lr is not None:
            group["lr"] = lr * factor
        groups.append(group)
    return groups


def network_param_groups(network: Any, text_encoder_lr: float | None, unet_lr: float | None,
                         default_lr: float | None) -> list[dict]:
    """The groups (module docstring); ``lr`` is only set where a value is known, and block groups
    whose lr is 0 are left out. With LoRA+ a missing part lr falls back to ``default_lr``."""
    te_ratio = network.loraplus_text_encoder_lr_ratio or network.loraplus_lr_ratio
    unet_ratio = network.loraplus_unet_lr_ratio or network.loraplus_lr_ratio
    rule_lrs = getattr(network, "module_lrs", {}) or {}
    groups: list[dict] = []

    def part(loras: list[Any], lr: float | None, ratio: float | None, blocks: bool) -> None:
        """The groups of the text encoder or the UNet."""
        if ratio is not None and lr is None:
            lr = default_lr
            if lr is None:
                logger.warning("LoRA+: no learning rate known, so the lora_up weights keep the optimizer's lr")
        own = [lora for lora in loras if lora.lora_name not in rule_lrs]
        if blocks:
            by_block: dict[int, list[Any]] = {}
            for lora in own:
                by_block.setdefault(block_index(lora.lora_name), []).append(lora)
            base = lr if lr is not None else default_lr
            for members in by_block.values():
                block_lr = None if base is None else base * network.get_lr_weight(members[0])
                if block_lr == 0:
                    continue
                groups.extend(_split(members, block_lr, ratio))
        else:
            groups.extend(_split(own, lr, ratio))
        by_lr: dict[float, list[Any]] = {}
        for lora in loras:
            if lora.lora_name in rule_lrs:
                by_lr.setdefault(rule_lrs[lora.lora_name], []).append(lora)
        for value, members in by_lr.items():
            groups.extend(_split(members, value, ratio))

    if network.text_encoder_loras:
        part(network.text_encoder_loras, text_encoder_lr, te_ratio, blocks=False)
    if network.unet_loras:
        part(network.unet_loras, unet_lr, unet_ratio, blocks=network.block_lr)
    return groups
