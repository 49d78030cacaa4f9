"""Training option groups (kohya flag names, defaults and meanings) and the checks run before training.

``add_*`` register argparse groups; :func:`validate_training_args` reports every inconsistency in one
UserError before anything heavy is loaded.
"""

from __future__ import annotations

import argparse

from library.errors import UserError
from library.training.ema import add_ema_arguments, ema_problems
from library.training.validation import add_validation_arguments, validation_problems
from library.training.loss_options import add_loss_arguments, validate_loss_arguments
from library.training.te_cache import add_te_cache_arguments
from library.training.tracker_config import tracker_problems


def build_training_parser(prog: str, description: str, *, support_dreambooth: bool, support_caption: bool,
                          support_caption_dropout: bool) -> argparse.ArgumentParser:
    """The option groups every training script shares: model, data loading, dataset, training, optimizer,
    logging and sampling. Scripts add their saving group and their own options."""
    from library.options import add_data_loading_arguments, add_dataset_group, add_model_arguments

    from library.cli import OneLineErrorParser

    parser = OneLineErrorParser(prog=prog, description=description)
    add_model_arguments(parser)
    add_data_loading_arguments(parser)
    add_dataset_group(parser, support_dreambooth=support_dreambooth, support_caption=support_caption,
                      support_caption_dropout=support_caption_dropout)
    add_training_arguments(parser, support_dreambooth=support_dreambooth)
    add_optimizer_arguments(parser)
    add_logging_arguments(parser)
    add_sample_arguments(parser)
    return parser


#: the --dynamo_backend names kohya accepts (torch.compile backends; which run depends on the installation)
DYNAMO_BACKENDS = ["eager", "aot_eager", "inductor", "aot_ts_nvfuser", "nvprims_nvfuser", "cudagraphs", "ofi",
                   "fx2trt", "onnxrt", "tensorrt", "ipex", "tvm"]


def add_training_arguments(parser: argparse.ArgumentParser, *, support_dreambooth: bool) -> None:
    """Steps, precision, memory, noise and loss options shared by every method."""
    g = parser.add_argument_group("training")
    a = g.add_argument
    a("--output_name", type=str, default=None, help="base name of saved files (defaults: last / epoch / at)")
    a("--max_train_steps", type=int, default=1600, help="optimizer steps to train (default 1600)")
    a("--max_train_epochs", type=int, default=None, help="train this many epochs (overrides --max_train_steps)")
    a("--gradient_checkpointing", action="store_true", help="activation checkpointing in UNet and text encoder")
    a("--gradient_accumulation_steps", type=int, default=1, help="micro-batches per optimizer step")
    a("--mixed_precision", type=str, default="no", choices=["no", "fp16", "bf16"], help="autocast precision")
    a("--full_fp16", action="store_true", help="keep trainable weights and gradients in fp16 (needs fp16)")
    a("--full_bf16", action="store_true", help="keep trainable weights and gradients in bf16 (needs bf16)")
    a("--clip_skip", type=int, default=None, help="use the n-th text-encoder layer from the end (2 = penultimate)")
    a("--xformers", action="store_true", help="xformers memory-efficient attention in the UNet")
    a("--mem_eff_attn", action="store_true", help="memory-efficient (sliced) attention in the UNet")
    a("--torch_compile", action="store_true",
      help="compile the UNet forward with torch.compile (first steps are slow while it compiles)")
    a("--dynamo_backend", type=str, default="inductor", choices=DYNAMO_BACKENDS,
      help="torch.compile backend with --torch_compile (default inductor)")
    a("--dynamo_mode", type=str, default=None, choices=["default", "reduce-overhead", "max-autotune"],
      help="torch.compile mode with --torch_compile (default: torch's)")
    a("--sdpa", action="store_true", help="PyTorch scaled-dot-product attention: what the UNet uses anyway "
      "unless --xformers or --mem_eff_attn is given; accepted for kohya command lines, changes nothing")
    a("--lowram", action="store_true", help="accepted for kohya command lines (a LoRA records it as ss_lowram); "
      "changes nothing else (kohya loads the model straight to the GPU): here the model is always built empty and "
      "filled tensor by tensor from the memory-mapped file, so RAM peaks at about one float32 copy of it before it "
      "moves to the device")
    a("--reference_model", type=str, default=None, metavar="FOLDER",
      help="diffusers folder of the base model's architecture (only its unet/, vae/, text_encoder/ config.json "
      "are read), for an ldm --pretrained_model_name_or_path whose layout is not standard SD1/SD2 (e.g. a "
      "converted custom model); ignored for diffusers models")
    a("--noise_offset", type=float, default=None, help="offset-noise strength (about 0.1)")
    a("--adaptive_noise_scale", type=float, default=None, help="add scale*|latent mean| to the noise offset")
    a("--multires_noise_iterations", type=int, default=None, help="pyramid-noise levels (6-10)")
    a("--multires_noise_discount", type=float, default=0.3, help="pyramid-noise per-level discount")
    a("--min_snr_gamma", type=float, default=None, help="Min-SNR loss weighting gamma (5 recommended)")
    add_loss_arguments(parser)
    from library.training.timestep_loss_options import add_timestep_loss_arguments
    add_timestep_loss_arguments(parser)  # --min/max_timestep, offset random strength, v-pred-like loss scalings
    from library.training.training_record import add_record_arguments
    add_record_arguments(parser)  # --record_training_dir (library/training/training_record.py)
    add_te_cache_arguments(parser)
    add_validation_arguments(parser)
    add_ema_arguments(parser)
    add_dry_run_arguments(parser)
    from library.models.fp8_options import add_fp8_arguments
    add_fp8_arguments(g)  # --fp8_base (used by train_network.py only, as in kohya)
    from library.training.ddp_options import add_ddp_arguments
    from library.training.deepspeed_options import add_deepspeed_arguments
    add_ddp_arguments(g)  # --ddp_timeout, --ddp_gradient_as_bucket_view, --ddp_static_graph
    add_deepspeed_arguments(parser)  # accepted; --deepspeed itself stops (issue 16)
    from library.config.option_file import add_option_file_arguments
    add_option_file_arguments(parser)  # --config_file / --output_config (docs/config_file.md)


