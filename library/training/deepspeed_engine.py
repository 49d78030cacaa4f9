"""DeepSpeed ZeRO for the training loop (``--deepspeed``, docs/distributed.md#deepspeed).

accelerate only provides the processes (``accelerate launch --multi_gpu``, the torch.distributed process
group); accelerate's DeepSpeed plugin is not used. The trainer builds the engine itself with
``deepspeed.initialize`` on that process group, over one module: the
:class:`~library.training.sharding.TrainedModules` root that holds what the method trains (the LoRA network,
the UNet and the text encoder being fine-tuned, or the token-embedding module of Textual Inversion / XTI). Frozen modules stay outside, whole on every process.
The engine's forward is what the loop calls for every micro-batch (it runs the whole loss computation), so
ZeRO-3's gather hooks run around every use of the trained weights; ``engine.backward`` and ``engine.step``
reduce (average) the gradients over the processes, clip them (``--max_grad_norm``) and step the optimizer
built from ``--optimizer_type`` (the engine wraps it; each process keeps its partition of its state).

The trained weights stay float32 (the engine's fp16/bf16 modes are not used); ``--mixed_precision bf16``
works through autocast as in every other run, so the result equals the plain multi-process run within
float32 round-off.

Saving: exports gather the full weights on the main process (ZeRO-3: ``GatheredParameters``, one module at
a time; stages 0-2 keep whole weights on every process), then the method writes them as a one-process run
does. ``--save_state`` is collective: every process writes its partition with ``engine.save_checkpoint``
into a ``deepspeed/`` folder inside the state folder, beside our ``state.pt`` (schedule, RNGs, position); the
whole folder appears atomically. Such a state resumes exactly with the same number of processes and ZeRO
stage; another is refused with one line.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from library.errors import UserError
from library.training.sharding import GatheredOptimizer, TrainedModules, holding_full_weights, trained_parts

logger = logging.getLogger(__name__)

STATE_KEY = "deepspeed"  # in a state's "extra": {"zero_stage": N, "world_size": N}
ENGINE_DIR = "deepspeed"  # the engine's checkpoint inside a state folder
ENGINE_TAG = "engine"


def engine_config(distributed: Any, *, micro_batch: int, accumulation: int, max_grad_norm: float | None) -> dict:
    """The DeepSpeed config of kohya's options (``distributed``: the run's DistributedOptions)."""
    zero: dict[str, Any] = {"stage": distributed.zero_stage}
    if distributed.offload_optimizer_device == "cpu":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if distributed.offload_param_device == "cpu":
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if distributed.zero_stage == 3:
        zero["stage3_param_persistence_threshold"] = 0  # every trained tensor is partitioned, small ones too
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": accumulation,
        "gradient_clipping": float(max_grad_norm or 0.0),
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # SGD and the other element-wise torch.optim classes
        "zero_force_ds_cpu_optimizer": False,  # with CPU offload the optimizer of --optimizer_type runs on the CPU
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def _init_process_group() -> None:
    """Give DeepSpeed the process group accelerate made (or a one-process group when there is none)."""
    import deepspeed

    if torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend=torch.distributed.get_backend(), dist_init_required=False)
        return
    import socket

    with socket.socket() as s:  # one process: accelerate makes no group; a group of one on a free local port
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(port)), ("RANK", "0"),
                       ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(key, value)
    deepspeed.init_distributed(dist_init_required=True)


class DeepSpeedRun:
    """The engine of one run and what the trainer does differently with it: the loop's forward, backward and
    step, gathered weights for exports, the engine's partitions in ``--save_state``."""

    deepspeed = True

    def __init__(self, engine: Any, root: TrainedModules, *, stage: int, world_size: int, is_main: bool,
                 output_dir: Path):
        """``engine``: the DeepSpeedEngine over ``root``; ``output_dir``: where states are written (their
        temporary folder is made beside them)."""
        self.engine, self.root, self.stage, self.output_dir = engine, root, stage, Path(output_dir)
        self.world_size, self.is_main = world_size, is_main
        self._last_batch: dict[str, Any] | None = None
        self._staging: Path | None = None

    # ---- the step ----------------------------------------------------------------------------

    def forward(self, fn: Callable[..., torch.Tensor], batch: dict[str, Any]) -> torch.Tensor:
        """``fn(batch)`` (the micro-batch's loss) through the engine's forward, so ZeRO-3's hooks run."""
        if not batch.get("padding"):
            self._last_batch = batch
        return self.engine(fn, batch)

    def together(self, fn: Callable[[], Any]) -> None:
        """For sample images and validation at ZeRO-3: ``fn()`` on every process inside the engine's forward
        (no gradients), whose hooks gather the partitioned weights as each module runs."""
        with torch.no_grad():
            self.engine(fn)

    def stand_in(self, step: int) -> dict[str, Any]:
        """For a micro-batch whose images all failed to load: this process's previous batch with zero loss
        weights (every process takes part in every collective of the engine; it adds nothing)."""
        if self._last_batch is None:
            raise UserError(f"--deepspeed: no image of this process's first batch could be read (step {step}); "
                            "every process needs a batch at every micro-step — fix or remove the unreadable images")
        batch = dict(self._last_batch)
        batch["loss_weights"] = torch.zeros_like(batch["loss_weights"])
        batch["padding"], batch["keys"] = True, []
        return batch

    def backward(self, loss: torch.Tensor, *, boundary: bool) -> None:
        """The engine's backward of ``loss`` (already divided by the accumulation steps); ``boundary``: the
        last micro-batch before an optimizer step (the trainer's accumulation, also at an epoch's end)."""
        self.engine.set_gradient_accumulation_boundary(boundary)
        self.engine.backward(loss, scale_wrt_gas=False)

    def step(self, trainer: Any) -> None:
        """The optimizer step: the engine reduces, clips (``--max_grad_norm``) and steps; then the learning
        rate schedule. A non-finite gradient norm stops the run (as without DeepSpeed)."""
        self.engine.step()
        trainer.lr_scheduler.step()
        norm = self.engine.get_global_grad_norm()  # None where the engine computed none (stage 0, no clipping)
        norm = torch.tensor(float(norm)) if norm is not None else torch.zeros(())
        trainer.guard.check_gradients(trainer.params, norm, step=trainer.progress.global_step + 1,
                                      scaler_active=False, last_saved=trainer.last_saved)

    # ---- saving --------------------------------------------------------------------------------

    def gather_weights(self) -> dict[str, torch.Tensor] | None:
        """ZeRO-3: the full trained weights on the main process, on the CPU (empty elsewhere); every process
        calls it. Stages 0-2 keep whole weights on every process: None (nothing to gather)."""
        if self.stage != 3:
            return None
        from deepspeed.runtime.zero import GatheredParameters

        full: dict[str, torch.Tensor] = {}
        for prefix, module in self.root.named_modules():
            params = list(module.named_parameters(recurse=False))
            if not params:
                continue
            with GatheredParameters([p for _, p in params], modifier_rank=None):
                if self.is_main:
                    for name, p in params:
                        full[f"{prefix}.{name}" if prefix else name] = p.detach().to("cpu", copy=True)
        return full

    @contextlib.contextmanager
    def full_weights(self, full: dict[str, torch.Tensor] | None) -> Iterator[None]:
        """On the main process: the trained modules hold the gathered weights inside the block (ZeRO-3), so
        the method's own save writes what a one-process run writes; the partitions come back after."""
        if full is None:
            yield
            return
        with holding_full_weights(self.root, full, "the gathered ZeRO-3 weights"):
            yield

    def state_parts(self, optimizer: Any) -> tuple[dict[str, torch.Tensor], GatheredOptimizer]:
        """Collective: every process writes its partition of the weights and optimizer state (the engine's
        checkpoint) into a temporary folder beside the output; ``state.pt`` then records only where it is."""
        from library.fileio import temp_prefix

        self.output_dir.mkdir(parents=True, exist_ok=True) if self.is_main else None
        staging = [tempfile.mkdtemp(prefix=temp_prefix("deepspeed-state"), suffix=".tmp",
                                    dir=self.output_dir)] if self.is_main else [None]
        if self.world_size > 1:
            torch.distributed.broadcast_object_list(staging, src=0)
        self._staging = Path(staging[0])
        self.engine.save_checkpoint(str(self._staging / ENGINE_DIR), tag=ENGINE_TAG, save_latest=False)
        if self.world_size > 1:
            torch.distributed.barrier()
        return {}, GatheredOptimizer({"deepspeed": f"{ENGINE_DIR}/{ENGINE_TAG}"})

    def staged_state(self) -> Path:
        """Where the main process writes ``state.pt`` for :meth:`commit_state` (inside the temporary folder)."""
        assert self._staging is not None, "state_parts first"
        return self._staging / "state"

    def commit_state(self, folder: Path) -> None:
        """Main process: move our state files and the engine's checkpoint into ``folder`` in one rename (an
        older state of that name is replaced in the same step)."""
        from library.fileio import atomic_path

        staging, self._staging = self._staging, None
        try:
            with atomic_path(folder, replace_kind="state") as tmp:
                os.replace(staging / "state", tmp)
                os.replace(staging / ENGINE_DIR, tmp / ENGINE_DIR)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        logger.info("the state (with the DeepSpeed engine's partitions) is %s", folder)

    def describe(self) -> dict[str, int]:
        """What a state records about the engine (checked on resume)."""
        return {"zero_stage": self.stage, "world_size": self.world_size}

    def load_folder(self, folder: str | Path) -> None:
        """Every process: the engine's partitions of weights and optimizer state from a state folder."""
        path = Path(folder) / ENGINE_DIR
        if not (path / ENGINE_TAG).is_dir():
            raise UserError(f"--resume {folder}: the DeepSpeed engine's files ({ENGINE_DIR}/{ENGINE_TAG}) are "
                            "missing; the state is incomplete")
        loaded, _ = self.engine.load_checkpoint(str(path), tag=ENGINE_TAG, load_optimizer_states=True,
                                                load_lr_scheduler_states=False, load_module_strict=True)
        if loaded is None:
            raise UserError(f"--resume {folder}: DeepSpeed could not read its files in {path}")
        from library.training.cpu_adam import restore_step_chain

        restore_step_chain(getattr(self.engine.optimizer, "optimizer", None))  # offloaded AdamW: bit-exact


