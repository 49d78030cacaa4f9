"""Exponential moving average (EMA) of the trained weights, for every method (docs/ema.md).

The EMA covers the method's trained tensors as :meth:`Method.trainable_state_dict` names them: the
network's weights (LoRA, DyLoRA), the UNet and (while it is in the optimizer) the text encoder of
DreamBooth / fine-tuning, the new token rows of Textual Inversion and XTI. It is kept in float32 on
the training device (``--ema_device same``) or in CPU memory (``--ema_device cpu``) and updated after
every ``--ema_update_every``-th optimizer step (after the method's own step hook):

    n = number of updates so far (1 at the first);  d_n = min(--ema_decay, (1 + n) / (10 + n))
    ema ← ema + (1 − d_n) · (weights − ema)      (starting from the weights before the first step)

The warm-up ``(1 + n) / (10 + n)`` (as diffusers' EMAModel) keeps short runs from being dominated by
the starting weights. With ``--save_ema`` every saved file holds the EMA weights (the live weights
are put back right after); the training state (``--save_state``) always holds both, and ``--resume``
continues the EMA exactly. Only the main process keeps an EMA (all processes hold identical weights).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
from typing import TYPE_CHECKING, Any, Iterator

from library.errors import UserError
from library.option_groups import EmaOptions

if TYPE_CHECKING:  # torch is imported where it is used, so that building the option parser stays quick
    import torch

logger = logging.getLogger(__name__)

DEFAULT_DECAY = 0.999
WARMUP_OFFSET = 10
TRANSFER_CHUNK = 1 << 24  # elements per device-to-CPU copy with --ema_device cpu (64 MiB of fp32)


def add_ema_arguments(parser: argparse.ArgumentParser) -> None:
    """``--ema``, ``--ema_decay``, ``--ema_update_every``, ``--ema_device``, ``--save_ema``."""
    g = parser.add_argument_group("EMA of the trained weights (docs/ema.md)")
    a = g.add_argument
    a("--ema", action="store_true", help="keep an exponential moving average of the trained weights")
    a("--ema_decay", type=float, default=DEFAULT_DECAY,
      help=f"EMA decay per update (default {DEFAULT_DECAY}; warmed up as min(decay, (1+n)/(10+n)))")
    a("--ema_update_every", type=int, default=1, help="update the EMA every N optimizer steps (default 1)")
    a("--ema_device", type=str, default="same", choices=["same", "cpu"],
      help="keep the EMA on the training device (same, default) or in CPU memory (cpu)")
    a("--save_ema", action="store_true", help="saved files hold the EMA weights (implies --ema)")


def ema_problems(args: argparse.Namespace) -> list[str]:
    """Range problems of --ema_decay and --ema_update_every (for the up-front option check)."""
    problems = []
    decay = args.ema_decay
    if decay is not None and not 0.0 < decay < 1.0:
        problems.append(f"--ema_decay must be between 0 and 1 (exclusive), got {decay:g}")
    every = args.ema_update_every
    if every is not None and every < 1:
        problems.append(f"--ema_update_every must be at least 1, got {every}")
    return problems


def warmed_decay(decay: float, updates: int) -> float:
    """The decay of the ``updates``-th update (counted from 1): ``min(decay, (1 + n) / (10 + n))``."""
    return min(decay, (1.0 + updates) / (WARMUP_OFFSET + updates))


class ExponentialMovingAverage:
    """The EMA of one method's trained tensors."""

    def __init__(self, method: Any, *, decay: float = DEFAULT_DECAY, update_every: int = 1,
                 device: torch.device | str | None = None):
        """Start from the method's current weights; ``device`` None keeps each tensor on its own device."""
        import torch

        self.method, self.decay, self.update_every = method, decay, update_every
        live = method.trainable_state_dict()
        # entries that share storage with the trained parameters are read in place at every update (other
        # entries, such as LoRA alphas, never change); a method whose state dict holds copies (Textual
        # Inversion's new rows) has every floating-point entry averaged and fetched again at each update
        pointers = {p.data_ptr() for p in method.trainable_parameters()}
        aliased = [k for k, v in live.items() if v.is_floating_point() and v.data_ptr() in pointers]
        self.names = aliased or [k for k, v in live.items() if v.is_floating_point()]
        if not self.names:
            raise UserError("--ema: this method has no trained floating-point weights to average")
        tensors = [live[k] for k in self.names]
        self._live = tensors if aliased else None
        self.device = torch.device(device) if device is not None else None
        self.save_files = False  # --save_ema: saved files hold the EMA (see saving())
        self.shadow = [self._place(t).clone() for t in tensors]
        self.updates = 0

    def _place(self, tensor: torch.Tensor) -> torch.Tensor:
        import torch

        return tensor.detach().to(self.device or tensor.device, torch.float32)

    def _current(self) -> list[torch.Tensor]:
        if self._live is not None:
            return self._live
        state = self.method.trainable_state_dict()
        return [state[k] for k in self.names]

    def update(self, global_step: int) -> bool:
        """Fold the current weights in when ``global_step`` is a multiple of ``update_every``."""
        import torch

        if global_step % self.update_every:
            return False
        self.updates += 1
        weight = 1.0 - warmed_decay(self.decay, self.updates)
        current = self._current()
        if self.device is None or all(t.device == self.device for t in current):
            with torch.no_grad():
                torch._foreach_lerp_(self.shadow, [t.detach().float() for t in current], weight)
            return True
        self._update_across_devices(current, weight)
        return True

    def _update_across_devices(self, current: list[torch.Tensor], weight: float) -> None:
        """Copy the weights to the EMA's device in a few large chunks (one transfer each), then lerp."""
        import torch

        start = 0
        with torch.no_grad():
            while start < len(current):
                end, size = start, 0
                while end < len(current) and (end == start or size + current[end].numel() <= TRANSFER_CHUNK):
                    size += current[end].numel()
                    end += 1
                flat = torch.cat([t.detach().reshape(-1).float() for t in current[start:end]]).to(self.device)
                parts = [p.view_as(s) for p, s in zip(flat.split([t.numel() for t in current[start:end]]),
                                                      self.shadow[start:end])]
                torch._foreach_lerp_(self.shadow[start:end], parts, weight)
                start = end

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs (tensors on the CPU)."""
        return {"names": list(self.names), "shadow": [s.detach().cpu().clone() for s in self.shadow],
                "updates": self.updates, "decay": self.decay, "update_every": self.update_every}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Continue a saved EMA exactly; a state saved without ``--ema`` restarts it from the current weights."""
        if not state:
            logger.warning("--resume: the state has no EMA (saved without --ema); the EMA starts from the resumed "
                           "weights")
            self.shadow = [self._place(t).clone() for t in self._current()]
            self.updates = 0
            return
        if list(state["names"]) != self.names:
            raise UserError("--resume: the saved EMA does not fit the trained weights of this run (another method, "
                            "network or model?)")
        for shadow, saved in zip(self.shadow, state["shadow"]):
            if tuple(saved.shape) != tuple(shadow.shape):
                raise UserError(f"--resume: the saved EMA tensor {tuple(saved.shape)} does not fit this run's "
                                f"{tuple(shadow.shape)}")
            shadow.copy_(saved)
        self.updates = int(state["updates"])
        if state.get("decay") != self.decay or state.get("update_every") != self.update_every:
            logger.warning("--resume: --ema_decay / --ema_update_every differ from the resumed run (%s / %s); "
                           "continuing with the new values", state.get("decay"), state.get("update_every"))

    def averaged_state_dict(self) -> dict[str, torch.Tensor]:
        """The EMA as a state dict with the method's names (CPU float32 copies)."""
        return {name: s.detach().cpu().clone() for name, s in zip(self.names, self.shadow)}

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """The method's trained weights replaced by the EMA for the duration (e.g. a save); the live weights
        are kept in CPU memory meanwhile and put back exactly."""
        live = self.method.trainable_state_dict()
        backup = {k: v.detach().to("cpu", copy=True) for k, v in live.items()}
        averaged = dict(backup)
        averaged.update(zip(self.names, self.shadow))
        self.method.load_trainable_state_dict(averaged)
        try:
            yield
        finally:
            self.method.load_trainable_state_dict(backup)


    def saving(self) -> contextlib.AbstractContextManager:
        """:meth:`applied` with ``--save_ema`` (for a save), else a no-op context."""
        return self.applied() if self.save_files else contextlib.nullcontext()


def make_ema(ema_options: EmaOptions, method: Any, accelerator: Any) -> ExponentialMovingAverage | None:
    """The run's EMA for ``--ema`` / ``--save_ema`` (main process only), else None; reads --ema_decay,
    --ema_update_every, --ema_device."""
    if not ema_options.enabled or not accelerator.is_main_process:
        return None
    device = "cpu" if ema_options.ema_device == "cpu" else None
    ema = ExponentialMovingAverage(method, decay=ema_options.ema_decay, update_every=ema_options.ema_update_every,
                                   device=device)
    ema.save_files = ema_options.save_ema
    size = sum(s.numel() for s in ema.shadow)
    logger.info("EMA of %d trained tensor(s) (%s values) on %s, decay %g, every %d step(s)%s", len(ema.shadow),
                f"{size:,}", "the CPU" if device == "cpu" else "the training device", ema_options.ema_decay,
                ema_options.ema_update_every, "; saved files hold the EMA" if ema_options.save_ema else "")
    if not ema_options.save_ema:
        logger.warning("--ema without --save_ema: saved files hold the raw weights; the EMA is kept only in the "
                       "training state (--save_state)")
    return ema
