"""Loss and noise options of the shared training loop (docs/loss_options.md, docs/masked_loss.md).

``--loss_type`` with ``--huber_c`` / ``--huber_schedule`` / ``--huber_scale``, ``--zero_terminal_snr``,
``--debiased_estimation_loss``, ``--ip_noise_gamma`` (+ ``--ip_noise_gamma_random_strength``) and the
masked-loss switches ``--masked_loss`` / ``--alpha_mask`` / ``--conditioning_data_dir``. The math lives in
:mod:`library.training.diffusion`; this module registers the options, checks their combinations, turns
them into :class:`~library.training.step_settings.StepSettings` fields and gives the loop the two small pieces
it calls per step (:func:`input_noise`, :func:`loss_kwargs`).
"""

from __future__ import annotations

import argparse
import logging
from typing import TYPE_CHECKING, Any

from library.errors import UserError
from library.option_groups import LossOptions

if TYPE_CHECKING:  # torch and diffusers load only when training runs (parsers stay fast)
    import torch

    from library.training.step_settings import StepSettings

logger = logging.getLogger(__name__)

# the same names as library.training.diffusion.LOSS_TYPES / HUBER_SCHEDULES (a test keeps them equal)
LOSS_TYPES = ("l2", "l1", "huber", "smooth_l1")
HUBER_SCHEDULES = ("constant", "exponential", "snr")

DEFAULT_HUBER_C = 0.1
DEFAULT_HUBER_SCHEDULE = "snr"  # as upstream sd-scripts
DEFAULT_HUBER_SCALE = 1.0


