"""DyLoRA networks (``--network_module networks.dylora``, training_behaviour.md §16).

The same layers and names as :mod:`networks.lora`. Each module keeps its rank components in
``unit``-sized chunks; every training forward picks a random chunk ``b`` (a multiple of ``unit``),
only that chunk receives gradients, and the update uses all components scaled by
``alpha/rank · √(rank / (b + unit))``. Files use the plain LoRA layout (chunks concatenated into
``lora_down.weight``/``lora_up.weight``), so lower-rank LoRAs can be cut out later
(:meth:`DyLoRANetwork.state_dict_at_rank`).

Outside training (``eval()``) a module applies its full rank with scale ``alpha/rank``, i.e. exactly
what the saved file does as a LoRA; :meth:`DyLoRANetwork.set_rank` restricts it to the first ``r``
components with scale ``alpha/r`` (the cut-out rank-``r`` LoRA).
"""

from __future__ import annotations

import math
import os
import random
from typing import Any, Mapping

import torch
from torch import nn

from library.errors import UserError
from networks.lora import DEFAULT_NETWORK_DIM, LoRAModule, LoRANetwork, match_dtype
from networks.lora_common import (
    adapt_shape,
    check_known_args,
    dims_from_state_dict,
    load_state_dict_file,
    parse_dropout_arg,
    parse_float_arg,
    parse_int_arg,
)

KNOWN_NETWORK_ARGS = ("unit", "conv_dim", "conv_alpha")


