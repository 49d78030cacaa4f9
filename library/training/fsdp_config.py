"""What accelerate's config asks for when it says FSDP, and which runs this trainer can shard yet.

``accelerate launch --config_file fsdp.yaml`` with ``distributed_type: FSDP`` writes the FSDP settings into
the environment of every process (``ACCELERATE_USE_FSDP``, ``FSDP_VERSION``, ...). accelerate turns them
into ``accelerator.state.fsdp_plugin`` on GPUs; on CPUs (``ACCELERATE_USE_CPU=1``, the gloo backend) it keeps
``distributed_type`` MULTI_CPU and drops the plugin, so the same settings are read back from that environment
with accelerate's own :class:`~accelerate.utils.FullyShardedDataParallelPlugin`. Either way the trainer shards
with PyTorch FSDP2 (``fully_shard``) itself: see :mod:`library.training.sharding` and docs/distributed.md.

:func:`fsdp_problems` names, in one line each, what is refused with FSDP (exit code 2) before anything loads.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from library.errors import UserError
from library.option_groups import Options

#: optimizers whose update is element-wise, so that a sharded step equals the unsharded one
FSDP_OPTIMIZERS = ("AdamW", "SGDNesterov")
#: torch.optim classes (--optimizer_type Adam, RMSprop, ...) that are element-wise as well
FSDP_TORCH_OPTIMIZERS = ("adam", "adamw", "sgd", "rmsprop", "adagrad", "adamax", "nadam", "radam")
#: the only --network_module tested under FSDP
FSDP_NETWORK_MODULES = ("networks.lora", "networks.loha", "networks.lokr", "networks.oft")

_PREFIX = "accelerate FSDP config"


def fsdp2_accelerate_config(processes: int = 2, mixed_precision: str = "no") -> str:
    """An accelerate config file (YAML) for FSDP2 full sharding on one machine with ``processes`` processes,
    as docs/distributed.md shows it (on the CPU, ``ACCELERATE_USE_CPU=1`` keeps the processes there)."""
    return f"""compute_environment: LOCAL_MACHINE
distributed_type: FSDP
fsdp_config:
  fsdp_version: 2
  fsdp_reshard_after_forward: true
  fsdp_offload_params: false
  fsdp_state_dict_type: FULL_STATE_DICT
  fsdp_activation_checkpointing: false
mixed_precision: '{mixed_precision}'
num_machines: 1
num_processes: {processes}
machine_rank: 0
main_training_function: main
rdzv_backend: static
same_network: true
use_cpu: false
"""


@dataclass(frozen=True)
class FsdpRequest:
    """accelerate's FSDP settings that this trainer reads."""

    version: int = 2
    reshard_after_forward: bool = True
    cpu_offload: bool = False
    activation_checkpointing: bool = False
    state_dict_type: str = "FULL_STATE_DICT"


def fsdp_requested() -> bool:
    """Whether accelerate's config (through ``accelerate launch``) asks for FSDP."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def fsdp_request(accelerator: Any) -> FsdpRequest | None:
    """The FSDP settings of accelerate's config (None when it does not ask for FSDP)."""
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    if plugin is None:
        if not fsdp_requested():
            return None
        from accelerate.utils import FullyShardedDataParallelPlugin

        try:  # the settings accelerate launch wrote into the environment (what the plugin reads on GPUs)
            plugin = FullyShardedDataParallelPlugin()
        except (ValueError, TypeError, KeyError) as exc:
            raise UserError(f"{_PREFIX}: accelerate cannot read its fsdp_config ({exc})") from None
    return _request_of(plugin)


def _request_of(plugin: Any) -> FsdpRequest:
    from torch.distributed.fsdp import CPUOffloadPolicy

    reshard = plugin.reshard_after_forward
    state_dict_type = getattr(plugin.state_dict_type, "name", str(plugin.state_dict_type))
    return FsdpRequest(version=int(plugin.fsdp_version or 1),
                       reshard_after_forward=bool(reshard) if isinstance(reshard, (bool, int)) else True,
                       cpu_offload=isinstance(plugin.cpu_offload, CPUOffloadPolicy),
                       activation_checkpointing=bool(plugin.activation_checkpointing),
                       state_dict_type=state_dict_type)


