"""DeepSpeed's CPU AdamW for ``--deepspeed --offload_optimizer_device cpu`` (docs/distributed.md#deepspeed).

With the optimizer offloaded, its state and its step live on the CPU. DeepSpeed's ``DeepSpeedCPUAdam`` (a
vectorised C++ AdamW) steps 4.4x faster there than ``torch.optim.AdamW`` (bench/cpu_adam.py: 200 M float32
parameters on 2 cores, 0.115 against 0.508 s/step) and computes the same update within float32 round-off.
So the default ``--optimizer_type AdamW`` becomes it in that case, over the same parameter groups and with
the same ``lr``, ``betas``, ``eps`` and ``weight_decay``. An explicit ``torch.optim.AdamW`` keeps torch's.
Its C++ op is compiled on first use (about 40 s; cached in ~/.cache/torch_extensions); where that fails,
torch's AdamW steps instead and a warning says why.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

logger = logging.getLogger(__name__)

CPU_ADAM = "deepspeed.ops.adam.cpu_adam.DeepSpeedCPUAdam"
_GROUP_KEYS = ("lr", "betas", "eps", "weight_decay")
_UNSUPPORTED = ("amsgrad", "maximize")  # DeepSpeedCPUAdam has no such update


def wants_cpu_adam(optimizer_type: str | None, distributed: Any) -> bool:
    """Whether the run's optimizer should be DeepSpeedCPUAdam: ``--deepspeed``, the optimizer offloaded to
    the CPU and ``--optimizer_type`` AdamW (or not given)."""
    if distributed is None or not distributed.deepspeed or distributed.offload_optimizer_device != "cpu":
        return False
    return (optimizer_type or "AdamW").lower() == "adamw"


def with_cpu_adam(built: Any) -> Any:
    """``built`` (a :class:`~library.training.optim.BuiltOptimizer` of torch's AdamW) with the same groups in
    DeepSpeedCPUAdam; ``built`` itself where an option has no equivalent there or the op cannot be built."""
    import torch

    if type(built.optimizer) is not torch.optim.AdamW:  # e.g. --use_8bit_adam with no --optimizer_type
        return built
    groups = built.optimizer.param_groups
    unsupported = sorted({key for group in groups for key in _UNSUPPORTED if group.get(key)})
    if unsupported:
        logger.warning("--offload_optimizer_device cpu: DeepSpeedCPUAdam has no %s; torch's AdamW steps on the "
                       "CPU instead (slower)", ", ".join(unsupported))
        return built
    try:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        optimizer = DeepSpeedCPUAdam([{key: group[key] for key in ("params", *_GROUP_KEYS)} for group in groups],
                                     adamw_mode=True)
    except Exception as exc:  # the JIT build of its C++ op (no compiler, no headers): keep torch's
        logger.warning("--offload_optimizer_device cpu: DeepSpeedCPUAdam could not be built (%s); torch's AdamW "
                       "steps on the CPU instead (slower)", str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return built
    for mine, theirs in zip(optimizer.param_groups, groups):
        for key, value in theirs.items():  # anything else a group carries (its name, for logs)
            mine.setdefault(key, value)
    logger.info("--offload_optimizer_device cpu: the optimizer is DeepSpeedCPUAdam (AdamW on the CPU)")
    return dataclasses.replace(built, optimizer=optimizer, name=CPU_ADAM)


def restore_step_chain(optimizer: Any) -> None:
    """After ``--resume`` loaded a DeepSpeedCPUAdam's state: bring its C++ op to the loaded step as the
    uninterrupted run reached it, so that the resumed run is bit-identical. The op keeps beta1^t and beta2^t
    for the bias correction and multiplies them by beta once per step; a fresh op would take pow(beta, t)
    instead, which rounds differently (seen: 4.5e-8 after 4 LoRA steps). So it is stepped 1, 2, ..., t on a
    one-element stand-in tensor. Anything else (another optimizer, no state yet) is left alone."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    if not isinstance(optimizer, DeepSpeedCPUAdam):
        return
    import torch

    steps = [int(state["step"]) for state in optimizer.state.values() if "step" in state]
    if not steps:
        return
    group = optimizer.param_groups[0]
    beta1, beta2 = group["betas"]
    stand_in = [torch.zeros(1) for _ in range(4)]  # weight, gradient, two moments
    for step in range(1, max(steps) + 1):
        optimizer.ds_opt_adam.adam_update(optimizer.opt_id, step, group["lr"], beta1, beta2, group["eps"],
                                          group["weight_decay"], group["bias_correction"], *stand_in)
