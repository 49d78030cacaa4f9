"""The allowed range of every numeric option of the training scripts, checked before anything loads.

:data:`BOUNDS` maps an option's argparse name to its :class:`Bound`; :func:`bound_problems` returns one
message per option outside its range (``--network_dim must be at least 1, got 0``) and
:func:`network_arg_problems` asks the ``--network_module`` to check ``--network_args`` the same way.
A few options keep their checks beside their other rules (:data:`CHECKED_ELSEWHERE`) and
:data:`UNBOUNDED` lists the ones any value of their type suits. docs/guardrails.md lists them all.
An option that sets a dataset-config key takes that key's range from its validator
(library/config/keys.py), so each such range is written once.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping

from library.errors import UserError


@dataclass(frozen=True)
class Bound:
    """A range ``low .. high`` (None: open-ended); ``low_open`` / ``high_open`` exclude the end itself.

    Every float option must also be finite (argparse's ``float`` accepts ``nan`` and ``inf``)."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def contains(self, value: float) -> bool:
        """True when ``value`` lies in the range."""
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        if self.high is not None and (value >= self.high if self.high_open else value > self.high):
            return False
        return True

    def describe(self) -> str:
        """The range in words, as the error messages and the docs say it."""
        low, high = _number(self.low), _number(self.high)
        if self.high is None:
            if self.low is None:
                return "a finite number"
            return f"> {low}" if self.low_open else (f"at least {low}" if isinstance(self.low, int) else f">= {low}")
        if self.low is None:
            return f"< {high}" if self.high_open else f"at most {high}"
        if self.low_open and self.high_open:
            return f"between {low} and {high} (exclusive)"
        if self.high_open:
            return f"at least {low} and below {high}"
        if self.low_open:
            return f"above {low} and at most {high}"
        return f"between {low} and {high}"


def _number(value: float | None) -> str:
    return "" if value is None else (str(value) if isinstance(value, int) else f"{value:g}")


AT_LEAST_1 = Bound(1)
AT_LEAST_0 = Bound(0)
NON_NEGATIVE = Bound(0.0)
POSITIVE = Bound(0.0, low_open=True)
UNIT = Bound(0.0, 1.0)  # a probability or share, both ends allowed
DROPOUT = Bound(0.0, 1.0, high_open=True)
FINITE = Bound()
SEED = Bound(0, 2**32 - 1)  # numpy's seed range (accelerate's set_seed seeds numpy too)


def config_key_bound(key: str) -> Bound:
    """The range of the dataset-config key ``key`` as its validator checks it (library/config/keys.py)."""
    from library.config.keys import KEYS

    low, high = KEYS[key].validator.range
    return Bound(low, high)


BOUNDS: Mapping[str, Bound] = MappingProxyType({
    # data loading and datasets (an option that sets a dataset-config key has that key's range)
    "seed": SEED,
    "train_batch_size": config_key_bound("batch_size"),
    "vae_batch_size": AT_LEAST_1,
    "max_data_loader_n_workers": AT_LEAST_0,
    "prior_loss_weight": NON_NEGATIVE,
    **{key: config_key_bound(key) for key in (
        "keep_tokens", "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps", "token_warmup_min",
        "token_warmup_step", "caption_dropout_rate", "caption_dropout_every_n_epochs", "caption_tag_dropout_rate")},
    "dataset_repeats": AT_LEAST_1,  # the config's num_repeats takes any integer (0: the subset is left out)
    # training length, precision, noise
    "max_train_epochs": AT_LEAST_0,  # 0 = not given (--max_train_steps counts)
    "gradient_accumulation_steps": AT_LEAST_1,
    "clip_skip": AT_LEAST_1,
    "noise_offset": NON_NEGATIVE,
    "adaptive_noise_scale": FINITE,  # may be negative (the offset is clamped at 0)
    "multires_noise_iterations": AT_LEAST_1,
    "multires_noise_discount": UNIT,
    "min_snr_gamma": NON_NEGATIVE,  # 0 = off
    "ddp_timeout": AT_LEAST_0,  # minutes; 0 = accelerate's default (library/training/ddp_options.py)
    "min_timestep": Bound(0, 999),  # with max: library/training/timestep_loss_options.py
    "max_timestep": Bound(1, 1000),
    "v_pred_like_loss": NON_NEGATIVE,  # 0 = off
    # optimizer and schedule
    "learning_rate": NON_NEGATIVE,
    "max_grad_norm": NON_NEGATIVE,  # 0 = no clipping
    "lr_warmup_steps": AT_LEAST_0,
    "lr_scheduler_num_cycles": AT_LEAST_1,
    "lr_scheduler_power": POSITIVE,
    "lr_decay_steps": AT_LEAST_0,  # a ratio form is also checked to be at most 1 (library/training/lr_options.py)
    "lr_scheduler_timescale": AT_LEAST_1,
    "lr_scheduler_min_lr_ratio": UNIT,
    "learning_rate_te": NON_NEGATIVE,  # train_db.py / fine_tune.py
    # saving and sampling
    "save_every_n_epochs": AT_LEAST_1,
    "save_n_epoch_ratio": AT_LEAST_1,
    "save_every_n_steps": AT_LEAST_1,
    "save_last_n_epochs": AT_LEAST_1,
    "save_last_n_epochs_state": AT_LEAST_1,
    "save_last_n_steps": AT_LEAST_1,
    "save_last_n_steps_state": AT_LEAST_1,
    "sample_every_n_steps": AT_LEAST_1,
    "sample_every_n_epochs": AT_LEAST_1,
    # train_network.py
    "network_dim": AT_LEAST_1,
    "network_alpha": NON_NEGATIVE,  # 0 = the rank (scale 1)
    "network_dropout": DROPOUT,
    "unet_lr": NON_NEGATIVE,
    "text_encoder_lr": NON_NEGATIVE,
    "initial_step": AT_LEAST_0,  # below --max_train_steps: checked with the run plan (library/training/start_step.py)
    "initial_epoch": AT_LEAST_1,
    "max_validation_steps": AT_LEAST_1,
    "scale_weight_norms": NON_NEGATIVE,  # 0 = off, as in kohya (library/methods/network_extras.py)
    # train_textual_inversion.py / _XTI.py
    "num_vectors_per_token": AT_LEAST_1,
})

# options whose range is checked beside the other rules of their module (same up-front check, same wording)
CHECKED_ELSEWHERE: Mapping[str, str] = MappingProxyType({
    "max_train_steps": "at least 1 (unless --max_train_epochs is given); library/training/args.py",
    "max_token_length": "75, 150 or 225 (argparse choices)",
    "zero_stage": "0, 1, 2 or 3 (argparse choices); only read with --deepspeed, which is refused (issue 16)",
    "ema_decay": "between 0 and 1 (exclusive); library/training/ema.py",
    "ema_update_every": "at least 1; library/training/ema.py",
    "validation_split": "at least 0 and below 1; library/training/validation.py",
    "validation_seed": "at least 0; library/training/validation.py",
    "validate_every_n_steps": "at least 1; library/training/validation.py",
    "validate_every_n_epochs": "at least 1; library/training/validation.py",
    "huber_c": "> 0; library/training/loss_options.py",
    "huber_scale": "> 0; library/training/loss_options.py",
    "ip_noise_gamma": ">= 0; library/training/loss_options.py",
    "text_encoder_batch_size": "at least 1, with --cache_text_encoder_outputs (unused without); "
                               "library/training/te_cache.py, before the model loads",
    "resolution": "'size' or 'width,height', positive integers; checked here with the config's parser",
    "face_crop_aug_range": "'low,high' numbers with low <= high; checked here with the config's parser",
})

# numeric options that take any value of their type
UNBOUNDED: Mapping[str, str] = MappingProxyType({
    "stop_text_encoder_training": "any integer (0 or negative: the text encoder never trains)",
    "base_weights_multiplier": "any finite number per --base_weights file (negative subtracts it); count and "
                               "finiteness: library/methods/network_extras.py",
})

# options whose float values are checked elsewhere only for their range: still refuse nan / inf here
_FINITE_ONLY = ("huber_c", "huber_scale", "ip_noise_gamma")


def _missing(args: argparse.Namespace, name: str) -> bool:
    return getattr(args, name, None) is None or isinstance(getattr(args, name), bool)


def _bound_problem(args: argparse.Namespace, name: str) -> str | None:
    """The message for option ``name`` of ``args`` when it lies outside :data:`BOUNDS`; None when it is
    within, not given or not an option of the script."""
    if _missing(args, name):
        return None
    value, bound = getattr(args, name), BOUNDS[name]
    if isinstance(value, float) and not math.isfinite(value):
        return f"--{name} must be a finite number, got {value}"
    if not bound.contains(value):
        return f"--{name} must be {bound.describe()}, got {_number(value) or value}"
    return None


def bound_problems(args: argparse.Namespace) -> list[str]:
    """One message per option of ``args`` outside its range (options the script lacks are skipped)."""
    from library.config.arguments import parse_face_crop_option, parse_resolution_option

    problems = [problem for problem in (_bound_problem(args, name) for name in BOUNDS) if problem]
    for name in _FINITE_ONLY:
        value = getattr(args, name, None)
        if isinstance(value, float) and not math.isfinite(value):
            problems.append(f"--{name} must be a finite number, got {value}")
    for name, parse in (("resolution", parse_resolution_option), ("face_crop_aug_range", parse_face_crop_option)):
        try:
            parse(getattr(args, name, None), f"--{name}")
        except UserError as exc:
            problems.append(str(exc))
    return problems


def network_arg_problems(args: argparse.Namespace) -> list[str]:
    """``--network_args`` checked by the network module's ``check_network_args`` (if it has one), with
    ``--network_dim`` / ``--network_alpha`` / ``--network_dropout``; a module that cannot be imported is
    left to the script's own import, which names it. Nothing more is said when one of those three is
    outside its range (:func:`bound_problems` names it already)."""
    import importlib

    name = getattr(args, "network_module", None)
    if not name or any(_bound_problem(args, option) for option in ("network_dim", "network_alpha", "network_dropout")):
        return []
    try:
        module = importlib.import_module(name)
    except ImportError:
        return []
    check = getattr(module, "check_network_args", None)
    if check is None:
        return []
    from library.config.arguments import parse_network_args

    try:
        kwargs = parse_network_args(getattr(args, "network_args", None))
        if getattr(args, "network_weights", None) and getattr(args, "dim_from_weights", False):
            return []  # ranks and alphas come from the file; create_network_from_weights checks the rest
        check(args.network_dim, args.network_alpha, neuron_dropout=getattr(args, "network_dropout", None), **kwargs)
    except UserError as exc:
        return [str(exc)]
    return []

