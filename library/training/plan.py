"""How long a run is: batches per epoch and process, optimizer steps per epoch, epochs, total steps."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class RunPlan:
    """The step arithmetic of a run (all counts per process)."""

    batches_per_epoch: int         # this process's batches per epoch
    steps_per_epoch: int           # optimizer steps per epoch
    max_train_steps: int
    num_epochs: int
    num_processes: int
    gradient_accumulation_steps: int
    batch_size: int

    @property
    def total_batch_size(self) -> int:
        """Samples per optimizer step over all processes (per-device batch × processes × accumulation)."""
        return self.batch_size * self.num_processes * self.gradient_accumulation_steps


def make_plan(total_batches: int, *, num_processes: int, gradient_accumulation_steps: int, batch_size: int,
              max_train_steps: int | None, max_train_epochs: int | None) -> RunPlan:
    """Compute the plan: ``--max_train_epochs`` overrides ``--max_train_steps`` as the reference does
    (``epochs × ceil(batches / processes / accumulation)``); epochs = ceil(steps / steps per epoch)."""
    per_process = math.ceil(total_batches / num_processes)
    steps_per_epoch = max(1, math.ceil(per_process / gradient_accumulation_steps))
    if max_train_epochs:
        max_train_steps = max_train_epochs * steps_per_epoch
    assert max_train_steps is not None and max_train_steps > 0
    num_epochs = math.ceil(max_train_steps / steps_per_epoch)
    return RunPlan(per_process, steps_per_epoch, max_train_steps, num_epochs, num_processes,
                   gradient_accumulation_steps, batch_size)


def save_every_n_epochs(num_epochs: int, every: int | None, ratio: int | None) -> int | None:
    """``--save_n_epoch_ratio`` (N saves over the run) overrides ``--save_every_n_epochs``."""
    if ratio:
        return max(1, num_epochs // ratio)
    return every
