"""LoRA networks for Stable Diffusion 1.x/2.x (``--network_module networks.lora``).

Files are the kohya-ss/sd-scripts layout (file_formats.md §1) and load in AUTOMATIC1111, ComfyUI
and diffusers. Module selection: Linear and 1×1 convs inside ``Transformer2DModel`` (UNet) and
``CLIPAttention``/``CLIPMLP`` (text encoder); with ``conv_dim``/``conv_block_dims`` also the layers
of ``ResnetBlock2D``/``Downsample2D``/``Upsample2D`` (3×3 convs at the conv rank). Options beyond
kohya's: DoRA (``dora_wd``, :mod:`networks.lora_dora`), LoRA+ (``loraplus_*lr_ratio``,
:mod:`networks.lora_groups`), rsLoRA (``rs_lora``) and per-module rules (``module_rules``,
:mod:`networks.module_rules`); docs/train_network.md describes them.

Use from Python on a diffusers pipeline::

    network, sd = create_network_from_weights(1.0, "my_lora.safetensors", pipe.vae, pipe.text_encoder, pipe.unet)
    network.apply_to(pipe.text_encoder, pipe.unet)   # hook the forwards …
    network.load_state_dict(sd)
    network.set_multiplier(0.8)
    # … or bake it in instead: network.merge_to(pipe.text_encoder, pipe.unet, sd)
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import nn

from library.errors import UserError
from networks.lora_common import (
    LORA_PREFIX_TEXT_ENCODER,
    LORA_PREFIX_UNET,
    NUM_OF_BLOCKS,
    TEXT_ENCODER_TARGET_MODULES,
    UNET_CONV_TARGET_MODULES,
    UNET_TARGET_MODULES,
    block_index,
    block_lr_weight_of,
    block_settings,
    check_known_args,
    dims_from_state_dict,
    DROPOUT_ARGS,
    find_target_modules,
    group_by_module,
    is_conv3x3,
    load_state_dict_file,
    max_norm_scale_,
    parse_dropouts,
    parse_float_arg,
    parse_int_arg,
    quiet_loggers,
    save_state_dict_file,
)
from networks.lora_dora import DoRAModule, dora_axis_of, dora_shapes_from_state_dict
from networks.lora_groups import network_param_groups
from networks.lora_module import LoRAModule, match_dtype  # noqa: F401 - match_dtype: public name kept here
from networks.lora_options import EXTRA_NETWORK_ARGS, LORAPLUS_ARGS, parse_extra_args

logger = logging.getLogger(__name__)

DEFAULT_NETWORK_DIM = 4

# --network_args keys understood by create_network (values arrive as strings).
KNOWN_NETWORK_ARGS = (
    "conv_dim", "conv_alpha", "block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas",
    "down_lr_weight", "mid_lr_weight", "up_lr_weight", "block_lr_zero_threshold",
    *DROPOUT_ARGS, *EXTRA_NETWORK_ARGS,
)
BLOCK_SETTINGS = ("block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas")


class LoRANetwork(nn.Module):
    """All LoRA modules of one text encoder + UNet pair (the kohya network module interface)."""

    NUM_OF_BLOCKS = NUM_OF_BLOCKS
    LORA_PREFIX_TEXT_ENCODER = LORA_PREFIX_TEXT_ENCODER
    LORA_PREFIX_UNET = LORA_PREFIX_UNET
    TEXT_ENCODER_TARGET_REPLACE_MODULE = TEXT_ENCODER_TARGET_MODULES
    UNET_TARGET_REPLACE_MODULE = UNET_TARGET_MODULES
    UNET_TARGET_REPLACE_MODULE_CONV2D_3X3 = UNET_CONV_TARGET_MODULES

    def __init__(self, text_encoder: nn.Module | None, unet: nn.Module | None, multiplier: float = 1.0,
                 lora_dim: int = DEFAULT_NETWORK_DIM, alpha: float | int | None = 1,
                 dropout: float | None = None, rank_dropout: float | None = None,
                 module_dropout: float | None = None, conv_lora_dim: int | None = None,
                 conv_alpha: float | None = None, block_dims: list[int] | None = None,
                 block_alphas: list[float] | None = None, conv_block_dims: list[int] | None = None,
                 conv_block_alphas: list[float] | None = None, modules_dim: Mapping[str, int] | None = None,
                 modules_alpha: Mapping[str, float] | None = None, module_class: type = LoRAModule,
                 module_kwargs: Mapping[str, Any] | None = None, for_inference: bool = False,
                 dora: str | Mapping[str, tuple[int, ...]] | None = None, rs_lora: bool = False,
                 module_rules: Any = None) -> None:
        """Find the target layers and create one ``module_class`` per layer with a non-zero rank.

        Ranks come from ``modules_dim`` (from a file) if given, else from the first matching rule of
        ``module_rules`` (:mod:`networks.module_rules`), else from the per-block lists for UNet layers
        when ``block_dims`` is set, else from ``lora_dim``/``conv_lora_dim``. ``dora`` makes DoRA
        modules (:mod:`networks.lora_dora`): an axis (``"in"``/``"out"``) for every module, or
        ``{lora_name: stored dora_scale shape}`` for the modules of a file. ``rs_lora`` stores
        ``alpha·√rank`` as alpha (scale ``alpha/√rank`` for loaders that compute ``alpha/rank``).
        """
        super().__init__()
        self.multiplier = multiplier
        self.lora_dim = lora_dim
        self.alpha = alpha
        self.conv_lora_dim = conv_lora_dim
        self.conv_alpha = conv_alpha
        self.dropout, self.rank_dropout, self.module_dropout = dropout, rank_dropout, module_dropout
        self._modules_dim, self._modules_alpha = modules_dim, modules_alpha
        self._block_dims, self._block_alphas = block_dims, block_alphas
        self._conv_block_dims, self._conv_block_alphas = conv_block_dims, conv_block_alphas
        self.block_lr = False
        self.down_lr_weight: list[float] | None = None
        self.mid_lr_weight: float | None = None
        self.up_lr_weight: list[float] | None = None
        self.loraplus_lr_ratio: float | None = None
        self.loraplus_unet_lr_ratio: float | None = None
        self.loraplus_text_encoder_lr_ratio: float | None = None
        self.dora, self.rs_lora, self.module_rules = dora, rs_lora, module_rules
        self.module_lrs: dict[str, float] = {}  # lora_name → absolute lr from a module rule
        self._candidates: list[str] = []  # every target layer's name (for the unused-rule warning)
        extra = dict(module_kwargs or {})
        if for_inference:
            extra["init_weights"] = False

        def create(prefix: str, root: nn.Module | None, targets: Iterable[str]) -> list[LoRAModule]:
            """One module per target layer with a non-zero rank."""
            loras = []
            for lora_name, layer in find_target_modules(root, prefix, targets):
                self._candidates.append(lora_name)
                dim, alpha_ = self._resolve_dim(lora_name, prefix == LORA_PREFIX_UNET, is_conv3x3(layer))
                if not dim:
                    continue
                if rs_lora:  # alpha' = alpha·√r, so alpha'/r = alpha/√r
                    alpha_ = (float(alpha_) if alpha_ else float(dim)) * math.sqrt(dim)
                cls, kw = self._module_class_for(lora_name, layer, module_class, extra)
                loras.append(cls(lora_name, layer, multiplier, dim, alpha_, dropout=dropout,
                                 rank_dropout=rank_dropout, module_dropout=module_dropout, **kw))
            return loras

        self.text_encoder_loras = create(LORA_PREFIX_TEXT_ENCODER, text_encoder, TEXT_ENCODER_TARGET_MODULES)
        unet_targets = UNET_TARGET_MODULES
        if modules_dim is not None or conv_lora_dim is not None or conv_block_dims is not None:
            unet_targets = UNET_TARGET_MODULES + UNET_CONV_TARGET_MODULES
        self.unet_loras = create(LORA_PREFIX_UNET, unet, unet_targets)
        logger.info("LoRA: %d text-encoder modules, %d UNet modules", len(self.text_encoder_loras),
                    len(self.unet_loras))
        if module_rules is not None:
            for rule in module_rules.unused(self._candidates):
                logger.warning("module_rules %s: the rule with pattern %r decides for no module", module_rules.path,
                               rule.pattern)
        for lora in self.text_encoder_loras + self.unet_loras:
            if lora.lora_name in self._modules:
                raise ValueError(f"duplicated LoRA name: {lora.lora_name}")
            self.add_module(lora.lora_name, lora)

    def _module_class_for(self, lora_name: str, layer: nn.Module, module_class: type,
                          extra: Mapping[str, Any]) -> tuple[type, dict[str, Any]]:
        """The class (LoRA or DoRA) and extra keyword arguments of one module."""
        axis = self.dora if isinstance(self.dora, str) else None
        if isinstance(self.dora, Mapping) and lora_name in self.dora:
            try:
                axis = dora_axis_of(self.dora[lora_name], layer.weight.shape)
            except ValueError as exc:
                raise UserError(f"LoRA module {lora_name}: {exc}") from None
        if axis is None:
            return module_class, dict(extra)
        return DoRAModule, {**extra, "dora_axis": axis}

    def _resolve_dim(self, lora_name: str, is_unet: bool, conv3x3: bool) -> tuple[int | None, Any]:
        """Rank and alpha of one layer (None/0 rank: no module)."""
        if self._modules_dim is not None:
            if lora_name not in self._modules_dim:
                return None, None
            return self._modules_dim[lora_name], self._modules_alpha[lora_name]
        rule = self.module_rules.match(lora_name) if self.module_rules is not None else None
        if rule is not None and rule.exclude:
            return None, None
        dim, alpha = self._default_dim(lora_name, is_unet, conv3x3)
        if rule is None or not dim:  # rules change the modules the network makes, never add any
            return dim, alpha
        if rule.lr is not None:
            self.module_lrs[lora_name] = rule.lr
        return (rule.dim if rule.dim is not None else dim), (rule.alpha if rule.alpha is not None else alpha)

    def _default_dim(self, lora_name: str, is_unet: bool, conv3x3: bool) -> tuple[int | None, Any]:
        """Rank and alpha from the block lists or the network rank (no rules)."""
        if is_unet and self._block_dims is not None:
            idx = block_index(lora_name)
            if not conv3x3:
                return self._block_dims[idx], self._block_alphas[idx]
            if self._conv_block_dims is not None:
                return self._conv_block_dims[idx], self._conv_block_alphas[idx]
            return None, None
        if not conv3x3:
            return self.lora_dim, self.alpha
        if self.conv_lora_dim is not None:
            return self.conv_lora_dim, self.conv_alpha
        return None, None

    # -- the network-module contract -------------------------------------------------------------

    def all_loras(self) -> list[LoRAModule]:
        """Text-encoder modules, then UNet modules."""
        return self.text_encoder_loras + self.unet_loras

    def set_multiplier(self, multiplier: float) -> None:
        """Set the strength of every module."""
        self.multiplier = multiplier
        for lora in self.all_loras():
            lora.set_multiplier(multiplier)

    def _drop(self, loras: list[LoRAModule]) -> None:
        for lora in loras:
            lora.restore()
            self._modules.pop(lora.lora_name, None)

    def apply_to(self, text_encoder: nn.Module | None = None, unet: nn.Module | None = None,
                 apply_text_encoder: bool = True, apply_unet: bool = True) -> None:
        """Hook the forwards of the wrapped layers; a part not applied is dropped from the network
        (it is neither trained nor saved)."""
        if not apply_text_encoder:
            self._drop(self.text_encoder_loras)
            self.text_encoder_loras = []
        if not apply_unet:
            self._drop(self.unet_loras)
            self.unet_loras = []
        for lora in self.all_loras():
            lora.apply_to()

    def restore(self) -> None:
        """Unhook every module (the base models behave as before ``apply_to``)."""
        for lora in self.all_loras():
            lora.restore()

    def is_mergeable(self) -> bool:
        """LoRA updates can be merged into the base weights."""
        return True

    def merge_to(self, text_encoder: nn.Module | None = None, unet: nn.Module | None = None,
                 weights_sd: Mapping[str, torch.Tensor] | None = None, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> None:
        """Add every module's update permanently to the base weights (irreversible).

        With ``weights_sd`` the text-encoder (UNet) part is merged only if it has ``lora_te``
        (``lora_unet``) keys, using those tensors; without it the network's own weights are merged.
        Merged modules are unhooked.
        """
        if weights_sd is None:
            for lora in self.all_loras():
                lora.merge_to(None, dtype, device)
            return
        has_te = any(k.startswith(LORA_PREFIX_TEXT_ENCODER) for k in weights_sd)
        has_unet = any(k.startswith(LORA_PREFIX_UNET) for k in weights_sd)
        per_module = group_by_module(weights_sd)
        merged = set()
        for lora in (self.text_encoder_loras if has_te else []) + (self.unet_loras if has_unet else []):
            sd = per_module.get(lora.lora_name)
            if sd is None:
                continue
            lora.merge_to(sd, dtype, device)
            merged.add(lora.lora_name)
        unmatched = sorted(set(per_module) - merged)
        if unmatched:
            logger.warning("%d LoRA modules in the weights have no matching layer, e.g. %s", len(unmatched),
                           unmatched[0])

    def file_names_to_ours(self, weights_sd: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
        """A file's tensors under this network's key names (the same here; OFT renames kohya's own)."""
        return weights_sd

    def file_tensors(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The tensors a save writes: the state dict, every tensor cast to ``dtype`` on the CPU when given."""
        state_dict = self.state_dict()
        if dtype is not None:
            state_dict = {k: v.detach().to("cpu").to(dtype) for k, v in state_dict.items()}
        return state_dict

    def load_weights(self, file: str | os.PathLike):
        """Load a network file non-strictly (missing/unexpected keys are reported, shapes must match)."""
        weights_sd, _ = load_state_dict_file(file)
        info = self.load_state_dict(self.file_names_to_ours(weights_sd), strict=False)
        if info.missing_keys or info.unexpected_keys:
            logger.info("network weights %s: %d missing, %d unexpected keys", file, len(info.missing_keys),
                        len(info.unexpected_keys))
        return info

    def save_weights(self, file: str | os.PathLike, dtype: torch.dtype | None = None,
                     metadata: Mapping[str, Any] | None = None) -> None:
        """Write :meth:`file_tensors`: ``.safetensors`` with metadata and ``sshs_*`` hashes, else ``torch.save``.

        With ``dtype`` every tensor (alpha included) is cast to it. With module rules their content is
        added to ``ss_network_args`` (key ``module_rules_content``, a JSON list) beside the file name.
        """
        state_dict = self.file_tensors(dtype)
        if metadata and self.module_rules is not None and "ss_network_args" in metadata:
            network_args = json.loads(metadata["ss_network_args"])
            network_args["module_rules_content"] = self.module_rules.to_json()
            metadata = {**metadata, "ss_network_args": json.dumps(network_args)}
        save_state_dict_file(state_dict, file, metadata)

    def enable_gradient_checkpointing(self) -> None:
        """Nothing to do: the LoRA layers are cheap (the base model checkpoints itself)."""

    def prepare_grad_etc(self, text_encoder: nn.Module | None = None, unet: nn.Module | None = None) -> None:
        """Make the LoRA weights trainable."""
        self.requires_grad_(True)

    def on_epoch_start(self, text_encoder: nn.Module | None = None, unet: nn.Module | None = None) -> None:
        """Switch to training mode (dropouts active)."""
        self.train()

    def get_trainable_params(self):
        """All LoRA parameters (for gradient clipping)."""
        return self.parameters()

    def set_block_lr_weight(self, up_lr_weight: list[float] | None = None, mid_lr_weight: float | None = None,
                            down_lr_weight: list[float] | None = None) -> None:
        """Enable block-wise learning rates with the given (already parsed) 12/1/12 weights."""
        self.block_lr = True
        self.down_lr_weight, self.mid_lr_weight, self.up_lr_weight = down_lr_weight, mid_lr_weight, up_lr_weight

    def get_lr_weight(self, lora: LoRAModule) -> float:
        """The block lr multiplier of one module."""
        return block_lr_weight_of(lora.lora_name, self.down_lr_weight, self.mid_lr_weight, self.up_lr_weight)

    def prepare_optimizer_params(self, text_encoder_lr: float | None, unet_lr: float | None,
                                 default_lr: float | None = None) -> list[dict]:
        """Optimizer parameter groups: one for the text encoder, one for the UNet, or in block-lr mode
        one per UNet block (order of first appearance, lr = (unet_lr or default_lr) × block weight,
        groups with lr 0 left out); then the modules with a module-rule ``lr``. LoRA+ splits each group
        (the ``lora_up`` weights at ratio × lr). ``lr`` is only set where a value is known
        (:mod:`networks.lora_groups`)."""
        self.requires_grad_(True)
        return network_param_groups(self, text_encoder_lr, unet_lr, default_lr)

    def set_loraplus_lr_ratio(self, loraplus_lr_ratio: float | None, loraplus_unet_lr_ratio: float | None,
                              loraplus_text_encoder_lr_ratio: float | None) -> None:
        """LoRA+: the ``lora_up`` weights train at ratio × lr (the part's own ratio, else the common one)."""
        self.loraplus_lr_ratio = loraplus_lr_ratio
        self.loraplus_unet_lr_ratio = loraplus_unet_lr_ratio
        self.loraplus_text_encoder_lr_ratio = loraplus_text_encoder_lr_ratio
        logger.info("LoRA+ lr ratio: text encoder %s, UNet %s", loraplus_text_encoder_lr_ratio or loraplus_lr_ratio,
                    loraplus_unet_lr_ratio or loraplus_lr_ratio)

    def supports_max_norm_regularization(self) -> bool:
        """True when every module is a plain LoRA or DoRA module (subclasses such as LoHa, LoKr, DyLoRA and OFT
        networks inherit :meth:`apply_max_norm_regularization` but their modules have other weights)."""
        return all(type(lora) in (LoRAModule, DoRAModule) for lora in self.all_loras())

    def apply_max_norm_regularization(self, max_norm_value: float, device: torch.device | str | None = None
                                      ) -> tuple[int, float, float]:
        """``--scale_weight_norms``: scale each module whose update ``alpha/rank · up∘down`` has a norm above
        ``max_norm_value`` back to that norm (:func:`networks.lora_common.max_norm_scale_`; for DoRA modules
        the low-rank direction update, not the magnitude). Returns ``(modules scaled, mean norm, max norm)``
        of the updates after scaling."""
        if not self.supports_max_norm_regularization():
            raise UserError(f"--scale_weight_norms: {type(self).__name__} modules are not plain LoRA/DoRA modules; "
                            "max-norm regularisation is not defined for them")
        scaled, norms = 0, []
        for lora in self.all_loras():
            changed, norm = max_norm_scale_(lora.lora_down.weight, lora.lora_up.weight, lora.scale, max_norm_value,
                                            device)
            scaled += int(changed)
            norms.append(norm)
        if not norms:
            return 0, 0.0, 0.0
        return scaled, sum(norms) / len(norms), max(norms)

    def module_dims(self) -> dict[str, tuple[int, float]]:
        """``{lora_name: (rank, alpha)}`` of every module."""
        return {lora.lora_name: (lora.lora_dim, float(lora.alpha.float())) for lora in self.all_loras()}


def resolve_network_args(network_dim: int | None, network_alpha: float | None, neuron_dropout: Any,
                         kwargs: dict[str, Any]) -> dict[str, Any]:
    """Defaults, types and ranges of :func:`create_network`'s arguments (UserError naming the option)."""
    check_known_args(kwargs, KNOWN_NETWORK_ARGS)
    if network_dim is None:
        network_dim = DEFAULT_NETWORK_DIM
    if network_alpha is None:
        network_alpha = 1.0
    if network_dim < 1:
        raise UserError(f"--network_dim must be at least 1, got {network_dim}")
    if network_alpha < 0:
        raise UserError(f"--network_alpha must be >= 0, got {network_alpha:g}")
    conv_dim = parse_int_arg("conv_dim", kwargs.get("conv_dim"))
    conv_alpha = parse_float_arg("conv_alpha", kwargs.get("conv_alpha"))
    if conv_dim is not None and conv_alpha is None:
        conv_alpha = 1.0
    if conv_dim is not None and conv_dim < 1:
        raise UserError(f"--network_args conv_dim={conv_dim}: must be at least 1 (leave conv_dim out for no "
                        "3x3-convolution modules)")
    if conv_alpha is not None and conv_alpha < 0:
        raise UserError(f"--network_args conv_alpha={kwargs.get('conv_alpha')}: must be >= 0")
    dropouts = parse_dropouts(neuron_dropout, kwargs)
    blocks = block_settings(network_dim, network_alpha, conv_dim, conv_alpha, kwargs)
    for key in ("block_alphas", "conv_block_alphas"):
        if any(a < 0 for a in blocks.get(key) or []):
            raise UserError(f"--network_args {key}={kwargs.get(key)}: alphas must be >= 0")
    threshold = parse_float_arg("block_lr_zero_threshold", kwargs.get("block_lr_zero_threshold"))
    if threshold is not None and threshold < 0:
        raise UserError(f"--network_args block_lr_zero_threshold={kwargs.get('block_lr_zero_threshold')}: "
                        "must be >= 0")
    return {"network_dim": network_dim, "network_alpha": network_alpha, "conv_dim": conv_dim,
            "conv_alpha": conv_alpha, "blocks": blocks, "extra": parse_extra_args(kwargs, dropouts["dropout"]),
            **dropouts}


def check_network_args(network_dim: int | None, network_alpha: float | None, neuron_dropout: Any = None,
                       **kwargs: Any) -> None:
    """Check what :func:`create_network` would get (``--network_dim``, ``--network_alpha``,
    ``--network_dropout``, ``--network_args``) without building anything, so a training script can refuse
    a bad value before it loads the model. Raises :class:`~library.errors.UserError` naming the option.
    Warnings (ignored or padded values) are left to :func:`create_network`, so they are said once."""
    with quiet_loggers(block_settings.__module__):
        resolve_network_args(network_dim, network_alpha, neuron_dropout, dict(kwargs))


def network_from_args(network_class: type, parsed: Mapping[str, Any], text_encoder: nn.Module | None,
                      unet: nn.Module | None, multiplier: float, **class_kwargs: Any) -> LoRANetwork:
    """A fresh ``network_class`` (a :class:`LoRANetwork`) from :func:`resolve_network_args`' result: ranks,
    alphas, 3×3 convolutions, block settings, dropouts, DoRA, rsLoRA and module rules, then its block
    learning rates and LoRA+ ratios set. ``class_kwargs`` (``module_class``, ``module_kwargs``) go to the class."""
    blocks, extra = parsed["blocks"], parsed["extra"]
    network = network_class(text_encoder, unet, multiplier=multiplier, lora_dim=parsed["network_dim"],
                            alpha=parsed["network_alpha"], conv_lora_dim=parsed["conv_dim"],
                            conv_alpha=parsed["conv_alpha"], dora=extra.dora_axis, rs_lora=extra.rs_lora,
                            module_rules=extra.rules, **{k: blocks.get(k) for k in BLOCK_SETTINGS},
                            **{k: parsed[k] for k in DROPOUT_ARGS}, **class_kwargs)
    if extra.loraplus is not None:
        network.set_loraplus_lr_ratio(*extra.loraplus.values())
    if blocks.get("block_lr"):
        down_w, mid_w, up_w = blocks["lr_weights"]
        network.set_block_lr_weight(up_w, mid_w, down_w)
    return network


def network_from_file(network_class: type, dims: Mapping[str, int], alphas: Mapping[str, float],
                      text_encoder: nn.Module | None, unet: nn.Module | None, multiplier: float,
                      for_inference: bool, kwargs: Mapping[str, Any], dropouts: Sequence[str] = DROPOUT_ARGS,
                      **class_kwargs: Any) -> LoRANetwork:
    """A ``network_class`` with one module per name of ``dims`` (rank) and ``alphas``, for a file's weights;
    of the extra ``kwargs`` (``--dim_from_weights`` training) the ``dropouts`` named are used (the neuron
    dropout from ``neuron_dropout``, else ``dropout``). ``class_kwargs`` go to the class."""
    parsed = parse_dropouts(kwargs.get("neuron_dropout"), kwargs, dropouts)
    return network_class(text_encoder, unet, multiplier=multiplier, modules_dim=dims, modules_alpha=alphas,
                         for_inference=for_inference, **parsed, **class_kwargs)


def create_network(multiplier: float, network_dim: int | None, network_alpha: float | None, vae: nn.Module | None,
                   text_encoder: nn.Module | None, unet: nn.Module | None, neuron_dropout: float | None = None,
                   **kwargs: Any) -> LoRANetwork:
    """Create a fresh LoRA network (``--network_module networks.lora``).

    ``network_dim`` None → 4; ``network_alpha`` None → 1.0 (0 → alpha = rank). ``kwargs`` are the
    ``--network_args`` (strings, parsed here): conv_dim, conv_alpha, block_dims, block_alphas,
    conv_block_dims, conv_block_alphas, down_lr_weight, mid_lr_weight, up_lr_weight,
    block_lr_zero_threshold, the later-upstream rank_dropout/module_dropout/dropout, and dora_wd,
    dora_axis, loraplus_lr_ratio, loraplus_unet_lr_ratio, loraplus_text_encoder_lr_ratio, rs_lora,
    module_rules (docs/train_network.md). An unknown or malformed key raises
    :class:`~library.errors.UserError`.
    """
    parsed = resolve_network_args(network_dim, network_alpha, neuron_dropout, kwargs)
    return network_from_args(LoRANetwork, parsed, text_encoder, unet, multiplier)


def create_network_from_weights(multiplier: float, file: str | os.PathLike | None, vae: nn.Module | None,
                                text_encoder: nn.Module | None, unet: nn.Module | None,
                                weights_sd: Mapping[str, torch.Tensor] | None = None, for_inference: bool = False,
                                **kwargs: Any) -> tuple[LoRANetwork, dict[str, torch.Tensor]]:
    """A network shaped like a LoRA file: one module per LoRA name in the weights, with its rank
    (rows of ``lora_down``) and alpha (rank where the file has none); 3×3 conv layers included.

    Returns ``(network, weights_sd)``; the weights are not loaded (call ``load_state_dict`` after
    ``apply_to``, or ``merge_to``). ``for_inference`` skips the random init. Of the extra
    ``kwargs`` (``--dim_from_weights`` training) the dropouts ``neuron_dropout``/``dropout``,
    ``rank_dropout`` and ``module_dropout`` are used, and the LoRA+ ratios; others are ignored. Modules
    with a ``dora_scale`` are DoRA modules, on the axis the tensor's shape tells.
    """
    if weights_sd is None:
        weights_sd, _ = load_state_dict_file(file)
    modules_dim, modules_alpha = dims_from_state_dict(weights_sd)
    network = network_from_file(LoRANetwork, modules_dim, modules_alpha, text_encoder, unet, multiplier,
                                for_inference, kwargs, dora=dora_shapes_from_state_dict(weights_sd) or None)
    loraplus = parse_extra_args({k: kwargs.get(k) for k in LORAPLUS_ARGS}, None).loraplus
    if loraplus is not None:
        network.set_loraplus_lr_ratio(*loraplus.values())
    return network, dict(weights_sd)
