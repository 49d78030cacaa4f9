"""Setting up a training run, shared by every entry script (after :func:`library.run_start.start_run`):
accelerate, seed, datasets, model, latents, optimizer, schedule and the trainer.

:func:`prepare_run`, :func:`train` and its part :func:`make_trainer` take the
:class:`~library.option_groups.Options` bundle (they set up a whole run); every other function takes the
option groups it reads, or plain values, and says which options it reads.
"""

from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from library.data.masks import attach_mask_source
from library.models.placement import place
from library.errors import UserError
from library.option_groups import (DataOptions, LoggingOptions, LossOptions, ModelOptions, OptimizerOptions,
                                   Options, SaveOptions, TrainingOptions, ValidationOptions)
from library.training.loss_options import step_fields
from library.training.timestep_loss_options import timestep_loss_fields
from library.training.output_targets import check_outputs
from library.training.te_cache import (TextEncoderUse, build_text_encoder_cache, caption_conflicts,
                                       check_text_encoder_cache)
from library.training.plan import RunPlan, make_plan, save_every_n_epochs
from library.training.step_settings import SaveSettings, StepSettings

logger = logging.getLogger(__name__)

DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class StartedRun:
    """A run past the shared start (:func:`library.run_start.start_run`): its options, sample settings,
    ``--save_precision`` dtype and set-up."""

    opts: Options
    sampling: Any  # library.training.sampling.SampleSettings, or None without samples
    save_dtype: torch.dtype | None
    run: "PreparedRun"


# ---- set-up -------------------------------------------------------------------------------------------

def make_accelerator(logging_options: LoggingOptions, training: TrainingOptions, ddp: Any):
    """An Accelerator for ``--mixed_precision`` and ``--logging_dir`` / ``--log_with`` (run folder
    ``<logging_dir>/<log_prefix><YYYYmmddHHMMSS>``; ``--wandb_api_key`` logs in); ``ddp`` is the run's
    :class:`library.training.ddp_options.DdpSettings` (``--ddp_timeout``). Returns ``(accelerator,
    logging_enabled)``; the trackers start with :func:`start_trackers`."""
    import time

    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    log_with = None
    project = None
    if logging_options.logging_dir:
        log_with = logging_options.log_with or "tensorboard"
        stamp = time.strftime('%Y%m%d%H%M%S')
        run_dir = Path(logging_options.logging_dir) / f"{logging_options.log_prefix or ''}{stamp}"
        project = ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir))
        if log_with in ("wandb", "all"):
            os.environ.setdefault("WANDB_DIR", str(run_dir))
    elif logging_options.log_with == "wandb":
        log_with = "wandb"
    if log_with == "all":
        log_with = ["tensorboard", "wandb"]
    if log_with and "wandb" in (log_with if isinstance(log_with, list) else [log_with]):
        try:
            import wandb
        except ImportError:
            raise UserError("--log_with wandb needs the package 'wandb' (pip install wandb)") from None
        if logging_options.wandb_api_key:
            wandb.login(key=logging_options.wandb_api_key)
    mixed = training.mixed_precision
    if mixed == "fp16" and not torch.cuda.is_available():
        raise UserError("--mixed_precision fp16 needs a CUDA GPU; use bf16 or no on this machine")
    from accelerate.state import AcceleratorState

    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        AcceleratorState._reset_state(reset_partial_state=True)  # a fresh run in this process (tests, notebooks)
    from library.training.ddp_options import describe_processes, process_group_kwargs

    accelerator = Accelerator(mixed_precision=mixed, log_with=log_with, project_config=project,
                              kwargs_handlers=process_group_kwargs(ddp))  # --ddp_timeout
    if describe_processes(accelerator) and accelerator.is_main_process:
        logger.info("distributed: %s", describe_processes(accelerator))
    return accelerator, bool(log_with)


