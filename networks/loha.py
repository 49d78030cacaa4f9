"""LoHa networks (``--network_module networks.loha``): the update of a layer is the Hadamard product of
two rank-r matrices, ``ΔW = (w1_a·w1_b) ⊙ (w2_a·w2_b) · alpha/r``, whose rank can reach r².

Same layers, names and options as :mod:`networks.lora` (``conv_dim``/``conv_alpha`` for the 3×3
convolutions, block ranks and learning rates, module rules, the dropouts); files are LyCORIS's LoHa
layout (``hada_w1_a`` …, :mod:`networks.lycoris_common`), read by AUTOMATIC1111 and ComfyUI.

``--network_args use_tucker=true`` stores the 3×3 convolutions in Tucker form (``hada_t1``/``hada_t2``
cores [r, r, 3, 3]; w_a [r, out], w_b [r, in]) instead of flat factors [r, in·3·3].

Initialisation (as LyCORIS): w1_a ~ N(0, 0.1²), w1_b and w2_b ~ N(0, 1), Tucker cores ~ N(0, 0.1²) and
w2_a = 0, so ΔW = 0 at the start while every factor gets a gradient after the first step.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import torch
from torch import nn

from networks.lora_options import parse_bool_arg
from networks.lycoris_base import LycorisModule, LycorisType, check_args, create, create_from_weights


class LoHaModule(LycorisModule):
    """One LoHa module (plain or Tucker form) on a Linear or Conv2d."""

    kind = "loha"

    def __init__(self, lora_name: str, org_module: nn.Module, multiplier: float = 1.0, lora_dim: int = 4,
                 alpha: float | int | torch.Tensor | None = 1, dropout: float | None = None,
                 rank_dropout: float | None = None, module_dropout: float | None = None,
                 init_weights: bool = True, use_tucker: bool = False) -> None:
        """``use_tucker`` applies to k×k convolutions only (other layers always use flat factors)."""
        self.tucker = bool(use_tucker) and isinstance(org_module, nn.Conv2d) and tuple(org_module.kernel_size) != (1, 1)
        super().__init__(lora_name, org_module, multiplier, lora_dim, alpha, dropout=dropout,
                         rank_dropout=rank_dropout, module_dropout=module_dropout, init_weights=init_weights)

    def _build_layers(self, org: nn.Module) -> None:
        """``hada_w{1,2}_a`` [out, r] and ``_b`` [r, in·kh·kw]; Tucker: ``hada_t{1,2}`` [r, r, kh, kw],
        ``_a`` [r, out], ``_b`` [r, in]."""
        out, inp, *kernel = self.weight_shape
        r = self.lora_dim
        for i in ("1", "2"):
            if self.tucker:
                shapes = {"a": (r, out), "b": (r, inp), "t": (r, r, *kernel)}
            else:
                shapes = {"a": (out, r), "b": (r, inp * (kernel[0] * kernel[1] if kernel else 1))}
            for part, shape in shapes.items():
                name = f"hada_t{i}" if part == "t" else f"hada_w{i}_{part}"
                self.register_parameter(name, nn.Parameter(torch.empty(shape)))

    def reset_parameters(self) -> None:
        """w1_a ~ N(0, 0.1²), w1_b, w2_b ~ N(0, 1), cores ~ N(0, 0.1²), w2_a = 0 (ΔW = 0)."""
        nn.init.normal_(self.hada_w1_a, std=0.1)
        nn.init.normal_(self.hada_w1_b, std=1.0)
        nn.init.normal_(self.hada_w2_b, std=1.0)
        nn.init.zeros_(self.hada_w2_a)
        if self.tucker:
            nn.init.normal_(self.hada_t1, std=0.1)
            nn.init.normal_(self.hada_t2, std=0.1)


def _layout_of(parts: Mapping[str, torch.Tensor]) -> tuple[int, dict[str, Any]]:
    """Rank (rows of ``hada_w1_b``) and form (Tucker when ``hada_t1`` is present) of a module in a file."""
    return int(parts["hada_w1_b"].shape[0]), {"use_tucker": "hada_t1" in parts}


LOHA = LycorisType("loha", LoHaModule, {"use_tucker": parse_bool_arg}, _layout_of)


def check_network_args(network_dim: int | None, network_alpha: float | None, neuron_dropout: Any = None,
                       **kwargs: Any) -> None:
    """Check the options :func:`create_network` would get without building anything (UserError)."""
    check_args(LOHA, network_dim, network_alpha, neuron_dropout, kwargs)


def create_network(multiplier: float, network_dim: int | None, network_alpha: float | None, vae: nn.Module | None,
                   text_encoder: nn.Module | None, unet: nn.Module | None, neuron_dropout: float | None = None,
                   **kwargs: Any):
    """A fresh LoHa network. ``network_dim`` None → 4, ``network_alpha`` None → 1 (0 → alpha = rank).

    ``--network_args``: ``use_tucker`` (true/false) and the networks.lora keys conv_dim, conv_alpha,
    block_dims, block_alphas, conv_block_dims, conv_block_alphas, down/mid/up_lr_weight,
    block_lr_zero_threshold, dropout, rank_dropout, module_dropout, module_rules.
    """
    return create(LOHA, multiplier, network_dim, network_alpha, text_encoder, unet, neuron_dropout, kwargs)


def create_network_from_weights(multiplier: float, file: str | os.PathLike | None, vae: nn.Module | None,
                                text_encoder: nn.Module | None, unet: nn.Module | None,
                                weights_sd: Mapping[str, torch.Tensor] | None = None, for_inference: bool = False,
                                **kwargs: Any):
    """A LoHa network shaped like a file (rank, alpha and form per module); returns ``(network, weights)``
    without loading them. Of ``kwargs`` the dropouts are used."""
    return create_from_weights(LOHA, multiplier, file, text_encoder, unet, weights_sd, for_inference, kwargs)
