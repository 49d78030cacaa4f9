"""The training DataLoader: one for the whole run, so ``--persistent_data_loader_workers`` keeps its workers.

Every epoch the main process tells the loader's sampler which batches this process takes (from the
batch's position in the epoch on, for a resumed run); the sampler hands ``(epoch, index, step)`` to the
workers, which build the batch with :meth:`library.data.dataset.DatasetGroup.load_batch`. The batch list
of an epoch is a pure function of (seed, epoch), so a worker that lives on from an earlier epoch derives
it itself and nothing but that small tuple crosses the process boundary. Without persistent workers
the DataLoader starts fresh workers at every epoch, exactly as a loader made per epoch would.

The processes take the epoch's batches in turn (:func:`process_share`), so the k-th batches of the N
processes are N consecutive batches of the epoch: with one bucket of one dataset (whose batches keep the
bucket's shuffled order, dataset.py ``epoch_batches``) their concatenation is exactly the k-th batch of a
one-process run with N times the batch size. Each batch says how many samples the processes train at its
step together (``global_samples``), which the trainer uses to weigh a short last batch as that run does.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from library.data.dataset import BatchSpec, DatasetGroup, noise_seed

# One sampler item: (epoch, index in this process's share of the epoch, optimizer step for token warm-up).
Item = tuple[int, int, int]


def process_share(specs: list[BatchSpec], rank: int, world: int) -> list[tuple[int, BatchSpec, bool]]:
    """Batches of ``rank``: every ``world``-th from ``rank`` on. When the epoch does not divide evenly, the
    ranks that come up short repeat their first batch with zero loss weight, so every process takes the
    same number of steps while every sample still counts exactly once."""
    share = [(p, s, False) for p, s in enumerate(specs) if p % world == rank]
    per_rank = math.ceil(len(specs) / world)
    while len(share) < per_rank:
        share.append((share[0][0], share[0][1], True))
    return share


class RunBatches(torch.utils.data.Dataset):
    """This process's batches of any epoch, built on demand (in DataLoader workers when there are any)."""

    def __init__(self, group: DatasetGroup, rank: int, world: int):
        """Batches of ``group`` for process ``rank`` of ``world``."""
        self.group, self.rank, self.world = group, rank, world
        self._epoch: int | None = None
        self._share: list[tuple[int, BatchSpec, bool]] = []
        self._global: list[int] = []

    def share(self, epoch: int) -> list[tuple[int, BatchSpec, bool]]:
        """``(position in the epoch, spec, is_padding)`` of this process's batches of ``epoch`` (kept for
        the epoch last asked for)."""
        if self._epoch != epoch:
            specs = self.group.epoch_batches(epoch)
            shares = [process_share(specs, r, self.world) for r in range(self.world)]
            self._share = shares[self.rank]
            # samples of each step over all processes (padding batches count none)
            self._global = [sum(0 if share[i][2] else len(share[i][1].items) for share in shares)
                            for i in range(len(self._share))]
            self._epoch = epoch
        return self._share

    def __len__(self) -> int:
        """Batches per epoch of this process (the same every epoch)."""
        return math.ceil(len(self.group) / self.world)

    def __getitem__(self, item: Item) -> dict[str, Any] | None:
        """The batch of ``item``; padding batches (see :func:`process_share`) get zero loss weights."""
        epoch, index, step = item
        position, spec, padding = self.share(epoch)[index]
        batch = self.group.load_batch(spec, epoch, position, step=step)
        if batch is not None:
            if isinstance(self.group, DatasetGroup):  # items are samples: the step's count over all processes
                batch["global_samples"] = self._global[index]
            else:  # a --dataset_class batch (its items are whole batches): noise seeded by the item
                batch["noise_seeds"] = [noise_seed(f"{getattr(self.group, 'seed', 0)}:{epoch}:item{spec.items}:{j}")
                                        for j in range(len(batch["loss_weights"]))]
            batch["padding"] = padding
            if padding:
                batch["loss_weights"] = torch.zeros_like(batch["loss_weights"])
        return batch


class EpochSampler(torch.utils.data.Sampler):
    """The items of the current epoch, set by the main process before each pass over the loader."""

    def __init__(self) -> None:
        self.items: list[Item] = []

    def __iter__(self):
        return iter(list(self.items))

    def __len__(self) -> int:
        return len(self.items)


def _identity(item: Any) -> Any:
    return item


class EpochLoader:
    """One DataLoader over :class:`RunBatches`, re-aimed at every epoch."""

    def __init__(self, group: DatasetGroup, *, rank: int, world: int, accumulation: int, num_workers: int,
                 persistent_workers: bool):
        """``persistent_workers`` keeps the ``num_workers`` workers from one epoch to the next."""
        self.batches = RunBatches(group, rank, world)
        self.sampler = EpochSampler()
        self.accumulation = accumulation
        # its own generator, reseeded per epoch: starting an epoch must not draw from the global RNG
        self.generator = torch.Generator()
        self.loader = torch.utils.data.DataLoader(
            self.batches, batch_size=None, sampler=self.sampler, num_workers=num_workers, collate_fn=_identity,
            generator=self.generator, persistent_workers=persistent_workers and num_workers > 0)

    def for_epoch(self, epoch: int, start: int, first_step: int) -> torch.utils.data.DataLoader:
        """The loader for ``epoch`` from this process's ``start``-th batch on; ``first_step`` is the optimizer
        step of that batch (token warm-up)."""
        count = len(self.batches.share(epoch))
        self.sampler.items = [(epoch, i, first_step + (i - start) // self.accumulation) for i in range(start, count)]
        self.generator.manual_seed(epoch)
        return self.loader
