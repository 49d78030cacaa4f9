"""train_network.py's own options (kohya names and defaults): the network, its learning rates and metadata, and
kohya's later additions ``--base_weights`` (+ multipliers), ``--scale_weight_norms``, ``--fp8_base_unet`` and
``--cpu_offload_checkpointing``; their registration and their up-front checks. The network method
(library/methods/network*.py) applies them; docs/train_network.md describes them.
"""

from __future__ import annotations

import argparse
import logging
import math
from collections.abc import Sequence
from pathlib import Path

logger = logging.getLogger(__name__)


def add_network_arguments(parser: argparse.ArgumentParser) -> None:
    """train_network.py's own options."""
    g = parser.add_argument_group("network")
    a = g.add_argument
    a("--network_module", type=str, default=None, help="module with create_network(), e.g. networks.lora")
    a("--network_dim", type=int, default=None, help="rank (module default: 4)")
    a("--network_alpha", type=float, default=1, help="alpha; scale = alpha/dim (default 1; 0 = dim)")
    a("--network_dropout", type=float, default=None, help="neuron dropout on the LoRA down output")
    a("--network_args", type=str, default=None, nargs="*", help="extra key=value arguments for create_network")
    a("--network_weights", type=str, default=None, help="start from these network weights")
    a("--dim_from_weights", action="store_true", help="take dims/alphas from --network_weights")
    a("--network_train_unet_only", action="store_true", help="train only the UNet modules")
    a("--network_train_text_encoder_only", action="store_true", help="train only the text-encoder modules")
    a("--unet_lr", type=float, default=None, help="learning rate of the UNet modules")
    a("--text_encoder_lr", type=float, default=None, help="learning rate of the text-encoder modules")
    a("--no_metadata", action="store_true", help="write only minimal metadata into the saved file")
    a("--training_comment", type=str, default=None, help="stored as ss_training_comment")
    add_network_extra_arguments(parser)  # --base_weights, --scale_weight_norms, --fp8_base_unet, ...
    from library.training.start_step import add_start_step_arguments
    from library.training.validation import add_max_validation_steps_argument
    add_start_step_arguments(parser)  # --initial_step / --initial_epoch / --skip_until_initial_step
    add_max_validation_steps_argument(parser)  # --max_validation_steps (library/training/validation.py)


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


def network_problems(args: argparse.Namespace) -> list[str]:
    """Up-front checks of train_network.py's own options (nothing for scripts that lack them)."""
    if not hasattr(args, "base_weights"):
        return []
    problems = []
    if args.network_train_unet_only and args.network_train_text_encoder_only:
        problems.append("--network_train_unet_only and --network_train_text_encoder_only leave nothing to train; "
                        "give at most one")
    problems += base_weight_problems(args.base_weights, args.base_weights_multiplier)
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


def base_weight_problems(files: Sequence[str] | None, multipliers: Sequence[float] | None) -> list[str]:
    """What is wrong with ``--base_weights`` / ``--base_weights_multiplier`` (checked before loading)."""
    problems = []
    files = list(files or [])
    if multipliers is not None and len(multipliers) != len(files):
        if not files:
            problems.append("--base_weights_multiplier needs --base_weights (one multiplier per file)")
        else:
            problems.append(f"--base_weights_multiplier: {len(multipliers)} value(s) for {len(files)} --base_weights "
                            "file(s); give one multiplier per file, or none for 1.0 each")
    for file in files:
        path = Path(file)
        if not path.exists():
            problems.append(f"--base_weights {file}: no such file")
        elif path.is_dir():
            problems.append(f"--base_weights {file}: is a folder; expected a network file (.safetensors, .pt, .ckpt)")
    return problems