def start_trackers(accelerator: Any, start: Any, project_name: str) -> None:
    """Start the accelerator's trackers for ``project_name`` (``--log_tracker_name`` or the script's name) with
    ``start``, a :class:`library.training.tracker_config.TrackerStart` (``--wandb_run_name``,
    ``--log_tracker_config``, ``--log_config``)."""
    accelerator.init_trackers(project_name, config=start.config, init_kwargs=start.init_kwargs)


def choose_seed(seed: int | None, resume: str | None) -> int:
    """``--seed``, or a random one (recorded in the metadata) so every run is reproducible afterwards; the
    seed of the run in ``resume`` (the ``--resume`` folder) wins so a resumed run continues exactly."""
    from accelerate.utils import set_seed

    from library.distributed import main_computes

    # one random seed for all processes (each drawing its own would give each another batch order)
    chosen = seed if seed is not None else main_computes(lambda: random.randint(0, 2**31 - 1), "choosing the seed")
    if resume and (Path(resume) / "state.json").is_file():
        import json

        saved = json.loads((Path(resume) / "state.json").read_text(encoding="utf-8")).get("seed")
        if saved is not None and saved != chosen:
            if seed is not None:
                logger.warning("--seed %s differs from the resumed run's seed %s; using %s so the run continues "
                               "exactly", seed, saved, saved)
            chosen = saved
    set_seed(chosen)
    return chosen


def tokenizer_for(model: ModelOptions):
    """The SD1 or SD2 tokenizer, chosen from the model's own header when it can be read cheaply
    (reads --pretrained_model_name_or_path, --v2, --tokenizer_cache_dir)."""
    from library.models.load import peek_is_v2
    from library.models.tokenizer import load_tokenizer

    v2 = peek_is_v2(model.pretrained_model_name_or_path)
    return load_tokenizer(model.v2 if v2 is None else v2, model.tokenizer_cache_dir)


def load_datasets(data: DataOptions, validation: ValidationOptions, tokenizer: Any, seed: int, *,
                  given: frozenset[str], support_dreambooth: bool, support_finetuning: bool):
    """The dataset group from ``--dataset_config`` or the legacy options (or ``--dataset_class``), with its
    validation images split off (reads the dataset options and --validation_*; ``given`` is the script's
    option names, :attr:`Options.given`)."""
    from library.config import load_dataset_blueprint

    if data.dataset_class:  # a user's dataset class makes the batches (library/data/user_dataset.py)
        from library.config.arguments import parse_resolution_option
        from library.data.user_dataset import load_user_dataset

        if data.dataset_config or data.train_data_dir:
            logger.warning("--dataset_class is given, so the dataset config / --train_data_dir are not used")
        return load_user_dataset(data.dataset_class, tokenizer=tokenizer, max_token_length=data.max_token_length,
                                 resolution=parse_resolution_option(data.resolution), debug_dataset=data.debug_dataset,
                                 seed=seed, weighted_captions=data.weighted_captions)
    from library.data.dataset import build_dataset_group, check_cache_compatibility

    blueprint = load_dataset_blueprint(data, validation, data.dataset_config, given=given,
                                       support_dreambooth=support_dreambooth, support_finetuning=support_finetuning)
    check_cache_compatibility(blueprint, data.latents_cached)
    group = build_dataset_group(blueprint, seed=seed, tokenizer=tokenizer, max_token_length=data.max_token_length,
                                weighted_captions=data.weighted_captions)
    if len(group) == 0:
        raise UserError("no training images found (with --train_data_dir, give the parent of the "
                        "<repeats>_<name> folders)")
    from library.training.validation import split_validation

    group = split_validation(group, validation, seed)  # held-out images go to group.validation (docs/validation.md)
    return blueprint, group


def load_base_model(model: ModelOptions):
    """The model of ``--pretrained_model_name_or_path`` (+ ``--vae``, ``--reference_model``), loaded in fp32
    (reads --v2, --v_parameterization, --clip_skip for their warnings, --tokenizer_cache_dir)."""
    from library.models.load import load_model

    if model.v_parameterization and not model.v2:
        logger.warning("--v_parameterization is meant for SD2 768-v models (--v2 not given)")
    if model.v2 and model.clip_skip:
        logger.warning("--clip_skip with SD2: the SD2 text encoder already ends at the penultimate layer")
    return load_model(model.pretrained_model_name_or_path, v2=model.v2, v_parameterization=model.v_parameterization,
                      vae=model.vae, tokenizer_cache_dir=model.tokenizer_cache_dir,
                      reference_model=model.reference_model, dtype=torch.float32)


