"""LoRA networks for Stable Diffusion 1.x/2.x (``--network_module networks.lora``).

Files are the kohya-ss/sd-scripts layout (file_formats.md §1) and load in AUTOMATIC1111, ComfyUI
and diffusers. Module selection: Linear and 1×1 convs inside ``Transformer2DModel`` (UNet) and
``CLIPAttention``/``CLIPMLP`` (text encoder); with ``conv_dim``/``conv_block_dims`` also the layers
of ``ResnetBlock2D``/``Downsample2D``/``Upsample2D`` (3×3 convs at the conv rank).

Use from Python on a diffusers pipeline::

    network, sd = create_network_from_weights(1.0, "my_lora.safetensors", pipe.vae, pipe.text_encoder, pipe.unet)
    network.apply_to(pipe.text_encoder, pipe.unet)   # hook the forwards …
    network.load_state_dict(sd)
    network.set_multiplier(0.8)
    # … or bake it in instead: network.merge_to(pipe.text_encoder, pipe.unet, sd)
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any, Iterable, Mapping

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
    adapt_shape,
    block_index,
    block_lr_weight_of,
    block_settings,
    check_known_args,
    dims_from_state_dict,
    find_target_modules,
    is_conv3x3,
    load_state_dict_file,
    lora_delta,
    parse_float_arg,
    parse_int_arg,
    save_state_dict_file,
)

logger = logging.getLogger(__name__)

DEFAULT_NETWORK_DIM = 4

# --network_args keys understood by create_network (values arrive as strings).
KNOWN_NETWORK_ARGS = (
    "conv_dim", "conv_alpha", "block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas",
    "down_lr_weight", "mid_lr_weight", "up_lr_weight", "block_lr_zero_threshold",
    "dropout", "rank_dropout", "module_dropout",
)


def match_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x`` cast to the LoRA weight's dtype, unless autocast will choose the dtype anyway."""
    if x.dtype == weight.dtype:
        return x
    try:
        autocast = torch.is_autocast_enabled(x.device.type)
    except TypeError:  # torch < 2.4 has no device-type argument
        autocast = torch.is_autocast_enabled()
    return x if autocast else x.to(weight.dtype)


