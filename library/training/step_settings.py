"""What one training step does and when results are saved: the two settings records the Trainer is built with.

They sit apart from trainer.py so that the option modules that fill them (loss_options.py,
timestep_loss_options.py, session.py) do not import the loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from library.training import diffusion


@dataclass(frozen=True)
class StepSettings:
    """What one training step does (from the command line, validated)."""

    v_parameterization: bool = False
    noise_offset: float | None = None
    adaptive_noise_scale: float | None = None
    multires_noise_iterations: int | None = None
    multires_noise_discount: float = 0.3
    min_snr_gamma: float | None = None
    max_grad_norm: float = 1.0
    weight_dtype: torch.dtype = torch.float32
    # loss and noise options (library/training/loss_options.py)
    loss_type: str = "l2"
    huber_c: float = 0.1
    huber_schedule: str = "snr"
    huber_scale: float = 1.0
    zero_terminal_snr: bool = False
    debiased_estimation: bool = False
    ip_noise_gamma: float | None = None
    ip_noise_gamma_random_strength: bool = False
    # timestep range, offset random strength, v-prediction loss scalings (library/training/timestep_loss_options.py)
    min_timestep: int = 0
    max_timestep: int = diffusion.NUM_TRAIN_TIMESTEPS
    noise_offset_random_strength: bool = False
    v_pred_like_loss: float | None = None
    scale_v_pred_loss_like_noise_pred: bool = False


@dataclass(frozen=True)
class SaveSettings:
    """When and where results and states are written."""

    output_dir: Path
    output_name: str | None = None
    every_n_epochs: int | None = None
    every_n_steps: int | None = None
    last_n_epochs: int | None = None
    last_n_epochs_state: int | None = None
    last_n_steps: int | None = None
    last_n_steps_state: int | None = None
    save_state: bool = False
    state_on_train_end: bool = False  # --save_state_on_train_end: the state of the final save only
    layout: Any = None  # library.output_safety.OutputLayout: names and kind of the method's saves
