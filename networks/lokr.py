"""LoKr networks (``--network_module networks.lokr``): the update of a layer is a Kronecker product,
``ΔW = kron(w1, w2)`` with w1 [a, c] and w2 [b, d] where out = a·b and in = c·d.

Same layers, names and options as :mod:`networks.lora` (``conv_dim``/``conv_alpha`` for the 3×3
convolutions, block ranks and learning rates, module rules, the dropouts); files are LyCORIS's LoKr
layout (``lokr_w1`` …, :mod:`networks.lycoris_common`), read by AUTOMATIC1111 and ComfyUI.

Shapes of one module of rank r = ``--network_dim`` (:func:`lokr_layout`, LyCORIS's rules):

- ``(a, b)`` and ``(c, d)`` are :func:`~networks.lycoris_common.factorization` of out and in with the
  ``factor`` network arg (default -1: as balanced as possible; a factor f that divides the size gives
  the split (f, size/f), smaller side first). The smaller sides a, c go to w1.
- w2 is decomposed into ``lokr_w2_a`` [b, r] · ``lokr_w2_b`` [r, d·kh·kw] when r < max(b, d)/2, else it
  is the full ``lokr_w2`` [b, d(, kh, kw)]. With ``use_tucker=true`` a decomposed w2 of a k×k
  convolution is ``lokr_t2`` [r, r, kh, kw] with ``lokr_w2_a`` [r, b], ``lokr_w2_b`` [r, d].
- w1 is the full ``lokr_w1`` [a, c], or with ``decompose_both=true`` and r < max(a, c)/2
  ``lokr_w1_a`` [a, r] · ``lokr_w1_b`` [r, c].
- The update is scaled by alpha/r when a factor is decomposed, and by 1 when both are full; alpha is
  then saved equal to r (as LyCORIS does).

Initialisation: w1 (or w1_a, w1_b), w2_a and t2 Kaiming-uniform, w2 (or w2_b) zero, so ΔW = 0 at the
start while the zero factor gets a gradient (through the non-zero w1) from the first step.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn

from library.errors import UserError
from networks.lora_common import args_error, parse_int_arg
from networks.lora_options import parse_bool_arg
from networks.lycoris_base import LycorisModule, LycorisType, check_args, create, create_from_weights
from networks.lycoris_common import factorization


@dataclass(frozen=True)
class LoKrLayout:
    """The factor shapes of one module: out = a·b, in = c·d, and which factors are decomposed."""

    a: int
    b: int
    c: int
    d: int
    w1_decomposed: bool
    w2_decomposed: bool
    tucker: bool = False


def lokr_layout(out: int, inp: int, kernel: tuple[int, ...], dim: int, factor: int = -1,
                decompose_both: bool = False, use_tucker: bool = False) -> LoKrLayout:
    """The layout of a fresh module of rank ``dim`` on a layer [out, inp, *kernel] (module docstring)."""
    a, b = factorization(out, factor)
    c, d = factorization(inp, factor)
    w2_decomposed = dim < max(b, d) / 2
    tucker = bool(use_tucker) and w2_decomposed and len(kernel) == 2 and tuple(kernel) != (1, 1)
    return LoKrLayout(a, b, c, d, bool(decompose_both) and dim < max(a, c) / 2, w2_decomposed, tucker)


class LoKrModule(LycorisModule):
    """One LoKr module on a Linear or Conv2d."""

    kind = "lokr"

    def __init__(self, lora_name: str, org_module: nn.Module, multiplier: float = 1.0, lora_dim: int = 4,
                 alpha: float | int | torch.Tensor | None = 1, dropout: float | None = None,
                 rank_dropout: float | None = None, module_dropout: float | None = None,
                 init_weights: bool = True, factor: int = -1, decompose_both: bool = False,
                 use_tucker: bool = False, file_layout: tuple[int, int, bool, bool, bool] | None = None) -> None:
        """The layout follows :func:`lokr_layout` with the other arguments, or a file's ``file_layout``
        ``(a, c, w1 decomposed, w2 decomposed, Tucker)``."""
        out, inp, *kernel = org_module.weight.shape
        if file_layout is None:
            self.layout = lokr_layout(out, inp, kernel, int(lora_dim), factor, decompose_both, use_tucker)
        else:
            a, c, *flags = file_layout
            if out % a or inp % c:
                raise UserError(f"LoKr module {lora_name}: its w1 [{a}, {c}] does not divide the layer "
                                f"({inp}→{out}); the file was made for another model")
            self.layout = LoKrLayout(a, out // a, c, inp // c, *flags)
        layout = self.layout
        self.unscaled = not (layout.w1_decomposed or layout.w2_decomposed)
        super().__init__(lora_name, org_module, multiplier, lora_dim, alpha, dropout=dropout,
                         rank_dropout=rank_dropout, module_dropout=module_dropout, init_weights=init_weights)

    def _build_layers(self, org: nn.Module) -> None:
        """Register ``lokr_w1`` or ``lokr_w1_a``/``_b``, and ``lokr_w2`` or ``lokr_w2_a``/``_b`` (+ ``lokr_t2``)."""
        lay, r = self.layout, self.lora_dim
        kernel = tuple(self.weight_shape[2:])
        shapes: dict[str, tuple[int, ...]] = {}
        if lay.w1_decomposed:
            shapes.update(lokr_w1_a=(lay.a, r), lokr_w1_b=(r, lay.c))
        else:
            shapes["lokr_w1"] = (lay.a, lay.c)
        if lay.tucker:
            shapes.update(lokr_t2=(r, r, *kernel), lokr_w2_a=(r, lay.b), lokr_w2_b=(r, lay.d))
        elif lay.w2_decomposed:
            shapes.update(lokr_w2_a=(lay.b, r), lokr_w2_b=(r, lay.d * math.prod(kernel)))
        else:
            shapes["lokr_w2"] = (lay.b, lay.d, *kernel)
        for name, shape in shapes.items():
            self.register_parameter(name, nn.Parameter(torch.empty(shape)))

    def reset_parameters(self) -> None:
        """Kaiming-uniform (a = √5) for all factors but the last of w2 (``lokr_w2`` or ``lokr_w2_b``): zero."""
        zero = "lokr_w2_b" if self.layout.w2_decomposed else "lokr_w2"
        for name, param in self.named_parameters(recurse=False):
            if name == zero:
                nn.init.zeros_(param)
            else:
                nn.init.kaiming_uniform_(param, a=math.sqrt(5))


def _layout_of(parts: Mapping[str, torch.Tensor]) -> tuple[int, dict[str, Any]]:
    """Rank and layout of a module in a file (rank: that of a decomposed factor; else alpha, as saved)."""
    if "lokr_w1" in parts:
        a, c = parts["lokr_w1"].shape
    else:
        a, c = parts["lokr_w1_a"].shape[0], parts["lokr_w1_b"].shape[1]
    decomposed = [parts[k] for k in ("lokr_w1_b", "lokr_w2_b") if k in parts]
    if decomposed:
        rank = decomposed[0].shape[0]
    else:
        alpha = parts.get("alpha")
        rank = max(1, round(float(alpha.float()))) if alpha is not None else 1
    flags = ("lokr_w1_a" in parts, "lokr_w2_a" in parts, "lokr_t2" in parts)
    return int(rank), {"file_layout": (int(a), int(c), *flags)}


def _parse_factor(key: str, value: Any) -> int:
    """``factor``: -1 or a positive integer."""
    factor = parse_int_arg(key, value)
    if factor != -1 and factor < 1:
        raise args_error(key, value, "must be -1 (split each size as evenly as possible) or a positive integer")
    return factor


LOKR = LycorisType("lokr", LoKrModule,
                   {"factor": _parse_factor, "decompose_both": parse_bool_arg, "use_tucker": parse_bool_arg},
                   _layout_of)


def check_network_args(network_dim: int | None, network_alpha: float | None, neuron_dropout: Any = None,
                       **kwargs: Any) -> None:
    """Check the options :func:`create_network` would get without building anything (UserError)."""
    check_args(LOKR, network_dim, network_alpha, neuron_dropout, kwargs)


def create_network(multiplier: float, network_dim: int | None, network_alpha: float | None, vae: nn.Module | None,
                   text_encoder: nn.Module | None, unet: nn.Module | None, neuron_dropout: float | None = None,
                   **kwargs: Any):
    """A fresh LoKr network. ``network_dim`` None → 4, ``network_alpha`` None → 1 (0 → alpha = rank).

    ``--network_args``: ``factor`` (int, default -1), ``decompose_both`` and ``use_tucker`` (true/false),
    and the networks.lora keys conv_dim, conv_alpha, block_dims, block_alphas, conv_block_dims,
    conv_block_alphas, down/mid/up_lr_weight, block_lr_zero_threshold, dropout, rank_dropout,
    module_dropout, module_rules.
    """
    return create(LOKR, multiplier, network_dim, network_alpha, text_encoder, unet, neuron_dropout, kwargs)


def create_network_from_weights(multiplier: float, file: str | os.PathLike | None, vae: nn.Module | None,
                                text_encoder: nn.Module | None, unet: nn.Module | None,
                                weights_sd: Mapping[str, torch.Tensor] | None = None, for_inference: bool = False,
                                **kwargs: Any):
    """A LoKr network shaped like a file (rank, alpha and factor shapes per module); returns
    ``(network, weights)`` without loading them. Of ``kwargs`` the dropouts are used."""
    return create_from_weights(LOKR, multiplier, file, text_encoder, unet, weights_sd, for_inference, kwargs)
