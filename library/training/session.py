"""Setting up a training run, shared by every entry script: accelerate, seed, datasets, model, latents,
optimizer, schedule and the trainer. Each function says which options it reads.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from library.config.arguments import latents_cached
from library.data.masks import attach_mask_source
from library.models.placement import place
from library.errors import UserError
from library.training.loss_options import step_fields
from library.training.timestep_loss_options import timestep_loss_fields
from library.training.output_targets import check_outputs
from library.training.te_cache import build_text_encoder_cache, check_text_encoder_cache
from library.training.plan import RunPlan, make_plan, save_every_n_epochs
from library.training.trainer import SaveSettings, StepSettings

logger = logging.getLogger(__name__)

DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def make_accelerator(args: argparse.Namespace, tracker_name: str):
    """An Accelerator for ``--mixed_precision`` and ``--logging_dir`` / ``--log_with`` (run folder
    ``<logging_dir>/<log_prefix><YYYYmmddHHMMSS>``)."""
    import time

    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    log_with = None
    project = None
    if args.logging_dir:
        log_with = args.log_with or "tensorboard"
        run_dir = Path(args.logging_dir) / f"{args.log_prefix or ''}{time.strftime('%Y%m%d%H%M%S')}"
        project = ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir))
        if log_with in ("wandb", "all"):
            os.environ.setdefault("WANDB_DIR", str(run_dir))
    elif args.log_with == "wandb":
        log_with = "wandb"
    if log_with == "all":
        log_with = ["tensorboard", "wandb"]
    if log_with and "wandb" in (log_with if isinstance(log_with, list) else [log_with]):
        try:
            import wandb
        except ImportError:
            raise UserError("--log_with wandb needs the package 'wandb' (pip install wandb)") from None
        if args.wandb_api_key:
            wandb.login(key=args.wandb_api_key)
    mixed = args.mixed_precision
    if mixed == "fp16" and not torch.cuda.is_available():
        raise UserError("--mixed_precision fp16 needs a CUDA GPU; use bf16 or no on this machine")
    from accelerate.state import AcceleratorState

    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        AcceleratorState._reset_state(reset_partial_state=True)  # a fresh run in this process (tests, notebooks)
    from library.training.ddp_options import ddp_settings, describe_processes, process_group_kwargs

    accelerator = Accelerator(mixed_precision=mixed, log_with=log_with, project_config=project,
                              kwargs_handlers=process_group_kwargs(ddp_settings(args)))  # --ddp_timeout
    if describe_processes(accelerator) and accelerator.is_main_process:
        logger.info("distributed: %s", describe_processes(accelerator))
    if log_with:
        from library.training.tracker_config import tracker_start

        start = tracker_start(args)  # --wandb_run_name, --log_tracker_config, --log_config (tracker_config.py)
        accelerator.init_trackers(args.log_tracker_name or tracker_name, config=start.config,
                                  init_kwargs=start.init_kwargs)
    return accelerator, bool(log_with)


def choose_seed(args: argparse.Namespace) -> int:
    """``--seed``, or a random one (recorded in the metadata) so every run is reproducible afterwards."""
    from accelerate.utils import set_seed

    from library.training.hub_resume import resume_folder

    seed = args.seed if args.seed is not None else random.randint(0, 2**31 - 1)
    resume = resume_folder(args)  # with --resume_from_huggingface the state is downloaded here
    if resume and (Path(resume) / "state.json").is_file():
        import json

        saved = json.loads((Path(resume) / "state.json").read_text(encoding="utf-8")).get("seed")
        if saved is not None and saved != seed:
            if args.seed is not None:
                logger.warning("--seed %s differs from the resumed run's seed %s; using %s so the run continues "
                               "exactly", args.seed, saved, saved)
            seed = saved
    set_seed(seed)
    return seed


def tokenizer_for(args: argparse.Namespace):
    """The SD1 or SD2 tokenizer, chosen from the model's own header when it can be read cheaply."""
    from library.models.load import peek_is_v2
    from library.models.tokenizer import load_tokenizer

    v2 = peek_is_v2(args.pretrained_model_name_or_path)
    return load_tokenizer(args.v2 if v2 is None else v2, args.tokenizer_cache_dir)


