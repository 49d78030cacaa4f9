"""kohya's multi-process options ``--ddp_timeout``, ``--ddp_gradient_as_bucket_view`` and
``--ddp_static_graph``, with what each means for this trainer.

The trainer does not wrap models in torch's DistributedDataParallel: it averages the gradients itself,
in buckets of at most :data:`library.training.trainer.ALL_REDUCE_BUCKET` elements, after backward. So:

* ``--ddp_timeout N`` (minutes) goes where kohya sends it, to accelerate's ``InitProcessGroupKwargs``:
  ``torch.distributed.init_process_group(timeout=N min)``. It bounds every collective operation (the
  gradient all-reduce, barriers, the stop flag). Not given or 0: accelerate's default (torch's, 30 minutes
  for gloo, 10 for nccl).
* ``--ddp_gradient_as_bucket_view``: as in DDP, the gradients *are* views into the all-reduce buckets
  (:class:`GradientBuckets`): backward accumulates straight into them and the all-reduce works in place,
  so no bucket-sized copy is made at each step. The averaged values are the same.
* ``--ddp_static_graph``: DDP's promise that the set of used parameters never changes, which lets it skip
  per-step bookkeeping. The trainer already reduces the same parameter list in the same order at every
  step (unused ones as zeros), so there is nothing to skip: accepted, changes nothing.
"""

from __future__ import annotations

import argparse
import datetime
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

from library.option_groups import DistributedOptions

if TYPE_CHECKING:  # torch is imported where it is used, so that parsing options stays light
    import torch

logger = logging.getLogger(__name__)


def add_ddp_arguments(parser: argparse.ArgumentParser) -> None:
    """``--ddp_timeout``, ``--ddp_gradient_as_bucket_view`` and ``--ddp_static_graph`` (kohya's names)."""
    a = parser.add_argument
    a("--ddp_timeout", type=int, default=None,
      help="timeout in minutes of every operation between processes (torch.distributed.init_process_group); "
      "default (or 0): accelerate's, i.e. torch's (30 minutes for gloo, 10 for nccl)")
    a("--ddp_gradient_as_bucket_view", action="store_true",
      help="with several processes, keep the gradients as views of the all-reduce buckets (no bucket-sized copy "
      "at each step); same results")
    a("--ddp_static_graph", action="store_true",
      help="accepted for kohya command lines, changes nothing: the gradient all-reduce already treats the set of "
      "trained parameters as fixed")


@dataclass(frozen=True)
class DdpSettings:
    """The multi-process options, validated."""

    timeout_minutes: int | None = None  # None or 0: accelerate's default
    gradient_as_bucket_view: bool = False
    static_graph: bool = False


def ddp_settings(distributed: DistributedOptions) -> DdpSettings:
    """The :class:`DdpSettings` of the command line (reads --ddp_timeout, --ddp_gradient_as_bucket_view,
    --ddp_static_graph)."""
    return DdpSettings(timeout_minutes=distributed.ddp_timeout,
                       gradient_as_bucket_view=distributed.ddp_gradient_as_bucket_view,
                       static_graph=distributed.ddp_static_graph)


def process_group_kwargs(settings: DdpSettings) -> list[Any]:
    """accelerate kwargs handlers for ``Accelerator(kwargs_handlers=...)``: an ``InitProcessGroupKwargs`` with
    the timeout when one is given (the backend stays accelerate's choice: gloo on the CPU, nccl on GPUs)."""
    if not settings.timeout_minutes:
        return []
    from accelerate.utils import InitProcessGroupKwargs

    handler = InitProcessGroupKwargs(timeout=datetime.timedelta(minutes=settings.timeout_minutes))
    # accelerate passes on only values that differ from the class defaults (backend nccl, 10 minutes), which
    # would drop exactly 10 minutes and leave gloo at torch's 30: pass the timeout always, nothing else
    handler.to_kwargs = lambda: {"timeout": handler.timeout}
    return [handler]


def process_group_timeout() -> datetime.timedelta | None:
    """The timeout of the default process group (None without one, or when torch does not expose it)."""
    import torch

    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None
    group = torch.distributed.group.WORLD
    for device in ("cpu", "cuda"):
        try:
            return group._get_backend(torch.device(device)).options._timeout
        except (AttributeError, RuntimeError, ValueError):
            continue
    return None


def describe_processes(accelerator: Any) -> str | None:
    """``"2 processes, backend gloo, timeout 0:07:00"`` for a multi-process run (None for one process)."""
    import torch

    if accelerator.num_processes <= 1:
        return None
    backend = torch.distributed.get_backend() if torch.distributed.is_initialized() else "none"
    timeout = process_group_timeout()
    return f"{accelerator.num_processes} processes, backend {backend}, timeout {timeout or 'unknown'}"


class GradientBuckets:
    """``--ddp_gradient_as_bucket_view``: persistent flat buffers whose slices are the parameters' ``.grad``.

    The buckets follow the trainer's own rule (consecutive trained parameters, at most ``bucket_elements``
    elements per bucket, one device and dtype per bucket), so they are reduced exactly as without views.
    :meth:`attach` (before each optimizer step's first backward) zeroes the buffers and points every
    trained parameter's gradient at its slice; autograd then accumulates in place.
    """

    def __init__(self, params: Sequence[torch.nn.Parameter], bucket_elements: int):
        """Lay out the buckets for the parameters that train now (``requires_grad``)."""
        self.buckets: list[tuple[torch.Tensor, list[tuple[torch.nn.Parameter, int]]]] = []
        members: list[tuple[torch.nn.Parameter, int]] = []
        size = 0
        for p in (p for p in params if p.requires_grad):
            kind = members[0][0] if members else None
            if members and (size + p.numel() > bucket_elements or p.dtype != kind.dtype or p.device != kind.device):
                self._add(members, size)
                members, size = [], 0
            members.append((p, size))
            size += p.numel()
        if members:
            self._add(members, size)

    def _add(self, members: list[tuple[torch.nn.Parameter, int]], size: int) -> None:
        import torch

        first = members[0][0]
        self.buckets.append((torch.zeros(size, dtype=first.dtype, device=first.device), members))

    def attach(self) -> None:
        """Zero the buckets and make each trained parameter's gradient its slice."""
        for flat, members in self.buckets:
            flat.zero_()
            for p, offset in members:
                if p.requires_grad:
                    p.grad = flat[offset:offset + p.numel()].view_as(p)

    def all_reduce_mean(self, world: int) -> None:
        """Average the buckets over ``world`` processes in place. A gradient that is no longer its slice
        (replaced by some code) is copied back in first, so every process reduces the same layout."""
        for flat, members in self.buckets:
            for p, offset in members:
                if p.grad is None:
                    continue
                slot = flat[offset:offset + p.numel()].view_as(p)
                if p.grad.data_ptr() != slot.data_ptr():
                    slot.copy_(p.grad)
                    p.grad = slot
            from torch import distributed

            distributed.all_reduce(flat)
            flat /= world


def gradient_buckets(settings: DdpSettings, params: Sequence[torch.nn.Parameter], num_processes: int,
                     bucket_elements: int) -> GradientBuckets | None:
    """The attached :class:`GradientBuckets` for a multi-process run with ``--ddp_gradient_as_bucket_view``
    (None otherwise: with one process nothing is reduced)."""
    if not settings.gradient_as_bucket_view or num_processes <= 1:
        return None
    buckets = GradientBuckets(params, bucket_elements)
    buckets.attach()
    logger.info("gradients are views of %d all-reduce bucket(s) (--ddp_gradient_as_bucket_view)", len(buckets.buckets))
    return buckets