def add_loss_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the loss, noise and masked-loss options (every training script)."""
    g = parser.add_argument_group("loss and noise")
    a = g.add_argument
    a("--loss_type", type=str, default="l2", choices=list(LOSS_TYPES),
      help="element loss: l2 (default, squared error), l1, huber or smooth_l1 (both use --huber_c)")
    a("--huber_c", type=float, default=None,
      help=f"Huber parameter c > 0 of huber / smooth_l1 (default {DEFAULT_HUBER_C})")
    a("--huber_schedule", type=str, default=None, choices=list(HUBER_SCHEDULES),
      help=f"how c changes with the timestep: constant, exponential or snr (default {DEFAULT_HUBER_SCHEDULE})")
    a("--huber_scale", type=float, default=None,
      help=f"multiplier of c for the constant and exponential schedules (default {DEFAULT_HUBER_SCALE:g})")
    a("--zero_terminal_snr", action="store_true",
      help="rescale the noise schedule so the last timestep is pure noise (use with --v_parameterization)")
    a("--debiased_estimation_loss", action="store_true",
      help="weight the loss by 1/sqrt(SNR) (epsilon) or 1/(SNR+1) (v-prediction)")
    a("--ip_noise_gamma", type=float, default=None,
      help="input-perturbation noise strength (about 0.1): noisy latents are built from noise + gamma * extra noise")
    a("--ip_noise_gamma_random_strength", action="store_true",
      help="draw the input-perturbation strength uniformly in [0, --ip_noise_gamma] every step")
    a("--masked_loss", action="store_true",
      help="weight the loss per pixel by a mask: conditioning_data_dir (mask images) or alpha_mask in the dataset")
    a("--alpha_mask", action="store_true",
      help="use each image's alpha channel as its loss mask (dataset-config key alpha_mask; enables masking)")
    a("--conditioning_data_dir", type=str, default=None,
      help="folder of mask images (same stem as each training image) for the training subsets with --masked_loss")


def validate_loss_arguments(args: argparse.Namespace) -> None:
    """Refuse impossible combinations (all problems in one UserError); warn about ineffective ones. Reads
    --loss_type, --huber_c, --huber_schedule, --huber_scale, --ip_noise_gamma(_random_strength),
    --zero_terminal_snr, --debiased_estimation_loss and --v_parameterization (every training script has them)."""
    problems = []
    uses_c = args.loss_type in ("huber", "smooth_l1")
    if args.huber_c is not None and args.huber_c <= 0:
        problems.append(f"--huber_c must be > 0, got {args.huber_c:g}")
    if args.huber_scale is not None and args.huber_scale <= 0:
        problems.append(f"--huber_scale must be > 0, got {args.huber_scale:g}")
    if args.ip_noise_gamma is not None and args.ip_noise_gamma < 0:
        problems.append(f"--ip_noise_gamma must be >= 0, got {args.ip_noise_gamma:g}")
    if args.ip_noise_gamma_random_strength and not args.ip_noise_gamma:
        problems.append("--ip_noise_gamma_random_strength needs --ip_noise_gamma (the largest strength)")
    if args.zero_terminal_snr and args.debiased_estimation_loss and not args.v_parameterization:
        problems.append("--debiased_estimation_loss with --zero_terminal_snr needs --v_parameterization "
                        "(the epsilon weight 1/sqrt(SNR) is infinite at the last timestep, whose SNR is 0)")
    if problems:
        raise UserError("; ".join(problems))
    if not uses_c:
        given = [f"--{n}" for n in ("huber_c", "huber_schedule", "huber_scale") if vars(args)[n] is not None]
        if given:
            logger.warning("%s only affect --loss_type huber / smooth_l1 (this run uses %s)", ", ".join(given),
                           args.loss_type)
    if args.zero_terminal_snr and not args.v_parameterization:
        logger.warning("--zero_terminal_snr without --v_parameterization: an epsilon-prediction model cannot "
                       "learn anything at the last (pure-noise) timestep; v-prediction is recommended")


def step_fields(loss: LossOptions) -> dict[str, Any]:
    """The :class:`~library.training.step_settings.StepSettings` fields of the loss options (reads --loss_type,
    --huber_c, --huber_schedule, --huber_scale, --zero_terminal_snr, --debiased_estimation_loss,
    --ip_noise_gamma, --ip_noise_gamma_random_strength; an unset Huber value takes its documented default)."""
    huber_c = loss.huber_c if loss.huber_c is not None else DEFAULT_HUBER_C
    huber_scale = loss.huber_scale if loss.huber_scale is not None else DEFAULT_HUBER_SCALE
    return dict(loss_type=loss.loss_type, huber_c=float(huber_c),
                huber_schedule=loss.huber_schedule or DEFAULT_HUBER_SCHEDULE, huber_scale=float(huber_scale),
                zero_terminal_snr=loss.zero_terminal_snr, debiased_estimation=loss.debiased_estimation_loss,
                ip_noise_gamma=loss.ip_noise_gamma or None,
                ip_noise_gamma_random_strength=loss.ip_noise_gamma_random_strength)


def input_noise(noise: torch.Tensor, generator: torch.Generator, settings: StepSettings) -> torch.Tensor:
    """The noise that builds x_t: ``noise`` itself, or with ``--ip_noise_gamma`` ε + γ·ε' (drawn after the
    timesteps; the target keeps the unperturbed ε). Draws nothing when the option is off."""
    gamma = settings.ip_noise_gamma
    if not gamma:
        return noise
    from library.training import diffusion

    return diffusion.perturb_noise(noise, generator, gamma, settings.ip_noise_gamma_random_strength)


def loss_kwargs(settings: StepSettings) -> dict[str, Any]:
    """Keyword arguments of :func:`library.training.diffusion.diffusion_loss` for these options."""
    return dict(loss_type=settings.loss_type, huber_c=settings.huber_c, huber_schedule=settings.huber_schedule,
                huber_scale=settings.huber_scale, debiased_estimation=settings.debiased_estimation,
                # --v_pred_like_loss / --scale_v_pred_loss_like_noise_pred (library/training/timestep_loss_options.py)
                v_pred_like_loss=settings.v_pred_like_loss,
                scale_v_pred_loss_like_noise_pred=settings.scale_v_pred_loss_like_noise_pred)


def batch_mask(batch: dict[str, Any], device: Any) -> torch.Tensor | None:
    """The batch's loss masks (B, 1, h, w) on ``device``, or None when the run has no masks."""
    masks = batch.get("masks")
    return None if masks is None else masks.to(device)


def loss_metadata(loss: LossOptions) -> dict[str, str]:
    """The ``ss_*`` keys upstream records for the loss options (LoRA metadata; adds --masked_loss)."""
    fields = step_fields(loss)
    return {"ss_loss_type": str(fields["loss_type"]), "ss_huber_c": str(fields["huber_c"]),
            "ss_huber_schedule": str(fields["huber_schedule"]), "ss_huber_scale": str(fields["huber_scale"]),
            "ss_zero_terminal_snr": str(fields["zero_terminal_snr"]),
            "ss_debiased_estimation": str(fields["debiased_estimation"]),
            "ss_ip_noise_gamma": str(fields["ip_noise_gamma"]),
            "ss_ip_noise_gamma_random_strength": str(fields["ip_noise_gamma_random_strength"]),
            "ss_masked_loss": str(loss.masked_loss)}