def load_datasets(args: argparse.Namespace, tokenizer: Any, seed: int, *, support_dreambooth: bool,
                  support_finetuning: bool):
    """The dataset group from ``--dataset_config`` or the legacy options (or ``--dataset_class``)."""
    from library.config import load_dataset_blueprint

    if getattr(args, "dataset_class", None):  # a user's dataset class makes the batches (library/data/user_dataset.py)
        from library.config.arguments import parse_resolution_option
        from library.data.user_dataset import load_user_dataset

        if args.dataset_config or args.train_data_dir:
            logger.warning("--dataset_class is given, so the dataset config / --train_data_dir are not used")
        return load_user_dataset(args.dataset_class, tokenizer=tokenizer, max_token_length=args.max_token_length,
                                 resolution=parse_resolution_option(args.resolution), debug_dataset=args.debug_dataset,
                                 seed=seed, weighted_captions=getattr(args, "weighted_captions", False))
    from library.data.dataset import build_dataset_group, check_cache_compatibility

    blueprint = load_dataset_blueprint(args, args.dataset_config, support_dreambooth=support_dreambooth,
                                       support_finetuning=support_finetuning)
    check_cache_compatibility(blueprint, latents_cached(args))
    group = build_dataset_group(blueprint, seed=seed, tokenizer=tokenizer, max_token_length=args.max_token_length,
                                weighted_captions=getattr(args, "weighted_captions", False))
    if len(group) == 0:
        raise UserError("no training images found (with --train_data_dir, give the parent of the "
                        "<repeats>_<name> folders)")
    from library.training.validation import split_validation

    group = split_validation(group, args, seed)  # held-out images go to group.validation (docs/validation.md)
    return blueprint, group


def load_base_model(args: argparse.Namespace, weight_dtype: torch.dtype):
    """The model of ``--pretrained_model_name_or_path`` (+ ``--vae``), loaded in fp32."""
    from library.models.load import load_model

    if args.v_parameterization and not args.v2:
        logger.warning("--v_parameterization is meant for SD2 768-v models (--v2 not given)")
    if args.v2 and args.clip_skip:
        logger.warning("--clip_skip with SD2: the SD2 text encoder already ends at the penultimate layer")
    return load_model(args.pretrained_model_name_or_path, v2=args.v2, v_parameterization=args.v_parameterization,
                      vae=args.vae, tokenizer_cache_dir=args.tokenizer_cache_dir,
                      reference_model=getattr(args, "reference_model", None), dtype=torch.float32)


def compile_unet(unet: Any, args: argparse.Namespace) -> None:
    """``--torch_compile``: compile the UNet's forward in place (``nn.Module.compile``, so its weight names and
    saved files stay as they are) with ``--dynamo_backend`` / ``--dynamo_mode`` (the backend was checked
    with the other options)."""
    if not args.torch_compile:
        return
    options = {"backend": args.dynamo_backend}
    if args.dynamo_mode and args.dynamo_mode != "default":
        options["mode"] = args.dynamo_mode
    unet.compile(**options)
    logger.info("UNet forward compiled with torch.compile (%s)", ", ".join(f"{k}={v}" for k, v in options.items()))


def set_attention(unet: Any, args: argparse.Namespace) -> None:
    """PyTorch SDPA by default (diffusers' processor); ``--xformers`` or ``--mem_eff_attn`` on request."""
    if args.xformers:
        unet.enable_xformers_memory_efficient_attention()
    elif args.mem_eff_attn:
        # sliced attention; "auto" halves the heads, which is 0 for single-head blocks: then one at a time
        heads = [m.sliceable_head_dim for m in unet.modules() if hasattr(m, "sliceable_head_dim")]
        unet.set_attention_slice("auto" if heads and min(heads) >= 2 else "max")