class LoRAModule(nn.Module):
    """A low-rank update ``m · (alpha/rank) · up(down(x))`` added to one Linear or Conv2d.

    The wrapped layer is kept outside the module tree (its weights never appear in the network's
    state dict, and the LoRA weights never in the base model's). ``apply_to`` replaces the layer's
    ``forward``; ``restore`` undoes it; ``merge_to`` adds the update to the layer's weight.
    """

    def __init__(self, lora_name: str, org_module: nn.Module, multiplier: float = 1.0, lora_dim: int = 4,
                 alpha: float | int | torch.Tensor | None = 1, dropout: float | None = None,
                 rank_dropout: float | None = None, module_dropout: float | None = None,
                 init_weights: bool = True) -> None:
        """Create the down/up layers for ``org_module`` (kaiming-uniform down, zero up)."""
        super().__init__()
        self.lora_name = lora_name
        self.lora_dim = int(lora_dim)
        self.is_conv = isinstance(org_module, nn.Conv2d)
        self.is_conv3x3 = is_conv3x3(org_module)
        self._build_layers(org_module)
        if init_weights:
            self.reset_parameters()
        if isinstance(alpha, torch.Tensor):
            alpha = float(alpha.detach().float())
        if alpha is None or alpha == 0:
            alpha = self.lora_dim
        # A Python int stays int64, a float float32 (the on-disk dtype of an unconverted save).
        self.register_buffer("alpha", torch.tensor(alpha))
        self.scale = float(alpha) / self.lora_dim
        self.multiplier = multiplier
        self.dropout = dropout
        self.rank_dropout = rank_dropout
        self.module_dropout = module_dropout
        self._org_module = [org_module]  # a list keeps it out of the module tree
        self.org_forward = None
        self._had_own_forward = False

    def _build_layers(self, org: nn.Module) -> None:
        """Create ``lora_down``/``lora_up`` matching the wrapped layer's type and shape."""
        if self.is_conv:
            self.lora_down = nn.Conv2d(org.in_channels, self.lora_dim, org.kernel_size, org.stride, org.padding,
                                       bias=False)
            self.lora_up = nn.Conv2d(self.lora_dim, org.out_channels, 1, 1, bias=False)
        else:
            self.lora_down = nn.Linear(org.in_features, self.lora_dim, bias=False)
            self.lora_up = nn.Linear(self.lora_dim, org.out_features, bias=False)

    def reset_parameters(self) -> None:
        """Down: Kaiming-uniform with a = √5; up: zeros (so a fresh module changes nothing)."""
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)

    @property
    def org_module(self) -> nn.Module:
        """The wrapped Linear/Conv2d."""
        return self._org_module[0]

    # -- hooking -------------------------------------------------------------------------------

    def apply_to(self) -> None:
        """Replace the wrapped layer's ``forward`` by this module's (idempotent)."""
        if self.org_forward is not None:
            return
        org = self.org_module
        self._had_own_forward = "forward" in org.__dict__
        self.org_forward = org.forward
        org.forward = self.forward

    def restore(self) -> None:
        """Give the wrapped layer its own ``forward`` back."""
        if self.org_forward is None:
            return
        org = self.org_module
        if self._had_own_forward:
            org.forward = self.org_forward
        else:
            org.__dict__.pop("forward", None)
        self.org_forward = None

    def set_multiplier(self, multiplier: float) -> None:
        """Change the strength ``m`` of this module."""
        self.multiplier = multiplier

    # -- maths ---------------------------------------------------------------------------------

    def get_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The full (down, up) weights as stored in a file."""
        return self.lora_down.weight, self.lora_up.weight

    def lora_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The scaled update ``m · s · up(down(x))`` with the training-time dropouts."""
        h = self.lora_down(match_dtype(x, self.lora_down.weight))
        if self.dropout is not None and self.training:
            h = torch.nn.functional.dropout(h, p=self.dropout)
        scale = self.scale
        if self.rank_dropout is not None and self.training:
            keep = torch.rand((h.shape[0], self.lora_dim), device=h.device) > self.rank_dropout
            if self.is_conv:
                keep = keep[:, :, None, None]
            else:
                keep = keep.reshape(h.shape[0], *([1] * (h.dim() - 2)), self.lora_dim)
            h = h * keep.to(h.dtype)
            scale = scale / (1.0 - self.rank_dropout)
        return self.lora_up(h) * (self.multiplier * scale)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``org(x) + m · (alpha/rank) · up(down(x))``."""
        out = self.org_forward(x, *args, **kwargs)
        if self.multiplier == 0:
            return out
        if self.module_dropout is not None and self.training and torch.rand(1).item() < self.module_dropout:
            return out
        return out + self.lora_forward(x).to(out.dtype)

    @torch.no_grad()
    def merge_to(self, sd: Mapping[str, torch.Tensor] | None = None, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> None:
        """Add ``m · s · ΔW`` to the wrapped weight (computed in float32, stored as ``dtype``).

        ``sd`` holds ``lora_down.weight``/``lora_up.weight`` (and optionally ``alpha``); without it
        this module's own weights are used. A hooked forward is restored so the update is not
        applied twice.
        """
        org = self.org_module
        weight = org.weight
        device = weight.device if device is None else torch.device(device)
        dtype = weight.dtype if dtype is None else dtype
        if sd is None:
            down, up = self.get_weights()
            scale = self.scale
        else:
            down, up = sd["lora_down.weight"], sd["lora_up.weight"]
            alpha = float(sd["alpha"]) if "alpha" in sd else float(down.shape[0])
            scale = alpha / down.shape[0]
        down = down.detach().to(device=device, dtype=torch.float32)
        up = up.detach().to(device=device, dtype=torch.float32)
        if weight.dim() == 4 and down.dim() == 2:  # 2-D file, conv layer
            down, up = down[:, :, None, None], up[:, :, None, None]
        elif weight.dim() == 2 and down.dim() == 4:  # 4-D file (1×1), linear layer
            down, up = down.flatten(1), up.flatten(1)
        delta = lora_delta(down, up).reshape(weight.shape)
        merged = weight.detach().to(device=device, dtype=torch.float32) + self.multiplier * scale * delta
        org.weight.data = merged.to(dtype)
        self.restore()

    # -- state dict ----------------------------------------------------------------------------

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """Accept 2-D or 4-D (1×1) weights, keep the incoming alpha's dtype, and refresh the scale."""
        for key, param in (("lora_down.weight", self.lora_down.weight), ("lora_up.weight", self.lora_up.weight)):
            full = prefix + key
            if full in state_dict:
                state_dict[full] = adapt_shape(state_dict[full], param.shape)
        alpha_key = prefix + "alpha"
        incoming = state_dict.get(alpha_key)
        if isinstance(incoming, torch.Tensor) and incoming.numel() == 1:
            state_dict[alpha_key] = incoming.reshape(())
            value = float(incoming)
            if not self.alpha.is_floating_point() and value != int(value):  # keep 0.5 from becoming 0
                self._buffers["alpha"] = torch.empty((), dtype=torch.float32, device=self.alpha.device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if isinstance(incoming, torch.Tensor):
            self.scale = float(self.alpha.float()) / self.lora_dim


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
                 module_kwargs: Mapping[str, Any] | None = None, for_inference: bool = False) -> None:
        """Find the target layers and create one ``module_class`` per layer with a non-zero rank.

        Ranks come from ``modules_dim`` (from a file) if given, else from the per-block lists for
        UNet layers when ``block_dims`` is set, else from ``lora_dim``/``conv_lora_dim``.
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
        extra = dict(module_kwargs or {})
        if for_inference:
            extra["init_weights"] = False

        def create(prefix: str, root: nn.Module | None, targets: Iterable[str]) -> list[LoRAModule]:
            """One module per target layer with a non-zero rank."""
            loras = []
            for lora_name, layer in find_target_modules(root, prefix, targets):
                dim, alpha_ = self._resolve_dim(lora_name, prefix == LORA_PREFIX_UNET, is_conv3x3(layer))
                if not dim:
                    continue
                loras.append(module_class(lora_name, layer, multiplier, dim, alpha_, dropout=dropout,
                                          rank_dropout=rank_dropout, module_dropout=module_dropout, **extra))
            return loras

        self.text_encoder_loras = create(LORA_PREFIX_TEXT_ENCODER, text_encoder, TEXT_ENCODER_TARGET_MODULES)
        unet_targets = UNET_TARGET_MODULES
        if modules_dim is not None or conv_lora_dim is not None or conv_block_dims is not None:
            unet_targets = UNET_TARGET_MODULES + UNET_CONV_TARGET_MODULES
        self.unet_loras = create(LORA_PREFIX_UNET, unet, unet_targets)
        logger.info("LoRA: %d text-encoder modules, %d UNet modules", len(self.text_encoder_loras),
                    len(self.unet_loras))
        for lora in self.text_encoder_loras + self.unet_loras:
            if lora.lora_name in self._modules:
                raise ValueError(f"duplicated LoRA name: {lora.lora_name}")
            self.add_module(lora.lora_name, lora)

    def _resolve_dim(self, lora_name: str, is_unet: bool, conv3x3: bool) -> tuple[int | None, Any]:
        """Rank and alpha of one layer (None/0 rank: no module)."""
        if self._modules_dim is not None:
            if lora_name not in self._modules_dim:
                return None, None
            return self._modules_dim[lora_name], self._modules_alpha[lora_name]
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
        per_module: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in weights_sd.items():
            name, _, rest = key.partition(".")
            per_module.setdefault(name, {})[rest] = value
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

    def load_weights(self, file: str | os.PathLike):
        """Load a network file non-strictly (missing/unexpected keys are reported, shapes must match)."""
        weights_sd, _ = load_state_dict_file(file)
        info = self.load_state_dict(weights_sd, strict=False)
        if info.missing_keys or info.unexpected_keys:
            logger.info("network weights %s: %d missing, %d unexpected keys", file, len(info.missing_keys),
                        len(info.unexpected_keys))
        return info

    def save_weights(self, file: str | os.PathLike, dtype: torch.dtype | None = None,
                     metadata: Mapping[str, Any] | None = None) -> None:
        """Write the network: ``.safetensors`` with metadata and ``sshs_*`` hashes, else ``torch.save``.

        With ``dtype`` every tensor (alpha included) is cast to it.
        """
        state_dict = self.state_dict()
        if dtype is not None:
            state_dict = {k: v.detach().to("cpu").to(dtype) for k, v in state_dict.items()}
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
        groups with lr 0 left out). ``lr`` is only set where a value is known."""
        self.requires_grad_(True)
        groups: list[dict] = []

        def params_of(loras: list[LoRAModule]) -> list[nn.Parameter]:
            """All parameters of these modules."""
            return [p for lora in loras for p in lora.parameters()]

        if self.text_encoder_loras:
            group: dict = {"params": params_of(self.text_encoder_loras)}
            if text_encoder_lr is not None:
                group["lr"] = text_encoder_lr
            groups.append(group)
        if self.unet_loras and self.block_lr:
            by_block: dict[int, list[LoRAModule]] = {}
            for lora in self.unet_loras:
                by_block.setdefault(block_index(lora.lora_name), []).append(lora)
            for loras in by_block.values():
                group = {"params": params_of(loras)}
                base = unet_lr if unet_lr is not None else default_lr
                if base is not None:
                    group["lr"] = base * self.get_lr_weight(loras[0])
                    if group["lr"] == 0:
                        continue
                groups.append(group)
        elif self.unet_loras:
            group = {"params": params_of(self.unet_loras)}
            if unet_lr is not None:
                group["lr"] = unet_lr
            groups.append(group)
        return groups

    def module_dims(self) -> dict[str, tuple[int, float]]:
        """``{lora_name: (rank, alpha)}`` of every module."""
        return {lora.lora_name: (lora.lora_dim, float(lora.alpha.float())) for lora in self.all_loras()}


