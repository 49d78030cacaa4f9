"""What a training method (LoRA, DreamBooth, fine-tuning, Textual Inversion) gives the shared loop."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol

import torch

if TYPE_CHECKING:
    from library.training.te_cache import TextEncoderUse


@dataclass(frozen=True)
class MethodStart:
    """The method's part of the start of a run, made from the options by the method module (after the
    shared checks, before anything loads) and used by :func:`library.run_start.start_run`."""

    #: how the method names its saves (library/output_safety.py)
    layout: Any
    #: the method's part of ``--dry_run`` (a :class:`library.dry_run.plan.DryRunPlan`), made only for a dry run
    dry_run_plan: Callable[[], Any]
    #: the stem of the run's saves: ``--output_name``, or the method's default (Textual Inversion: the token)
    output_name: str | None
    #: what the method does with the text encoder (whether the text-encoder output cache may be used)
    text_encoder_use: "TextEncoderUse"
    #: the method's change to the datasets once built (Textual Inversion's caption replacements), or None
    configure_group: Callable[[Any], None] | None = None


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

    def replace_parameters(self, new_of: dict[int, torch.nn.Parameter]) -> None:
        """Train ``new_of[id(p)]`` instead of each parameter ``p`` (FSDP's sharded parameters)."""

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

    def on_train_start(self, trainer: Any, built: Any) -> None:
        """Called once before the first step, after ``--resume``: ``trainer`` is the
        :class:`~library.training.trainer.Trainer` (its ``progress`` holds the run's session id and start time),
        ``built`` the :class:`~library.training.optim.BuiltOptimizer` (LoRA builds its file metadata here)."""

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

    def replace_parameters(self, new_of: dict[int, torch.nn.Parameter]) -> None:
        """Use ``new_of[id(old)]`` in place of every trained parameter (FSDP made new, sharded ones:
        library/training/sharding.py). This default rewrites the groups :meth:`param_groups` returns, for
        methods that keep them; a method that builds them at each call overrides it."""
        for group in self.param_groups():
            group["params"] = [new_of.get(id(p), p) for p in group["params"]]

    def unet_forward(self, unet: Any, noisy: torch.Tensor, timesteps: torch.Tensor, cond: torch.Tensor,
                     dtype: torch.dtype) -> torch.Tensor:
        """``unet(noisy, timesteps, cond).sample`` with the conditioning in ``dtype``."""
        return unet(noisy, timesteps, cond.to(dtype)).sample

    def on_epoch_start(self, epoch: int) -> None:
        """Nothing to do per epoch."""

    def after_step(self, global_step: int) -> None:
        """Nothing to do per step."""

    def on_train_start(self, trainer: Any, built: Any) -> None:
        """Nothing to do before the first step."""

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
