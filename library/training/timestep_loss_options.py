"""Timestep range, noise-offset random strength and the two v-prediction loss scalings (kohya HEAD options).

``--min_timestep`` / ``--max_timestep`` restrict the training timesteps to ``[min, max)`` (kohya's
defaults None = 0 and 1000; equal values give that one timestep), ``--noise_offset_random_strength``
draws the offset strength uniformly in ``[0, --noise_offset]`` every step, ``--v_pred_like_loss w``
adds ``w · ℓ / (SNR/(SNR+1))`` to an ε-prediction loss and ``--scale_v_pred_loss_like_noise_pred``
multiplies a v-prediction loss by ``SNR/(SNR+1)``. The math lives in :mod:`library.training.diffusion`;
this module registers the options, checks their combinations and turns them into plain values for
:class:`~library.training.step_settings.StepSettings` and the validation loss (docs/loss_options.md).
"""

from __future__ import annotations

import argparse
from typing import Any
from library.option_groups import LossOptions

NUM_TRAIN_TIMESTEPS = 1000  # the same as library.training.diffusion.NUM_TRAIN_TIMESTEPS (kept import-free)
NUM_VALIDATION_TIMESTEPS = 4  # kohya: linspace(min, max, 4 + 2)[1:-1] inside a restricted range


def add_timestep_loss_arguments(parser: argparse.ArgumentParser) -> None:
    """Register ``--min_timestep``, ``--max_timestep``, ``--noise_offset_random_strength``,
    ``--v_pred_like_loss`` and ``--scale_v_pred_loss_like_noise_pred`` (every training script)."""
    g = parser.add_argument_group("timesteps and v-prediction loss scaling (docs/loss_options.md)")
    a = g.add_argument
    a("--min_timestep", type=int, default=None,
      help="smallest training timestep, 0-999 (default 0); timesteps are uniform in [min, max)")
    a("--max_timestep", type=int, default=None,
      help="training timesteps stay below this, 1-1000 (default 1000); equal to --min_timestep: that one timestep")
    a("--noise_offset_random_strength", action="store_true",
      help="draw the offset-noise strength uniformly in [0, --noise_offset] every step")
    a("--v_pred_like_loss", type=float, default=None,
      help="add w * loss / (SNR/(SNR+1)) to the loss (an epsilon-prediction loss weighted like v-prediction); "
           "not with --v_parameterization")
    a("--scale_v_pred_loss_like_noise_pred", action="store_true",
      help="multiply the v-prediction loss by SNR/(SNR+1), so it is weighted like an epsilon-prediction loss "
           "(needs --v_parameterization)")


def timestep_range(min_timestep: int | None, max_timestep: int | None) -> tuple[int, int]:
    """``(min, max)`` of the training timesteps with kohya's defaults for None (0 and 1000)."""
    low = 0 if min_timestep is None else int(min_timestep)
    high = NUM_TRAIN_TIMESTEPS if max_timestep is None else int(max_timestep)
    return low, high


def timestep_loss_problems(args: argparse.Namespace) -> list[str]:
    """Combination problems of these options (their numeric ranges are in library/training/bounds.py); reads
    --min_timestep, --max_timestep, --noise_offset(_random_strength), --v_pred_like_loss,
    --scale_v_pred_loss_like_noise_pred and --v_parameterization (every training script has them)."""
    problems = []
    low, high = args.min_timestep, args.max_timestep
    if low is not None and high is not None and low > high:
        problems.append(f"--min_timestep ({low}) must be at most --max_timestep ({high})")
    if args.noise_offset_random_strength and not args.noise_offset:
        problems.append("--noise_offset_random_strength needs --noise_offset (the largest strength)")
    v_param = args.v_parameterization
    if args.v_pred_like_loss and v_param:
        problems.append("--v_pred_like_loss cannot be used with --v_parameterization")
    if args.scale_v_pred_loss_like_noise_pred and not v_param:
        problems.append("--scale_v_pred_loss_like_noise_pred needs --v_parameterization")
    return problems


def timestep_loss_fields(loss: LossOptions) -> dict[str, Any]:
    """The :class:`~library.training.step_settings.StepSettings` fields of these options (reads --min_timestep,
    --max_timestep, --noise_offset_random_strength, --v_pred_like_loss, --scale_v_pred_loss_like_noise_pred)."""
    low, high = timestep_range(loss.min_timestep, loss.max_timestep)
    return dict(min_timestep=low, max_timestep=high, noise_offset_random_strength=loss.noise_offset_random_strength,
                v_pred_like_loss=loss.v_pred_like_loss or None,
                scale_v_pred_loss_like_noise_pred=loss.scale_v_pred_loss_like_noise_pred)


def validation_timesteps(min_timestep: int | None, max_timestep: int | None) -> tuple[int, ...] | None:
    """The validation loss's fixed timesteps inside a restricted training range, as kohya picks them:
    the 4 inner points of ``linspace(min, max, 6)`` truncated to integers (e.g. 0-1000 → 200, 400, 600,
    800). None when neither option is given (the validation loss keeps its own default timesteps)."""
    if min_timestep is None and max_timestep is None:
        return None
    low, high = timestep_range(min_timestep, max_timestep)
    parts = NUM_VALIDATION_TIMESTEPS + 1
    return tuple(int(low + (high - low) * i / parts) for i in range(1, parts))