def compile_unet(unet: Any, model: ModelOptions) -> None:
    """``--torch_compile``: compile the UNet's forward in place (``nn.Module.compile``, so its weight names and
    saved files stay as they are) with ``--dynamo_backend`` / ``--dynamo_mode`` (the backend was checked
    with the other options)."""
    if not model.torch_compile:
        return
    options = {"backend": model.dynamo_backend}
    if model.dynamo_mode and model.dynamo_mode != "default":
        options["mode"] = model.dynamo_mode
    unet.compile(**options)
    logger.info("UNet forward compiled with torch.compile (%s)", ", ".join(f"{k}={v}" for k, v in options.items()))


def set_attention(unet: Any, model: ModelOptions) -> None:
    """PyTorch SDPA by default (diffusers' processor); ``--xformers`` or ``--mem_eff_attn`` on request."""
    if model.xformers:
        unet.enable_xformers_memory_efficient_attention()
    elif model.mem_eff_attn:
        # sliced attention; "auto" halves the heads, which is 0 for single-head blocks: then one at a time
        heads = [m.sliceable_head_dim for m in unet.modules() if hasattr(m, "sliceable_head_dim")]
        unet.set_attention_slice("auto" if heads and min(heads) >= 2 else "max")


def cache_latents(data: DataOptions, group: Any, vae: Any, accelerator: Any, weight_dtype: torch.dtype,
                  seed: int) -> None:
    """``--cache_latents`` / ``--cache_latents_to_disk``: encode every image once before training
    (``--vae_batch_size``, ``--skip_cache_check`` trusts existing files, ``--highvram`` keeps cached GPU
    memory between batches, ``--max_data_loader_n_workers``).

    With several processes each encodes its share of the images and writes just those files (or, in
    memory, the latents are exchanged), see :func:`library.data.group_latents.cache_shared_group_latents`."""
    if not data.latents_cached:
        return
    from library.data.group_latents import cache_shared_group_latents

    place(vae, accelerator.device, weight_dtype)
    cache_shared_group_latents(group, vae, to_disk=data.cache_latents_to_disk, batch_size=data.vae_batch_size,
                               workers=loader_workers(data), seed=seed, skip_check=data.skip_cache_check,
                               high_vram=data.highvram)


def run_plan(training: TrainingOptions, data: DataOptions, group: Any, accelerator: Any) -> RunPlan:
    """Steps and epochs for this run (reads --max_train_steps, --max_train_epochs,
    --gradient_accumulation_steps, --train_batch_size)."""
    plan = make_plan(len(group), num_processes=accelerator.num_processes,
                     gradient_accumulation_steps=training.gradient_accumulation_steps,
                     batch_size=data.train_batch_size, max_train_steps=training.max_train_steps,
                     max_train_epochs=training.max_train_epochs)
    group.set_max_train_steps(plan.max_train_steps)
    return plan


def step_settings(loss: LossOptions, optimizer: OptimizerOptions, v_parameterization: bool,
                  weight_dtype: torch.dtype) -> StepSettings:
    """The per-step options: the :class:`~library.option_groups.LossOptions` (noise, timesteps, loss) and
    --max_grad_norm."""
    return StepSettings(v_parameterization=v_parameterization, noise_offset=loss.noise_offset,
                        adaptive_noise_scale=loss.adaptive_noise_scale,
                        multires_noise_iterations=loss.multires_noise_iterations,
                        multires_noise_discount=loss.multires_noise_discount, min_snr_gamma=loss.min_snr_gamma,
                        max_grad_norm=optimizer.max_grad_norm, weight_dtype=weight_dtype, **step_fields(loss),
                        **timestep_loss_fields(loss))


