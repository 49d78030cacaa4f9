"""``--fused_backward_pass``: AdaFactor steps each parameter as soon as its gradient is complete.

kohya's rules (library/train_util.py ``get_optimizer``, sdxl_train.py): only with ``--optimizer_type
AdaFactor`` and ``--gradient_accumulation_steps 1``. A hook registered with torch's
``register_post_accumulate_grad_hook`` runs when backward has finished a parameter's gradient: it clips that
gradient alone to ``--max_grad_norm`` (per parameter, as kohya; 0 = no clipping), steps the optimizer for
that parameter only and frees the gradient. So the full set of gradients never lives at once. With
``--max_grad_norm 0`` the trained weights are those of the ordinary step (the same AdaFactor update, one
parameter at a time).

Besides kohya's rules, here it needs one process (the trainer averages gradients across processes after
backward, which a per-parameter step would precede) and no ``--mixed_precision fp16`` (the loss scaler
unscales and checks the whole gradient set at once). A non-finite gradient is not applied: the step's
remaining parameters are left alone and the run stops with the guard's one-line message.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import torch

from library.errors import UserError

logger = logging.getLogger(__name__)


def step_one_parameter(optimizer: torch.optim.Optimizer, param: torch.nn.Parameter, group: dict) -> None:
    """Run ``optimizer.step()`` for ``param`` alone, with the settings of its parameter ``group``: the
    optimizer sees a single group holding only ``param`` for the duration of the call."""
    groups = optimizer.param_groups
    optimizer.param_groups = [dict(group, params=[param])]
    try:
        optimizer.step()
    finally:
        optimizer.param_groups = groups


class FusedBackward:
    """The per-parameter hooks of one optimizer, and the end of each of its optimizer steps."""

    def __init__(self, optimizer: torch.optim.Optimizer, params: Sequence[torch.nn.Parameter], max_grad_norm: float):
        """Register a hook on every trained parameter the optimizer holds."""
        self.optimizer, self.max_grad_norm = optimizer, max_grad_norm
        self.non_finite = False  # a gradient of the current step was not finite
        group_of = {id(p): group for group in optimizer.param_groups for p in group["params"]}
        self.handles = [p.register_post_accumulate_grad_hook(self._hook_for(group_of[id(p)]))
                        for p in params if p.requires_grad and id(p) in group_of]

    def _hook_for(self, group: dict):
        def hook(param: torch.nn.Parameter) -> None:
            self._step(param, group)
        return hook

    @torch.no_grad()
    def _step(self, param: torch.nn.Parameter, group: dict) -> None:
        if param.grad is None:
            return
        if self.non_finite:  # the step is lost anyway: do not change more weights
            param.grad = None
            return
        if not bool(torch.isfinite(param.grad).all()):
            self.non_finite = True  # kept, so the guard can name it
            return
        if self.max_grad_norm:
            torch.nn.utils.clip_grad_norm_([param], self.max_grad_norm)
        step_one_parameter(self.optimizer, param, group)
        param.grad = None

    def end_step(self, trainer: Any) -> None:
        """The rest of an optimizer step of ``trainer`` (the parameters were stepped in the hooks): the
        non-finite-gradient guard, the learning-rate schedule, dropping what is left of the gradients."""
        norm = torch.tensor(float("inf") if self.non_finite else 0.0)
        self.non_finite = False
        trainer.guard.check_gradients(trainer.params, norm, step=trainer.progress.global_step + 1,
                                      scaler_active=False, last_saved=trainer.last_saved)
        trainer.lr_scheduler.step()
        trainer.optimizer.zero_grad(set_to_none=True)

    def remove(self) -> None:
        """Unregister the hooks."""
        for handle in self.handles:
            handle.remove()
        self.handles = []


def install_fused_backward(enabled: bool, optimizer: torch.optim.Optimizer, params: Sequence[torch.nn.Parameter],
                           *, max_grad_norm: float, num_processes: int) -> FusedBackward | None:
    """The :class:`FusedBackward` of ``--fused_backward_pass`` (None without it). The option combinations
    were checked before loading; the number of processes is known only now."""
    if not enabled:
        return None
    if num_processes > 1:
        raise UserError(f"--fused_backward_pass needs a single process here, got {num_processes}: the gradients "
                        "are averaged across processes after backward, and a per-parameter step would come first")
    fused = FusedBackward(optimizer, params, max_grad_norm)
    logger.info("fused backward pass: AdaFactor steps %d parameter tensors during backward", len(fused.handles))
    return fused