def add_dry_run_arguments(parser: argparse.ArgumentParser) -> None:
    """``--dry_run`` and ``--dry_run_json``."""
    g = parser.add_argument_group("dry run (docs/dry_run.md)")
    g.add_argument("--dry_run", action="store_true",
                   help="print buckets, steps, the lr schedule, sample captions, the files to be written and a "
                        "memory estimate without loading the model, then exit")
    g.add_argument("--dry_run_json", type=str, default=None,
                   help="also write the dry-run report as JSON to this file (implies --dry_run)")


def add_optimizer_arguments(parser: argparse.ArgumentParser) -> None:
    """Optimizer and learning-rate scheduler options."""
    g = parser.add_argument_group("optimizer")
    a = g.add_argument
    a("--optimizer_type", type=str, default="", help="AdamW (default), AdamW8bit, Lion, Lion8bit, SGDNesterov, "
      "SGDNesterov8bit, DAdaptation/DAdaptAdam/..., Prodigy, AdaFactor, or module.Class")
    a("--use_8bit_adam", action="store_true", help="legacy alias of --optimizer_type AdamW8bit")
    a("--use_lion_optimizer", action="store_true", help="legacy alias of --optimizer_type Lion")
    a("--learning_rate", type=float, default=2e-6, help="learning rate (default 2e-6)")
    a("--max_grad_norm", type=float, default=1.0, help="gradient-norm clipping; 0 disables (default 1.0)")
    a("--optimizer_args", type=str, default=None, nargs="*", help="optimizer key=value arguments")
    a("--lr_scheduler_type", type=str, default="", help="module.Class of a custom scheduler")
    a("--lr_scheduler_args", type=str, default=None, nargs="*",
      help="scheduler key=value arguments (of --lr_scheduler_type, or extra ones of a --lr_scheduler)")
    a("--lr_scheduler", type=str, default="constant", help="linear, cosine, cosine_with_restarts, polynomial, "
      "constant (default), constant_with_warmup, inverse_sqrt, cosine_with_min_lr, warmup_stable_decay, "
      "piecewise_constant, adafactor")
    from library.training.lr_options import add_lr_schedule_arguments, steps_or_ratio
    a("--lr_warmup_steps", type=steps_or_ratio, default=0,
      help="warm-up steps of the schedule: a count, a ratio below 1 or N%% of the run (default 0)")
    a("--lr_scheduler_num_cycles", type=int, default=1, help="restarts of cosine_with_restarts")
    a("--lr_scheduler_power", type=float, default=1.0, help="power of the polynomial schedule")
    add_lr_schedule_arguments(parser)  # --lr_decay_steps, --lr_scheduler_timescale, --lr_scheduler_min_lr_ratio
    from library.training.fused_backward_options import add_fused_backward_arguments
    add_fused_backward_arguments(g)  # --fused_backward_pass (AdaFactor only)