def save_settings(save: SaveOptions, plan: RunPlan, layout: Any, *, output_name: str | None) -> SaveSettings:
    """The saving options (--output_dir, --save_every_n_* / --save_n_epoch_ratio, --save_last_n_*,
    --save_state, --save_state_on_train_end), for saves named by ``layout`` with the stem ``output_name``
    (the method's :attr:`~library.methods.base.MethodStart.output_name`); ``--output_dir`` was checked before
    loading."""
    return SaveSettings(output_dir=Path(save.output_dir), output_name=output_name, layout=layout,
                        every_n_epochs=save_every_n_epochs(plan.num_epochs, save.save_every_n_epochs,
                                                           save.save_n_epoch_ratio),
                        every_n_steps=save.save_every_n_steps, last_n_epochs=save.save_last_n_epochs,
                        last_n_epochs_state=save.save_last_n_epochs_state, last_n_steps=save.save_last_n_steps,
                        last_n_steps_state=save.save_last_n_steps_state, save_state=save.save_state,
                        state_on_train_end=save.save_state_on_train_end)


def loader_workers(data: DataOptions) -> int:
    """DataLoader workers: min(--max_data_loader_n_workers, CPUs − 1)."""
    return max(0, min(data.max_data_loader_n_workers, (os.cpu_count() or 1) - 1))


@dataclass
class StartSummary:
    """What is printed before the first step."""

    lines: list[str]

    def log(self, accelerator: Any) -> None:
        """Print on the main process."""
        if accelerator.is_main_process:
            for line in self.lines:
                logger.info("%s", line)


def start_summary(group: Any, plan: RunPlan, method_name: str) -> StartSummary:
    """Images, repeats, epochs, steps, batch sizes and buckets, as users expect to see them at start."""
    n_train = sum(e.num_repeats for ds in group.datasets for e in ds.entries if not e.is_reg)
    n_reg = sum(e.num_repeats for ds in group.datasets for e in ds.entries if e.is_reg)
    lines = [f"running training ({method_name})",
             f"  images: {group.num_images} ({n_train} training samples and {n_reg} regularization samples per "
             f"epoch, repeats included)",
             f"  batches per epoch (per process): {plan.batches_per_epoch}",
             f"  epochs: {plan.num_epochs}",
             f"  batch size per device: {plan.batch_size}; processes: {plan.num_processes}; gradient accumulation: "
             f"{plan.gradient_accumulation_steps}; total batch size: {plan.total_batch_size}",
             f"  optimizer steps: {plan.max_train_steps} ({plan.steps_per_epoch} per epoch)"]
    if getattr(group, "validation", None) is not None:
        lines.append(f"  validation images (never trained): {group.validation.num_images}")
    return StartSummary(lines)


def optimizer_and_schedule(optimizer: OptimizerOptions, param_groups: list[dict[str, Any]], plan: RunPlan,
                           distributed: Any = None):
    """The optimizer over ``param_groups`` (``--optimizer_type``, ``--learning_rate``, ``--optimizer_args``,
    ``--max_grad_norm``, legacy aliases) and its learning-rate schedule (``--lr_scheduler*``,
    ``--lr_warmup_steps``, ``--lr_decay_steps``), sized in optimizer steps; AdamW is DeepSpeedCPUAdam with
    ``--deepspeed --offload_optimizer_device cpu`` (``distributed``; cpu_adam.py). Returns
    ``(BuiltOptimizer, scheduler)``."""
    from library.training.cpu_adam import wants_cpu_adam, with_cpu_adam
    from library.training.lr import build_lr_scheduler
    from library.training.optim import build_optimizer

    built = build_optimizer(optimizer.optimizer_type, param_groups, optimizer.learning_rate, optimizer.optimizer_args,
                            use_8bit_adam=optimizer.use_8bit_adam, use_lion_optimizer=optimizer.use_lion_optimizer,
                            max_grad_norm=optimizer.max_grad_norm, lr_scheduler=optimizer.lr_scheduler)
    if wants_cpu_adam(optimizer.optimizer_type, distributed):
        built = with_cpu_adam(built)
    from library.training.lr_options import schedule_options

    scheduler = build_lr_scheduler(built.lr_scheduler or optimizer.lr_scheduler, built.optimizer,
                                   max_train_steps=plan.max_train_steps, **schedule_options(optimizer))
    return built, scheduler


