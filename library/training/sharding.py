"""PyTorch FSDP2 (``torch.distributed.fsdp.fully_shard``) for the training loop (docs/distributed.md).

Only the trained modules are sharded; what stays frozen (the VAE, and for LoRA the UNet and text encoder)
stays outside, replicated on every process:

* full model (train_db.py, fine_tune.py): the UNet, and the text encoder when it is in the optimizer. Every
  UNet down/mid/up block and every text-encoder layer is its own FSDP unit (all-gathered just before it runs,
  freed after); the remaining weights (conv_in, time embedding, conv_out, token and position embeddings, the
  final layer norm) form the root unit.
* LoRA (train_network.py): the network, one unit (it is small).
* Textual Inversion / XTI: the text encoder's token-embedding module, one unit. Its whole matrix is the
  optimizer's parameter (as without FSDP), so the matrix, its gradient and the AdamW moments are split by
  rows over the processes; the new rows are the last ones. The rest of the text encoder stays frozen and
  replicated; the method restores the old rows of each shard after every step.

The trained modules are children of one :class:`TrainedModules` root, and *its* forward is what the loop
calls for every micro-batch (it runs the whole loss computation), so FSDP's hooks run around all uses of the
trained weights: a LoRA module's weights are used inside the frozen UNet's forward, where no hook of the
LoRA module itself would run. FSDP reduce-scatters (averages) the gradients in backward, so the trainer's
own all-reduce is skipped; :meth:`Sharding.grad_norm` is the 2-norm over all shards.

Saving: every export first gathers the full weights on the main process (FSDP full state dict, on the CPU);
the method then saves them as in a one-process run (:meth:`Sharding.full_weights`), so the files have the same
keys, dtypes and metadata. ``--save_state`` gathers the weights and the optimizer state the same way (a
collective step); such a state resumes exactly with the same number of processes and is refused with another
(:func:`check_state`; docs/distributed.md, Saving and resuming).
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from library.errors import UserError
from library.training.fsdp_config import FsdpRequest

logger = logging.getLogger(__name__)

STATE_KEY = "fsdp"  # in a state's "extra": {"version": 2, "world_size": N}


class TrainedModules(torch.nn.Module):
    """The root FSDP unit: the trained modules as children; ``forward(fn, *args)`` runs ``fn(*args)``, so
    everything the loop computes with the trained weights happens inside this module's forward."""

    def __init__(self, parts: dict[str, torch.nn.Module]):
        """``parts``: child name → trained module (``unet``, ``text_encoder`` or ``network``)."""
        super().__init__()
        for name, module in parts.items():
            self.add_module(name, module)

    def forward(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)`` with the root unit's weights gathered."""
        return fn(*args, **kwargs)


def trained_parts(method: Any, model: Any) -> dict[str, torch.nn.Module]:
    """The modules a method trains, by their name in the root: the network for LoRA, the UNet (and the text
    encoder when it is in the optimizer) for the full model, the token-embedding module for Textual Inversion
    and XTI (it stays a child of the text encoder as well, which uses it where it always did)."""
    if method.network is not None:
        return {"network": method.network}
    if method.name in ("textual_inversion", "xti"):
        return {"token_embedding": method.embedding}
    if method.name == "full_model":
        parts = {"unet": model.unet}
        if method.text_encoder_in_optimizer:
            parts["text_encoder"] = model.text_encoder
        return parts
    raise UserError(f"accelerate FSDP config: the {method.name} method cannot be sharded yet; train it without "
                    "the FSDP config")


def shard_units(parts: dict[str, torch.nn.Module]) -> list[torch.nn.Module]:
    """The inner FSDP units: the UNet's down/mid/up blocks and the text encoder's layers (a network is one
    unit with the root)."""
    units: list[torch.nn.Module] = []
    unet = parts.get("unet")
    if unet is not None:
        units += list(getattr(unet, "down_blocks", []))
        if getattr(unet, "mid_block", None) is not None:
            units.append(unet.mid_block)
        units += list(getattr(unet, "up_blocks", []))
    te = parts.get("text_encoder")
    if te is not None:
        for name, module in te.named_modules():
            if name.endswith("encoder.layers") and isinstance(module, torch.nn.ModuleList):
                units += list(module)
                break
    return units


class GatheredOptimizer:
    """A gathered (full) optimizer state dict in the place of the optimizer, for
    :func:`library.training.checkpoint.save_state`, which asks for ``state_dict()``."""

    def __init__(self, state: dict[str, Any]):
        """``state``: the full optimizer state dict (parameter names as keys)."""
        self.state = state

    def state_dict(self) -> dict[str, Any]:
        """The gathered state."""
        return self.state