def add_saving_arguments(parser: argparse.ArgumentParser, *, model_formats: tuple[str, ...], default_format: str | None
                         ) -> None:
    """Save cadence, retention, precision, state and resume options."""
    g = parser.add_argument_group("saving")
    a = g.add_argument
    a("--save_model_as", type=str, default=default_format, choices=list(model_formats),
      help=f"file format of saved models ({', '.join(model_formats)}; default {default_format})")
    a("--save_precision", type=str, default=None, choices=[None, "float", "fp16", "bf16"],
      help="dtype of saved weights (default: as trained)")
    a("--save_every_n_epochs", type=int, default=None, help="save every N epochs")
    a("--save_n_epoch_ratio", type=int, default=None, help="save about N times over the run (overrides the above)")
    a("--save_every_n_steps", type=int, default=None, help="save every N steps")
    a("--save_last_n_epochs", type=int, default=None, help="keep only the last N epoch saves")
    a("--save_last_n_epochs_state", type=int, default=None, help="keep only the last N epoch states")
    a("--save_last_n_steps", type=int, default=None, help="keep only step saves of roughly the last N steps")
    a("--save_last_n_steps_state", type=int, default=None, help="the same for step states")
    a("--save_state", action="store_true", help="also save the training state (for --resume) with every save")
    from library.training.state_options import add_state_on_train_end_argument
    add_state_on_train_end_argument(g)  # --save_state_on_train_end (library/training/state_options.py)
    a("--resume", type=str, default=None, help="resume from a saved state folder (exactly where it stopped)")
    from library.modelspec import add_metadata_arguments
    from library.training.hub_upload import add_huggingface_arguments

    add_metadata_arguments(parser)
    add_huggingface_arguments(parser)  # --huggingface_* upload / resume (library/training/hub_upload.py)


def add_logging_arguments(parser: argparse.ArgumentParser) -> None:
    """TensorBoard / W&B logging options."""
    g = parser.add_argument_group("logging")
    a = g.add_argument
    a("--logging_dir", type=str, default=None, help="enables logging: runs go to <logging_dir>/<prefix><time>")
    a("--log_prefix", type=str, default=None, help="prefix of the run folder name")
    a("--log_with", type=str, default=None, choices=[None, "tensorboard", "wandb", "all"],
      help="tensorboard (default with --logging_dir), wandb or all")
    a("--log_tracker_name", type=str, default=None, help="tracker / project name")
    a("--wandb_api_key", type=str, default=None, help="W&B API key (never written to files)")
    from library.training.logging_setup import add_console_logging_arguments
    from library.training.tracker_config import add_tracker_arguments
    add_tracker_arguments(parser)  # --wandb_run_name, --log_tracker_config, --log_config (tracker_config.py)
    add_console_logging_arguments(parser)  # --console_log_level / _file / _simple (logging_setup.py)


def add_sample_arguments(parser: argparse.ArgumentParser) -> None:
    """Sample images during training (docs/sampling.md)."""
    from library.training.prompts import DEFAULT_SAMPLER, SAMPLER_NAMES

    g = parser.add_argument_group("sample images")
    a = g.add_argument
    a("--sample_every_n_steps", type=int, default=None, help="generate sample images every N optimizer steps")
    a("--sample_every_n_epochs", type=int, default=None,
      help="generate sample images every N epochs (overrides --sample_every_n_steps)")
    a("--sample_at_first", action="store_true", help="also generate sample images before the first step")
    a("--sample_prompts", type=str, default=None,
      help="text file with one prompt per line; options --n (negative) --w --h --d (seed) --l (CFG) --s (steps)")
    a("--sample_sampler", type=str, default=DEFAULT_SAMPLER, choices=list(SAMPLER_NAMES),
      help=f"sampler of the sample images (default {DEFAULT_SAMPLER})")


