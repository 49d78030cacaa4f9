"""What a training method (LoRA, DreamBooth, fine-tuning, Textual Inversion) gives the shared loop."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import torch


class Method(Protocol):
    """The small interface through which one loop trains every method: what differs between them.

    Methods differ only in which parameters train, how captions become conditioning, and what is saved.
    :class:`MethodBase` gives the members whose behaviour most methods share; a method overrides those
    that differ for it.
    """

    name: str
    #: the trained network module when the method trains one (names trained tensors in guard messages)
    network: torch.nn.Module | None
    #: whether any text-encoder weight is in the optimizer (a text-encoder output cache is then wrong)
    text_encoder_in_optimizer: bool
    #: whether the text encoder trains at the current step (DreamBooth's stops at a set step)
    text_encoder_training: bool

    def param_groups(self) -> list[dict[str, Any]]:
        """Optimizer parameter groups (``params`` and, where it differs from the default, ``lr``)."""

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """Every trained parameter (for clipping and gradient synchronisation)."""

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The trained weights, for training states."""

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore :meth:`trainable_state_dict` output (``--resume``)."""

    def set_train(self, training: bool) -> None:
        """Put the trained modules into train or eval mode."""

    def conditioning(self, batch: dict[str, Any]) -> torch.Tensor:
        """Text-encoder hidden states for a batch (with gradients where the text encoder trains)."""

    def unet_forward(self, unet: Any, noisy: torch.Tensor, timesteps: torch.Tensor, cond: torch.Tensor,
                     dtype: torch.dtype) -> torch.Tensor:
        """The UNet's prediction for the noisy latents under ``cond``."""

    def on_epoch_start(self, epoch: int) -> None:
        """Called before every epoch."""

    def after_step(self, global_step: int) -> None:
        """Called after every optimizer step."""

    def learning_rates(self, optimizer: Any) -> dict[str, float]:
        """Scalars to log as ``lr/...`` for the current step."""

    def save(self, output_dir: Path, name: str, *, epoch: int, step: int, final: bool) -> Path:
        """Write the trained result as ``output_dir/name.<ext>`` (or a folder) atomically; return its path."""


class MethodBase:
    """The shared defaults of :class:`Method`: no network, the text encoder in the optimizer and training,
    the parameters of every group trained, the plain UNet call, nothing per epoch or step, one lr logged."""

    name = "method"
    network: torch.nn.Module | None = None
    text_encoder_in_optimizer = True
    text_encoder_training = True

    def param_groups(self) -> list[dict[str, Any]]:  # pragma: no cover - every method defines it
        """Optimizer parameter groups."""
        raise NotImplementedError

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """Every parameter of :meth:`param_groups`, in order."""
        return [p for group in self.param_groups() for p in group["params"]]

    def unet_forward(self, unet: Any, noisy: torch.Tensor, timesteps: torch.Tensor, cond: torch.Tensor,
                     dtype: torch.dtype) -> torch.Tensor:
        """``unet(noisy, timesteps, cond).sample`` with the conditioning in ``dtype``."""
        return unet(noisy, timesteps, cond.to(dtype)).sample

    def on_epoch_start(self, epoch: int) -> None:
        """Nothing to do per epoch."""

    def after_step(self, global_step: int) -> None:
        """Nothing to do per step."""

    def learning_rates(self, optimizer: Any) -> dict[str, float]:
        """``lr`` of the (single) group, and ``lr/d*lr`` for D-Adaptation / Prodigy."""
        return single_group_learning_rates(optimizer)


def single_group_learning_rates(optimizer: Any) -> dict[str, float]:
    """``lr`` of a one-group optimizer, plus ``lr/d*lr`` for D-Adaptation / Prodigy (kohya's D/F/T names)."""
    group = optimizer.param_groups[0]
    lr = float(group["lr"]) if group.get("lr") is not None else 0.0
    out = {"lr": lr}
    if "d" in group:
        out["lr/d*lr"] = float(group["d"] * lr)
    return out
