"""The ``--network_args`` of :mod:`networks.lora` beyond kohya's original set: DoRA (``dora_wd``,
``dora_axis``), LoRA+ (``loraplus_lr_ratio``, ``loraplus_unet_lr_ratio``,
``loraplus_text_encoder_lr_ratio``), rsLoRA (``rs_lora``) and per-module rules (``module_rules``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from library.errors import UserError
from networks.lora_common import args_error, parse_float_arg
from networks.module_rules import ModuleRules, load_module_rules

EXTRA_NETWORK_ARGS = ("dora_wd", "dora_axis", "loraplus_lr_ratio", "loraplus_unet_lr_ratio",
                      "loraplus_text_encoder_lr_ratio", "rs_lora", "module_rules")
LORAPLUS_ARGS = ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio")
_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")


@dataclass
class ExtraOptions:
    """The parsed extra options (None / False: not used)."""

    dora_axis: str | None = None
    loraplus: dict[str, float | None] | None = None
    rs_lora: bool = False
    rules: ModuleRules | None = None


def parse_bool_arg(key: str, value: Any) -> bool:
    """``true/false`` (also 1/0, yes/no, on/off; None → False)."""
    if value is None:
        return False
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise args_error(key, value, "must be true or false")


def parse_extra_args(kwargs: Mapping[str, Any], dropout: float | None) -> ExtraOptions:
    """Check and convert the extra options (``dropout``: the neuron dropout, which DoRA refuses)."""
    options = ExtraOptions()
    dora = parse_bool_arg("dora_wd", kwargs.get("dora_wd"))
    axis = kwargs.get("dora_axis")
    if axis is not None:
        axis = str(axis).strip().lower()
        if axis not in ("in", "out"):
            raise args_error("dora_axis", kwargs["dora_axis"], "must be 'in' (the default: one magnitude per input "
                                                               "column) or 'out' (one per output row)")
        if not dora:
            raise args_error("dora_axis", kwargs["dora_axis"], "only used with dora_wd=true")
    if dora:
        if dropout is not None:
            raise UserError(f"--network_dropout / --network_args dropout={dropout:g}: neuron dropout is not "
                            "supported with dora_wd=true (DoRA works on the merged weight); use rank_dropout or "
                            "module_dropout")
        options.dora_axis = axis or "in"
    ratios = {}
    for key in LORAPLUS_ARGS:
        ratio = parse_float_arg(key, kwargs.get(key))
        if ratio is not None and ratio <= 0:
            raise args_error(key, kwargs[key], "must be > 0 (the up weights train at ratio × the learning rate)")
        ratios[key] = ratio
    if any(r is not None for r in ratios.values()):
        options.loraplus = ratios
    options.rs_lora = parse_bool_arg("rs_lora", kwargs.get("rs_lora"))
    if kwargs.get("module_rules") is not None:
        options.rules = load_module_rules(str(kwargs["module_rules"]).strip())
    return options
