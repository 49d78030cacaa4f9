"""One LoRA module: the low-rank update ``m · (alpha/rank) · up(down(x))`` on a Linear or Conv2d
(:mod:`networks.lora` builds the network of them; :mod:`networks.lora_dora` derives DoRA from it)."""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from torch import nn

from networks.lora_common import adapt_shape, is_conv3x3, lora_delta


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
        """Replace the wrapped layer's ``forward`` by a call of this module (idempotent). It goes through
        ``__call__``, not ``forward``, so that hooks on this module run: DeepSpeed ZeRO-3 gathers the
        module's own partitioned weights (LoHa / LoKr factors) in its pre-forward hook."""
        if self.org_forward is not None:
            return
        org = self.org_module
        self._had_own_forward = "forward" in org.__dict__
        self.org_forward = org.forward
        org.forward = self.__call__

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

    def apply_dropouts(self, h: torch.Tensor, scale: float) -> tuple[torch.Tensor, float]:
        """The training-time dropouts on ``h`` (channels on dim 1 for a conv, last for a linear layer):
        ``dropout`` zeroes elements, ``rank_dropout`` whole channels per sample and divides ``scale`` by
        1 − p. Returns ``(h, scale)``; outside training both unchanged."""
        if self.dropout is not None and self.training:
            h = torch.nn.functional.dropout(h, p=self.dropout)
        if self.rank_dropout is not None and self.training:
            channels = h.shape[1] if self.is_conv else h.shape[-1]
            keep = torch.rand((h.shape[0], channels), device=h.device) > self.rank_dropout
            keep = keep[:, :, None, None] if self.is_conv else keep.reshape(h.shape[0], *([1] * (h.dim() - 2)), -1)
            h = h * keep.to(h.dtype)
            scale = scale / (1.0 - self.rank_dropout)
        return h, scale

    def layer_op(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """``x`` through the wrapped layer's linear map or convolution (its stride, padding, padding mode …)
        with ``weight`` instead of its own, without bias."""
        if self.is_conv:
            return self.org_module._conv_forward(x, weight, None)
        return torch.nn.functional.linear(x, weight)

    def lora_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The scaled update ``m · s · up(down(x))`` with the training-time dropouts."""
        h, scale = self.apply_dropouts(self.lora_down(match_dtype(x, self.lora_down.weight)), self.scale)
        return self.lora_up(h) * (self.multiplier * scale)

    def skipped(self) -> bool:
        """True when this forward adds nothing: multiplier 0, or the module dropped (``module_dropout``,
        training only; draws one number from torch's RNG exactly then)."""
        if self.multiplier == 0:
            return True
        return self.module_dropout is not None and self.training and torch.rand(1).item() < self.module_dropout

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``org(x) + m · (alpha/rank) · up(down(x))``."""
        out = self.org_forward(x, *args, **kwargs)
        if self.skipped():
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

    def take_file_alpha(self, state_dict: dict, prefix: str) -> Any:
        """Take a scalar ``<prefix>alpha`` of ``state_dict`` as it is (its dtype included) into the alpha buffer
        and leave it 0-d in ``state_dict``; returns the incoming value (None when there is none)."""
        incoming = state_dict.get(prefix + "alpha")
        if isinstance(incoming, torch.Tensor) and incoming.numel() == 1:
            state_dict[prefix + "alpha"] = incoming.reshape(())
            self._buffers["alpha"] = incoming.detach().reshape(()).clone().to(self.alpha.device)
        return incoming

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
