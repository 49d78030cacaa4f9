"""Learning-rate scheduler table: ``--lr_scheduler`` names, ``adafactor``, or ``--lr_scheduler_type``.

training_options.md §4, §4.3, §4.4 and training_behaviour.md §12. The built-in schedules are the
Diffusers schedule functions (``LambdaLR`` objects, so ``state_dict`` / ``load_state_dict`` resume them
exactly). Length (§4.4): built-ins get ``num_training_steps = max_train_steps × num_processes ×
gradient_accumulation_steps`` and the warm-up as given, in the units of the accelerate-wrapped
scheduler, which advances ``num_processes`` times per optimizer step. With gradient accumulation > 1
only the first 1/GA of the schedule is traversed: a reference bug kept on purpose.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch.optim.lr_scheduler import LRScheduler

from library.errors import UserError
from library.training.optim import import_class, parse_optimizer_args

logger = logging.getLogger(__name__)

DEFAULT_SCHEDULER = "constant"
ADAFACTOR = "adafactor"


@dataclass(frozen=True)
class ScheduleLength:
    """The numbers a built-in schedule is built from (already in scheduler steps)."""

    num_training_steps: int
    num_warmup_steps: int
    num_cycles: int
    power: float


@dataclass(frozen=True)
class SchedulerEntry:
    """One built-in schedule: its Diffusers function name and whether it accepts a warm-up."""

    name: str
    build: Callable[[torch.optim.Optimizer, ScheduleLength], LRScheduler]
    uses_warmup: bool = True


def _diffusers() -> Any:
    """``diffusers.optimization``, imported on first use (it is slow to import)."""
    import diffusers.optimization

    return diffusers.optimization


def _constant(optimizer: torch.optim.Optimizer, length: ScheduleLength) -> LRScheduler:
    """Constant lr."""
    return _diffusers().get_constant_schedule(optimizer)


def _constant_with_warmup(optimizer: torch.optim.Optimizer, length: ScheduleLength) -> LRScheduler:
    """Linear ramp from 0 over the warm-up, then constant."""
    return _diffusers().get_constant_schedule_with_warmup(optimizer, num_warmup_steps=length.num_warmup_steps)


def _linear(optimizer: torch.optim.Optimizer, length: ScheduleLength) -> LRScheduler:
    """Ramp, then linear decay to 0 at num_training_steps."""
    return _diffusers().get_linear_schedule_with_warmup(
        optimizer, num_warmup_steps=length.num_warmup_steps, num_training_steps=length.num_training_steps)


def _cosine(optimizer: torch.optim.Optimizer, length: ScheduleLength) -> LRScheduler:
    """Ramp, then half a cosine down to 0."""
    return _diffusers().get_cosine_schedule_with_warmup(
        optimizer, num_warmup_steps=length.num_warmup_steps, num_training_steps=length.num_training_steps)


def _cosine_with_restarts(optimizer: torch.optim.Optimizer, length: ScheduleLength) -> LRScheduler:
    """Ramp, then ``num_cycles`` hard-restart cosine cycles."""
    return _diffusers().get_cosine_with_hard_restarts_schedule_with_warmup(
        optimizer, num_warmup_steps=length.num_warmup_steps, num_training_steps=length.num_training_steps,
        num_cycles=length.num_cycles)


def _polynomial(optimizer: torch.optim.Optimizer, length: ScheduleLength) -> LRScheduler:
    """Ramp, then ``(lr − 1e-7)·(1 − progress)^power + 1e-7``."""
    return _diffusers().get_polynomial_decay_schedule_with_warmup(
        optimizer, num_warmup_steps=length.num_warmup_steps, num_training_steps=length.num_training_steps,
        power=length.power)


_ENTRIES: tuple[SchedulerEntry, ...] = (
    SchedulerEntry("linear", _linear),
    SchedulerEntry("cosine", _cosine),
    SchedulerEntry("cosine_with_restarts", _cosine_with_restarts),
    SchedulerEntry("polynomial", _polynomial),
    SchedulerEntry("constant", _constant, uses_warmup=False),
    SchedulerEntry("constant_with_warmup", _constant_with_warmup),
)

BUILTIN_SCHEDULERS: dict[str, SchedulerEntry] = {entry.name: entry for entry in _ENTRIES}


def known_scheduler_names() -> list[str]:
    """The ``--lr_scheduler`` values, ``adafactor`` included."""
    return [entry.name for entry in _ENTRIES] + [ADAFACTOR]


def scheduler_length(max_train_steps: int, *, num_processes: int = 1, gradient_accumulation_steps: int = 1) -> int:
    """``num_training_steps`` of a built-in schedule: ``max_train_steps × num_processes × GA`` (§4.4)."""
    return max_train_steps * num_processes * gradient_accumulation_steps


def _no_warmup(option_value: str, num_warmup_steps: int) -> None:
    """Schedules without a warm-up reject a non-zero ``--lr_warmup_steps``."""
    if num_warmup_steps:
        raise UserError(f"--lr_warmup_steps must be 0 with {option_value} (it has no warm-up); got {num_warmup_steps}")


def _adafactor_schedule(name: str, optimizer: torch.optim.Optimizer) -> LRScheduler:
    """``adafactor[:<initial lr>]`` → transformers ``AdafactorSchedule`` (only for relative-step Adafactor)."""
    import transformers.optimization as tf_optim

    if not isinstance(optimizer, tf_optim.Adafactor) or not optimizer.defaults.get("relative_step", False):
        raise UserError("--lr_scheduler adafactor needs --optimizer_type AdaFactor with relative_step=True "
                        "(the default); use another --lr_scheduler")
    _, _, value = name.partition(":")
    initial_lr = 0.0
    if value and value != "None":
        try:
            initial_lr = float(value)
        except ValueError:
            raise UserError(f"--lr_scheduler {name}: the part after 'adafactor:' must be a number") from None
    return tf_optim.AdafactorSchedule(optimizer, initial_lr)


def _custom_scheduler(scheduler_type: str, optimizer: torch.optim.Optimizer, kwargs: dict[str, Any]) -> LRScheduler:
    """``--lr_scheduler_type`` class built as ``Class(optimizer, **lr_scheduler_args)``."""
    cls = import_class(scheduler_type, default_module="torch.optim.lr_scheduler", option="--lr_scheduler_type",
                       unknown_hint="use a torch.optim.lr_scheduler class such as StepLR, or module.Class")
    logger.info("lr scheduler %s | %s", scheduler_type, kwargs)
    try:
        return cls(optimizer, **kwargs)
    except (TypeError, ValueError) as exc:
        raise UserError(f"--lr_scheduler_type {scheduler_type}: cannot build it with --lr_scheduler_args "
                        f"{kwargs or 'none'}: {exc}") from exc


def build_lr_scheduler(
    name: str,
    optimizer: torch.optim.Optimizer,
    *,
    max_train_steps: int,
    num_warmup_steps: int = 0,
    num_cycles: int = 1,
    power: float = 1.0,
    scheduler_type: str = "",
    scheduler_args: Sequence[str] | None = None,
    num_processes: int = 1,
    gradient_accumulation_steps: int = 1,
) -> LRScheduler:
    """Build the lr scheduler of a run (not yet wrapped by accelerate).

    ``name`` is ``--lr_scheduler`` (or the ``adafactor:<lr>`` override from the optimizer);
    a non-empty ``scheduler_type`` (``--lr_scheduler_type``) replaces it and receives the parsed
    ``scheduler_args`` (``--lr_scheduler_args``; built-in schedules ignore them). ``max_train_steps``
    is in optimizer steps; the length is ``max_train_steps × num_processes × gradient_accumulation_steps``
    (the reference's accounting, §4.4). Our training loop steps the schedule once per optimizer step and
    passes 1 and 1, so the schedule spans exactly ``max_train_steps`` (the reference's accumulation bug is
    not reproduced). ``num_warmup_steps``
    (``--lr_warmup_steps``) must be 0 for ``constant``, ``adafactor`` and custom classes.
    """
    if num_warmup_steps < 0:
        raise UserError(f"--lr_warmup_steps must be 0 or more; got {num_warmup_steps}")
    kwargs = parse_optimizer_args(scheduler_args, option="--lr_scheduler_args")
    if scheduler_type:
        _no_warmup(f"--lr_scheduler_type {scheduler_type}", num_warmup_steps)
        return _custom_scheduler(scheduler_type, optimizer, kwargs)
    if kwargs:
        logger.warning("--lr_scheduler_args is only used with --lr_scheduler_type; ignored for --lr_scheduler %s", name)

    if name == ADAFACTOR or name.startswith(ADAFACTOR + ":"):
        _no_warmup(f"--lr_scheduler {ADAFACTOR}", num_warmup_steps)
        return _adafactor_schedule(name, optimizer)

    entry = BUILTIN_SCHEDULERS.get(name)
    if entry is None:
        raise UserError(f"unknown --lr_scheduler '{name}': use one of {', '.join(known_scheduler_names())}, "
                        "or --lr_scheduler_type for a scheduler class")
    if not entry.uses_warmup:
        _no_warmup(f"--lr_scheduler {name}", num_warmup_steps)
    length = ScheduleLength(
        num_training_steps=scheduler_length(max_train_steps, num_processes=num_processes,
                                            gradient_accumulation_steps=gradient_accumulation_steps),
        num_warmup_steps=num_warmup_steps,
        num_cycles=num_cycles,
        power=power,
    )
    try:
        return entry.build(optimizer, length)
    except ValueError as exc:  # polynomial: lr_end (1e-7) must be below --learning_rate
        raise UserError(f"--lr_scheduler {name}: {exc}") from exc


def _throwaway_optimizer(name: str, learning_rate: float | None, group_lrs: Sequence[float] | None) -> torch.optim.Optimizer:
    """A one-number-per-group optimizer to run a schedule on, never a real run's optimizer."""
    groups: list[dict[str, Any]]
    if group_lrs:
        groups = [{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": lr} for lr in group_lrs]
    else:
        groups = [{"params": [torch.nn.Parameter(torch.zeros(1))]}]
    if name == ADAFACTOR or name.startswith(ADAFACTOR + ":"):
        import transformers.optimization as tf_optim

        for group in groups:
            group.pop("lr", None)
        return tf_optim.Adafactor(groups, lr=None, relative_step=True)
    if learning_rate is None:
        raise UserError("--learning_rate is required for --lr_scheduler " + name)
    return torch.optim.SGD(groups, lr=learning_rate)


def lr_at_steps(
    name: str,
    steps: Sequence[int],
    *,
    learning_rate: float | None,
    max_train_steps: int,
    num_warmup_steps: int = 0,
    num_cycles: int = 1,
    power: float = 1.0,
    scheduler_type: str = "",
    scheduler_args: Sequence[str] | None = None,
    num_processes: int = 1,
    gradient_accumulation_steps: int = 1,
    group_lrs: Sequence[float] | None = None,
) -> list[list[float]]:
    """Learning rates after each of ``steps`` optimizer steps, computed on a throwaway optimizer.

    Arguments are those of :func:`build_lr_scheduler` plus ``learning_rate`` (``--learning_rate``) and
    optional per-group lrs. Step 0 is the lr of the first optimizer step; optimizer step ``k``
    corresponds to scheduler position ``k × num_processes`` (accelerate steps the schedule once per
    process). Returns, for each requested step in the given order, one lr per parameter group.
    For ``adafactor`` the lr is computed inside Adafactor; the values are the schedule's initial lr.
    """
    optimizer = _throwaway_optimizer(scheduler_type or name, learning_rate, group_lrs)
    scheduler = build_lr_scheduler(
        name, optimizer, max_train_steps=max_train_steps, num_warmup_steps=num_warmup_steps,
        num_cycles=num_cycles, power=power, scheduler_type=scheduler_type, scheduler_args=scheduler_args,
        num_processes=num_processes, gradient_accumulation_steps=gradient_accumulation_steps)
    optimizer.step()  # no gradients: changes nothing, keeps torch from warning about the call order
    wanted = sorted({max(0, int(step)) * num_processes for step in steps})
    values: dict[int, list[float]] = {}
    position = 0
    for target in wanted:
        while position < target:
            scheduler.step()
            position += 1
        values[target] = [float(lr) for lr in scheduler.get_last_lr()]
    return [values[max(0, int(step)) * num_processes] for step in steps]