def validate_training_args(args: argparse.Namespace) -> None:
    """Check option combinations up front; every problem is reported together in one UserError."""
    from library.config.image_options import image_cache_problems
    from library.modelspec import metadata_problems
    from library.training.bounds import bound_problems, network_arg_problems
    from library.training.hub_upload import huggingface_problems
    from library.training.deepspeed_options import deepspeed_problems
    from library.training.fused_backward_options import fused_backward_problems

    problems = bound_problems(args)  # every numeric option's range (library/training/bounds.py)
    if args.noise_offset is not None and args.multires_noise_iterations is not None:
        problems.append("--noise_offset and --multires_noise_iterations cannot be combined")
    if args.adaptive_noise_scale is not None and args.noise_offset is None:
        problems.append("--adaptive_noise_scale needs --noise_offset")
    if args.full_fp16 and args.mixed_precision != "fp16":
        problems.append("--full_fp16 needs --mixed_precision fp16")
    if args.full_bf16 and args.mixed_precision != "bf16":
        problems.append("--full_bf16 needs --mixed_precision bf16")
    if args.max_train_steps is not None and args.max_train_steps < 1 and not args.max_train_epochs:
        problems.append(f"--max_train_steps must be at least 1, got {args.max_train_steps}")
    if getattr(args, "log_with", None) in ("tensorboard", "all") and not args.logging_dir:
        problems.append(f"--log_with {args.log_with} needs --logging_dir")
    if args.xformers:
        import importlib.util

        if importlib.util.find_spec("xformers") is None:
            problems.append("--xformers needs the package 'xformers' (pip install xformers); "
                            "without it PyTorch's scaled-dot-product attention is used by default")
    if args.torch_compile:
        import torch._dynamo

        available = torch._dynamo.list_backends(exclude_tags=())
        if args.dynamo_backend not in available:
            problems.append(f"--dynamo_backend {args.dynamo_backend} is not available in this torch installation "
                            f"(available: {', '.join(sorted(torch._dynamo.list_backends()))})")
        elif args.dynamo_backend == "inductor" and not torch.cuda.is_available():
            problems.append("--torch_compile --dynamo_backend inductor needs a CUDA GPU: on the CPU its compiled UNet "
                            "backward gives wrong gradients with this torch (docs/train_network.md); "
                            "--dynamo_backend aot_eager compiles correctly on the CPU")
    if hasattr(args, "output_dir") and not args.output_dir and not getattr(args, "debug_dataset", False):
        problems.append("--output_dir is required (where trained files are written)")
    problems += validation_problems(args) + ema_problems(args)
    problems += image_cache_problems(args)
    problems += fused_backward_problems(args) + deepspeed_problems(args)
    problems += metadata_problems(args) + huggingface_problems(args)  # modelspec.py, hub_upload.py
    from library.training.lr_options import lr_schedule_problems
    from library.training.timestep_loss_options import timestep_loss_problems
    problems += timestep_loss_problems(args) + lr_schedule_problems(args)
    from library.training.training_record import record_problems
    problems += record_problems(args)  # --record_training_dir
    from library.models.fp8_options import fp8_problems
    from library.training.network_options import network_problems
    problems += fp8_problems(args) + network_problems(args)  # library/models/fp8_options.py, training/network_options.py
    problems += tracker_problems(args)
    problems += network_arg_problems(args)
    if problems:
        raise UserError("; ".join(problems))
    validate_loss_arguments(args)
    _check_schedule(args)


def _check_schedule(args: argparse.Namespace) -> None:
    """Build the learning-rate schedule on a throwaway optimizer, so its mistakes surface before loading."""
    from library.training.lr import lr_at_steps

    if args.optimizer_type.lower() == "adafactor" or args.lr_scheduler.startswith("adafactor"):
        return  # its schedule depends on the optimizer's own rules, checked when it is built
    from library.option_groups import OptimizerOptions
    from library.training.lr_options import schedule_options

    lr_at_steps(args.lr_scheduler, [0], learning_rate=args.learning_rate or 1.0,
                max_train_steps=max(1, args.max_train_steps or 1), **schedule_options(OptimizerOptions.from_args(args)))