def _parse_dropout(key: str, value: Any) -> float | None:
    """A dropout probability in [0, 1) (None stays None)."""
    p = parse_float_arg(key, value)
    if p is not None and not 0.0 <= p < 1.0:
        where = "--network_dropout " if key == "neuron_dropout" else f"--network_args {key}="
        raise UserError(f"{where}{value}: a dropout probability must be in [0, 1)")
    return p


def create_network(multiplier: float, network_dim: int | None, network_alpha: float | None, vae: nn.Module | None,
                   text_encoder: nn.Module | None, unet: nn.Module | None, neuron_dropout: float | None = None,
                   **kwargs: Any) -> LoRANetwork:
    """Create a fresh LoRA network (``--network_module networks.lora``).

    ``network_dim`` None → 4; ``network_alpha`` None → 1.0 (0 → alpha = rank). ``kwargs`` are the
    ``--network_args`` (strings, parsed here): conv_dim, conv_alpha, block_dims, block_alphas,
    conv_block_dims, conv_block_alphas, down_lr_weight, mid_lr_weight, up_lr_weight,
    block_lr_zero_threshold, and the later-upstream rank_dropout/module_dropout/dropout. An unknown
    or malformed key raises :class:`~library.errors.UserError`.
    """
    check_known_args(kwargs, KNOWN_NETWORK_ARGS)
    if network_dim is None:
        network_dim = DEFAULT_NETWORK_DIM
    if network_alpha is None:
        network_alpha = 1.0
    conv_dim = parse_int_arg("conv_dim", kwargs.get("conv_dim"))
    conv_alpha = parse_float_arg("conv_alpha", kwargs.get("conv_alpha"))
    if conv_dim is not None and conv_alpha is None:
        conv_alpha = 1.0
    if conv_dim is not None and conv_dim < 0:
        raise UserError(f"--network_args conv_dim={conv_dim}: must not be negative")
    dropout = _parse_dropout("neuron_dropout", neuron_dropout)
    if dropout is None:
        dropout = _parse_dropout("dropout", kwargs.get("dropout"))
    rank_dropout = _parse_dropout("rank_dropout", kwargs.get("rank_dropout"))
    module_dropout = _parse_dropout("module_dropout", kwargs.get("module_dropout"))
    blocks = block_settings(network_dim, network_alpha, conv_dim, conv_alpha, kwargs)
    network = LoRANetwork(text_encoder, unet, multiplier=multiplier, lora_dim=network_dim, alpha=network_alpha,
                          dropout=dropout, rank_dropout=rank_dropout, module_dropout=module_dropout,
                          conv_lora_dim=conv_dim, conv_alpha=conv_alpha, block_dims=blocks.get("block_dims"),
                          block_alphas=blocks.get("block_alphas"), conv_block_dims=blocks.get("conv_block_dims"),
                          conv_block_alphas=blocks.get("conv_block_alphas"))
    if blocks.get("block_lr"):
        down_w, mid_w, up_w = blocks["lr_weights"]
        network.set_block_lr_weight(up_w, mid_w, down_w)
    return network


