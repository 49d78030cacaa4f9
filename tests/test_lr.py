"""LR scheduler table (training_options.md §4, §4.4; training_behaviour.md §12) against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from library.errors import UserError
from library.training.lr import build_lr_scheduler, known_scheduler_names, lr_at_steps, scheduler_length
from library.training.optim import build_optimizer


def _sgd(lr: float = 1.0) -> torch.optim.SGD:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=lr)


def _curve(scheduler: torch.optim.lr_scheduler.LRScheduler, optimizer: torch.optim.Optimizer, n: int) -> list[float]:
    """lr used by optimizer steps 0..n-1 (one scheduler step after each optimizer step)."""
    values = []
    for _ in range(n):
        values.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return values


def _lrs(name: str, steps: list[int], **kwargs: object) -> list[float]:
    """lr at the given optimizer steps, via lr_at_steps with --learning_rate 1.0."""
    kwargs.setdefault("max_train_steps", 100)
    return [row[0] for row in lr_at_steps(name, steps, learning_rate=1.0, **kwargs)]


def test_constant() -> None:
    assert _lrs("constant", [0, 1, 50, 100]) == [1.0, 1.0, 1.0, 1.0]


def test_constant_with_warmup() -> None:
    values = _lrs("constant_with_warmup", [0, 1, 2, 3, 4, 5, 99], num_warmup_steps=4)
    assert values == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0, 1.0, 1.0])


def test_linear_warmup_then_decay() -> None:
    values = _lrs("linear", [0, 5, 10, 55, 90, 100], num_warmup_steps=10)
    # ramp 0 → 1 over 10 steps, then 1 → 0 over the remaining 90
    assert values == pytest.approx([0.0, 0.5, 1.0, 0.5, 10 / 90, 0.0])


def test_cosine_half_way() -> None:
    values = _lrs("cosine", [0, 25, 50, 100])
    assert values == pytest.approx([1.0, 0.5 * (1 + math.cos(math.pi * 0.25)), 0.5, 0.0], abs=1e-12)


def test_cosine_with_restarts_two_cycles() -> None:
    values = _lrs("cosine_with_restarts", [0, 25, 49, 50, 75, 100], num_cycles=2)
    expected = [1.0, 0.5, 0.5 * (1 + math.cos(math.pi * 0.98)), 1.0, 0.5, 0.0]
    assert values == pytest.approx(expected, abs=1e-12)


def test_polynomial_power_two() -> None:
    end = 1e-7
    values = _lrs("polynomial", [0, 5, 10, 55, 100, 120], num_warmup_steps=10, power=2.0)
    expected = [0.0, 0.5, 1.0, (1 - end) * 0.5 ** 2 + end, end, end]
    assert values == pytest.approx(expected, rel=1e-9, abs=1e-15)


def test_polynomial_needs_lr_above_the_end_value() -> None:
    with pytest.raises(UserError, match=r"^--lr_scheduler polynomial: lr_end"):
        build_lr_scheduler("polynomial", _sgd(1e-8), max_train_steps=10)


def test_build_matches_lr_at_steps_and_counts_from_the_first_step() -> None:
    optimizer = _sgd(2.0)
    scheduler = build_lr_scheduler("linear", optimizer, max_train_steps=8, num_warmup_steps=2)
    curve = _curve(scheduler, optimizer, 9)
    assert curve == pytest.approx([0.0, 1.0, 2.0, 5 / 3, 4 / 3, 1.0, 2 / 3, 1 / 3, 0.0])
    assert [r[0] for r in lr_at_steps("linear", list(range(9)), learning_rate=2.0, max_train_steps=8,
                                      num_warmup_steps=2)] == pytest.approx(curve)


def test_lr_at_steps_keeps_request_order_and_groups() -> None:
    rows = lr_at_steps("cosine", [50, 0, 50], learning_rate=1.0, max_train_steps=100, group_lrs=[1e-4, 1e-3])
    assert rows == [pytest.approx([5e-5, 5e-4]), pytest.approx([1e-4, 1e-3]), pytest.approx([5e-5, 5e-4])]


# --- §4.4 length scaling -------------------------------------------------------------------------------


def test_length_is_scaled_by_processes_and_accumulation() -> None:
    assert scheduler_length(100) == 100
    assert scheduler_length(100, num_processes=2, gradient_accumulation_steps=4) == 800
    # two processes: the wrapped schedule advances twice per optimizer step, so it still ends on time
    assert _lrs("linear", [0, 5, 10], max_train_steps=10, num_processes=2) == pytest.approx([1.0, 0.5, 0.0])
    # gradient accumulation 2: only half of the schedule is traversed (the reference bug, kept)
    assert _lrs("linear", [10], max_train_steps=10, gradient_accumulation_steps=2) == pytest.approx([0.5])
    # warm-up counts scheduler steps (lr_warmup_steps / num_processes optimizer steps)
    assert _lrs("constant_with_warmup", [1, 2], num_warmup_steps=4, num_processes=2) == pytest.approx([0.5, 1.0])


# --- warm-up rules, adafactor, custom classes, errors ----------------------------------------------------


def test_constant_rejects_warmup() -> None:
    with pytest.raises(UserError, match=r"^--lr_warmup_steps must be 0 with --lr_scheduler constant"):
        build_lr_scheduler("constant", _sgd(), max_train_steps=10, num_warmup_steps=5)


def test_negative_warmup() -> None:
    with pytest.raises(UserError, match=r"^--lr_warmup_steps must be 0 or more"):
        build_lr_scheduler("linear", _sgd(), max_train_steps=10, num_warmup_steps=-1)


def test_unknown_scheduler_lists_names() -> None:
    with pytest.raises(UserError) as info:
        build_lr_scheduler("Cosine", _sgd(), max_train_steps=10)
    message = str(info.value)
    assert message.startswith("unknown --lr_scheduler 'Cosine': use one of ")
    assert all(name in message for name in known_scheduler_names()) and "\n" not in message


def test_adafactor_schedule_follows_the_optimizer_override() -> None:
    model = torch.nn.Linear(3, 2)
    built = build_optimizer("AdaFactor", model.parameters(), 1e-3, None)
    scheduler = build_lr_scheduler(built.lr_scheduler, built.optimizer, max_train_steps=10)
    assert type(scheduler).__name__ == "AdafactorSchedule"
    assert scheduler.get_last_lr() == pytest.approx([1e-3])  # before any step: the initial lr
    model(torch.ones(1, 3)).sum().backward()
    built.optimizer.step()
    scheduler.step()
    lr = scheduler.get_last_lr()[0]
    assert 0 < lr <= 1e-2  # computed inside Adafactor (relative step)
    assert lr_at_steps("adafactor:0.001", [0, 3], learning_rate=None, max_train_steps=10) == [[1e-3], [1e-3]]


def test_adafactor_schedule_rules() -> None:
    with pytest.raises(UserError, match=r"^--lr_scheduler adafactor needs --optimizer_type AdaFactor"):
        build_lr_scheduler("adafactor", _sgd(), max_train_steps=10)
    built = build_optimizer("AdaFactor", torch.nn.Linear(2, 2).parameters(), 1e-3, None)
    with pytest.raises(UserError, match=r"^--lr_warmup_steps must be 0 with --lr_scheduler adafactor"):
        build_lr_scheduler(built.lr_scheduler, built.optimizer, max_train_steps=10, num_warmup_steps=3)


@pytest.mark.parametrize("scheduler_type", ["StepLR", "torch.optim.lr_scheduler.StepLR"])
def test_custom_scheduler_class_with_args(scheduler_type: str) -> None:
    optimizer = _sgd()
    scheduler = build_lr_scheduler("cosine", optimizer, max_train_steps=10, scheduler_type=scheduler_type,
                                   scheduler_args=["step_size=2", "gamma=0.5"])
    assert isinstance(scheduler, torch.optim.lr_scheduler.StepLR)
    assert _curve(scheduler, optimizer, 6) == pytest.approx([1.0, 1.0, 0.5, 0.5, 0.25, 0.25])
    assert _lrs("ignored", [0, 2, 4], scheduler_type=scheduler_type,
                scheduler_args=["step_size=2", "gamma=0.5"]) == pytest.approx([1.0, 0.5, 0.25])


def test_custom_scheduler_errors() -> None:
    with pytest.raises(UserError, match=r"^--lr_warmup_steps must be 0 with --lr_scheduler_type StepLR"):
        build_lr_scheduler("constant", _sgd(), max_train_steps=10, num_warmup_steps=1, scheduler_type="StepLR",
                           scheduler_args=["step_size=2"])
    with pytest.raises(UserError, match=r"^--lr_scheduler_type nosuchpkg\.Sched: cannot import module 'nosuchpkg'"):
        build_lr_scheduler("constant", _sgd(), max_train_steps=10, scheduler_type="nosuchpkg.Sched")
    with pytest.raises(UserError, match=r"^unknown --lr_scheduler_type 'NoSuchLR'"):
        build_lr_scheduler("constant", _sgd(), max_train_steps=10, scheduler_type="NoSuchLR")
    with pytest.raises(UserError, match=r"^--lr_scheduler_type StepLR: cannot build it"):
        build_lr_scheduler("constant", _sgd(), max_train_steps=10, scheduler_type="StepLR")  # no step_size


# --- resume ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("linear", {"num_warmup_steps": 3}),
        ("cosine_with_restarts", {"num_warmup_steps": 2, "num_cycles": 2}),
        ("polynomial", {"power": 2.0}),
        ("constant_with_warmup", {"num_warmup_steps": 4}),
        ("constant", {"scheduler_type": "StepLR", "scheduler_args": ["step_size=3", "gamma=0.5"]}),
    ],
)
def test_resume_continues_the_same_sequence(name: str, kwargs: dict) -> None:
    total, cut = 16, 6

    def fresh() -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
        optimizer = _sgd(0.5)
        return optimizer, build_lr_scheduler(name, optimizer, max_train_steps=total, **kwargs)

    optimizer, scheduler = fresh()
    straight = _curve(scheduler, optimizer, total)

    optimizer, scheduler = fresh()
    first = _curve(scheduler, optimizer, cut)
    saved_opt, saved_sched = optimizer.state_dict(), scheduler.state_dict()
    optimizer, scheduler = fresh()
    optimizer.load_state_dict(saved_opt)
    scheduler.load_state_dict(saved_sched)
    rest = _curve(scheduler, optimizer, total - cut)
    assert first + rest == pytest.approx(straight)
