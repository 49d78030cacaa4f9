"""The training side shared by LoHa (:mod:`networks.loha`) and LoKr (:mod:`networks.lokr`).

Both are built on the LoRA machinery of :mod:`networks.lora`: the same layers and module names, block
ranks and learning rates, conv_dim/conv_alpha for 3×3 convolutions, module rules, dropouts, saving,
loading, hooking and merging. Only the module differs: it holds the factors of its type (file key
names as parameter names, :mod:`networks.lycoris_common`) and rebuilds the full ΔW at every forward::

    y = org(x) + m · scale · op(x, ΔW)          op: the wrapped layer's linear / convolution

Training-time dropouts: ``dropout`` (``--network_dropout``) zeroes elements of the update's output,
``rank_dropout`` zeroes whole output channels of the update per sample (the rest scaled by 1/(1−p)),
``module_dropout`` skips the module for a forward pass.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Mapping

import torch
from torch import nn

from library.errors import UserError
from networks.lora import LoRANetwork, network_from_args, network_from_file, resolve_network_args
from networks.lora_module import LoRAModule, match_dtype
from networks.lora_common import DROPOUT_ARGS, adapt_shape, check_known_args, group_by_module, load_state_dict_file
from networks.lycoris_common import KIND_NAMES, LYCORIS_KEYS, lycoris_delta, lycoris_scale, module_kind

# The networks.lora keys that mean the same for LoHa/LoKr (parsed by networks.lora).
SHARED_NETWORK_ARGS = (
    "conv_dim", "conv_alpha", "block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas",
    "down_lr_weight", "mid_lr_weight", "up_lr_weight", "block_lr_zero_threshold",
    *DROPOUT_ARGS, "module_rules",
)


class LycorisModule(LoRAModule):
    """One LoHa/LoKr module on a Linear or Conv2d: ``org(x) + m · scale · op(x, ΔW)``.

    Subclasses register their factors (named as in the file) in ``_build_layers`` and initialise them
    in ``reset_parameters`` so that ΔW = 0 at the start. ``scale`` is alpha/rank, or 1 when
    ``unscaled`` (a LoKr module without a decomposed factor).
    """

    kind = ""
    unscaled = False

    def __init__(self, lora_name: str, org_module: nn.Module, multiplier: float = 1.0, lora_dim: int = 4,
                 alpha: float | int | torch.Tensor | None = 1, dropout: float | None = None,
                 rank_dropout: float | None = None, module_dropout: float | None = None,
                 init_weights: bool = True) -> None:
        """Build the factors (``_build_layers``), the alpha buffer and the layer's op arguments."""
        self.weight_shape = tuple(org_module.weight.shape)
        super().__init__(lora_name, org_module, multiplier, lora_dim, alpha, dropout=dropout,
                         rank_dropout=rank_dropout, module_dropout=module_dropout, init_weights=init_weights)
        if self.unscaled:
            self.register_buffer("alpha", torch.tensor(self.lora_dim))  # saved equal to dim, as LyCORIS does
            self.scale = 1.0

    def parts(self) -> Mapping[str, torch.Tensor]:
        """The factors by file key name (``hada_w1_a`` …): a read-only view of the module's own parameters
        (its only ones), made without copying them at every forward."""
        return MappingProxyType(self._parameters)

    def get_weights(self) -> dict[str, torch.Tensor]:
        """The factors as stored in a file (see :meth:`parts`)."""
        return self.parts()

    def delta_weight(self) -> torch.Tensor:
        """The unscaled ΔW in the wrapped layer's weight shape (differentiable)."""
        return lycoris_delta(self.parts()).reshape(self.weight_shape)

    def lora_forward(self, x: torch.Tensor) -> torch.Tensor:
        """``m · scale · op(x, ΔW)`` with the training-time dropouts."""
        weight = self.delta_weight()
        h, scale = self.apply_dropouts(self.layer_op(match_dtype(x, weight), weight), self.scale)
        return h * (self.multiplier * scale)

    @torch.no_grad()
    def merge_to(self, sd: Mapping[str, torch.Tensor] | None = None, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> None:
        """Add ``m · scale · ΔW`` to the wrapped weight (float32 sum, stored as ``dtype``), then unhook.

        ``sd``: this module's tensors from a file (factors and optionally ``alpha``); None: its own.
        """
        target = self.org_module.weight
        if sd is None:
            parts, scale = self.parts(), self.scale
        else:
            parts = {k: v for k, v in sd.items() if k in LYCORIS_KEYS}
            scale = lycoris_scale(parts, sd.get("alpha"))
        where = target.device if device is None else torch.device(device)
        delta = lycoris_delta({k: v.detach().to(where, torch.float32) for k, v in parts.items()})
        summed = target.detach().to(where, torch.float32) + delta.reshape(target.shape) * (self.multiplier * scale)
        self.org_module.weight.data = summed.to(target.dtype if dtype is None else dtype)
        self.restore()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """Accept flat or [.., 1, 1] factors for 1×1 layers; take the incoming alpha as it is; refresh the scale."""
        for name, param in self.named_parameters(recurse=False):
            key = prefix + name
            if key in state_dict:
                state_dict[key] = adapt_shape(state_dict[key], param.shape)
        incoming = self.take_file_alpha(state_dict, prefix)
        nn.Module._load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                                        unexpected_keys, error_msgs)
        if isinstance(incoming, torch.Tensor):
            self.scale = 1.0 if self.unscaled else float(self.alpha.float()) / self.lora_dim