def cache_latents(args: argparse.Namespace, group: Any, vae: Any, accelerator: Any, weight_dtype: torch.dtype,
                  seed: int) -> None:
    """``--cache_latents`` / ``--cache_latents_to_disk``: encode every image once before training
    (``--skip_cache_check`` trusts existing files, ``--highvram`` keeps cached GPU memory between batches).

    In memory every process encodes for itself; on disk the main process writes the files first and the
    others then load them."""
    if not latents_cached(args):
        return
    from library.data.group_latents import cache_group_latents

    place(vae, accelerator.device, weight_dtype)
    workers = max(0, min(args.max_data_loader_n_workers, (os.cpu_count() or 1) - 1))
    if not args.cache_latents_to_disk or accelerator.is_main_process:
        cache_group_latents(group, vae, to_disk=args.cache_latents_to_disk, batch_size=args.vae_batch_size,
                            workers=workers, seed=seed, skip_check=args.skip_cache_check, high_vram=args.highvram)
    accelerator.wait_for_everyone()
    if args.cache_latents_to_disk and not accelerator.is_main_process:
        cache_group_latents(group, vae, to_disk=True, batch_size=args.vae_batch_size, workers=0, seed=seed,
                            skip_check=args.skip_cache_check, high_vram=args.highvram)


def run_plan(args: argparse.Namespace, group: Any, accelerator: Any) -> RunPlan:
    """Steps and epochs for this run (``--max_train_steps`` / ``--max_train_epochs``)."""
    plan = make_plan(len(group), num_processes=accelerator.num_processes,
                     gradient_accumulation_steps=args.gradient_accumulation_steps, batch_size=args.train_batch_size,
                     max_train_steps=args.max_train_steps, max_train_epochs=args.max_train_epochs)
    group.set_max_train_steps(plan.max_train_steps)
    return plan


def step_settings(args: argparse.Namespace, v_parameterization: bool, weight_dtype: torch.dtype) -> StepSettings:
    """The per-step options."""
    return StepSettings(v_parameterization=v_parameterization, noise_offset=args.noise_offset,
                        adaptive_noise_scale=args.adaptive_noise_scale,
                        multires_noise_iterations=args.multires_noise_iterations,
                        multires_noise_discount=args.multires_noise_discount, min_snr_gamma=args.min_snr_gamma,
                        max_grad_norm=args.max_grad_norm, weight_dtype=weight_dtype, **step_fields(args),
                        **timestep_loss_fields(args))


def save_settings(args: argparse.Namespace, plan: RunPlan, layout: Any) -> SaveSettings:
    """The saving options, for saves named by ``layout`` (``--output_dir`` was checked before loading)."""
    return SaveSettings(output_dir=Path(args.output_dir), output_name=args.output_name,
                        layout=layout,
                        every_n_epochs=save_every_n_epochs(plan.num_epochs, args.save_every_n_epochs,
                                                           args.save_n_epoch_ratio),
                        every_n_steps=args.save_every_n_steps, last_n_epochs=args.save_last_n_epochs,
                        last_n_epochs_state=args.save_last_n_epochs_state, last_n_steps=args.save_last_n_steps,
                        last_n_steps_state=args.save_last_n_steps_state, save_state=args.save_state,
                        state_on_train_end=args.save_state_on_train_end)


def recorded_learning_rates(args: argparse.Namespace, built: Any) -> dict[str, str]:
    """Learning-rate metadata as the optimizer left it (relative-step AdaFactor clears the lrs and sets
    the ``adafactor:<lr>`` scheduler)."""
    cleared = built.group_lrs_cleared
    return {"ss_learning_rate": str(built.learning_rate),
            "ss_unet_lr": str(None if cleared else getattr(args, "unet_lr", None)),
            "ss_text_encoder_lr": str(None if cleared else getattr(args, "text_encoder_lr", None)),
            "ss_lr_scheduler": str(built.lr_scheduler or args.lr_scheduler)}


def loader_workers(args: argparse.Namespace) -> int:
    """DataLoader workers: min(--max_data_loader_n_workers, CPUs − 1)."""
    return max(0, min(args.max_data_loader_n_workers, (os.cpu_count() or 1) - 1))


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


def optimizer_and_schedule(args: argparse.Namespace, param_groups: list[dict[str, Any]], plan: RunPlan):
    """The optimizer over ``param_groups`` (``--optimizer_type``, ``--learning_rate``, ``--optimizer_args``,
    legacy aliases) and its learning-rate schedule (``--lr_scheduler*``, ``--lr_warmup_steps``), sized
    in optimizer steps. Returns ``(BuiltOptimizer, scheduler)``."""
    from library.training.lr import build_lr_scheduler
    from library.training.optim import build_optimizer

    built = build_optimizer(args.optimizer_type, param_groups, args.learning_rate, args.optimizer_args,
                            use_8bit_adam=args.use_8bit_adam, use_lion_optimizer=args.use_lion_optimizer,
                            max_grad_norm=args.max_grad_norm, lr_scheduler=args.lr_scheduler)
    from library.training.lr_options import schedule_options

    scheduler = build_lr_scheduler(built.lr_scheduler or args.lr_scheduler, built.optimizer,
                                   max_train_steps=plan.max_train_steps, **schedule_options(args))
    return built, scheduler


