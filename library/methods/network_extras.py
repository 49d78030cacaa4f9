"""train_network.py's later kohya options: ``--base_weights`` (+ multipliers), ``--scale_weight_norms``,
``--fp8_base_unet`` and ``--cpu_offload_checkpointing``: their registration, their up-front checks and the
glue that applies them (``--fp8_base`` itself is shared by every script: :mod:`library.models.fp8`).

docs/train_network.md ("Base weights, max-norm regularisation, fp8") describes them.
"""

from __future__ import annotations

import argparse
import logging
import math
from typing import Any

from library.errors import UserError

logger = logging.getLogger(__name__)


def add_network_extra_arguments(parser: argparse.ArgumentParser) -> None:
    """The options above, in train_network.py's network group (kohya names, defaults and meanings)."""
    from library.models.fp8_options import add_fp8_unet_argument

    g = parser.add_argument_group("network: base weights, max-norm, fp8 (docs/train_network.md)")
    a = g.add_argument
    a("--base_weights", type=str, default=None, nargs="*", metavar="FILE",
      help="network files (LoRA, LoCon, DoRA, LoHa, LoKr) merged into the model before training, in order")
    a("--base_weights_multiplier", type=float, default=None, nargs="*", metavar="M",
      help="multiplier of each --base_weights file, one per file (default 1.0 each)")
    a("--scale_weight_norms", type=float, default=None, metavar="MAX",
      help="after every optimizer step, scale each module whose update alpha/rank·up·down has a norm above MAX "
           "back to MAX (max-norm regularisation; 1 is a good start; networks.lora only)")
    add_fp8_unet_argument(g)
    a("--cpu_offload_checkpointing", action="store_true",
      help="[EXPERIMENTAL in kohya] offload checkpointed activations to the CPU, for U-Nets or DiTs that support it; "
           "the SD1/SD2 U-Net does not: refused with --gradient_checkpointing, no effect without it")


def network_extra_problems(args: argparse.Namespace) -> list[str]:
    """Up-front checks of the options above (nothing for scripts that lack them)."""
    if not hasattr(args, "base_weights"):
        return []
    from library.methods.network_base_weights import base_weight_problems

    problems = base_weight_problems(args.base_weights, args.base_weights_multiplier)
    bad = [m for m in args.base_weights_multiplier or [] if not math.isfinite(m)]
    if bad:
        problems.append(f"--base_weights_multiplier must be finite numbers, got {bad[0]}")
    if args.cpu_offload_checkpointing:
        if args.gradient_checkpointing:
            problems.append("--cpu_offload_checkpointing: the SD1/SD2 U-Net cannot offload checkpointed activations "
                            "to the CPU (kohya-ss/sd-scripts' SD1/SD2 U-Net has no such mode either); leave it out")
        else:
            logger.warning("--cpu_offload_checkpointing has no effect without --gradient_checkpointing (and the "
                           "SD1/SD2 U-Net does not support it)")
    return problems


def check_max_norm_support(network: Any, module_name: str, max_norm: float | None) -> None:
    """UserError when ``--scale_weight_norms`` is given for a network without ``apply_max_norm_regularization``
    (or whose ``supports_max_norm_regularization()`` says no: networks.loha, lokr, dylora, oft). kohya warns
    and trains without it; a silently ignored regularisation is refused here."""
    supported = hasattr(network, "apply_max_norm_regularization") and \
        getattr(network, "supports_max_norm_regularization", lambda: True)()
    if max_norm and not supported:
        raise UserError(f"--scale_weight_norms: the network of --network_module {module_name} does not support "
                        "max-norm regularisation (apply_max_norm_regularization; networks.lora does); leave the "
                        "option out")


class MaxNormRegularizer:
    """``--scale_weight_norms``: after every optimizer step the network's modules are scaled back to the
    norm bound, and the step's ``max_norm/keys_scaled``, ``max_norm/max_key_norm`` and
    ``norm/avg_key_norm`` are kept for the logs (kohya's names)."""

    def __init__(self, network: Any, max_norm: float, device: Any):
        """Regularise ``network`` to ``max_norm``; ΔW norms are computed on ``device``."""
        self.network, self.max_norm, self.device = network, max_norm, device
        self.logs: dict[str, float] = {}
        self.mark_unchanged()

    def _version(self) -> int:
        """The sum of the parameters' in-place change counters (an optimizer step raises it)."""
        return sum(p._version for p in self.network.parameters())

    def mark_unchanged(self) -> None:
        """Take the network's current weights as regularised (a fresh or restored network)."""
        self._seen = self._version()

    def apply_if_changed(self) -> dict[str, float]:
        """:meth:`apply` when the weights changed since the last call (an optimizer step happened)."""
        if self._version() != self._seen:
            self.apply()
        return self.logs

    def apply(self) -> dict[str, float]:
        """Scale the modules; return (and keep) the step's log values."""
        scaled, mean_norm, max_norm = self.network.apply_max_norm_regularization(self.max_norm, self.device)
        self.logs = {"max_norm/keys_scaled": float(scaled), "norm/avg_key_norm": float(mean_norm),
                     "max_norm/max_key_norm": float(max_norm)}
        self.mark_unchanged()
        return self.logs