def make_trainer(opts: Options, run: "PreparedRun", method: Any, *, built: Any, scheduler: Any,
                 sampler: Any = None):
    """The :class:`~library.training.trainer.Trainer` for a prepared method: the step and saving options,
    DataLoader workers, its EMA (``--ema``), validator (held-out images), text-encoder cache and record
    (``--record_training_dir``). Part of :func:`train`, so it takes the bundle: it hands the loss,
    optimizer, save, data, EMA, validation and text-encoder-cache groups to their modules."""
    from library.training.ema import make_ema
    from library.training.trainer import Trainer
    from library.training.training_record import make_training_record
    from library.training.validation import make_validator

    accelerator, model, group, plan = run.accelerator, run.model, run.group, run.plan
    validator = make_validator(opts.validation, opts.loss, group, run.seed)
    keep_te = sampler is not None or validator is not None  # both still run the text encoder
    te_cache = build_text_encoder_cache(opts.te_cache, run.text_encoder_use,
                                        caption_conflicts(group, opts.data, opts.dreambooth),
                                        train_batch_size=opts.data.train_batch_size, accelerator=accelerator,
                                        model=model, group=group, method=method, keep_text_encoder=keep_te,
                                        clip_skip=opts.model.clip_skip)
    return Trainer(accelerator=accelerator, model=model, group=group, method=method, optimizer=built.optimizer,
                   lr_scheduler=scheduler, plan=plan,
                   step=step_settings(opts.loss, opts.optimizer, model.v_parameterization, run.weight_dtype),
                   save=save_settings(opts.save, plan, run.layout, output_name=run.output_name), seed=run.seed,
                   num_workers=loader_workers(opts.data),
                   persistent_workers=opts.data.persistent_data_loader_workers,
                   logging_enabled=run.logging_enabled, sampler=sampler, ema=make_ema(opts.ema, method, accelerator),
                   validator=validator, text_encoder_cache=te_cache,
                   record=make_training_record(opts.training.record_training_dir, accelerator.process_index))


@dataclass
class PreparedRun:
    """What every training script has once the shared set-up is done."""

    accelerator: Any
    logging_enabled: bool
    seed: int
    tokenizer: Any
    blueprint: Any
    group: Any
    weight_dtype: torch.dtype
    model: Any
    layout: Any  # library.output_safety.OutputLayout: how the method names its saves
    plan: RunPlan  # steps and epochs, known before the model loads (the output check needs them)
    text_encoder_use: TextEncoderUse  # the method's (library.methods.base.MethodStart.text_encoder_use)
    vae_dtype: torch.dtype = torch.float32  # weight_dtype, or float32 with --no_half_vae
    output_name: str | None = None  # the stem of the saves (library.methods.base.MethodStart.output_name)


