"""The later kohya learning-rate options: step counts given as ratios, the decay length, the inverse-sqrt
timescale, the minimum-lr ratio, and the text-encoder lr of train_db.py / fine_tune.py.

``--lr_warmup_steps`` and ``--lr_decay_steps`` take a step count (``100``), a float below 1 (``0.1``)
or a percentage (``10%``): a ratio of the run's scheduler steps, resolved by
:func:`library.training.lr.resolve_steps` when the schedule is built. ``--lr_scheduler_timescale``
(``inverse_sqrt``) and ``--lr_scheduler_min_lr_ratio`` (``cosine_with_min_lr``, ``warmup_stable_decay``)
belong to the schedules of library/training/lr.py. ``--learning_rate_te`` gives the text encoder of a
full-model run its own optimizer group (library/methods/full_model.py). docs/train_network.md#optimizer.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any
from library.option_groups import OptimizerOptions

logger = logging.getLogger(__name__)

#: the schedules each option is read by (a warning names an option the chosen schedule ignores)
USED_BY = {
    "lr_decay_steps": ("warmup_stable_decay",),
    "lr_scheduler_timescale": ("inverse_sqrt",),
    "lr_scheduler_min_lr_ratio": ("cosine_with_min_lr", "warmup_stable_decay"),
}


def steps_or_ratio(value: str) -> int | float:
    """argparse type of ``--lr_warmup_steps`` / ``--lr_decay_steps`` (kohya's rule): ``N%`` → N/100 (a
    ratio), a number below 1 → that float ratio, a number of 1 or more → an int step count (``1.5`` is
    refused: a count must be whole)."""
    text = value.strip()
    if text.endswith("%"):
        try:
            return float(text[:-1]) / 100.0
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{value}' is not a percentage (e.g. 10%)") from None
    try:
        number = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{value}' is not a step count (e.g. 100), a ratio below 1 (0.1) "
                                         "or a percentage (10%)") from None
    if number < 1:
        return number
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{value}': a step count of 1 or more must be a whole number; "
                                         "give a ratio below 1 (0.1) or a percentage (10%) for a share") from None


def add_lr_schedule_arguments(parser: argparse.ArgumentParser) -> None:
    """``--lr_decay_steps``, ``--lr_scheduler_timescale``, ``--lr_scheduler_min_lr_ratio`` (every script)."""
    g = parser.add_argument_group("learning-rate schedule (later kohya options)")
    a = g.add_argument
    a("--lr_decay_steps", type=steps_or_ratio, default=0,
      help="decay steps of warmup_stable_decay: a count, a ratio below 1 or N%% of the run (default 0)")
    a("--lr_scheduler_timescale", type=int, default=None,
      help="timescale of inverse_sqrt (default: the warm-up steps, or 10000 without warm-up)")
    a("--lr_scheduler_min_lr_ratio", type=float, default=None,
      help="lowest lr as a share of the initial lr, for cosine_with_min_lr (required there) and "
           "warmup_stable_decay (default 0)")


def add_text_encoder_lr_arguments(parser: argparse.ArgumentParser) -> None:
    """``--learning_rate_te`` (train_db.py and fine_tune.py only, as in kohya)."""
    parser.add_argument("--learning_rate_te", type=float, default=None,
                        help="learning rate of the text encoder while it trains (default: --learning_rate)")


def _is_ratio(value: Any) -> bool:
    return isinstance(value, float)


def lr_schedule_problems(args: argparse.Namespace) -> list[str]:
    """Range problems of the ratio forms (the counts' ranges are in library/training/bounds.py); warns about
    options the chosen ``--lr_scheduler`` does not read."""
    problems = []
    given = vars(args)  # every training script has these options
    for name in ("lr_warmup_steps", "lr_decay_steps"):
        value = given[name]
        if _is_ratio(value) and value > 1.0:  # a negative value is named by the range check (bounds.py)
            problems.append(f"--{name} as a ratio must be at most 1 (100%), got {value:g}")
    warmup, decay = args.lr_warmup_steps, args.lr_decay_steps
    if (_is_ratio(warmup) and _is_ratio(decay) and args.lr_scheduler == "warmup_stable_decay"
            and warmup + decay > 1.0):
        problems.append(f"--lr_warmup_steps ({warmup:g}) and --lr_decay_steps ({decay:g}) together exceed the run")
    scheduler = args.lr_scheduler
    if not args.lr_scheduler_type:
        defaults = {"lr_decay_steps": 0, "lr_scheduler_timescale": None, "lr_scheduler_min_lr_ratio": None}
        ignored = [f"--{name}" for name, users in USED_BY.items()
                   if given[name] not in (defaults[name], 0.0) and scheduler not in users]
        if ignored:
            logger.warning("%s: not used by --lr_scheduler %s (ignored)", ", ".join(ignored), scheduler)
    return problems


def schedule_options(optimizer: OptimizerOptions) -> dict[str, Any]:
    """Keyword arguments of :func:`library.training.lr.build_lr_scheduler` / ``lr_at_steps`` from the optimizer group
    (everything but the scheduler name, the optimizer and the run length)."""
    return dict(num_warmup_steps=optimizer.lr_warmup_steps, num_cycles=optimizer.lr_scheduler_num_cycles,
                power=optimizer.lr_scheduler_power, scheduler_type=optimizer.lr_scheduler_type,
                scheduler_args=optimizer.lr_scheduler_args, num_decay_steps=optimizer.lr_decay_steps,
                timescale=optimizer.lr_scheduler_timescale,
                min_lr_ratio=optimizer.lr_scheduler_min_lr_ratio)