def make_trainer(args: argparse.Namespace, *, accelerator: Any, model: Any, group: Any, method: Any, built: Any,
                 scheduler: Any, plan: RunPlan, seed: int, weight_dtype: torch.dtype, logging_enabled: bool,
                 layout: Any, sampler: Any = None):
    """The :class:`~library.training.trainer.Trainer` for a prepared method, with the step and saving
    options of ``args`` (DataLoader workers included), its EMA (``--ema``) and validator (held-out images)."""
    from library.training.ema import make_ema
    from library.training.trainer import Trainer
    from library.training.validation import make_validator

    validator = make_validator(args, group, seed)
    keep_te = sampler is not None or validator is not None  # both still run the text encoder
    te_cache = build_text_encoder_cache(args, accelerator=accelerator, model=model, group=group, method=method,
                                        keep_text_encoder=keep_te)
    return Trainer(accelerator=accelerator, model=model, group=group, method=method, optimizer=built.optimizer,
                   lr_scheduler=scheduler, plan=plan, step=step_settings(args, model.v_parameterization, weight_dtype),
                   save=save_settings(args, plan, layout), seed=seed, num_workers=loader_workers(args),
                   persistent_workers=args.persistent_data_loader_workers, logging_enabled=logging_enabled,
                   sampler=sampler, ema=make_ema(args, method, accelerator), validator=validator,
                   text_encoder_cache=te_cache)


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
    vae_dtype: torch.dtype = torch.float32  # weight_dtype, or float32 with --no_half_vae


def prepare_run(args: argparse.Namespace, tracker_name: str, *, layout: Any, support_dreambooth: bool,
                support_finetuning: bool, configure_group: Any = None) -> PreparedRun:
    """The set-up every script shares, in order: accelerate, seed, tokenizer, datasets (then
    ``configure_group(group)``, e.g. TI's caption replacements), the output check for the method's save
    ``layout`` (:class:`library.output_safety.OutputLayout`), the model, attention, cached latents."""
    accelerator, logging_enabled = make_accelerator(args, tracker_name)
    seed = choose_seed(args)
    tokenizer = tokenizer_for(args)
    blueprint, group = load_datasets(args, tokenizer, seed, support_dreambooth=support_dreambooth,
                                     support_finetuning=support_finetuning)
    if configure_group is not None:
        configure_group(group)
        if group.validation is not None:
            group.validation.replacements = group.replacements
    attach_mask_source(args, group)  # --masked_loss / alpha_mask (library/data/masks.py)
    check_text_encoder_cache(args, group)  # refuse --cache_text_encoder_outputs before loading the model
    plan = run_plan(args, group, accelerator)
    _check_start_step(args, plan)  # --initial_step / --initial_epoch inside the run (start_step.py)
    check_outputs(args, layout, blueprint, plan,
                  sampling=bool(getattr(args, "sample_prompts", None)), main_process=accelerator.is_main_process)
    weight_dtype = DTYPES[args.mixed_precision]
    model = load_base_model(args, weight_dtype)
    if getattr(args, "diffusers_xformers", False):
        model.unet.enable_xformers_memory_efficient_attention()
        model.vae.enable_xformers_memory_efficient_attention()
    else:
        set_attention(model.unet, args)
    from library.training.precision_options import keep_vae_in_float32, vae_dtype_for

    vae_dtype = vae_dtype_for(weight_dtype, getattr(args, "no_half_vae", False))
    if vae_dtype != weight_dtype:  # --no_half_vae: float32 also inside autocast (sampling)
        keep_vae_in_float32(model.vae)
    cache_latents(args, group, model.vae, accelerator, vae_dtype, seed)
    if group.validation is not None:
        cache_latents(args, group.validation, model.vae, accelerator, vae_dtype, seed)
    return PreparedRun(accelerator, logging_enabled, seed, tokenizer, blueprint, group, weight_dtype, model, layout,
                       plan, vae_dtype=vae_dtype)