def create_network_from_weights(multiplier: float, file: str | os.PathLike | None, vae: nn.Module | None,
                                text_encoder: nn.Module | None, unet: nn.Module | None,
                                weights_sd: Mapping[str, torch.Tensor] | None = None, for_inference: bool = False,
                                **kwargs: Any) -> tuple[LoRANetwork, dict[str, torch.Tensor]]:
    """A network shaped like a LoRA file: one module per LoRA name in the weights, with its rank
    (rows of ``lora_down``) and alpha (rank where the file has none); 3×3 conv layers included.

    Returns ``(network, weights_sd)``; the weights are not loaded (call ``load_state_dict`` after
    ``apply_to``, or ``merge_to``). ``for_inference`` skips the random init. Of the extra
    ``kwargs`` (``--dim_from_weights`` training) the dropouts ``neuron_dropout``/``dropout``,
    ``rank_dropout`` and ``module_dropout`` are used; others are ignored.
    """
    if weights_sd is None:
        weights_sd, _ = load_state_dict_file(file)
    modules_dim, modules_alpha = dims_from_state_dict(weights_sd)
    dropout = _parse_dropout("neuron_dropout", kwargs.get("neuron_dropout"))
    if dropout is None:
        dropout = _parse_dropout("dropout", kwargs.get("dropout"))
    network = LoRANetwork(text_encoder, unet, multiplier=multiplier, modules_dim=modules_dim,
                          modules_alpha=modules_alpha, for_inference=for_inference, dropout=dropout,
                          rank_dropout=_parse_dropout("rank_dropout", kwargs.get("rank_dropout")),
                          module_dropout=_parse_dropout("module_dropout", kwargs.get("module_dropout")))
    return network, dict(weights_sd)
