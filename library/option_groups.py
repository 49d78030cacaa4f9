"""The training scripts' options as frozen, typed groups, built once per run right after argparse.

Only the option layer (the ``add_*_arguments`` / ``*_problems`` functions, library/training/args.py,
library/training/bounds.py, library/config/option_file.py, library/config/arguments.py) reads the argparse
Namespace. Everything else takes the groups it needs, or the :class:`Options` bundle where a function sets up a
whole run. Nothing rewrites an option: a derived value is a property here or has its own name where it is made.

Adding an option: ``add_argument`` in its ``add_*_arguments`` function, one field in one group below (same name,
type and default; tests/test_option_groups.py checks every parser option has exactly one field), its use and
its test. An option a script does not have takes the field's default.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, TypeVar

G = TypeVar("G", bound="OptionGroup")

# options the option layer consumes itself (``--config_file`` / ``--output_config``): in no group
OPTION_LAYER_ONLY = frozenset({"config_file", "output_config"})


class OptionGroup:
    """Base of every group: built from the parsed command line, field by field."""

    @classmethod
    def from_args(cls: type[G], args: argparse.Namespace) -> G:
        """The group's values from ``args``; an option the script lacks takes the field default, a list
        becomes a tuple (the groups are immutable)."""
        given = vars(args)
        values = {}
        for f in fields(cls):  # type: ignore[arg-type]
            value = given.get(f.name, f.default)
            values[f.name] = tuple(value) if isinstance(value, list) else value
        return cls(**values)

    def values(self) -> dict[str, Any]:
        """Every field by name."""
        return {f.name: getattr(self, f.name) for f in fields(self)}  # type: ignore[arg-type]


@dataclass(frozen=True)
class DataOptions(OptionGroup):
    """Datasets, captions, buckets, latent caching and the data loader (the dataset options and kohya's data-loading options)."""

    train_data_dir: str | None = None
    shuffle_caption: bool = False
    caption_prefix: str | None = None
    caption_suffix: str | None = None
    caption_separator: str = ','
    keep_tokens_separator: str = ''
    secondary_separator: str | None = None
    enable_wildcard: bool = False
    caption_extension: str = '.caption'
    caption_extention: str | None = None
    keep_tokens: int = 0
    color_aug: bool = False
    flip_aug: bool = False
    face_crop_aug_range: str | None = None
    random_crop: bool = False
    debug_dataset: bool = False
    resolution: str | None = None
    cache_latents: bool = False
    vae_batch_size: int = 1
    cache_latents_to_disk: bool = False
    enable_bucket: bool = False
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False
    resize_interpolation: str | None = None
    cache_info: bool = False
    skip_cache_check: bool = False
    dataset_class: str | None = None
    highvram: bool = False
    token_warmup_min: int = 1
    token_warmup_step: float = 0.0
    caption_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    caption_tag_dropout_rate: float = 0.0
    reg_data_dir: str | None = None
    in_json: str | None = None
    dataset_repeats: int = 1
    dataset_config: Path | None = None
    train_batch_size: int = 1
    max_token_length: int | None = None
    prior_loss_weight: float = 1.0
    weighted_captions: bool = False
    max_data_loader_n_workers: int = 8
    persistent_data_loader_workers: bool = False
    debug_dataset_dir: str | None = None
    alpha_mask: bool = False
    conditioning_data_dir: str | None = None

    @property
    def latents_cached(self) -> bool:
        """Whether latents are cached before training: ``--cache_latents`` or ``--cache_latents_to_disk``
        (which implies it)."""
        return self.cache_latents or self.cache_latents_to_disk

    @property
    def caption_extension_in_effect(self) -> str | None:
        """The caption extension: the legacy ``--caption_extention`` spelling wins when given."""
        return self.caption_extention if self.caption_extention is not None else self.caption_extension


@dataclass(frozen=True)
class ModelOptions(OptionGroup):
    """The base model, the VAE, attention, memory savers and the text encoder's clip skip."""

    no_half_vae: bool = False
    pretrained_model_name_or_path: str | None = None
    v2: bool = False
    v_parameterization: bool = False
    tokenizer_cache_dir: str | None = None
    vae: str | None = None
    gradient_checkpointing: bool = False
    clip_skip: int | None = None
    mem_eff_attn: bool = False
    torch_compile: bool = False
    dynamo_backend: str = 'inductor'
    dynamo_mode: str | None = None
    lowram: bool = False
    reference_model: str | None = None
    fp8_base: bool = False
    fp8_base_unet: bool = False
    cpu_offload_checkpointing: bool = False
    xformers: bool = False
    sdpa: bool = False


@dataclass(frozen=True)
class SaveOptions(OptionGroup):
    """Where and when results and states are written, and the run to resume."""

    output_dir: str | None = None
    output_name: str | None = None
    save_model_as: str | None = None  # the default differs per script
    save_precision: str | None = None
    save_every_n_epochs: int | None = None
    save_n_epoch_ratio: int | None = None
    save_every_n_steps: int | None = None
    save_last_n_epochs: int | None = None
    save_last_n_epochs_state: int | None = None
    save_last_n_steps: int | None = None
    save_last_n_steps_state: int | None = None
    save_state: bool = False
    save_state_on_train_end: bool = False
    resume: str | None = None
    use_safetensors: bool = False


@dataclass(frozen=True)
class TrainingOptions(OptionGroup):
    """Steps, epochs, accumulation, precision, the seed, the start step and the run's record."""

    seed: int | None = None
    max_train_steps: int = 1600
    max_train_epochs: int | None = None
    gradient_accumulation_steps: int = 1
    mixed_precision: str = 'no'
    full_fp16: bool = False
    full_bf16: bool = False
    skip_until_initial_step: bool = False
    initial_epoch: int | None = None
    initial_step: int | None = None
    record_training_dir: str | None = None  # library/training/training_record.py

    @property
    def full_half(self) -> bool:
        """Whether the trained weights (and their gradients) are kept in the half dtype: ``--full_fp16`` or
        ``--full_bf16``."""
        return self.full_fp16 or self.full_bf16


@dataclass(frozen=True)
class LossOptions(OptionGroup):
    """Noise, timesteps and the loss (docs/loss_options.md)."""

    noise_offset: float | None = None
    adaptive_noise_scale: float | None = None
    multires_noise_iterations: int | None = None
    multires_noise_discount: float = 0.3
    min_snr_gamma: float | None = None
    loss_type: str = 'l2'
    huber_c: float | None = None
    huber_schedule: str | None = None
    huber_scale: float | None = None
    zero_terminal_snr: bool = False
    debiased_estimation_loss: bool = False
    ip_noise_gamma: float | None = None
    ip_noise_gamma_random_strength: bool = False
    masked_loss: bool = False
    min_timestep: int | None = None
    max_timestep: int | None = None
    noise_offset_random_strength: bool = False
    v_pred_like_loss: float | None = None
    scale_v_pred_loss_like_noise_pred: bool = False


@dataclass(frozen=True)
class DistributedOptions(OptionGroup):
    """Several processes: the DDP options and kohya's DeepSpeed options."""

    ddp_timeout: int | None = None
    ddp_gradient_as_bucket_view: bool = False
    ddp_static_graph: bool = False
    deepspeed: bool = False
    zero_stage: int = 2
    offload_optimizer_device: str | None = None
    offload_optimizer_nvme_path: str | None = None
    offload_param_device: str | None = None
    offload_param_nvme_path: str | None = None
    zero3_init_flag: bool = False
    zero3_save_16bit_model: bool = False
    fp16_master_weights_and_gradients: bool = False


@dataclass(frozen=True)
class TextEncoderCacheOptions(OptionGroup):
    """The text-encoder output cache (docs/te_cache.md)."""

    cache_text_encoder_outputs: bool = False
    cache_text_encoder_outputs_to_disk: bool = False
    text_encoder_batch_size: int | None = None
    no_cache_text_encoder_outputs: bool = False

    @property
    def requested(self) -> bool:
        """Whether the cache is asked for: ``--cache_text_encoder_outputs`` or
        ``--cache_text_encoder_outputs_to_disk`` (which implies it)."""
        return self.cache_text_encoder_outputs or self.cache_text_encoder_outputs_to_disk


@dataclass(frozen=True)
class ValidationOptions(OptionGroup):
    """The validation loss (docs/validation.md)."""

    validation_split: float | None = None
    validation_seed: int | None = None
    validate_every_n_steps: int | None = None
    validate_every_n_epochs: int | None = None
    max_validation_steps: int | None = None


@dataclass(frozen=True)
class EmaOptions(OptionGroup):
    """The moving average of the trained weights (docs/ema.md)."""

    ema: bool = False
    ema_decay: float = 0.999
    ema_update_every: int = 1
    ema_device: str = 'same'
    save_ema: bool = False

    @property
    def enabled(self) -> bool:
        """Whether the run keeps an EMA: ``--ema``, or ``--save_ema`` (which implies it)."""
        return self.ema or self.save_ema


@dataclass(frozen=True)
class DryRunOptions(OptionGroup):
    """The dry run (docs/dry_run.md)."""

    dry_run: bool = False
    dry_run_json: str | None = None

    @property
    def requested(self) -> bool:
        """True when ``--dry_run`` or ``--dry_run_json`` was given."""
        return self.dry_run or bool(self.dry_run_json)


@dataclass(frozen=True)
class OptimizerOptions(OptionGroup):
    """The optimizer, gradient clipping and the learning-rate schedule."""

    optimizer_type: str = ''
    use_8bit_adam: bool = False
    use_lion_optimizer: bool = False
    learning_rate: float = 2e-06
    max_grad_norm: float = 1.0
    optimizer_args: tuple[str, ...] | None = None
    lr_scheduler_type: str = ''
    lr_scheduler_args: tuple[str, ...] | None = None
    lr_scheduler: str = 'constant'
    lr_warmup_steps: int | float = 0
    lr_scheduler_num_cycles: int = 1
    lr_scheduler_power: float = 1.0
    fused_backward_pass: bool = False
    lr_decay_steps: int | float = 0
    lr_scheduler_timescale: int | None = None
    lr_scheduler_min_lr_ratio: float | None = None
    learning_rate_te: float | None = None


@dataclass(frozen=True)
class LoggingOptions(OptionGroup):
    """TensorBoard / wandb trackers and the console log."""

    logging_dir: str | None = None
    log_prefix: str | None = None
    log_with: str | None = None
    log_tracker_name: str | None = None
    wandb_api_key: str | None = None
    wandb_run_name: str | None = None
    log_tracker_config: str | None = None
    log_config: bool = False
    console_log_level: str | None = None
    console_log_file: str | None = None
    console_log_simple: bool = False


@dataclass(frozen=True)
class SampleOptions(OptionGroup):
    """Sample images during training (docs/sampling.md)."""

    sample_every_n_steps: int | None = None
    sample_every_n_epochs: int | None = None
    sample_at_first: bool = False
    sample_prompts: str | None = None
    sample_sampler: str = 'ddim'


@dataclass(frozen=True)
class MetadataOptions(OptionGroup):
    """The user's modelspec.* fields of LoRA and embedding files."""

    metadata_title: str | None = None
    metadata_author: str | None = None
    metadata_description: str | None = None
    metadata_license: str | None = None
    metadata_tags: str | None = None
    metadata_usage_hint: str | None = None
    metadata_thumbnail: str | None = None
    metadata_merged_from: str | None = None
    metadata_trigger_phrase: str | None = None
    metadata_preprocessor: str | None = None
    metadata_is_negative_embedding: str | None = None


@dataclass(frozen=True)
class HubOptions(OptionGroup):
    """Hugging Face upload and resume."""

    huggingface_repo_id: str | None = None
    huggingface_repo_type: str | None = None
    huggingface_path_in_repo: str | None = None
    huggingface_token: str | None = None
    huggingface_repo_visibility: str | None = None
    save_state_to_huggingface: bool = False
    resume_from_huggingface: bool = False
    async_upload: bool = False


@dataclass(frozen=True)
class NetworkOptions(OptionGroup):
    """train_network.py: the network, its learning rates, base weights and metadata."""

    network_module: str | None = None
    network_dim: int | None = None
    network_alpha: float = 1
    network_dropout: float | None = None
    network_args: tuple[str, ...] | None = None
    network_weights: str | None = None
    dim_from_weights: bool = False
    network_train_unet_only: bool = False
    network_train_text_encoder_only: bool = False
    unet_lr: float | None = None
    text_encoder_lr: float | None = None
    no_metadata: bool = False
    training_comment: str | None = None
    base_weights: tuple[str, ...] | None = None
    base_weights_multiplier: tuple[float, ...] | None = None
    scale_weight_norms: float | None = None


@dataclass(frozen=True)
class DreamBoothOptions(OptionGroup):
    """train_db.py only."""

    stop_text_encoder_training: int | None = None
    no_token_padding: bool = False


@dataclass(frozen=True)
class FineTuneOptions(OptionGroup):
    """fine_tune.py only."""

    train_text_encoder: bool = False
    diffusers_xformers: bool = False


@dataclass(frozen=True)
class EmbeddingOptions(OptionGroup):
    """train_textual_inversion.py (and XTI) only."""

    token_string: str | None = None
    num_vectors_per_token: int = 1
    init_word: str | None = None
    weights: str | None = None
    use_object_template: bool = False
    use_style_template: bool = False



_GROUPS: dict[str, type[OptionGroup]] = {
    "model": ModelOptions, "data": DataOptions, "training": TrainingOptions, "loss": LossOptions,
    "optimizer": OptimizerOptions, "save": SaveOptions, "metadata": MetadataOptions, "hub": HubOptions,
    "logging": LoggingOptions, "sample": SampleOptions, "validation": ValidationOptions, "ema": EmaOptions,
    "te_cache": TextEncoderCacheOptions, "distributed": DistributedOptions, "dry_run": DryRunOptions,
    "network": NetworkOptions, "dreambooth": DreamBoothOptions, "fine_tune": FineTuneOptions,
    "embedding": EmbeddingOptions,
}


@dataclass(frozen=True)
class Options:
    """All option groups of one run, and the names of the options the script's parser has."""

    model: ModelOptions
    data: DataOptions
    training: TrainingOptions
    loss: LossOptions
    optimizer: OptimizerOptions
    save: SaveOptions
    metadata: MetadataOptions
    hub: HubOptions
    logging: LoggingOptions
    sample: SampleOptions
    validation: ValidationOptions
    ema: EmaOptions
    te_cache: TextEncoderCacheOptions
    distributed: DistributedOptions
    dry_run: DryRunOptions
    network: NetworkOptions
    dreambooth: DreamBoothOptions
    fine_tune: FineTuneOptions
    embedding: EmbeddingOptions
    given: frozenset[str] = frozenset()

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "Options":
        """Every group from the parsed (and validated) command line."""
        groups = {name: group.from_args(args) for name, group in _GROUPS.items()}
        return cls(**groups, given=frozenset(vars(args)) - OPTION_LAYER_ONLY)

    def option(self, name: str) -> Any:
        """The value of option ``name`` (for tables of option names, e.g. the run's input files); None for a
        name that is no option."""
        group = group_of_option(name)
        return None if group is None else getattr(getattr(self, group), name)

    def command_line(self) -> dict[str, Any]:
        """The value of every option the script has, by option name (for records such as --log_config)."""
        out: dict[str, Any] = {}
        for name in _GROUPS:
            out.update({k: v for k, v in getattr(self, name).values().items() if k in self.given})
        return out


def group_of_option(name: str) -> str | None:
    """The :class:`Options` field holding option ``name`` (e.g. ``"ema"`` for ``ema_decay``), or None."""
    for group_name, group in _GROUPS.items():
        if any(f.name == name for f in fields(group)):  # type: ignore[arg-type]
            return group_name
    return None
