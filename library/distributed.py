"""Start-up work done once for all processes of a multi-process run (``accelerate launch``).

The process group is the one accelerate started (``torch.distributed``, gloo on the CPU, nccl on GPUs), so
every wait here is bounded by its timeout, i.e. ``--ddp_timeout`` (library/training/ddp_options.py). With
one process (or no process group) every helper simply runs the work here.

* :func:`main_computes`: the main process (global rank 0) runs a function and the others receive its result
  (``torch.distributed.broadcast_object_list``); an input error raised on the main process is raised on
  every process, so nobody is left waiting for a result that never comes.
* :func:`gather_lists`: every process contributes a list; every process gets all of them, in rounds of
  bounded size (used to share latents that each process encoded for its own share of the images).
* :func:`record_start_up`: part of ``--record_training_dir DIR`` (library/training/training_record.py): once
  :func:`record_start_up_into` named DIR for this run, appends a JSON line to
  ``DIR/startup-<name>-rank<rank>.jsonl`` (which process read or wrote what during start-up).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any, TypeVar

from library.errors import UserError

T = TypeVar("T")
GATHER_ROUND = 256  # items per process and round in gather_lists (bounds the pickled buffers)


def rank_and_world() -> tuple[int, int]:
    """``(global rank, number of processes)`` of the running process group; ``(0, 1)`` without one."""
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _timeout_hint(what: str, exc: BaseException) -> UserError:
    """The one-line error of a wait between processes that failed (usually the process group timeout)."""
    first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return UserError(f"waiting for the other processes to finish {what} failed ({first[:200]}); if it timed out, "
                     "give a longer --ddp_timeout (minutes) or run this step once with one process first "
                     "(its results are cached)")


def main_computes(work: Callable[[], T], what: str) -> T:
    """``work()`` run on the main process only, its result sent to every process (see the module docstring).

    A :class:`UserError` raised by ``work`` on the main process is raised (with the same message) on every
    process. ``what`` names the work in the error of a failed wait."""
    import torch

    rank, world = rank_and_world()
    if world == 1:
        return work()
    payload: list[Any] = [None]
    if rank == 0:
        try:
            payload = [("ok", work())]
        except UserError as exc:
            payload = [("error", str(exc))]
    try:
        torch.distributed.broadcast_object_list(payload, src=0)
    except (RuntimeError, ValueError) as exc:  # DistBackendError is a RuntimeError
        raise _timeout_hint(what, exc) from None
    status, value = payload[0]
    if status == "error":
        raise UserError(value)
    return value


def wait_for_all(what: str) -> None:
    """A barrier of all processes (no-op with one), bounded by the process group timeout (``--ddp_timeout``)."""
    import torch

    _, world = rank_and_world()
    if world == 1:
        return
    try:
        if torch.distributed.get_backend() == "nccl":
            torch.distributed.barrier(device_ids=[torch.cuda.current_device()])
        else:
            torch.distributed.barrier()
    except (RuntimeError, ValueError) as exc:
        raise _timeout_hint(what, exc) from None


def gather_lists(local: list[T], what: str) -> list[list[T]]:
    """Every process's ``local`` list, indexed by rank, on every process (``[local]`` with one process).

    The lists travel in rounds of at most :data:`GATHER_ROUND` items per process, so the pickled buffers
    stay small however many items there are."""
    import torch

    _, world = rank_and_world()
    if world == 1:
        return [local]
    out: list[list[T]] = [[] for _ in range(world)]
    start = 0
    while True:
        chunk = local[start:start + GATHER_ROUND]
        received: list[Any] = [None] * world
        try:
            torch.distributed.all_gather_object(received, (chunk, start + GATHER_ROUND < len(local)))
        except (RuntimeError, ValueError) as exc:
            raise _timeout_hint(what, exc) from None
        for rank, (items, _) in enumerate(received):
            out[rank].extend(items)
        if not any(more for _, more in received):
            return out
        start += GATHER_ROUND


_START_UP_RECORD: list[str | None] = [None]  # the --record_training_dir of the run this process is starting


def record_start_up_into(folder: str | None) -> None:
    """Name the ``--record_training_dir`` folder of the run now starting (None: record nothing); the start
    call (library/run_start.py) sets it for every run, so a second run in one process never writes into
    the first run's folder."""
    _START_UP_RECORD[0] = folder


def recording_start_up() -> bool:
    """Whether this run records its start-up (``--record_training_dir`` given)."""
    return bool(_START_UP_RECORD[0])


def record_start_up(name: str, payload: Any) -> None:
    """With a ``--record_training_dir`` named (:func:`record_start_up_into`), append ``payload`` as a JSON
    line to ``<dir>/startup-<name>-rank<rank>.jsonl``; does nothing otherwise."""
    folder = _START_UP_RECORD[0]
    if not folder:
        return
    os.makedirs(folder, exist_ok=True)
    rank, _ = rank_and_world()
    with open(os.path.join(folder, f"startup-{name}-rank{rank}.jsonl"), "a", encoding="utf-8") as handle:
        handle.write(json.dumps(payload) + "\n")