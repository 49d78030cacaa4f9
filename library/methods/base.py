"""What a training method (LoRA, DreamBooth, fine-tuning, Textual Inversion) gives the shared loop."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import torch


class Method(Protocol):
    """The small interface through which one loop trains every method.

    Methods differ only in which parameters train, how captions become conditioning, and what is saved.
    """

    name: str

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

    def on_epoch_start(self, epoch: int) -> None:
        """Called before every epoch."""

    def conditioning(self, batch: dict[str, Any]) -> torch.Tensor:
        """Text-encoder hidden states for a batch (with gradients where the text encoder trains)."""

    # Optional: ``unet_forward(unet, noisy, timesteps, cond, dtype) -> prediction`` replaces the plain
    # ``unet(noisy, timesteps, cond.to(dtype)).sample`` (XTI feeds each cross-attention layer its own states).

    def after_step(self, global_step: int) -> None:
        """Called after every optimizer step (TI restores frozen rows; DreamBooth stops the text encoder)."""

    def learning_rates(self, optimizer: Any) -> dict[str, float]:
        """Scalars to log as ``lr/...`` for the current step."""

    def save(self, output_dir: Path, name: str, *, epoch: int, step: int, final: bool) -> Path:
        """Write the trained result as ``output_dir/name.<ext>`` (or a folder) atomically; return its path."""


def single_group_learning_rates(optimizer: Any) -> dict[str, float]:
    """``lr`` of a one-group optimizer, plus ``lr/d*lr`` for D-Adaptation / Prodigy (kohya's D/F/T names)."""
    group = optimizer.param_groups[0]
    lr = float(group["lr"]) if group.get("lr") is not None else 0.0
    out = {"lr": lr}
    if "d" in group:
        out["lr/d*lr"] = float(group["d"] * lr)
    return out