def attach_step_options(args: argparse.Namespace, trainer: Any, built: Any) -> None:
    """Give ``trainer`` the per-parameter AdaFactor hooks of ``--fused_backward_pass``
    (library/training/fused_backward.py) and the gradient buckets of ``--ddp_gradient_as_bucket_view``
    (library/training/ddp_options.py), where they apply."""
    from library.training.ddp_options import ddp_settings, gradient_buckets
    from library.training.fused_backward import install_fused_backward
    from library.training.trainer import ALL_REDUCE_BUCKET

    world = trainer.accelerator.num_processes
    trainer.fused_backward = install_fused_backward(getattr(args, "fused_backward_pass", False), built.optimizer,
                                                    trainer.params, max_grad_norm=args.max_grad_norm,
                                                    num_processes=world)
    trainer.grad_buckets = gradient_buckets(ddp_settings(args), trainer.params, world, ALL_REDUCE_BUCKET)


def _check_start_step(args: argparse.Namespace, plan: RunPlan) -> None:
    from library.training.start_step import check_start_step, start_step_of_args

    problem = check_start_step(start_step_of_args(args, plan.steps_per_epoch), plan.max_train_steps)
    if problem:
        raise UserError(problem)


def start_from_initial_step(args: argparse.Namespace, trainer: Any, plan: RunPlan) -> None:
    """``--initial_step`` / ``--initial_epoch`` (with ``--skip_until_initial_step``): set the trainer's
    counters, after ``--resume`` restored everything else (library/training/start_step.py)."""
    from library.training.start_step import start_point, start_step_of_args

    step = start_step_of_args(args, plan.steps_per_epoch)
    if step is None:
        return
    trainer.start_at(start_point(step, steps_per_epoch=plan.steps_per_epoch,
                                 gradient_accumulation_steps=plan.gradient_accumulation_steps,
                                 skip=bool(args.skip_until_initial_step)), replaces_state=bool(args.resume))


def train(args: argparse.Namespace, run: Any, method: Any, *, sampling: Any, description: str, result_name: str,
          sampler_options: dict[str, Any] | None = None, before_start: Any = None) -> int:
    """The common tail of every entry script: plan, optimizer and schedule, sampler, Trainer, ``--resume``,
    the start summary, the run; prints where the result went. ``before_start(trainer, plan, built)`` runs
    after resuming (LoRA builds its metadata there). Returns the exit code."""
    from library.training.sampling import make_sampler

    accelerator, model, plan = run.accelerator, run.model, run.plan
    built, scheduler = optimizer_and_schedule(args, method.param_groups(), plan)
    sampler = make_sampler(sampling, args, unet=model.unet, vae=model.vae, text_encoder=model.text_encoder,
                           tokenizer=run.tokenizer, v_parameterization=model.v_parameterization, seed=run.seed,
                           **(sampler_options or {}))
    compile_unet(model.unet, args)  # after the method's changes (LoRA modules), before the first forward
    trainer = make_trainer(args, accelerator=accelerator, model=model, group=run.group, method=method, built=built,
                           scheduler=scheduler, plan=plan, seed=run.seed, weight_dtype=run.weight_dtype,
                           logging_enabled=run.logging_enabled, layout=run.layout, sampler=sampler)
    attach_step_options(args, trainer, built)  # --fused_backward_pass, --ddp_gradient_as_bucket_view
    from library.training.hub_resume import resume_folder
    from library.training.hub_upload import make_uploader

    if accelerator.is_main_process:
        trainer.uploader = make_uploader(args)  # --huggingface_repo_id: upload every save (hub_upload.py)
    if args.resume:
        trainer.resume(resume_folder(args))  # --resume_from_huggingface: the downloaded state (hub_resume.py)
    start_from_initial_step(args, trainer, plan)  # --initial_step / --initial_epoch (start_step.py)
    if before_start is not None:
        before_start(trainer, plan, built)
    start_summary(run.group, plan, description).log(accelerator)
    result = trainer.run()
    if result is not None and accelerator.is_main_process:
        print(f"saved the trained {result_name} to {result}")
    return 0
