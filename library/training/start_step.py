"""Where a run's counters start: ``--initial_step``, ``--initial_epoch``, ``--skip_until_initial_step``
(train_network.py only, as in kohya).

``--initial_step N`` (or ``--initial_epoch E``, meaning ``N = (E - 1) × steps per epoch``; ``--initial_step``
wins when both are given) starts the step counter at N and the epoch counter at ``N // steps per epoch + 1``:
file names, save / sample / validation cadence, the log steps and ``ss_steps`` / ``ss_epoch`` count from
there, and the run trains the remaining ``max_train_steps - N`` steps. Without ``--skip_until_initial_step``
that epoch's batches are trained from its first one; with it, the batches of the steps before N in that
epoch are left out, so every step trains the batch it would have trained in an uninterrupted run (the
batch order is a function of (seed, epoch), so nothing is loaded to skip it). The learning-rate schedule
is not advanced: a fresh run starts it at 0, a resumed run where the state left it.

With ``--resume`` the state's weights, optimizer, schedule and random generators are restored; given
together with it, ``--initial_step`` / ``--initial_epoch`` replace the state's step, epoch and batch
position as above (a warning says so). Without them the state's exact position is used, and
``--skip_until_initial_step`` changes nothing.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from library.option_groups import TrainingOptions


def add_start_step_arguments(parser: argparse.ArgumentParser) -> None:
    """``--initial_epoch``, ``--initial_step``, ``--skip_until_initial_step`` (kohya's names and defaults)."""
    g = parser.add_argument_group("start step (docs/train_network.md)")
    g.add_argument("--skip_until_initial_step", action="store_true",
                   help="leave out the batches of the steps before --initial_step / --initial_epoch, so the "
                        "run trains the batches an uninterrupted run would have trained from there")
    g.add_argument("--initial_epoch", type=int, default=None,
                   help="start the epoch counter here (1 = first epoch, as without it); the lr scheduler is "
                        "not advanced")
    g.add_argument("--initial_step", type=int, default=None,
                   help="start the step counter here, counted over all epochs (0 = as without it); overrides "
                        "--initial_epoch; the lr scheduler is not advanced")


@dataclass(frozen=True)
class StartPoint:
    """Counters a run starts from: the next optimizer step is ``global_step + 1``."""

    global_step: int
    epoch: int      # counted from 1
    position: int   # this process's next batch inside the epoch (micro-batches)


def initial_step_of(initial_step: int | None, initial_epoch: int | None, steps_per_epoch: int) -> int | None:
    """The step ``--initial_step`` / ``--initial_epoch`` name (None when neither is given)."""
    if initial_step is not None:
        return initial_step
    if initial_epoch is not None:
        return (initial_epoch - 1) * steps_per_epoch
    return None


def start_point(step: int, *, steps_per_epoch: int, gradient_accumulation_steps: int, skip: bool) -> StartPoint:
    """Counters for a run that starts after optimizer step ``step``: its epoch, and inside it the first batch
    (``skip`` False) or the batch of step ``step + 1`` (``skip`` True)."""
    epoch, done = divmod(step, steps_per_epoch)
    return StartPoint(global_step=step, epoch=epoch + 1,
                      position=done * gradient_accumulation_steps if skip else 0)


def initial_step_from(training: TrainingOptions, steps_per_epoch: int) -> int | None:
    """The initial step of --initial_step / --initial_epoch (None without them; scripts that lack them have
    the fields' default None)."""
    return initial_step_of(training.initial_step, training.initial_epoch, steps_per_epoch)


def check_start_step(step: int | None, max_train_steps: int) -> str | None:
    """The problem of a start step the run cannot train from (kohya: max_train_steps > initial step)."""
    if step is not None and step >= max_train_steps:
        return (f"--initial_step / --initial_epoch start at step {step}, but the run ends at --max_train_steps "
                f"{max_train_steps}: give more steps (or epochs) than that")
    return None
