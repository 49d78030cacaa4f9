"""The ``--fused_backward_pass`` option and its checks, kept apart from :mod:`library.training.fused_backward`
(which does the stepping) so that parsing never imports torch."""

from __future__ import annotations

import argparse
from typing import Any
from library.option_groups import OptimizerOptions


def add_fused_backward_arguments(parser: Any) -> None:
    """``--fused_backward_pass`` (kohya registers it with the optimizer options of every script)."""
    parser.add_argument(
        "--fused_backward_pass", action="store_true",
        help="step AdaFactor for each parameter during backward, as soon as its gradient is complete, so the "
             "gradients of the whole model never exist at once (needs --optimizer_type AdaFactor, "
             "--gradient_accumulation_steps 1, one process, not --mixed_precision fp16; --max_grad_norm clips "
             "each parameter's gradient on its own)")


def _optimizer_name(optimizer: OptimizerOptions) -> str:
    if optimizer.use_8bit_adam:
        return "AdamW8bit"
    if optimizer.use_lion_optimizer:
        return "Lion"
    return optimizer.optimizer_type or "AdamW"


def fused_backward_problems(args: argparse.Namespace) -> list[str]:
    """What ``--fused_backward_pass`` cannot be combined with (empty without it): the optimizer,
    --gradient_accumulation_steps and --mixed_precision."""
    if not args.fused_backward_pass:
        return []
    problems = []
    name = _optimizer_name(OptimizerOptions.from_args(args))
    if name.lower() != "adafactor":
        problems.append(f"--fused_backward_pass needs --optimizer_type AdaFactor, got {name}")
    if args.gradient_accumulation_steps > 1:
        problems.append("--fused_backward_pass cannot be combined with --gradient_accumulation_steps "
                        f"{args.gradient_accumulation_steps}: give 1")
    if args.mixed_precision == "fp16":
        problems.append("--fused_backward_pass cannot be combined with --mixed_precision fp16 (its loss scaler needs "
                        "the whole gradient set at once): use bf16 or no")
    return problems