def check_state(payload: dict[str, Any], folder: str | Path, run: DeepSpeedRun | None) -> None:
    """Refuse a state written with ``--deepspeed`` in a run without it, with another number of processes or
    another ZeRO stage, and a state written without ``--deepspeed`` in a DeepSpeed run."""
    recorded = (payload.get("extra") or {}).get(STATE_KEY)
    if run is None and recorded:
        raise UserError(f"--resume {folder}: this state was written with --deepspeed --zero_stage "
                        f"{recorded['zero_stage']} by {recorded['world_size']} processes; resume it with the same "
                        "options and number of processes")
    if run is None:
        return
    if not recorded:
        raise UserError(f"--resume {folder}: this state was written without --deepspeed; resume it without "
                        "--deepspeed (DeepSpeed runs resume only their own states)")
    if recorded["world_size"] != run.world_size:
        raise UserError(f"--resume {folder}: this state was written by {recorded['world_size']} DeepSpeed "
                        f"processes, this run has {run.world_size}; resume with {recorded['world_size']} (the "
                        "engine's partitions and the split of the data depend on it)")
    if recorded["zero_stage"] != run.stage:
        raise UserError(f"--resume {folder}: this state was written with --zero_stage {recorded['zero_stage']}, "
                        f"this run has --zero_stage {run.stage}; resume with --zero_stage {recorded['zero_stage']}")


