"""kohya's DeepSpeed options (its library/deepspeed_utils.py ``add_deepspeed_arguments``).

They are accepted with kohya's names, types, defaults and choices, so kohya command lines and
``--config_file`` files parse in every training script. DeepSpeed itself is not available yet (issue 16):
``--deepspeed`` stops the run before anything loads, with one line and exit code 2 that points to FSDP2
(an accelerate config file, docs/distributed.md, which also records what was found about DeepSpeed). Without
``--deepspeed`` the other options change nothing, as in kohya (they only configure its DeepSpeed plugin).
"""

from __future__ import annotations

import argparse

DEEPSPEED_UNAVAILABLE = ("--deepspeed: DeepSpeed is not available yet (issue 16); to shard training use FSDP2 "
                         "through an accelerate config file (docs/distributed.md), or train without --deepspeed")

_ONLY_WITH = "only read with --deepspeed, which is not available yet (issue 16)"


def add_deepspeed_arguments(parser: argparse.ArgumentParser) -> None:
    """``--deepspeed``, ``--zero_stage``, the offload options, the ZeRO-3 flags and
    ``--fp16_master_weights_and_gradients`` (kohya's names, types, defaults and choices)."""
    g = parser.add_argument_group("DeepSpeed (accepted; --deepspeed itself is not available yet, issue 16)")
    a = g.add_argument
    a("--deepspeed", action="store_true", help="enable DeepSpeed training: not available yet (issue 16), the run "
      "stops with exit code 2")
    a("--zero_stage", type=int, default=2, choices=[0, 1, 2, 3],
      help=f"DeepSpeed ZeRO stage 0-3 (default 2); {_ONLY_WITH}")
    a("--offload_optimizer_device", type=str, default=None, choices=[None, "cpu", "nvme"],
      help=f"offload the optimizer to cpu or nvme (ZeRO stages 2 and 3); {_ONLY_WITH}")
    a("--offload_optimizer_nvme_path", type=str, default=None,
      help=f"NVMe folder for the offloaded optimizer, e.g. /nvme (ZeRO stage 3); {_ONLY_WITH}")
    a("--offload_param_device", type=str, default=None, choices=[None, "cpu", "nvme"],
      help=f"offload the parameters to cpu or nvme (ZeRO stage 3); {_ONLY_WITH}")
    a("--offload_param_nvme_path", type=str, default=None,
      help=f"NVMe folder for the offloaded parameters, e.g. /nvme (ZeRO stage 3); {_ONLY_WITH}")
    a("--zero3_init_flag", action="store_true",
      help=f"construct the model with deepspeed.zero.Init (ZeRO stage 3); {_ONLY_WITH}")
    a("--zero3_save_16bit_model", action="store_true", help=f"save a 16-bit model (ZeRO stage 3); {_ONLY_WITH}")
    a("--fp16_master_weights_and_gradients", action="store_true",
      help="DeepSpeed ZeRO-2 with --offload_optimizer_device cpu only: keep fp16 master weights and gradients "
      f"(optimizer states stay fp32); {_ONLY_WITH}. It never changes anything without --deepspeed, as in kohya")


def deepspeed_problems(args: argparse.Namespace) -> list[str]:
    """The one-line refusal of ``--deepspeed`` (empty when it is not given)."""
    return [DEEPSPEED_UNAVAILABLE] if args.deepspeed else []
