"""THE training loop: one loop for LoRA, DreamBooth, fine-tuning and Textual Inversion.

accelerate provides the processes, devices, autocast and trackers. The step mechanics are explicit:
gradient accumulation, the gradient all-reduce across processes, clipping, the optimizer and scheduler
steps. So the loop knows exactly where it is, and a state saved at any optimizer step resumes to
bit-identical weights.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from library.data.dataset import DatasetGroup
from library.methods.base import Method
from library.training import diffusion, loss_options
from library.errors import UserError
from library.output_safety import check_target, remove_save
from library.training.epoch_loader import EpochLoader
from library.training.checkpoint import (PROCESSES_KEY, TrainProgress, check_processes, epoch_name, epoch_to_remove,
                                         final_name, load_state, restore_rng_states, save_state, step_name,
                                         step_to_remove)
from library.training.guard import TrainingGuard, total_grad_norm
from library.training.plan import RunPlan
from library.training.sharding import STATE_KEY, check_state as check_sharded_state
from library.training.start_step import StartPoint
from library.training.step_settings import SaveSettings, StepSettings
from library.training.tracking import LossAverage, Tracker

if TYPE_CHECKING:  # annotations only: these modules import the trainer's neighbours
    from library.training.ema import ExponentialMovingAverage
    from library.training.sampling import Sampler
    from library.training.te_cache import TextEncoderCache
    from library.training.training_record import TrainingRecord
    from library.training.validation import Validator

logger = logging.getLogger(__name__)

LATENT_SCALE = diffusion.LATENT_SCALE


ALL_REDUCE_BUCKET = 1 << 24  # elements per all-reduce call (64 MiB of fp32): bounded extra memory


def _reduce_bucket(bucket: list[torch.Tensor], world: int) -> None:
    flat = torch.cat([g.reshape(-1) for g in bucket])
    torch.distributed.all_reduce(flat)
    flat /= world
    offset = 0
    for g in bucket:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def _all_reduce_mean(grads: list[torch.Tensor], world: int) -> None:
    """Average gradients over processes, at most ALL_REDUCE_BUCKET elements per call (bounded memory)."""
    bucket: list[torch.Tensor] = []
    size = 0
    for grad in grads:
        if bucket and size + grad.numel() > ALL_REDUCE_BUCKET:
            _reduce_bucket(bucket, world)
            bucket, size = [], 0
        bucket.append(grad)
        size += grad.numel()
    if bucket:
        _reduce_bucket(bucket, world)


def _share_of_global_batch(batch: dict[str, Any], world: int) -> float:
    """The factor that turns this process's mean loss into its part of the global batch's mean once the
    gradients are averaged over the ``world`` processes: ``world × samples here / samples of the step over all
    processes`` (``global_samples``, epoch_loader.py). Exactly 1 when every process has a full batch; it makes
    a short last batch (and a padding batch: 0) weigh as in a one-process run of the global batch."""
    total = batch.get("global_samples")
    if world == 1 or not total:
        return 1.0
    return world * (0 if batch.get("padding") else len(batch["keys"])) / total


class Trainer:
    """Runs a method over a dataset group for a planned number of steps."""

    def __init__(self, *, accelerator: Any, model: Any, group: DatasetGroup, method: Method, optimizer: Any,
                 lr_scheduler: Any, plan: RunPlan, step: StepSettings, save: SaveSettings, seed: int,
                 num_workers: int = 0, persistent_workers: bool = False, logging_enabled: bool = False,
                 sampler: Sampler | None = None, ema: ExponentialMovingAverage | None = None,
                 validator: Validator | None = None, text_encoder_cache: TextEncoderCache | None = None,
                 record: TrainingRecord | None = None):
        """Wire the pieces together; nothing runs until :meth:`run`. ``sampler`` makes sample images at its
        due points, ``ema`` keeps the moving average of the trained weights (``--ema``), ``validator``
        computes the validation loss of held-out images, ``text_encoder_cache`` gives the text conditioning
        instead of the method (``--cache_text_encoder_outputs`` or automatic reuse), ``record`` writes what
        this process trained on and its final weights (``--record_training_dir``)."""
        self.accelerator, self.model, self.group, self.method = accelerator, model, group, method
        self.optimizer, self.lr_scheduler, self.plan = optimizer, lr_scheduler, plan
        self.step_settings, self.save_settings = step, save
        self.num_workers, self.persistent_workers = num_workers, persistent_workers
        self.logging_enabled = logging_enabled
        self.sampler = sampler
        self.device = accelerator.device
        self.noise_scheduler = diffusion.make_noise_scheduler(step.v_parameterization, step.zero_terminal_snr)
        self.text_encoder_cache = text_encoder_cache
        self.progress = TrainProgress(session_id=int(torch.randint(0, 2**31 - 1, (1,)).item()),
                                      started_at=time.time(), seed=seed)
        self.stop_requested: str | None = None
        self.last_saved: Path | None = None
        self.last_state: Path | None = None  # the newest state folder written (named when a save fails)
        self.params = method.trainable_parameters()
        self._allow_fp16_unscale()
        self.record = record  # --record_training_dir (training_record.py)
        self.guard = TrainingGuard(method, model, accelerator)  # non-finite loss / gradient stops (guard.py)
        self.ema, self.validator = ema, validator
        self.uploader = None  # library.training.hub_upload.HubUploader: --huggingface_repo_id (set by session.train)

    def _allow_fp16_unscale(self) -> None:
        """--full_fp16 keeps trainable weights (and so their gradients) in fp16, which torch's GradScaler
        refuses to unscale; this run's own scaler instance is told to allow it (as the reference does)."""
        scaler = self.accelerator.scaler
        if scaler is None or not any(p.dtype == torch.float16 for p in self.params):
            return
        unscale = scaler._unscale_grads_
        scaler._unscale_grads_ = lambda optimizer, inv_scale, found_inf, allow_fp16: unscale(
            optimizer, inv_scale, found_inf, True)

    # ---- resume ---------------------------------------------------------------------------------

    def resume(self, folder: str) -> None:
        """Restore weights, optimizer, scheduler, RNGs and the exact position from a state folder."""
        payload = load_state(folder)
        from library.training.deepspeed_engine import check_state as check_deepspeed_state

        check_deepspeed_state(payload, folder, self.deepspeed)  # DeepSpeed states under --deepspeed only
        check_sharded_state(payload, folder, None if self.deepspeed else self.sharding)  # FSDP: sharding.py
        check_processes(payload, folder, self.accelerator.num_processes)
        self.last_state = Path(folder)
        if self.deepspeed is not None:
            self.deepspeed.load_folder(folder)  # the engine's partitions of weights and optimizer state
        elif self.sharding is not None:
            self.sharding.load(payload, self.optimizer)
        else:
            self.method.load_trainable_state_dict(payload["trainable"])
            self.optimizer.load_state_dict(payload["optimizer"])
        self.lr_scheduler.load_state_dict(payload["scheduler"])
        restore_rng_states(payload["rng"])  # the training noise has no state: it is seeded per sample
        if payload["extra"].get("noise_per_rank"):
            logger.info("%s was written when each process had its own noise generator; from here on the noise "
                        "is drawn per sample (not the noise the old run would have drawn next)", folder)
        if self.ema is not None:
            self.ema.load_state_dict(payload["extra"].get("ema"))
        if self.validator is not None:
            self.validator.load_state_dict(payload["extra"].get("validation"))
        self.progress = payload["progress"]
        self.method.after_step(self.progress.global_step)  # e.g. DreamBooth's text encoder stays stopped
        logger.info("resumed from %s at step %d (epoch %d, batch %d)", folder, self.progress.global_step,
                    self.progress.epoch, self.progress.position)

    def start_at(self, point: StartPoint, *, replaces_state: bool = False) -> None:
        """``--initial_step`` / ``--initial_epoch``: the counters start at ``point`` (weights, optimizer, the lr
        scheduler and RNGs stay as they are: fresh, or as ``--resume`` restored them)."""
        if replaces_state:
            logger.warning("--initial_step / --initial_epoch replace the resumed state's step %d (epoch %d, batch "
                           "%d); the lr scheduler stays where the state left it", self.progress.global_step,
                           self.progress.epoch, self.progress.position)
        self.progress.global_step, self.progress.epoch = point.global_step, point.epoch
        self.progress.position, self.progress.micro_step = point.position, 0
        self.method.after_step(point.global_step)  # e.g. DreamBooth's text encoder stops where it would have
        logger.info("starting at step %d (epoch %d, batch %d); the lr scheduler is not advanced", point.global_step,
                    point.epoch, point.position)

    # ---- one step -------------------------------------------------------------------------------

    @staticmethod
    def sample_generators(batch: dict[str, Any]) -> list[torch.Generator]:
        """One CPU generator per sample, seeded from the sample's identity in the epoch (``noise_seeds``:
        library/data/dataset.py ``noise_seed``). Every random draw of a step comes from these, so a
        sample's noise, timestep and latent draw do not depend on its batch, the batch size or the process
        that trains it, and a resumed run draws exactly what the uninterrupted run would have."""
        return [torch.Generator(device="cpu").manual_seed(int(seed)) for seed in batch["noise_seeds"]]

    def _latents(self, batch: dict[str, Any], generators: list[torch.Generator]) -> torch.Tensor:
        if batch.get("latents") is not None:
            latents = batch["latents"].to(self.device)
        else:
            vae = self.model.vae
            with torch.no_grad():
                images = batch["images"].to(self.device, dtype=vae.dtype)
                dist = vae.encode(images).latent_dist
                draw = diffusion.normal(tuple(dist.mean.shape), generators)
                latents = dist.mean + dist.std * draw.to(self.device, dist.mean.dtype)
        return latents.to(self.step_settings.weight_dtype) * LATENT_SCALE

    def conditioning(self, batch: dict[str, Any]) -> torch.Tensor:
        """The batch's text conditioning: the method's, or the cached outputs (--cache_text_encoder_outputs)."""
        if self.text_encoder_cache is not None:
            return self.text_encoder_cache.conditioning(batch, self.device)
        return self.method.conditioning(batch)

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """The UNet's prediction (ε or v) in ``weight_dtype``, through the method's ``unet_forward`` (the plain
        call; XTI routes its conditioning per cross-attention layer)."""
        return self.method.unet_forward(self.model.unet, noisy, timesteps, cond, self.step_settings.weight_dtype)

    def prediction_and_target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                              cond: torch.Tensor, input_noise: torch.Tensor | None = None
                              ) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's prediction for ``latents`` noised to ``timesteps`` (with ``input_noise`` where it
        differs from ``noise``: ``--ip_noise_gamma``) and the target it is scored against (ε or v), for
        the training loss and the validation loss alike."""
        noisy = diffusion.add_noise(self.noise_scheduler, latents, noise if input_noise is None else input_noise,
                                    timesteps)
        with self.accelerator.autocast():
            pred = self.predict(noisy, timesteps, cond)
        target = diffusion.target_for(self.noise_scheduler, latents, noise, timesteps,
                                      self.step_settings.v_parameterization)
        return pred, target

    def loss(self, batch: dict[str, Any]) -> torch.Tensor:
        """The diffusion loss of one batch (documented order: text, noise, timesteps)."""
        s = self.step_settings
        generators = self.sample_generators(batch)  # per sample: draws in the order latent, noise, timestep, ip
        latents = self._latents(batch, generators)
        cond = self.conditioning(batch)
        noise = diffusion.sample_noise(latents, generators, noise_offset=s.noise_offset,
                                       adaptive_noise_scale=s.adaptive_noise_scale,
                                       multires_iterations=s.multires_noise_iterations,
                                       multires_discount=s.multires_noise_discount,
                                       noise_offset_random_strength=s.noise_offset_random_strength)
        timesteps = diffusion.sample_timesteps(latents.shape[0], generators, s.min_timestep,
                                               s.max_timestep).to(self.device)
        if self.record is not None:
            self.record.timesteps(timesteps.tolist())
        pred, target = self.prediction_and_target(latents, noise, timesteps, cond,
                                                  input_noise=loss_options.input_noise(noise, generators, s))
        return diffusion.diffusion_loss(pred.float(), target.float(),
                                        loss_weights=batch["loss_weights"].to(self.device), timesteps=timesteps,
                                        scheduler=self.noise_scheduler, min_snr_gamma=s.min_snr_gamma,
                                        v_parameterization=s.v_parameterization, **loss_options.loss_kwargs(s),
                                        mask=loss_options.batch_mask(batch, self.device))

    fused_backward: Any = None  # --fused_backward_pass hooks (fused_backward.py), set by session.attach_step_options
    grad_buckets: Any = None  # --ddp_gradient_as_bucket_view buckets (ddp_options.py), set there too
    sharding: Any = None  # FSDP2 (library/training/sharding.py Sharding), set by sharding.attach_sharding
    deepspeed: Any = None  # --deepspeed (deepspeed_engine.py DeepSpeedRun, also the sharding), set by attach_deepspeed

    def _sync_and_step(self) -> None:
        if self.fused_backward is not None:  # each parameter was already stepped during backward
            return self.fused_backward.end_step(self)
        if self.deepspeed is not None:  # the engine reduces, clips and steps
            return self.deepspeed.step(self)
        world = self.accelerator.num_processes
        if self.sharding is not None:
            pass  # FSDP reduce-scattered (averaged) every gradient during backward
        elif world > 1 and self.grad_buckets is not None:  # the gradients are views of the buckets: reduce in place
            self.grad_buckets.all_reduce_mean(world)
        elif world > 1:
            # every process reduces the same list, even one whose batch had no usable image
            for p in self.params:
                if p.requires_grad and p.grad is None:
                    p.grad = torch.zeros_like(p)
            _all_reduce_mean([p.grad for p in self.params if p.requires_grad], world)
        scaler = self.accelerator.scaler
        if scaler is not None:
            scaler.unscale_(self.optimizer)
        clip = self.step_settings.max_grad_norm
        norm_of = total_grad_norm if self.sharding is None else self.sharding.grad_norm  # over all shards
        norm = norm_of(self.params) if clip or scaler is None else None
        # checked before clipping: a non-finite norm would turn every gradient into NaN
        self.guard.check_gradients(self.params, norm, step=self.progress.global_step + 1,
                                   scaler_active=scaler is not None, last_saved=self.last_saved)
        if clip:  # as clip_grad_norm_, with the norm computed once
            clip_with = torch.nn.utils.clip_grads_with_norm_ if self.sharding is None else self.sharding.clip
            clip_with(self.params, clip, norm)
        if scaler is not None:
            scaler.step(self.optimizer)
            scaler.update()
        else:
            self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.grad_buckets is not None:
            self.grad_buckets.attach()  # the next step's gradients accumulate into the zeroed buckets

    # ---- saving ---------------------------------------------------------------------------------

    def _save(self, name: str, *, epoch: int, final: bool, remove: str | None, remove_state: str | None,
              with_state: bool) -> None:
        cfg = self.save_settings
        full = self.sharding.gather_weights() if self.sharding is not None else None  # FSDP: all processes
        if self.accelerator.is_main_process:
            try:
                if cfg.layout is not None:  # checked before training too; again in case something appeared since
                    check_target(cfg.layout.path(cfg.output_dir, name), cfg.layout.kind)
                with self.ema.saving() if self.ema is not None else \
                        self.sharding.full_weights(full) if full is not None else contextlib.nullcontext():
                    self.last_saved = self.method.save(cfg.output_dir, name, epoch=epoch,
                                                       step=self.progress.global_step, final=final)
            except UserError as exc:
                raise UserError(f"{exc}{self._resume_hint()}") from None
            logger.info("saved %s", self.last_saved)
            if self.uploader is not None:  # after the local save; the final model synchronously
                self.uploader.upload(self.last_saved, wait=final)
            if remove and cfg.layout is not None:  # exactly the older save of this run's name and kind
                remove_save(cfg.layout.path(cfg.output_dir, remove), cfg.layout.kind)
        if with_state:
            self.save_training_state(cfg.output_dir / f"{name}-state")
            if remove_state and self.accelerator.is_main_process:
                remove_save(cfg.output_dir / f"{remove_state}-state", "state")

    def _resume_hint(self) -> str:
        """How to go on after a failed save: from the last state written, if any."""
        if self.last_state is not None:
            return f" — the last training state is {self.last_state}: free space, then --resume {self.last_state}"
        if self.save_settings.save_state or self.save_settings.state_on_train_end:
            return " — no training state was written yet"
        return " — no training state is kept (--save_state keeps one to resume from)"

    def save_training_state(self, folder: Path) -> None:
        """Write the training state (all processes take part: with FSDP the shards are gathered)."""
        trainable, optimizer = self.sharding.state_parts(self.optimizer) if self.sharding is not None else (None, None)
        if self.accelerator.is_main_process:
            try:  # DeepSpeed: state.pt is written beside the engine's files, then both move into folder
                save_state(folder if self.deepspeed is None else self.deepspeed.staged_state(), progress=self.progress,
                           trainable=trainable if trainable is not None else self.method.trainable_state_dict(),
                           optimizer=optimizer or self.optimizer, scheduler=self.lr_scheduler,
                           scaler=self.accelerator.scaler, extra={
                               STATE_KEY: None if self.deepspeed else self.sharding and self.sharding.describe(),
                               "deepspeed": self.deepspeed and self.deepspeed.describe(),  # deepspeed_engine.py
                               PROCESSES_KEY: self.accelerator.num_processes,
                               "ema": self.ema.state_dict() if self.ema is not None else None,
                               "validation": self.validator.state_dict() if self.validator is not None else None})
                if self.deepspeed is not None:
                    self.deepspeed.commit_state(folder)
            except UserError as exc:
                raise UserError(f"{exc}{self._resume_hint()}") from None
            self.last_state = folder
            if self.uploader is not None:
                self.uploader.upload_state(folder)
        self.accelerator.wait_for_everyone()

    def _after_optimizer_step(self, epoch: int) -> None:
        cfg = self.save_settings
        step = self.progress.global_step
        if cfg.every_n_steps and step % cfg.every_n_steps == 0 and step < self.plan.max_train_steps:
            old = step_to_remove(step, cfg.every_n_steps, cfg.last_n_steps)
            old_state = step_to_remove(step, cfg.every_n_steps, cfg.last_n_steps_state or cfg.last_n_steps)
            self._save(step_name(cfg.output_name, step), epoch=epoch - 1, final=False,
                       remove=step_name(cfg.output_name, old) if old else None,
                       remove_state=step_name(cfg.output_name, old_state) if old_state else None,
                       with_state=cfg.save_state)

    # ---- the loop -------------------------------------------------------------------------------

    _epoch_loader: EpochLoader | None = None  # made at the first epoch, kept for the run (epoch_loader.py)

    def _loader(self, epoch: int) -> torch.utils.data.DataLoader:
        """The run's DataLoader aimed at ``epoch`` from the current position (its workers live on between
        epochs with ``--persistent_data_loader_workers``)."""
        if self._epoch_loader is None:
            self._epoch_loader = EpochLoader(self.group, rank=self.accelerator.process_index,
                                             world=self.accelerator.num_processes,
                                             accumulation=self.plan.gradient_accumulation_steps,
                                             num_workers=self.num_workers, persistent_workers=self.persistent_workers)
        start = self.progress.position
        first_step = (epoch - 1) * self.plan.steps_per_epoch + start // self.plan.gradient_accumulation_steps
        return self._epoch_loader.for_epoch(epoch, start, first_step)

    def _should_stop(self) -> bool:
        """True when any process was asked to stop (all processes agree, so none waits for the others)."""
        if self.accelerator.num_processes == 1:
            return self.stop_requested is not None
        flag = torch.tensor([1 if self.stop_requested else 0])
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if flag.item() and not self.stop_requested:
            self.stop_requested = "another process"
        return bool(flag.item())

    def _install_signal_handlers(self) -> dict:
        def request_stop(signum, _frame):
            self.stop_requested = signal.Signals(signum).name

        previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                previous[sig] = signal.signal(sig, request_stop)
            except ValueError:  # not the main thread (e.g. some test runners)
                pass
        return previous

    def run(self) -> Path | None:
        """Train to ``plan.max_train_steps``; returns the final saved path (None when interrupted)."""
        plan, cfg, acc = self.plan, self.save_settings, self.accelerator
        previous_handlers = self._install_signal_handlers()
        tracker = Tracker(acc, total_steps=plan.max_train_steps, initial_step=self.progress.global_step,
                          enabled_logging=self.logging_enabled)
        average = LossAverage(plan.steps_per_epoch)
        ga = plan.gradient_accumulation_steps
        try:
            if self.sampler is not None:
                self.sampler.maybe_sample(acc, step=self.progress.global_step, first=True)
            if self.validator is not None:
                self.validator.maybe_validate(self, tracker, step=self.progress.global_step, first=True)
            for epoch in range(self.progress.epoch, plan.num_epochs + 1):
                if self.progress.global_step >= plan.max_train_steps:
                    break
                self.progress.epoch = epoch
                self.method.on_epoch_start(epoch)
                self.method.set_train(True)
                loader = self._loader(epoch)
                start = self.progress.position
                micro, accumulated, batches_done = 0, 0.0, 0
                cut_short = False  # the step budget ran out before the epoch's last batch
                for index, batch in enumerate(loader):
                    position = start + index
                    if batch is None and self.sharding is not None:  # FSDP: every process runs every micro-step
                        batch = self.sharding.stand_in(self.progress.global_step + 1)
                    if batch is not None:
                        loss = self.loss(batch) if self.sharding is None else self.sharding.forward(self.loss, batch)
                        self.guard.check_loss(loss, step=self.progress.global_step + 1, epoch=epoch,
                                              keys=batch["keys"], last_saved=self.last_saved)
                        scaled = loss * _share_of_global_batch(batch, acc.num_processes) / ga
                        if self.deepspeed is not None:  # the engine's backward (ZeRO's gradient hooks)
                            self.deepspeed.backward(scaled, boundary=micro + 1 >= ga or index == len(loader) - 1)
                        else:
                            acc.backward(scaled)
                        if self.record is not None and not batch["padding"]:
                            self.record.trained(epoch, batch["keys"])
                        accumulated += loss.detach().item()
                        batches_done += 1
                    micro += 1
                    last_of_epoch = index == len(loader) - 1
                    if micro < ga and not last_of_epoch:
                        continue
                    self._sync_and_step()
                    self.progress.global_step += 1
                    self.progress.position = position + 1
                    self.method.after_step(self.progress.global_step)
                    if self.ema is not None:
                        self.ema.update(self.progress.global_step)
                    current = accumulated / max(1, batches_done)
                    logs = {"loss/current": current, "loss/average": average.add(current)}
                    logs.update(self.method.learning_rates(self.optimizer))
                    tracker.step(self.progress.global_step, logs)
                    micro, accumulated, batches_done = 0, 0.0, 0
                    if self.validator is not None:
                        self.validator.maybe_validate(self, tracker, step=self.progress.global_step)
                    if self.sampler is not None:
                        self.sampler.maybe_sample(acc, step=self.progress.global_step)
                    self._after_optimizer_step(epoch)
                    if self._should_stop():
                        return self._interrupted(tracker)
                    if self.progress.global_step >= plan.max_train_steps:
                        cut_short = index < len(loader) - 1
                        break
                tracker.log({"loss/epoch": average.average}, step=epoch)
                if not cut_short:  # else the state keeps the position, so a resume with more steps goes on there
                    self.progress.epoch, self.progress.position = epoch + 1, 0
                acc.wait_for_everyone()
                if self.validator is not None:
                    self.validator.maybe_validate(self, tracker, step=self.progress.global_step, epoch=epoch)
                every = cfg.every_n_epochs
                if every and epoch % every == 0 and epoch < plan.num_epochs:
                    old = epoch_to_remove(epoch, every, cfg.last_n_epochs)
                    old_state = epoch_to_remove(epoch, every, cfg.last_n_epochs_state or cfg.last_n_epochs)
                    self._save(epoch_name(cfg.output_name, epoch), epoch=epoch, final=False,
                               remove=epoch_name(cfg.output_name, old) if old else None,
                               remove_state=epoch_name(cfg.output_name, old_state) if old_state else None,
                               with_state=cfg.save_state)
                if self.sampler is not None:
                    self.sampler.maybe_sample(acc, step=self.progress.global_step, epoch=epoch)
            if self.validator is not None:
                self.validator.maybe_validate(self, tracker, step=self.progress.global_step, last=True)
            self.method.set_train(False)
            self._save(final_name(cfg.output_name), epoch=plan.num_epochs, final=True, remove=None,
                       remove_state=None, with_state=cfg.save_state or cfg.state_on_train_end)
            if self.record is not None:
                self.record.finish(self._recorded_weights())
            return self.last_saved
        finally:
            tracker.close()
            if self.uploader is not None:
                self.uploader.finish()  # waits for pending --async_upload uploads
            for sig, handler in previous_handlers.items():
                signal.signal(sig, handler)

    def _recorded_weights(self) -> dict[str, torch.Tensor]:
        """The trained weights for ``--record_training_dir`` (with FSDP: gathered, on the main process)."""
        if self.sharding is None:
            return self.method.trainable_state_dict()
        full = self.sharding.gather_weights()
        if not self.accelerator.is_main_process:
            return {}
        with self.sharding.full_weights(full):
            return {k: v.detach().clone() for k, v in self.method.trainable_state_dict().items()}

    def _interrupted(self, tracker: Tracker) -> None:
        step = self.progress.global_step
        if self.save_settings.save_state:
            folder = self.save_settings.output_dir / f"{step_name(self.save_settings.output_name, step)}-state"
            self.save_training_state(folder)
            tracker.write(f"stopped by {self.stop_requested} at step {step}; resume with --resume {folder}")
        else:
            tracker.write(f"stopped by {self.stop_requested} at step {step}; no state saved (use --save_state)")
        return None
