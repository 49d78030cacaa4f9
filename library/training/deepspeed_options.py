"""kohya's DeepSpeed options (its library/deepspeed_utils.py ``add_deepspeed_arguments``) and what is refused.

They are accepted with kohya's names, types, defaults and choices, so kohya command lines and
``--config_file`` files parse in every training script. ``--deepspeed`` trains networks (``networks.lora``, ``networks.loha``, ``networks.lokr``, ``networks.oft``) and
the full model (train_db.py, fine_tune.py) with a DeepSpeed ZeRO engine built by the trainer itself
(:mod:`library.training.deepspeed_engine`, docs/distributed.md#deepspeed); accelerate only provides the
processes. Without ``--deepspeed`` the other options change nothing, as in kohya.

:func:`deepspeed_problems` names, one line each, what is refused with ``--deepspeed`` (exit code 2) before
anything loads. It reads the argparse Namespace only (the option layer); nothing here imports torch.
"""

from __future__ import annotations

import argparse
import importlib.util
import os

INSTALL_HINT = ("make setup-deepspeed, or: pip install wheel setuptools hjson msgpack ninja py-cpuinfo && "
                "DS_BUILD_OPS=0 pip install --no-build-isolation -r requirements-deepspeed.txt")
_ONLY_WITH = "only read with --deepspeed"
#: optimizers whose update is element-wise, so a ZeRO-partitioned step equals the whole one
DEEPSPEED_OPTIMIZERS = ("adamw", "sgdnesterov")
DEEPSPEED_TORCH_OPTIMIZERS = ("adam", "adamw", "sgd", "rmsprop", "adagrad", "adamax", "nadam", "radam")
DEEPSPEED_NETWORK_MODULES = ("networks.lora", "networks.loha", "networks.lokr", "networks.oft")


def add_deepspeed_arguments(parser: argparse.ArgumentParser) -> None:
    """``--deepspeed``, ``--zero_stage``, the offload options, the ZeRO-3 flags and
    ``--fp16_master_weights_and_gradients`` (kohya's names, types, defaults and choices)."""
    g = parser.add_argument_group("DeepSpeed ZeRO (optional package: requirements-deepspeed.txt; "
                                  "docs/distributed.md#deepspeed)")
    a = g.add_argument
    a("--deepspeed", action="store_true", help="train the trained modules (LoRA network, UNet / text encoder, or "
      "the token embedding of Textual Inversion / XTI) in a DeepSpeed ZeRO engine; launch with accelerate launch --multi_gpu --num_processes N (needs the "
      "package deepspeed)")
    a("--zero_stage", type=int, default=2, choices=[0, 1, 2, 3],
      help=f"DeepSpeed ZeRO stage 0-3 (default 2): 1 shards the optimizer state, 2 also the gradients, 3 also "
      f"the weights; {_ONLY_WITH}")
    a("--offload_optimizer_device", type=str, default=None, choices=[None, "cpu", "nvme"],
      help=f"offload the optimizer state and its step to the CPU (ZeRO stages 2 and 3; AdamW steps there with "
      f"DeepSpeedCPUAdam; nvme is refused); {_ONLY_WITH}")
    a("--offload_optimizer_nvme_path", type=str, default=None,
      help=f"NVMe folder for the offloaded optimizer: refused (NVMe offload is not supported); {_ONLY_WITH}")
    a("--offload_param_device", type=str, default=None, choices=[None, "cpu", "nvme"],
      help=f"offload the trained weights to the CPU (ZeRO stage 3; nvme is refused); {_ONLY_WITH}")
    a("--offload_param_nvme_path", type=str, default=None,
      help=f"NVMe folder for the offloaded parameters: refused (NVMe offload is not supported); {_ONLY_WITH}")
    a("--zero3_init_flag", action="store_true",
      help=f"construct the model with deepspeed.zero.Init: refused (the model loads whole, then the engine "
      f"partitions the trained modules); {_ONLY_WITH}")
    a("--zero3_save_16bit_model", action="store_true", help="accepted for kohya's command lines; changes nothing "
      "(saved models are always gathered to full weights, in the --save_precision dtype)")
    a("--fp16_master_weights_and_gradients", action="store_true",
      help="DeepSpeed fp16 master weights: refused with --deepspeed (its fp16 mode is not used); it never changes "
      "anything without --deepspeed, as in kohya")


def _optimizer_problems(args: argparse.Namespace) -> list[str]:
    from library.errors import UserError
    from library.training.optim import resolve_optimizer_name

    try:
        name = resolve_optimizer_name(getattr(args, "optimizer_type", None),
                                      use_8bit_adam=bool(getattr(args, "use_8bit_adam", False)),
                                      use_lion_optimizer=bool(getattr(args, "use_lion_optimizer", False)))
    except UserError:
        return []  # reported by the optimizer's own check
    if _optimizer_ok(name):
        return []
    return [f"--deepspeed: --optimizer_type {name} is not supported yet (use AdamW or SGDNesterov, or an "
            "element-wise torch.optim class such as Adam)"]