def _resolved_optimizer(opts: Options) -> str:
    from library.training.optim import resolve_optimizer_name

    o = opts.optimizer
    return resolve_optimizer_name(o.optimizer_type, use_8bit_adam=o.use_8bit_adam,
                                  use_lion_optimizer=o.use_lion_optimizer)


def _optimizer_ok(name: str) -> bool:
    if name.lower() in (n.lower() for n in FSDP_OPTIMIZERS):
        return True
    from library.training.optim import BUILTIN_OPTIMIZERS

    if name.lower() in BUILTIN_OPTIMIZERS:
        return False
    bare = name.split(".")[-1].lower() if name.startswith("torch.optim.") or "." not in name else ""
    return bare in FSDP_TORCH_OPTIMIZERS


def _network_args_problem(opts: Options) -> str | None:
    for item in opts.network.network_args or ():
        key = str(item).split("=", 1)[0].strip()
        if key in ("module_dropout", "rank_dropout"):
            return (f"{_PREFIX}: --network_args {key} is not supported with FSDP yet (a module it skips has no "
                    "gradient on one process only); drop it or train without the FSDP config")
    return None


def fsdp_problems(request: FsdpRequest | None, opts: Options) -> list[str]:
    """One line per FSDP combination this trainer refuses (empty without FSDP, or when all is supported).

    Reads --network_module (when given: ``opts.given``) / --network_args / --scale_weight_norms,
    --optimizer_type (and its legacy flags), --fused_backward_pass, --mixed_precision, --ema, --torch_compile, --ddp_gradient_as_bucket_view and --deepspeed."""
    if request is None:
        return []
    if request.version != 2:
        return [f"{_PREFIX}: fsdp_version {request.version} is not supported; set fsdp_version: 2 in the "
                "accelerate config (PyTorch FSDP2, docs/distributed.md)"]
    problems = []
    if request.cpu_offload:
        problems.append(f"{_PREFIX}: fsdp_offload_params: true is not supported yet; set it to false")
    if request.activation_checkpointing:
        problems.append(f"{_PREFIX}: fsdp_activation_checkpointing is not used; set it to false and give "
                        "--gradient_checkpointing instead")
    simple = [
        (opts.distributed.deepspeed, "--deepspeed and an FSDP config cannot be combined: choose one"),
        (opts.optimizer.fused_backward_pass, "--fused_backward_pass is not supported with FSDP yet"),
        (opts.training.mixed_precision == "fp16", "--mixed_precision fp16 is not supported with FSDP yet (the "
         "gradient scaler is not shard-aware); use bf16 or no"),
        (opts.ema.ema, "--ema is not supported with FSDP yet"),
        (opts.model.torch_compile, "--torch_compile is not supported with FSDP yet"),
        (opts.distributed.ddp_gradient_as_bucket_view, "--ddp_gradient_as_bucket_view has no meaning with FSDP "
         "(FSDP reduce-scatters the gradients itself); drop it"),
        (bool(opts.network.scale_weight_norms), "--scale_weight_norms is not supported with FSDP yet"),
    ]
    problems += [f"{_PREFIX}: {text}" for bad, text in simple if bad]
    if "network_module" in opts.given and opts.network.network_module not in FSDP_NETWORK_MODULES:
        problems.append(f"{_PREFIX}: --network_module {opts.network.network_module} is not supported with FSDP "
                        f"yet (supported: {', '.join(FSDP_NETWORK_MODULES)})")
    problem = _network_args_problem(opts)
    if problem:
        problems.append(problem)
    try:
        name = _resolved_optimizer(opts)
    except UserError:
        name = None  # reported by the optimizer's own check
    if name is not None and not _optimizer_ok(name):
        problems.append(f"{_PREFIX}: --optimizer_type {name} is not supported with FSDP yet (use "
                        f"{' or '.join(FSDP_OPTIMIZERS)}, or an element-wise torch.optim class such as Adam)")
    return problems


def check_fsdp(request: FsdpRequest | None, opts: Options) -> None:
    """Raise the first of :func:`fsdp_problems` as a :class:`UserError` (exit code 2)."""
    problems = fsdp_problems(request, opts)
    if problems:
        raise UserError(problems[0])
