"""What a training method tells ``--dry_run`` about itself: the interface between the dry run and the methods.

Each method module (library/methods/network.py, full_model.py, textual_inversion.py, xti.py) has a
``dry_run_plan(...)`` that returns a :class:`DryRunPlan`; the entry script passes it to
:func:`library.dry_run.report.run_dry_run`. The dry run never imports a method module and never asks
which method it reports on: everything method-specific comes through the plan.

This module is small on purpose (torch and the option groups only) so that the method modules can
import it without pulling in the rest of the dry run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable

import torch

from library.option_groups import TrainingOptions

if TYPE_CHECKING:
    from library.dry_run.memory import MetaModel
    from library.output_safety import OutputLayout

PRECISION_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def numel(params: Iterable[torch.Tensor]) -> int:
    """Total element count of ``params``."""
    return sum(p.numel() for p in params)


@dataclass(frozen=True)
class Precision:
    """The dtypes of a run: ``--mixed_precision`` and ``--full_fp16`` / ``--full_bf16``."""

    mixed_precision: str   # "no", "fp16" or "bf16"
    full_half: bool        # trained weights (and their gradients) in the half dtype

    @classmethod
    def from_training(cls, training: TrainingOptions) -> "Precision":
        """Reads ``--mixed_precision`` and ``TrainingOptions.full_half``."""
        return cls(training.mixed_precision, training.full_half)

    @property
    def weight_dtype(self) -> torch.dtype:
        """The mixed-precision dtype (fp32 without mixed precision): frozen parts are placed in it."""
        return PRECISION_DTYPES[self.mixed_precision]

    @property
    def mixed(self) -> bool:
        """Whether autocast runs (``--mixed_precision`` fp16 or bf16)."""
        return self.mixed_precision != "no"

    @property
    def trained_dtype(self) -> torch.dtype:
        """The dtype of trained weights: fp32, or the half dtype with ``--full_fp16`` / ``--full_bf16``."""
        return self.weight_dtype if self.full_half else torch.float32


@dataclass
class Trainable:
    """What a method trains on the meta model, and how it places the model on the device."""

    shapes: list[torch.Size]                 # every trained tensor (optimizer state is per tensor)
    parts: dict[str, int]                    # label -> trained element count
    groups: list[tuple[str, float | None]]   # optimizer groups: (name, lr or None = --learning_rate)
    dtype: torch.dtype                       # dtype of the trained weights (and their gradients)
    component_dtypes: dict[str, torch.dtype]  # "unet" / "text_encoder" / "vae" as placed on the device
    text_encoder_in_grad_path: bool          # the step backpropagates through the text encoder
    autocast_copies: int = 0                 # fp32 elements autocast casts and keeps for backward (mixed only)
    extra_weights: int = 0                   # trained elements that are not part of the base model (LoRA)
    added_embedding_rows: int = 0            # Textual Inversion: new token rows
    text_encoder_runs: int = 1               # text-encoder passes per caption and step (XTI: one per layer)
    ema_elements: int = 0                    # elements an EMA would average
    network: Any = None                      # extra trained module (its parameters are not activations)
    notes: list[str] = field(default_factory=list)

    @property
    def count(self) -> int:
        """Trained elements."""
        return sum(s.numel() for s in self.shapes)


@dataclass(frozen=True)
class DryRunPlan:
    """A method's part of the dry run.

    ``trainable(meta, precision)`` sets ``requires_grad`` on the meta model (and builds any extra trained
    module on it) the way the method's training does and says what is trained; ``prepare_tokenizer`` adds
    the method's new tokens to the tokenizer before the datasets are built (Textual Inversion)."""

    method: str                                            # the report's ``method`` key, e.g. "network"
    title: str                                             # its heading, e.g. "DreamBooth (train_db.py)"
    layout: "OutputLayout"                                 # how the method names its saves
    trainable: Callable[["MetaModel", Precision], Trainable]
    prepare_tokenizer: Callable[[Any], Any] | None = None