def _optimizer_ok(name: str) -> bool:
    if name.lower() in DEEPSPEED_OPTIMIZERS:
        return True
    from library.training.optim import BUILTIN_OPTIMIZERS

    if name.lower() in BUILTIN_OPTIMIZERS:
        return False
    bare = name.split(".")[-1].lower() if name.startswith("torch.optim.") or "." not in name else ""
    return bare in DEEPSPEED_TORCH_OPTIMIZERS


def _setting_problems(args: argparse.Namespace) -> list[str]:
    """The DeepSpeed settings themselves: stage and offload combinations, NVMe, the ZeRO-3 flags."""
    stage, problems = args.zero_stage, []
    nvme = [o for o, v in (("--offload_optimizer_device nvme", args.offload_optimizer_device == "nvme"),
                           ("--offload_param_device nvme", args.offload_param_device == "nvme"),
                           ("--offload_optimizer_nvme_path", bool(args.offload_optimizer_nvme_path)),
                           ("--offload_param_nvme_path", bool(args.offload_param_nvme_path))) if v]
    if nvme:
        problems.append(f"--deepspeed: {nvme[0]}: NVMe offload is not supported (untested; it needs DeepSpeed's "
                        "async_io op and libaio); use --offload_optimizer_device cpu / --offload_param_device cpu")
    if args.offload_optimizer_device == "cpu" and stage not in (2, 3):
        problems.append(f"--offload_optimizer_device cpu needs --zero_stage 2 or 3 (got {stage})")
    if args.offload_param_device == "cpu" and stage != 3:
        problems.append(f"--offload_param_device cpu needs --zero_stage 3 (got {stage})")
    if args.zero3_init_flag:
        problems.append("--zero3_init_flag is not supported: the model loads whole on every process and the "
                        "engine partitions the trained modules when it is built; drop it")
    if args.fp16_master_weights_and_gradients:
        problems.append("--fp16_master_weights_and_gradients is not supported with --deepspeed (DeepSpeed's fp16 "
                        "mode is not used); drop it")
    return problems


def _training_problems(args: argparse.Namespace) -> list[str]:
    """What the run asks for that is not supported (or not tested) under DeepSpeed yet."""
    problems = []
    simple = [
        (getattr(args, "mixed_precision", "no") == "fp16", "--mixed_precision fp16 is not supported (the trainer's "
         "gradient scaler is not used by the engine); use bf16 or no"),
        (getattr(args, "full_fp16", False) or getattr(args, "full_bf16", False), "--full_fp16 / --full_bf16 are "
         "not supported (the engine keeps the trained weights in float32)"),
        (getattr(args, "fused_backward_pass", False), "--fused_backward_pass is not supported"),
        (getattr(args, "ema", False) and args.zero_stage == 3, "--ema with --zero_stage 3 is not supported (the "
         "weights are partitioned; the EMA reads whole weights on the main process); use --zero_stage 2"),
        (getattr(args, "torch_compile", False), "--torch_compile is not supported"),
        (getattr(args, "ddp_gradient_as_bucket_view", False), "--ddp_gradient_as_bucket_view has no meaning "
         "(the engine reduces the gradients itself); drop it"),
        (bool(getattr(args, "scale_weight_norms", None)), "--scale_weight_norms is not supported"),
        (os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true", "accelerate's DeepSpeed config "
         "(distributed_type: DEEPSPEED) is not used; launch with accelerate launch --multi_gpu --num_processes N "
         "(or a MULTI_GPU config) and give --deepspeed --zero_stage N"),
    ]
    problems += [text if text.startswith("--deepspeed") else f"--deepspeed: {text}" for bad, text in simple if bad]
    module = getattr(args, "network_module", None)
    if module is not None and module not in DEEPSPEED_NETWORK_MODULES:
        problems.append(f"--deepspeed: --network_module {module} is not supported yet (supported: "
                        f"{', '.join(DEEPSPEED_NETWORK_MODULES)})")
    for item in getattr(args, "network_args", None) or ():
        key = str(item).split("=", 1)[0].strip()
        if key in ("module_dropout", "rank_dropout"):
            problems.append(f"--deepspeed: --network_args {key} is not supported (a module it skips has no "
                            "gradient on one process only)")
    return problems + _optimizer_problems(args)


def deepspeed_problems(args: argparse.Namespace) -> list[str]:
    """One line per refused ``--deepspeed`` combination (empty without ``--deepspeed``)."""
    if not args.deepspeed:
        return []
    if importlib.util.find_spec("deepspeed") is None:
        return [f"--deepspeed needs the package 'deepspeed', which is not installed ({INSTALL_HINT})"]
    return _setting_problems(args) + _training_problems(args)
