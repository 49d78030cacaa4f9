"""Learning-rate scheduler table: ``--lr_scheduler`` names, ``adafactor``, or ``--lr_scheduler_type``.

training_options.md §4, §4.3, §4.4, §12 and training_behaviour.md §12. The built-in schedules are the
Diffusers schedule functions, and for the later kohya names (``inverse_sqrt``, ``cosine_with_min_lr``,
``warmup_stable_decay``) the Transformers ones kohya calls (``LambdaLR`` objects, so ``state_dict`` /
``load_state_dict`` resume them exactly). Length (§4.4): built-ins get
``num_training_steps = max_train_steps × num_processes ×
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
    num_decay_steps: int = 0
    timescale: int | None = None
    min_lr_ratio: float | None = None
    extra: Any = None  # --lr_scheduler_args keyword arguments (a dict), passed on as kohya does


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


def _transformers() -> Any:
    """``transformers.optimization`` (the later schedules kohya takes from there)."""
    import transformers.optimization

    return transformers.optimization


def _extra(length: ScheduleLength) -> dict[str, Any]:
    return dict(length.extra or {})


def _constant(optimizer: torch.optim.Optimizer, length: ScheduleLength) -> LRScheduler:
    """Constant lr."""
    return _diffusers().get_constant_schedule(optimizer, **_extra(length))


def _constant_with_warmup(optimizer: torch.optim.Optimizer, length: ScheduleLength) -> LRScheduler:
    """Linear ramp from 0 over the warm-up, then constant."""
    return _diffusers().get_constant_schedule_with_warmup(optimizer, num_warmup_steps=length.num_warmup_steps,
                                                          **_extra(length))


def _linear(optimizer: torch.optim.Optimizer, length: ScheduleLength) -> LRScheduler:
    """Ramp, then linear decay to 0 at num_training_steps."""
    return _diffusers().get_linear_schedule_with_warmup(
        optimizer, num_warmup_steps=length.num_warmup_steps, num_training_steps=length.num_training_steps,
        **_extra(length))


def _cosine(optimizer: torch.optim.Optimizer, length: ScheduleLength) -> LRScheduler:
    """Ramp, then half a cosine down to 0."""
    return _diffusers().get_cosine_schedule_with_warmup(
        optimizer, num_warmup_steps=length.num_warmup_steps, num_training_steps=length.num_training_steps,
        **_extra(length))


def _cosine_with_restarts(optimizer: torch.optim.Optimizer, length: ScheduleLength) -> LRScheduler:
    """Ramp, then ``num_cycles`` hard-restart cosine cycles."""
    return _diffusers().get_cosine_with_hard_restarts_schedule_with_warmup(
        optimizer, num_warmup_steps=length.num_warmup_steps, num_training_steps=length.num_training_steps,
        num_cycles=length.num_cycles, **_extra(length))


def _polynomial(optimizer: torch.optim.Optimizer, length: ScheduleLength) -> LRScheduler:
    """Ramp, then ``(lr − 1e-7)·(1 − progress)^power + 1e-7``."""
    return _diffusers().get_polynomial_decay_schedule_with_warmup(
        optimizer, num_warmup_steps=length.num_warmup_steps, num_training_steps=length.num_training_steps,
        power=length.power, **_extra(length))


def _inverse_sqrt(optimizer: torch.optim.Optimizer, length: ScheduleLength) -> LRScheduler:
    """Ramp, then ``1/√((step + timescale − warm-up) / timescale)`` (timescale: ``--lr_scheduler_timescale``,
    default the warm-up steps or 10000)."""
    return _transformers().get_inverse_sqrt_schedule(
        optimizer, num_warmup_steps=length.num_warmup_steps, timescale=length.timescale, **_extra(length))


def _cosine_with_min_lr(optimizer: torch.optim.Optimizer, length: ScheduleLength) -> LRScheduler:
    """Ramp, then a cosine from lr down to ``lr × --lr_scheduler_min_lr_ratio`` (``num_cycles/2`` waves, as kohya)."""
    extra = _extra(length)
    if length.min_lr_ratio is None and "min_lr" not in extra and "min_lr_rate" not in extra:
        raise UserError("--lr_scheduler cosine_with_min_lr needs --lr_scheduler_min_lr_ratio (e.g. 0.1), or "
                        "--lr_scheduler_args min_lr=<lr>")
    return _transformers().get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, num_warmup_steps=length.num_warmup_steps, num_training_steps=length.num_training_steps,
        num_cycles=length.num_cycles / 2, min_lr_rate=length.min_lr_ratio, **extra)


def _warmup_stable_decay(optimizer: torch.optim.Optimizer, length: ScheduleLength) -> LRScheduler:
    """Warm-up (from ``min_lr_ratio × lr``), constant, then a cosine decay over ``--lr_decay_steps`` to
    ``lr × --lr_scheduler_min_lr_ratio`` (default 0); the stable part is what the other two leave."""
    stable = length.num_training_steps - length.num_warmup_steps - length.num_decay_steps
    if stable < 0:
        raise UserError(f"--lr_scheduler warmup_stable_decay: --lr_warmup_steps ({length.num_warmup_steps}) + "
                        f"--lr_decay_steps ({length.num_decay_steps}) exceed the run's {length.num_training_steps} "
                        "scheduler steps")
    return _transformers().get_wsd_schedule(
        optimizer, num_warmup_steps=length.num_warmup_steps, num_stable_steps=stable,
        num_decay_steps=length.num_decay_steps, num_cycles=length.num_cycles / 2,
        min_lr_ratio=length.min_lr_ratio if length.min_lr_ratio is not None else 0.0, **_extra(length))


def _piecewise_constant(optimizer: torch.optim.Optimizer, length: ScheduleLength) -> LRScheduler:
    """Multipliers by step from ``--lr_scheduler_args step_rules=1:10,0.1:20,0.01`` (1 before step 10,
    0.1 before step 20, then 0.01)."""
    extra = _extra(length)
    rules = extra.pop("step_rules", None)
    if rules is None:
        raise UserError("--lr_scheduler piecewise_constant needs --lr_scheduler_args step_rules=<rules>, e.g. "
                        "step_rules=1:10,0.1:20,0.01 (lr x1 before step 10, x0.1 before step 20, then x0.01)")
    try:
        return _diffusers().get_piecewise_constant_schedule(optimizer, step_rules=str(rules), **extra)
    except ValueError:
        raise UserError(f"--lr_scheduler_args step_rules={rules}: write multiplier:step pairs and a last "
                        "multiplier, separated by commas (e.g. 1:10,0.1:20,0.01)") from None


_ENTRIES: tuple[SchedulerEntry, ...] = (
    SchedulerEntry("linear", _linear),
    SchedulerEntry("cosine", _cosine),
    SchedulerEntry("cosine_with_restarts", _cosine_with_restarts),
    SchedulerEntry("polynomial", _polynomial),
    SchedulerEntry("constant", _constant, uses_warmup=False),
    SchedulerEntry("constant_with_warmup", _constant_with_warmup),
    SchedulerEntry("inverse_sqrt", _inverse_sqrt),
    SchedulerEntry("cosine_with_min_lr", _cosine_with_min_lr),
    SchedulerEntry("warmup_stable_decay", _warmup_stable_decay),
    SchedulerEntry("piecewise_constant", _piecewise_constant, uses_warmup=False),
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
    num_warmup_steps: int | float = 0,
    num_cycles: int = 1,
    power: float = 1.0,
    scheduler_type: str = "",
    scheduler_args: Sequence[str] | None = None,
    num_processes: int = 1,
    gradient_accumulation_steps: int = 1,
    num_decay_steps: int | float = 0,
    timescale: int | None = None,
    min_lr_ratio: float | None = None,
) -> LRScheduler:
    """Build the lr scheduler of a run (not yet wrapped by accelerate).

    ``name`` is ``--lr_scheduler`` (or the ``adafactor:<lr>`` override from the optimizer);
    a non-empty ``scheduler_type`` (``--lr_scheduler_type``) replaces it and receives the parsed
    ``scheduler_args`` (``--lr_scheduler_args``; built-in schedules get them as extra keyword arguments,
    as kohya passes them, e.g. ``step_rules`` of ``piecewise_constant``). ``num_warmup_steps`` /
    ``num_decay_steps`` (``--lr_warmup_steps`` / ``--lr_decay_steps``) may be float ratios of the
    schedule length (:func:`resolve_steps`); ``num_decay_steps`` is read by ``warmup_stable_decay``,
    ``timescale`` by ``inverse_sqrt`` and ``min_lr_ratio`` by ``cosine_with_min_lr`` and
    ``warmup_stable_decay``. ``max_train_steps``
    is in optimizer steps; the length is ``max_train_steps × num_processes × gradient_accumulation_steps``
    (the reference's accounting, §4.4). Our training loop steps the schedule once per optimizer step and
    passes 1 and 1, so the schedule spans exactly ``max_train_steps`` (the reference's accumulation bug is
    not reproduced). ``num_warmup_steps``
    (``--lr_warmup_steps``) must be 0 for ``constant``, ``adafactor`` and custom classes.
    """
    total = scheduler_length(max_train_steps, num_processes=num_processes,
                             gradient_accumulation_steps=gradient_accumulation_steps)
    num_warmup_steps = resolve_steps(num_warmup_steps, total)
    num_decay_steps = resolve_steps(num_decay_steps, total)
    if num_warmup_steps < 0:
        raise UserError(f"--lr_warmup_steps must be 0 or more; got {num_warmup_steps}")
    if num_decay_steps < 0:
        raise UserError(f"--lr_decay_steps must be 0 or more; got {num_decay_steps}")
    kwargs = parse_optimizer_args(scheduler_args, option="--lr_scheduler_args")
    if scheduler_type:
        _no_warmup(f"--lr_scheduler_type {scheduler_type}", num_warmup_steps)
        return _custom_scheduler(scheduler_type, optimizer, kwargs)
    if kwargs and (name == ADAFACTOR or name.startswith(ADAFACTOR + ":")):
        logger.warning("--lr_scheduler_args is not used by --lr_scheduler %s (ignored)", name)

    if name == ADAFACTOR or name.startswith(ADAFACTOR + ":"):
        _no_warmup(f"--lr_scheduler {ADAFACTOR}", num_warmup_steps)
        return _adafactor_schedule(name, optimizer)

    entry = BUILTIN_SCHEDULERS.get(name)
    if entry is None:
        raise UserError(f"unknown --lr_scheduler '{name}': use one of {', '.join(known_scheduler_names())}, "
                        "or --lr_scheduler_type for a scheduler class")
    if not entry.uses_warmup:
        _no_warmup(f"--lr_scheduler {name}", num_warmup_steps)
    length = ScheduleLength(num_training_steps=total, num_warmup_steps=num_warmup_steps, num_cycles=num_cycles,
                            power=power, num_decay_steps=num_decay_steps, timescale=timescale,
                            min_lr_ratio=min_lr_ratio, extra=kwargs)
    try:
        return entry.build(optimizer, length)
    except ValueError as exc:  # polynomial: lr_end (1e-7) must be below --learning_rate
        raise UserError(f"--lr_scheduler {name}: {exc}") from exc
    except TypeError as exc:  # an --lr_scheduler_args key the schedule function does not take
        raise UserError(f"--lr_scheduler {name}: cannot use --lr_scheduler_args {kwargs}: {exc}") from exc


def resolve_steps(value: int | float | None, total: int) -> int:
    """A step option as a count: a float is a ratio of ``total`` (``int(ratio × total)``, kohya's rounding
    down), an int is itself, None is 0."""
    if value is None:
        return 0
    if isinstance(value, float):
        return int(value * total)
    return int(value)


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
    num_warmup_steps: int | float = 0,
    num_cycles: int = 1,
    power: float = 1.0,
    scheduler_type: str = "",
    scheduler_args: Sequence[str] | None = None,
    num_processes: int = 1,
    gradient_accumulation_steps: int = 1,
    group_lrs: Sequence[float] | None = None,
    num_decay_steps: int | float = 0,
    timescale: int | None = None,
    min_lr_ratio: float | None = None,
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
        num_processes=num_processes, gradient_accumulation_steps=gradient_accumulation_steps,
        num_decay_steps=num_decay_steps, timescale=timescale, min_lr_ratio=min_lr_ratio)
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
