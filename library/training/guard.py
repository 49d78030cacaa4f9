"""Guardrails of the training loop: stop at the first non-finite loss or gradient, and say where.

The message is one line (a :class:`~library.errors.UserError`, exit code 2) naming the optimizer step,
the epoch, the image keys of the batch(es) of that step, the first trained module whose weights or
gradient are not finite (in the order of the method's trained parameters, with names as
``named_parameters`` of the network / UNet / text encoder give them) and the last file saved.

With ``--mixed_precision fp16`` the gradient scaler already skips steps whose gradients overflowed
(and lowers its scale), so only the loss is checked there. With several processes the gradients are
identical after their all-reduce, and a flag is all-reduced so every process stops at the same step.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import torch

from library.errors import UserError

logger = logging.getLogger(__name__)

KEYS_SHOWN = 4


def parameter_names(method: Any, model: Any) -> dict[int, str]:
    """``id(parameter) → name`` for the method's trained parameters: network parameters by their own
    names (``lora_unet_…​.lora_up.weight``), model parameters as ``unet.…`` / ``text_encoder.…``."""
    trained = {id(p) for p in method.trainable_parameters()}
    names: dict[int, str] = {}
    roots = [("", method.network), ("unet.", getattr(model, "unet", None)),
             ("text_encoder.", getattr(model, "text_encoder", None))]
    for prefix, root in roots:
        if not isinstance(root, torch.nn.Module):
            continue
        for name, param in root.named_parameters():
            if id(param) in trained and id(param) not in names:
                names[id(param)] = prefix + name
    return names


def describe_parameter(name: str | None, index: int) -> str:
    """The parameter's dotted name (module path and parameter), or its position when it has none."""
    return name or f"trained tensor #{index}"


def total_grad_norm(params: Sequence[torch.Tensor]) -> torch.Tensor:
    """The 2-norm over every gradient, exactly as ``clip_grad_norm_`` computes it (0 without gradients)."""
    return torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])


class TrainingGuard:
    """Checks the loss of every micro-batch and the gradients of every optimizer step."""

    def __init__(self, method: Any, model: Any, accelerator: Any):
        """Names are looked up lazily (only when something went wrong)."""
        self.method, self.model, self.accelerator = method, model, accelerator
        self.step_keys: list[str] = []
        self.epoch = 0
        self.pending: str | None = None  # this process's non-finite loss, reported at the gradient check

    def _first_bad(self, tensors: Sequence[torch.Tensor | None]) -> tuple[int, int]:
        """(index of the first non-finite tensor or -1, how many are non-finite)."""
        first, count = -1, 0
        for i, t in enumerate(tensors):
            if t is not None and not bool(torch.isfinite(t).all()):
                count += 1
                first = i if first < 0 else first
        return first, count

    def _where(self, params: list[torch.Tensor], index: int) -> str:
        return describe_parameter(parameter_names(self.method, self.model).get(id(params[index])), index)

    def _images(self, keys: Sequence[str]) -> str:
        shown = ", ".join(keys[:KEYS_SHOWN])
        return shown + (f" and {len(keys) - KEYS_SHOWN} more" if len(keys) > KEYS_SHOWN else "")

    def check_loss(self, loss: torch.Tensor, *, step: int, epoch: int, keys: Sequence[str],
                   last_saved: Any = None) -> None:
        """Record the batch's keys; stop when ``loss`` is not finite (``step`` is the step being trained)."""
        self.step_keys.extend(keys)
        self.epoch = epoch
        if bool(torch.isfinite(loss)):
            return
        params = list(self.method.trainable_parameters())
        first, count = self._first_bad(params)
        if first >= 0:
            cause = f"trained weights are already non-finite in {count} tensor(s), first in {self._where(params, first)}"
        else:
            peaks = [float(p.detach().abs().max()) if p.numel() else 0.0 for p in params]
            largest = max(range(len(peaks)), key=peaks.__getitem__) if peaks else -1
            where = f" (largest |w| {peaks[largest]:.3g} in {self._where(params, largest)})" if peaks else ""
            cause = (f"every trained weight is finite{where}, so the forward pass overflowed (check those images, "
                     "lower the learning rate, or avoid fp16)")
        saved = f"; last saved: {last_saved}" if last_saved else ""
        message = (f"the loss became {loss.item()} at step {step} (epoch {epoch}, images "
                   f"{self._images(list(keys))}); {cause}{saved}")
        if self.accelerator.num_processes == 1:
            raise UserError(message)
        self.pending = self.pending or message  # every process must reach the gradient check together

    def check_gradients(self, params: list[torch.Tensor], norm: torch.Tensor | None, *, step: int,
                        scaler_active: bool = False, last_saved: Any = None) -> None:
        """Stop when a gradient of this optimizer step is not finite (``norm`` from clipping, or computed)."""
        keys, self.step_keys = self.step_keys, []
        bad_grad = False
        if not scaler_active:
            norm = total_grad_norm(params) if norm is None else norm
            bad_grad = norm is not None and not bool(torch.isfinite(norm))
        other = False
        if self.accelerator.num_processes > 1:
            flag = torch.tensor([1.0 if self.pending else 0.0], device=self.accelerator.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            other = bool(flag.item()) and not self.pending
        if self.pending:
            raise UserError(self.pending)
        saved = f"; last saved: {last_saved}" if last_saved else ""
        if bad_grad:
            first, count = self._first_bad([p.grad for p in params])
            where = self._where(params, first) if first >= 0 else "an unknown tensor"
            raise UserError(f"the gradient became non-finite at step {step} (epoch {self.epoch}, images "
                            f"{self._images(keys)}): {count} of {len(params)} trained tensor(s), first in {where}"
                            f"{saved}")
        if other:
            raise UserError(f"another process got a non-finite loss at step {step} (see its message){saved}")
