"""DoRA (weight-decomposed LoRA) for :mod:`networks.lora` (``--network_args dora_wd=true``).

One module keeps the LoRA pair ``lora_down``/``lora_up`` and a trained magnitude ``dora_scale``. With
``W`` the frozen weight, ``s = alpha/rank`` and ``ΔW = up∘down``::

    W' = dora_scale · (W + s·ΔW) / ‖W + s·ΔW‖

where the norm is taken per input column (over every axis but 1: ``dora_scale`` is ``[1, in]`` for a
Linear layer, ``[1, in, 1, 1]`` for a convolution, the layout AUTOMATIC1111 and ComfyUI read) or, with
``dora_axis=out``, per output row (over every axis but 0: ``[out, 1]`` / ``[out, 1, 1, 1]``). A
multiplier ``m`` gives ``W + m·(W' − W)``, as A1111 and ComfyUI apply a strength. ``dora_scale`` starts
at the norm of ``W``, so a fresh module leaves the layer unchanged.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from networks.lora_module import LoRAModule, match_dtype
from networks.lora_common import adapt_shape, group_by_module, lora_delta

DORA_KEY = "dora_scale"
DORA_AXES = ("in", "out")


def _kept_axis(axis: str) -> int:
    """The weight axis that keeps its size in the norm: 1 for ``in``, 0 for ``out``."""
    if axis not in DORA_AXES:
        raise ValueError(f"DoRA axis must be one of {DORA_AXES}, got {axis!r}")
    return 1 if axis == "in" else 0


def dora_norm(weight: torch.Tensor, axis: str = "in") -> torch.Tensor:
    """‖weight‖ per input column (``axis="in"``, shape ``[1, in(, 1, 1)]``) or per output row
    (``axis="out"``, shape ``[out, 1(, 1, 1)]``); the norm runs over every other axis."""
    keep = _kept_axis(axis)
    dims = [d for d in range(weight.dim()) if d != keep]
    return torch.linalg.vector_norm(weight, dim=dims, keepdim=True)


def dora_axis_of(magnitude_shape: tuple[int, ...] | torch.Size, weight_shape: tuple[int, ...] | torch.Size) -> str:
    """``"in"`` or ``"out"`` for a stored ``dora_scale`` of a layer with ``weight_shape`` (2-D/4-D file
    shapes on a 4-D/2-D layer are accepted, as for the LoRA weights); ValueError for any other shape,
    1-D vectors included."""
    shape = tuple(magnitude_shape)
    out, inp = int(weight_shape[0]), int(weight_shape[1])
    if len(shape) in (2, 4) and all(s == 1 for s in shape[2:]):
        if shape[:2] == (1, inp):
            return "in"
        if shape[:2] == (out, 1):
            return "out"
    raise ValueError(f"dora_scale has shape {list(shape)}; for a layer with {inp} inputs and {out} outputs it must "
                     f"be [1, {inp}] (per input column) or [{out}, 1] (per output row), with two trailing 1s for a "
                     "convolution")


def dora_weight(base: torch.Tensor, scaled_delta: torch.Tensor, magnitude: torch.Tensor,
                axis: str = "in") -> torch.Tensor:
    """``W' = magnitude · (base + scaled_delta) / ‖base + scaled_delta‖`` (norm per :func:`dora_norm`).

    ``scaled_delta`` is ``alpha/rank · up∘down`` in the shape of ``base``; ``magnitude`` is reshaped
    between its 2-D and 4-D forms when the layer asks for the other one."""
    merged = base + scaled_delta
    norm = dora_norm(merged, axis)
    return merged * (adapt_shape(magnitude, norm.shape) / norm)


def dora_diff(base: torch.Tensor, scaled_delta: torch.Tensor, magnitude: torch.Tensor, axis: str = "in",
              multiplier: float = 1.0) -> torch.Tensor:
    """``multiplier · (W' − W)``: what a strength-``multiplier`` DoRA module adds to ``base``."""
    return (dora_weight(base, scaled_delta, magnitude, axis) - base) * multiplier


class DoRAModule(LoRAModule):
    """A LoRA module whose layer weight is re-normalised: ``W + m·(W' − W)`` (module docstring).

    Neuron dropout has no meaning on the merged weight and is refused by the option parser;
    ``rank_dropout`` drops ranks of ``ΔW`` (per step, for the whole batch) and ``module_dropout``
    skips the module for a step.
    """

    def __init__(self, lora_name: str, org_module: nn.Module, *args: Any, dora_axis: str = "in",
                 **kwargs: Any) -> None:
        """The LoRA layers plus ``dora_scale`` = ‖W‖ along ``dora_axis`` (float32)."""
        super().__init__(lora_name, org_module, *args, **kwargs)
        _kept_axis(dora_axis)
        self.dora_axis = dora_axis
        with torch.no_grad():
            norm = dora_norm(org_module.weight.detach().float(), dora_axis)
        self.dora_scale = nn.Parameter(norm.clone())

    def scaled_delta(self, down: torch.Tensor | None = None, up: torch.Tensor | None = None,
                     scale: float | None = None) -> torch.Tensor:
        """``s · up∘down`` in the wrapped weight's shape (this module's weights, with rank dropout
        while training, unless ``down``/``up``/``scale`` are given)."""
        own = down is None
        down = self.lora_down.weight if own else down
        up = self.lora_up.weight if own else up
        scale = self.scale if scale is None else scale
        if own and self.rank_dropout is not None and self.training:
            keep = (torch.rand(self.lora_dim, device=down.device) > self.rank_dropout).to(down.dtype)
            down = down * keep.reshape(-1, *([1] * (down.dim() - 1)))
            scale = scale / (1.0 - self.rank_dropout)
        weight = self.org_module.weight
        if weight.dim() == 4 and down.dim() == 2:
            down, up = down[:, :, None, None], up[:, :, None, None]
        elif weight.dim() == 2 and down.dim() == 4:
            down, up = down.flatten(1), up.flatten(1)
        return lora_delta(down, up).reshape(weight.shape) * scale

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``org(x) + layer(x; m·(W' − W))`` (the previous forward is kept, so networks stack)."""
        out = self.org_forward(x, *args, **kwargs)
        if self.skipped():
            return out
        delta = self.scaled_delta()
        base = self.org_module.weight.detach().to(delta.dtype)
        diff = dora_diff(base, delta, self.dora_scale.to(delta.dtype), self.dora_axis, self.multiplier)
        return out + self.layer_op(match_dtype(x, diff), diff).to(out.dtype)

    @torch.no_grad()
    def merge_to(self, sd: Mapping[str, torch.Tensor] | None = None, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> None:
        """``W ← W + m·(W' − W)`` in float32 (``sd`` as for LoRA, plus ``dora_scale``)."""
        org = self.org_module
        weight = org.weight
        device = weight.device if device is None else torch.device(device)
        dtype = weight.dtype if dtype is None else dtype
        if sd is None:
            down, up, magnitude, scale = self.lora_down.weight, self.lora_up.weight, self.dora_scale, self.scale
        else:
            down, up, magnitude = sd["lora_down.weight"], sd["lora_up.weight"], sd[DORA_KEY]
            scale = (float(sd["alpha"]) if "alpha" in sd else float(down.shape[0])) / down.shape[0]
        f32 = {"device": device, "dtype": torch.float32}
        delta = self.scaled_delta(down.detach().to(**f32), up.detach().to(**f32), scale)
        base = weight.detach().to(**f32)
        merged = base + dora_diff(base, delta, magnitude.detach().to(**f32), self.dora_axis, self.multiplier)
        org.weight.data = merged.to(dtype)
        self.restore()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """Accept ``dora_scale`` in its 2-D or 4-D form, then the LoRA rules."""
        key = prefix + DORA_KEY
        if key in state_dict:
            state_dict[key] = adapt_shape(state_dict[key], self.dora_scale.shape)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


def dora_shapes_from_state_dict(weights_sd: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    """``{lora_name: shape of its dora_scale}`` for every DoRA module of a network file (empty for LoRA)."""
    return {name: tuple(parts[DORA_KEY].shape) for name, parts in group_by_module(weights_sd).items()
            if DORA_KEY in parts}