def build_engine(method: Any, model: Any, distributed: Any, *, optimizer: Any, micro_batch: int,
                 accumulation: int, max_grad_norm: float | None, accelerator: Any,
                 output_dir: Path) -> DeepSpeedRun:
    """The engine over what ``method`` trains, with ``optimizer`` (built over the method's parameter groups)
    and the config of kohya's options (:func:`engine_config`). Every process calls it."""
    import deepspeed

    logging.getLogger("DeepSpeed").setLevel(max(logging.WARNING, logging.getLogger().level))
    _init_process_group()
    parts = trained_parts(method, model)
    root = TrainedModules(parts)
    inside = {id(p) for p in root.parameters()}
    if any(id(p) not in inside for p in method.trainable_parameters()):
        raise UserError(f"--deepspeed: trained tensors of the {method.name} method are outside the modules the "
                        "engine holds; train without --deepspeed")
    config = engine_config(distributed, micro_batch=micro_batch, accumulation=accumulation,
                           max_grad_norm=max_grad_norm)
    engine, _, _, _ = deepspeed.initialize(model=root, optimizer=optimizer, config=config, dist_init_required=False)
    world = torch.distributed.get_world_size()
    if accelerator.is_main_process:
        count = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in root.parameters())
        logger.info("DeepSpeed ZeRO-%d: %s in the engine over %d process(es) (%s trained parameters%s)",
                    distributed.zero_stage, " + ".join(parts), world, f"{count:,}",
                    "".join(f", {what} offloaded to the CPU" for what, device in
                            (("optimizer", distributed.offload_optimizer_device),
                             ("weights", distributed.offload_param_device)) if device == "cpu"))
    run = DeepSpeedRun(engine, root, stage=distributed.zero_stage, world_size=world,
                       is_main=accelerator.is_main_process, output_dir=output_dir)
    return run


def attach_deepspeed(trainer: Any, run: DeepSpeedRun | None) -> None:
    """Give ``trainer`` the engine (as its ``deepspeed`` and its ``sharding``: forward, stand-in batches,
    gathered exports) after checking that nothing it runs needs the whole model on one process."""
    if run is None:
        return
    needs_whole = [("--ema with --zero_stage 3", trainer.ema if run.stage == 3 else None),
                   ("--fused_backward_pass", trainer.fused_backward), ("gradient buckets", trainer.grad_buckets)]
    for what, part in needs_whole:
        if part is not None:
            raise UserError(f"--deepspeed: {what} is not supported with DeepSpeed yet")
    trainer.sharding = trainer.deepspeed = run
    for part in (trainer.sampler, trainer.validator):  # stages 0-2 hold whole weights: the usual paths
        if part is not None:
            part.together = run.together if run.stage == 3 else None