class DyLoRAModule(LoRAModule):
    """A LoRA module whose rank components are trained one ``unit``-sized chunk at a time."""

    def __init__(self, lora_name: str, org_module: nn.Module, multiplier: float = 1.0, lora_dim: int = 4,
                 alpha: float | int | torch.Tensor | None = 1, unit: int = 1, dropout: float | None = None,
                 rank_dropout: float | None = None, module_dropout: float | None = None,
                 init_weights: bool = True) -> None:
        """Create ``lora_dim / unit`` down/up chunks (kaiming-uniform down, zero up).

        Only the neuron ``dropout`` is supported; rank/module dropout are ignored (as upstream).
        """
        if unit < 1 or int(lora_dim) % unit != 0:
            raise UserError(f"DyLoRA: the rank ({lora_dim}) of {lora_name} must be a multiple of "
                            f"--network_args unit={unit}")
        self.unit = unit
        self.inference_rank: int | None = None
        super().__init__(lora_name, org_module, multiplier, lora_dim, alpha, dropout=dropout,
                         init_weights=init_weights)

    def _build_layers(self, org: nn.Module) -> None:
        """One down/up parameter pair per chunk: down [unit, in(, k, k)], up [out, unit(, 1, 1)]."""
        if self.is_conv:
            in_dim, out_dim = org.in_channels, org.out_channels
            down_tail, up_tail = tuple(org.kernel_size), (1, 1)
        else:
            in_dim, out_dim = org.in_features, org.out_features
            down_tail, up_tail = (), ()
        self.num_chunks = self.lora_dim // self.unit
        self.lora_down_chunks = [f"lora_down_{i}" for i in range(self.num_chunks)]
        self.lora_up_chunks = [f"lora_up_{i}" for i in range(self.num_chunks)]
        for down_name, up_name in zip(self.lora_down_chunks, self.lora_up_chunks):
            self.register_parameter(down_name, nn.Parameter(torch.zeros(self.unit, in_dim, *down_tail)))
            self.register_parameter(up_name, nn.Parameter(torch.zeros(out_dim, self.unit, *up_tail)))
        self._down_shape = (self.lora_dim, in_dim, *down_tail)
        self._up_shape = (out_dim, self.lora_dim, *up_tail)

    def _chunks(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        return ([getattr(self, n) for n in self.lora_down_chunks], [getattr(self, n) for n in self.lora_up_chunks])

    def reset_parameters(self) -> None:
        """Down chunks Kaiming-uniform (a = √5, fan-in of the full layer), up chunks zeros."""
        downs, ups = self._chunks()
        for d, u in zip(downs, ups):
            nn.init.kaiming_uniform_(d, a=math.sqrt(5))
            nn.init.zeros_(u)

    def get_weights(self, rank: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(down [rank, …], up [out, rank, …]) of the first ``rank`` components (all by default)."""
        downs, ups = self._chunks()
        down, up = torch.cat(downs, dim=0), torch.cat(ups, dim=1)
        if rank is not None:
            down, up = down[:rank], up[:, :rank]
        return down, up

    def pick_slot(self) -> int:
        """A random chunk start ``b = r − r mod unit`` with r uniform in 0 … rank−1 (Python ``random``)."""
        r = random.randint(0, self.lora_dim - 1)
        return r - r % self.unit

    def _low_rank(self, x: torch.Tensor, down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """``up(dropout(down(x)))``: down with the layer's own stride/padding, up a 1×1 map."""
        h, _ = self.apply_dropouts(self.layer_op(match_dtype(x, down), down), 1.0)  # neuron dropout only
        return torch.nn.functional.conv2d(h, up) if self.is_conv else torch.nn.functional.linear(h, up)

    def lora_forward(self, x: torch.Tensor, slot: int | None = None) -> torch.Tensor:
        """The scaled update. Training: chunk ``slot`` (random if None) trainable, all components
        used, scale ``alpha/rank·√(rank/(slot+unit))``; otherwise full or ``inference_rank`` rank."""
        if self.inference_rank is not None:
            down, up = self.get_weights(self.inference_rank)
            scale = float(self.alpha.float()) / self.inference_rank
        elif self.training:
            slot = self.pick_slot() if slot is None else slot
            trained = slot // self.unit
            downs, ups = self._chunks()
            for i, (d, u) in enumerate(zip(downs, ups)):
                d.requires_grad_(i == trained)
                u.requires_grad_(i == trained)
            down, up = self.get_weights()
            scale = self.scale * math.sqrt(self.lora_dim / (slot + self.unit))
        else:
            down, up = self.get_weights()
            scale = self.scale
        return self._low_rank(x, down, up) * (self.multiplier * scale)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``org(x) + update`` (see :meth:`lora_forward`)."""
        out = self.org_forward(x, *args, **kwargs)
        if self.multiplier == 0:
            return out
        return out + self.lora_forward(x).to(out.dtype)

    # -- state dict in the plain LoRA layout ----------------------------------------------------

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        """Write ``lora_down.weight``, ``lora_up.weight`` (concatenated chunks) and ``alpha``."""
        down, up = self.get_weights()
        destination[prefix + "alpha"] = self.alpha if keep_vars else self.alpha.detach()
        destination[prefix + "lora_down.weight"] = down if keep_vars else down.detach()
        destination[prefix + "lora_up.weight"] = up if keep_vars else up.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """Split ``lora_down.weight``/``lora_up.weight`` into the chunks; take ``alpha`` as given."""
        downs, ups = self._chunks()
        for key, shape, params, dim in (("lora_down.weight", self._down_shape, downs, 0),
                                        ("lora_up.weight", self._up_shape, ups, 1)):
            full = prefix + key
            if full not in state_dict:
                missing_keys.append(full)
                continue
            tensor = adapt_shape(state_dict[full], torch.Size(shape))
            if tuple(tensor.shape) != tuple(shape):
                error_msgs.append(f"size mismatch for {full}: copying a param with shape {tuple(tensor.shape)}, "
                                  f"the shape in the current model is {tuple(shape)}.")
                continue
            with torch.no_grad():
                for p, part in zip(params, tensor.split(self.unit, dim=dim)):
                    p.copy_(part)
        alpha_key = prefix + "alpha"
        if alpha_key in state_dict:
            incoming = state_dict[alpha_key]
            self._buffers["alpha"] = incoming.detach().reshape(()).clone().to(self.alpha.device)
            self.scale = float(self.alpha.float()) / self.lora_dim
        else:
            missing_keys.append(alpha_key)
        if strict:
            ours = {prefix + k for k in ("lora_down.weight", "lora_up.weight", "alpha")}
            unexpected_keys.extend(k for k in state_dict if k.startswith(prefix) and k not in ours)


class DyLoRANetwork(LoRANetwork):
    """A LoRA network made of :class:`DyLoRAModule` (no block-wise settings)."""

    def __init__(self, text_encoder: nn.Module | None, unet: nn.Module | None, multiplier: float = 1.0,
                 lora_dim: int = DEFAULT_NETWORK_DIM, alpha: float | int | None = 1, apply_to_conv: bool = False,
                 unit: int = 1, dropout: float | None = None, modules_dim: Mapping[str, int] | None = None,
                 modules_alpha: Mapping[str, float] | None = None, for_inference: bool = False) -> None:
        """Create DyLoRA modules; with ``apply_to_conv`` 3×3 convs get ``lora_dim``/``alpha`` too."""
        self.unit = unit
        super().__init__(text_encoder, unet, multiplier=multiplier, lora_dim=lora_dim, alpha=alpha, dropout=dropout,
                         conv_lora_dim=lora_dim if apply_to_conv else None, conv_alpha=alpha if apply_to_conv else None,
                         modules_dim=modules_dim, modules_alpha=modules_alpha, module_class=DyLoRAModule,
                         module_kwargs={"unit": unit}, for_inference=for_inference)

    def set_rank(self, rank: int | None) -> None:
        """Use only the first ``rank`` components (scale alpha/rank) in every forward; None: normal."""
        for lora in self.all_loras():
            if rank is not None and (rank <= 0 or rank > lora.lora_dim or rank % lora.unit):
                raise ValueError(f"rank {rank} is not a multiple of unit {lora.unit} within 1…{lora.lora_dim} "
                                 f"for {lora.lora_name}")
            lora.inference_rank = rank

    def state_dict_at_rank(self, rank: int) -> dict[str, torch.Tensor]:
        """The rank-``rank`` LoRA cut out of this network: first components of down/up, alpha kept."""
        sd = {}
        for key, value in self.state_dict().items():
            if key.endswith("lora_down.weight"):
                value = value[:rank]
            elif key.endswith("lora_up.weight"):
                value = value[:, :rank]
            sd[key] = value.detach().clone().contiguous()
        return sd


def create_network(multiplier: float, network_dim: int | None, network_alpha: float | None, vae: nn.Module | None,
                   text_encoder: nn.Module | None, unet: nn.Module | None, neuron_dropout: float | None = None,
                   **kwargs: Any) -> DyLoRANetwork:
    """Create a fresh DyLoRA network (``--network_module networks.dylora``).

    ``--network_args``: ``unit`` (int, default 1; the rank must be a multiple), ``conv_dim`` (must
    equal the rank; switches 3×3 convs on), ``conv_alpha`` (parsed, unused).
    """
    check_known_args(kwargs, KNOWN_NETWORK_ARGS)
    if network_dim is None:
        network_dim = DEFAULT_NETWORK_DIM
    if network_alpha is None:
        network_alpha = 1.0
    unit = parse_int_arg("unit", kwargs.get("unit"))
    unit = 1 if unit is None else unit
    if unit < 1 or network_dim % unit != 0:
        raise UserError(f"--network_args unit={unit}: --network_dim ({network_dim}) must be a multiple of unit")
    conv_dim = parse_int_arg("conv_dim", kwargs.get("conv_dim"))
    parse_float_arg("conv_alpha", kwargs.get("conv_alpha"))
    if conv_dim is not None and conv_dim != network_dim:
        raise UserError(f"--network_args conv_dim={conv_dim}: DyLoRA needs conv_dim equal to --network_dim "
                        f"({network_dim})")
    dropout = parse_dropout_arg("neuron_dropout", neuron_dropout)
    return DyLoRANetwork(text_encoder, unet, multiplier=multiplier, lora_dim=network_dim, alpha=network_alpha,
                         apply_to_conv=conv_dim is not None, unit=unit, dropout=dropout)


def create_network_from_weights(multiplier: float, file: str | os.PathLike | None, vae: nn.Module | None,
                                text_encoder: nn.Module | None, unet: nn.Module | None,
                                weights_sd: Mapping[str, torch.Tensor] | None = None, for_inference: bool = False,
                                **kwargs: Any) -> tuple[DyLoRANetwork, dict[str, torch.Tensor]]:
    """A DyLoRA network shaped like a file (ranks/alphas per module); ``unit`` from kwargs (default 1)."""
    if weights_sd is None:
        weights_sd, _ = load_state_dict_file(file)
    unit = parse_int_arg("unit", kwargs.get("unit"))
    modules_dim, modules_alpha = dims_from_state_dict(weights_sd)
    network = DyLoRANetwork(text_encoder, unet, multiplier=multiplier, unit=1 if unit is None else unit,
                            modules_dim=modules_dim, modules_alpha=modules_alpha, for_inference=for_inference)
    return network, dict(weights_sd)