# ----------------------------------------------------------------------------------------------
# Creating networks


@dataclass(frozen=True)
class LycorisType:
    """What the create functions need to know of one type."""

    kind: str                                   # "loha" / "lokr"
    module_class: type
    own_args: Mapping[str, Callable[[str, Any], Any]] = field(default_factory=dict)  # key → parser
    # A module's tensors from a file → (rank, per-module keyword arguments that reproduce its layout).
    layout_of: Callable[[Mapping[str, torch.Tensor]], tuple[int, dict[str, Any]]] | None = None

    @property
    def name(self) -> str:
        """``LoHa`` / ``LoKr``."""
        return KIND_NAMES[self.kind]

    def known_args(self) -> tuple[str, ...]:
        """Every ``--network_args`` key of this type."""
        return SHARED_NETWORK_ARGS + tuple(self.own_args)

    def split_args(self, kwargs: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """``(own keys parsed, shared keys as given)``; UserError for an unknown key."""
        check_known_args(kwargs, self.known_args())
        own = {key: parse(key, kwargs[key]) for key, parse in self.own_args.items() if kwargs.get(key) is not None}
        return own, {k: v for k, v in kwargs.items() if k not in self.own_args}


class _PerModule:
    """A module factory for :class:`LoRANetwork` that adds each module's own keyword arguments."""

    def __init__(self, module_class: type, per_module: Mapping[str, Mapping[str, Any]]) -> None:
        self.module_class, self.per_module = module_class, per_module

    def __call__(self, lora_name: str, layer: nn.Module, *args: Any, **kwargs: Any) -> LycorisModule:
        return self.module_class(lora_name, layer, *args, **kwargs, **self.per_module.get(lora_name, {}))


def check_args(kind: LycorisType, network_dim: int | None, network_alpha: float | None, neuron_dropout: Any,
               kwargs: Mapping[str, Any]) -> None:
    """What ``create_network`` would refuse, without building anything (UserError naming the option)."""
    from networks.lora import check_network_args

    check_network_args(network_dim, network_alpha, neuron_dropout, **kind.split_args(kwargs)[1])


def create(kind: LycorisType, multiplier: float, network_dim: int | None, network_alpha: float | None,
           text_encoder: nn.Module | None, unet: nn.Module | None, neuron_dropout: Any,
           kwargs: Mapping[str, Any]) -> LoRANetwork:
    """A fresh network of ``kind`` modules from the command-line values (see the type's ``create_network``)."""
    own, shared = kind.split_args(kwargs)
    parsed = resolve_network_args(network_dim, network_alpha, neuron_dropout, dict(shared))
    return network_from_args(LoRANetwork, parsed, text_encoder, unet, multiplier, module_class=kind.module_class,
                             module_kwargs=own)


def file_modules(weights_sd: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """``{module name: {key after the name: tensor}}`` of the LoHa/LoKr modules of a state dict."""
    return {name: parts for name, parts in group_by_module(weights_sd).items() if module_kind(parts) is not None}


def create_from_weights(kind: LycorisType, multiplier: float, file: str | os.PathLike | None,
                        text_encoder: nn.Module | None, unet: nn.Module | None,
                        weights_sd: Mapping[str, torch.Tensor] | None, for_inference: bool,
                        kwargs: Mapping[str, Any]) -> tuple[LoRANetwork, dict[str, torch.Tensor]]:
    """A network shaped like a file's ``kind`` modules (rank, alpha and layout per module); of ``kwargs``
    only the dropouts are used."""
    if weights_sd is None:
        weights_sd, _ = load_state_dict_file(file)
    modules = {n: parts for n, parts in file_modules(weights_sd).items() if module_kind(parts) == kind.kind}
    if not modules:
        found = sorted({module_kind(p) or "" for p in file_modules(weights_sd).values()} - {""})
        what = f"{KIND_NAMES[found[0]]} modules" if found else "no LoHa/LoKr modules"
        raise UserError(f"--network_weights {file}: has no {kind.name} modules ({what}); use the --network_module "
                        "the file was trained with")
    dims, alphas, per_module = {}, {}, {}
    for name, parts in modules.items():
        dims[name], per_module[name] = kind.layout_of(parts)
        alpha = parts.get("alpha")
        alphas[name] = float(alpha.float()) if alpha is not None else float(dims[name])
    network = network_from_file(LoRANetwork, dims, alphas, text_encoder, unet, multiplier, for_inference, kwargs,
                                module_class=_PerModule(kind.module_class, per_module))
    return network, dict(weights_sd)