class Sharding:
    """The sharded trained modules of one run and what the trainer does differently with them."""

    def __init__(self, root: TrainedModules, request: FsdpRequest, *, world_size: int, is_main: bool):
        """``root``: the already sharded :class:`TrainedModules`."""
        self.root, self.request = root, request
        self.world_size, self.is_main = world_size, is_main
        self._last_batch: dict[str, Any] | None = None

    # ---- the step ----------------------------------------------------------------------------

    def forward(self, fn: Callable[..., torch.Tensor], batch: dict[str, Any]) -> torch.Tensor:
        """``fn(batch)`` (the micro-batch's loss) through the root's forward, so FSDP's hooks run."""
        if not batch.get("padding"):
            self._last_batch = batch
        return self.root(fn, batch)

    def together(self, fn: Callable[[], Any]) -> None:
        """For sample images and validation: ``fn()`` on every process inside the root's forward (no gradients);
        the root and every inner unit gather their weights when they run, so all processes must call it."""
        with torch.no_grad():
            self.root(fn)

    def stand_in(self, step: int) -> dict[str, Any]:
        """For a micro-batch whose images all failed to load: this process's previous batch with zero loss
        weights (every process must take part in every FSDP collective; it adds nothing to the gradient)."""
        if self._last_batch is None:
            raise UserError(f"accelerate FSDP config: no image of this process's first batch could be read "
                            f"(step {step}); with FSDP every process needs a batch at every micro-step — fix "
                            "or remove the unreadable images")
        batch = dict(self._last_batch)
        batch["loss_weights"] = torch.zeros_like(batch["loss_weights"])
        batch["padding"], batch["keys"] = True, []
        return batch

    @staticmethod
    def _local(t: torch.Tensor) -> torch.Tensor:
        from torch.distributed.tensor import DTensor

        return t.to_local() if isinstance(t, DTensor) else t

    def grad_norm(self, params: list[torch.nn.Parameter]) -> torch.Tensor:
        """The 2-norm over every gradient of every shard (the same value on every process)."""
        from torch.distributed.tensor import DTensor

        grads = [p.grad for p in params if p.grad is not None]
        device = grads[0].device if grads else torch.device("cpu")
        total = torch.zeros((), dtype=torch.float32, device=self._local(grads[0]).device if grads else device)
        for g in grads:
            if isinstance(g, DTensor):
                total += torch.linalg.vector_norm(g.to_local().float(), 2.0) ** 2
            elif self.is_main:  # a replicated gradient counts once
                total += torch.linalg.vector_norm(g.float(), 2.0) ** 2
        torch.distributed.all_reduce(total)
        return total.sqrt()

    def clip(self, params: list[torch.nn.Parameter], max_norm: float, norm: torch.Tensor) -> None:
        """Scale every local gradient shard as ``clip_grads_with_norm_`` does (coefficient max_norm /
        (norm + 1e-6), at most 1)."""
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        local = [self._local(p.grad) for p in params if p.grad is not None]
        if local:
            torch._foreach_mul_(local, coef.to(local[0].device))

    # ---- saving --------------------------------------------------------------------------------

    def _options(self, **kwargs: Any) -> Any:
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return StateDictOptions(**kwargs)

    def gather_weights(self) -> dict[str, torch.Tensor]:
        """The full trained weights on the main process, on the CPU (empty elsewhere). Every process calls it."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(self.root, options=self._options(full_state_dict=True, cpu_offload=True))

    def gather_optimizer(self, optimizer: Any) -> dict[str, Any]:
        """The full optimizer state (parameter names as keys) on the main process. Every process calls it."""
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(self.root, optimizer,
                                        options=self._options(full_state_dict=True, cpu_offload=True))

    @contextlib.contextmanager
    def full_weights(self, full: dict[str, torch.Tensor]) -> Iterator[None]:
        """On the main process: the trained modules hold the gathered full weights (plain CPU tensors) inside
        the block, so the method's own save writes what a one-process run writes; the shards come back after."""
        with holding_full_weights(self.root, full, "FSDP full state dict"):
            yield

    def state_parts(self, optimizer: Any) -> tuple[dict[str, torch.Tensor], GatheredOptimizer]:
        """The gathered weights and optimizer of a training state (collective: every process calls it)."""
        return self.gather_weights(), GatheredOptimizer(self.gather_optimizer(optimizer))

    def describe(self) -> dict[str, int]:
        """What a state records about the sharding (checked on resume)."""
        return {"version": self.request.version, "world_size": self.world_size}

    def load(self, payload: dict[str, Any], optimizer: Any) -> None:
        """Put a gathered state's weights and optimizer state back into the shards (every process)."""
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        set_model_state_dict(self.root, payload["trainable"], options=self._options(full_state_dict=True))
        set_optimizer_state_dict(self.root, optimizer, payload["optimizer"],
                                 options=self._options(full_state_dict=True))