def prepare_run(opts: Options, tracker_name: str, *, layout: Any, output_name: str | None,
                text_encoder_use: TextEncoderUse, support_dreambooth: bool, support_finetuning: bool,
                configure_group: Any = None) -> PreparedRun:
    """The set-up every script shares, in order: accelerate, seed, tokenizer, datasets (then
    ``configure_group(group)``, e.g. TI's caption replacements), the output check for the method's save
    ``layout`` (:class:`library.output_safety.OutputLayout`) and stem ``output_name``, the model, attention,
    cached latents."""
    from library.training.ddp_options import ddp_settings
    from library.training.hub_resume import resume_folder

    accelerator, logging_enabled = make_accelerator(opts.logging, opts.training, ddp_settings(opts.distributed))
    if logging_enabled:
        from library.training.tracker_config import tracker_start

        start_trackers(accelerator, tracker_start(opts.logging, opts.command_line()),
                       opts.logging.log_tracker_name or tracker_name)
    from library.training.fsdp_config import check_fsdp, fsdp_request

    check_fsdp(fsdp_request(accelerator), opts)  # refused FSDP combinations (docs/distributed.md)
    # the seed of a resumed run wins; with --resume_from_huggingface its state is downloaded here
    seed = choose_seed(opts.training.seed, resume_folder(opts.save, opts.hub))
    tokenizer = tokenizer_for(opts.model)
    blueprint, group = load_datasets(opts.data, opts.validation, tokenizer, seed, given=opts.given,
                                     support_dreambooth=support_dreambooth, support_finetuning=support_finetuning)
    if configure_group is not None:
        configure_group(group)
        if group.validation is not None:
            group.validation.replacements = group.replacements
    attach_mask_source(group, masked_loss=opts.loss.masked_loss,  # --masked_loss / alpha_mask (library/data/masks.py)
                       conditioning_data_dir=opts.data.conditioning_data_dir)
    # refuse --cache_text_encoder_outputs before loading the model (the method declares its text-encoder use)
    check_text_encoder_cache(opts.te_cache, text_encoder_use, caption_conflicts(group, opts.data, opts.dreambooth))
    plan = run_plan(opts.training, opts.data, group, accelerator)
    _check_start_step(opts.training, plan)  # --initial_step / --initial_epoch inside the run (start_step.py)
    check_outputs(opts, layout, blueprint, plan, output_name=output_name,
                  sampling=bool(opts.sample.sample_prompts), main_process=accelerator.is_main_process)
    weight_dtype = DTYPES[opts.training.mixed_precision]
    model = load_base_model(opts.model)
    if opts.fine_tune.diffusers_xformers:
        model.unet.enable_xformers_memory_efficient_attention()
        model.vae.enable_xformers_memory_efficient_attention()
    else:
        set_attention(model.unet, opts.model)
    from library.training.precision_options import keep_vae_in_float32, vae_dtype_for

    vae_dtype = vae_dtype_for(weight_dtype, opts.model.no_half_vae)
    if vae_dtype != weight_dtype:  # --no_half_vae: float32 also inside autocast (sampling)
        keep_vae_in_float32(model.vae)
    cache_latents(opts.data, group, model.vae, accelerator, vae_dtype, seed)
    if group.validation is not None:
        cache_latents(opts.data, group.validation, model.vae, accelerator, vae_dtype, seed)
    return PreparedRun(accelerator, logging_enabled, seed, tokenizer, blueprint, group, weight_dtype, model, layout,
                       plan, text_encoder_use=text_encoder_use, vae_dtype=vae_dtype, output_name=output_name)


def attach_step_options(optimizer: OptimizerOptions, ddp: Any, trainer: Any, built: Any) -> None:
    """Give ``trainer`` the per-parameter AdaFactor hooks of ``--fused_backward_pass`` (with
    ``--max_grad_norm``; library/training/fused_backward.py) and the gradient buckets of
    ``--ddp_gradient_as_bucket_view`` (``ddp``: the :class:`~library.training.ddp_options.DdpSettings`), where
    they apply."""
    from library.training.ddp_options import gradient_buckets
    from library.training.fused_backward import install_fused_backward
    from library.training.trainer import ALL_REDUCE_BUCKET

    world = trainer.accelerator.num_processes
    trainer.fused_backward = install_fused_backward(optimizer.fused_backward_pass, built.optimizer,
                                                    trainer.params, max_grad_norm=optimizer.max_grad_norm,
                                                    num_processes=world)
    trainer.grad_buckets = gradient_buckets(ddp, trainer.params, world, ALL_REDUCE_BUCKET)


def _initial_step(training: TrainingOptions, plan: RunPlan) -> int | None:
    from library.training.start_step import initial_step_of

    return initial_step_of(training.initial_step, training.initial_epoch, plan.steps_per_epoch)


def _check_start_step(training: TrainingOptions, plan: RunPlan) -> None:
    from library.training.start_step import check_start_step

    problem = check_start_step(_initial_step(training, plan), plan.max_train_steps)
    if problem:
        raise UserError(problem)


def start_from_initial_step(training: TrainingOptions, trainer: Any, plan: RunPlan, *, resumed: bool) -> None:
    """``--initial_step`` / ``--initial_epoch`` (with ``--skip_until_initial_step``): set the trainer's
    counters, after ``--resume`` (``resumed``) restored everything else (library/training/start_step.py)."""
    from library.training.start_step import start_point

    step = _initial_step(training, plan)
    if step is None:
        return
    trainer.start_at(start_point(step, steps_per_epoch=plan.steps_per_epoch,
                                 gradient_accumulation_steps=plan.gradient_accumulation_steps,
                                 skip=bool(training.skip_until_initial_step)), replaces_state=resumed)


def train(started: StartedRun, method: Any, *, description: str, result_name: str,
          sampler_options: dict[str, Any] | None = None) -> int:
    """The common tail of every entry script: optimizer and schedule, sampler, Trainer, ``--resume``, the
    method's :meth:`~library.methods.base.Method.on_train_start`, the start summary, the run; prints where the
    result went. Returns the exit code."""
    from library.training.ddp_options import ddp_settings
    from library.training.sampling import make_sampler

    opts, run = started.opts, started.run
    accelerator, model, plan = run.accelerator, run.model, run.plan
    from library.training.fsdp_config import fsdp_request
    from library.training.sharding import attach_sharding, shard_trained_modules

    request = fsdp_request(accelerator)  # accelerate's FSDP config: shard the trained modules (sharding.py)
    sharding = shard_trained_modules(method, model, request, accelerator) if request is not None else None
    built, scheduler = optimizer_and_schedule(opts.optimizer, method.param_groups(), plan, opts.distributed)
    engine = None
    if opts.distributed.deepspeed:  # --deepspeed: the engine over the trained modules (deepspeed_engine.py)
        from library.training.deepspeed_engine import build_engine

        engine = build_engine(method, model, opts.distributed, optimizer=built.optimizer,
                              micro_batch=opts.data.train_batch_size, accumulation=plan.gradient_accumulation_steps,
                              max_grad_norm=opts.optimizer.max_grad_norm, accelerator=accelerator,
                              output_dir=Path(opts.save.output_dir))
    sampler = make_sampler(started.sampling, output_dir=opts.save.output_dir, clip_skip=opts.model.clip_skip,
                           unet=model.unet, vae=model.vae, text_encoder=model.text_encoder,
                           tokenizer=run.tokenizer, v_parameterization=model.v_parameterization, seed=run.seed,
                           output_name=run.output_name, **(sampler_options or {}))
    compile_unet(model.unet, opts.model)  # after the method's changes (LoRA modules), before the first forward
    trainer = make_trainer(opts, run, method, built=built, scheduler=scheduler, sampler=sampler)
    # --fused_backward_pass, --ddp_gradient_as_bucket_view
    attach_step_options(opts.optimizer, ddp_settings(opts.distributed), trainer, built)
    attach_sharding(trainer, sharding)  # FSDP2: the loop's forward, gradient norm, saves and resume
    if engine is not None:
        from library.training.deepspeed_engine import attach_deepspeed

        attach_deepspeed(trainer, engine)  # --deepspeed: the loop's forward, backward, step, saves and resume
    from library.training.hub_resume import resume_folder
    from library.training.hub_upload import make_uploader

    if accelerator.is_main_process:
        trainer.uploader = make_uploader(opts.hub)  # --huggingface_repo_id: upload every save (hub_upload.py)
    if opts.save.resume:
        trainer.resume(resume_folder(opts.save, opts.hub))  # with --resume_from_huggingface: the downloaded state
    start_from_initial_step(opts.training, trainer, plan, resumed=bool(opts.save.resume))  # start_step.py
    method.on_train_start(trainer, built)  # LoRA: the ss_* metadata (needs the resumed session id)
    start_summary(run.group, plan, description).log(accelerator)
    result = trainer.run()
    if result is not None and accelerator.is_main_process:
        print(f"saved the trained {result_name} to {result}")
    return 0