@contextlib.contextmanager
def holding_full_weights(root: torch.nn.Module, full: dict[str, torch.Tensor], source: str) -> Iterator[None]:
    """Inside the block every parameter of ``root`` is the plain (frozen) tensor of the same name in ``full``;
    the sharded or partitioned parameters come back after. Used by the FSDP and DeepSpeed exports, so the
    method's own save writes what a one-process run writes."""
    swapped: list[tuple[torch.nn.Module, str, torch.nn.Parameter]] = []
    try:
        for name, param in list(root.named_parameters()):
            if name not in full:
                raise RuntimeError(f"{source} lacks {name}")
            owner_name, _, attr = name.rpartition(".")
            owner = root.get_submodule(owner_name)
            swapped.append((owner, attr, param))
            owner._parameters[attr] = torch.nn.Parameter(full[name], requires_grad=False)
        yield
    finally:
        for owner, attr, param in swapped:
            owner._parameters[attr] = param


def check_state(payload: dict[str, Any], folder: str | Path, sharding: Sharding | None) -> None:
    """Refuse a state written with FSDP in a run without it (or with another number of processes), and a
    state written without FSDP in an FSDP run."""
    recorded = (payload.get("extra") or {}).get(STATE_KEY)
    if sharding is None and recorded:
        raise UserError(f"--resume {folder}: this state was written with accelerate's FSDP config by "
                        f"{recorded['world_size']} processes; resume it with the same config and number of processes")
    if sharding is not None and not recorded:
        raise UserError(f"--resume {folder}: this state was written without FSDP; resume it without the FSDP "
                        "config (FSDP runs resume only their own states)")
    if sharding is not None and recorded["world_size"] != sharding.world_size:
        raise UserError(f"--resume {folder}: this state was written by {recorded['world_size']} FSDP processes, "
                        f"this run has {sharding.world_size}; resume with {recorded['world_size']} (a state's "
                        "place in the epoch counts each process's own batches, and a step trains one batch per "
                        "process)")


def shard_trained_modules(method: Any, model: Any, request: FsdpRequest, accelerator: Any) -> Sharding | None:
    """Shard what ``method`` trains with ``fully_shard`` (see the module docstring) and hand the method the
    sharded parameters (:meth:`library.methods.base.MethodBase.replace_parameters`), before its optimizer is
    built. None with one process (nothing to shard)."""
    world = accelerator.num_processes
    if world <= 1:
        logger.info("accelerate FSDP config with one process: nothing to shard, training as usual")
        return None
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    parts = trained_parts(method, model)
    root = TrainedModules(parts)
    name_of = {id(p): name for name, p in root.named_parameters()}
    missing = [p for p in method.trainable_parameters() if id(p) not in name_of]
    if missing:
        raise UserError(f"accelerate FSDP config: {len(missing)} trained tensor(s) of the {method.name} method are "
                        "outside the modules that are sharded; train without the FSDP config")
    mesh = init_device_mesh(accelerator.device.type, (world,))
    units = shard_units(parts)
    for unit in units:
        fully_shard(unit, mesh=mesh, reshard_after_forward=request.reshard_after_forward)
    fully_shard(root, mesh=mesh, reshard_after_forward=request.reshard_after_forward)
    sharded = dict(root.named_parameters())
    method.replace_parameters({old: sharded[name] for old, name in name_of.items()})
    count = sum(p.numel() for p in sharded.values())
    if accelerator.is_main_process:
        logger.info("FSDP2: %s sharded over %d processes (%d units, %.1fM trained parameters)",
                    " + ".join(parts), world, len(units) + 1, count / 1e6)
    return Sharding(root, request, world_size=world, is_main=accelerator.is_main_process)


def attach_sharding(trainer: Any, sharding: Sharding | None) -> None:
    """Give ``trainer`` its :class:`Sharding` after checking that nothing it runs needs the whole model on
    one process (sampling, validation, EMA, the fused backward pass, gradient buckets)."""
    if sharding is None:
        return
    needs_whole = [("--ema", trainer.ema),
                   ("--fused_backward_pass", trainer.fused_backward), ("gradient buckets", trainer.grad_buckets)]
    for what, part in needs_whole:
        if part is not None:
            raise UserError(f"accelerate FSDP config: {what} is not supported with FSDP yet")
    for part in (trainer.sampler, trainer.validator):
        if part is not None:
            part.together = sharding.together
    sharded = {id(p) for p in sharding.root.parameters()}
    if any(id(p) not in sharded for p in trainer.params):
        raise RuntimeError("the trainer's parameters are not the sharded ones (shard before making the trainer)")
    trainer.sharding = sharding
