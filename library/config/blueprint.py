"""The parsed dataset configuration: frozen dataclasses that later layers build datasets from.

Nothing here reads images. A blueprint is the fully resolved answer to "which folders and metadata
files, with which per-subset and per-dataset settings" after the cascade
subset > dataset > [general] > command line > built-in default has been applied.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from library.config.caption_options import caption_settings_text

DatasetStyle = Literal["dreambooth", "finetuning"]

DREAMBOOTH: DatasetStyle = "dreambooth"
FINETUNING: DatasetStyle = "finetuning"


@dataclass(frozen=True)
class BlueprintSubset:
    """One image folder (DreamBooth style) or one metadata file (fine-tuning style) with its settings.

    ``image_dir`` is the folder holding the images directly (None only for a fine-tuning subset whose
    metadata keys are full paths). ``metadata_file`` is set exactly for fine-tuning subsets.
    ``is_reg``, ``class_tokens`` and ``caption_extension`` are used by DreamBooth-style subsets only.
    """

    image_dir: str | None
    num_repeats: int = 1
    is_reg: bool = False
    class_tokens: str | None = None
    caption_extension: str = ".caption"
    metadata_file: str | None = None
    shuffle_caption: bool = False
    keep_tokens: int = 0
    color_aug: bool = False
    flip_aug: bool = False
    face_crop_aug_range: tuple[float, float] | None = None
    random_crop: bool = False
    caption_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    caption_tag_dropout_rate: float = 0.0
    token_warmup_min: int = 1
    token_warmup_step: float = 0.0
    alpha_mask: bool = False
    conditioning_data_dir: str | None = None
    resize_interpolation: str | None = None  # None: area when shrinking, lanczos when enlarging (images.py)
    cache_info: bool = False  # DreamBooth style: sizes and captions kept in <image_dir>/metadata_cache.json
    # caption rules of later sd-scripts (library/data/caption_rules.py, docs/datasets.md)
    caption_prefix: str | None = None
    caption_suffix: str | None = None
    caption_separator: str = ","
    keep_tokens_separator: str | None = None
    secondary_separator: str | None = None
    enable_wildcard: bool = False
    # free-form table carried along unchanged (kohya's custom_attributes); not part of equality/hash
    custom_attributes: Mapping[str, Any] | None = field(default=None, compare=False, hash=False)

    @property
    def is_finetuning(self) -> bool:
        """True for a fine-tuning-style (metadata) subset, False for a DreamBooth-style folder."""
        return self.metadata_file is not None


@dataclass(frozen=True)
class BlueprintDataset:
    """A group of subsets sharing resolution, batch size and bucketing settings.

    ``resolution`` is (width, height); it is None only for fine-tuning datasets whose metadata is
    expected to carry ``train_resolution``. ``max_token_length`` and ``prior_loss_weight`` are
    command-line-only settings carried along for the dataset builders.
    """

    style: DatasetStyle
    subsets: tuple[BlueprintSubset, ...]
    resolution: tuple[int, int] | None = None
    batch_size: int = 1
    enable_bucket: bool = False
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False
    max_token_length: int | None = None
    prior_loss_weight: float = 1.0
    is_validation: bool = False        # every image of this dataset is held out for the validation loss
    validation_split: float = 0.0      # share of its training images held out (docs/validation.md)
    validation_seed: int | None = None  # picks the held-out images and their noise (None: the run seed)

    @property
    def is_dreambooth(self) -> bool:
        """True for a DreamBooth-style (folder) dataset."""
        return self.style == DREAMBOOTH


@dataclass(frozen=True)
class DatasetBlueprint:
    """Every dataset of a run, in order; ``source`` names the config file, or None for the command line."""

    datasets: tuple[BlueprintDataset, ...] = field(default_factory=tuple)
    source: str | None = None

    def summary(self) -> str:
        """A multi-line human-readable description, suitable for logging at start-up."""
        origin = self.source if self.source is not None else "command line"
        lines = [f"dataset configuration from {origin}: {len(self.datasets)} dataset(s)"]
        for i, ds in enumerate(self.datasets):
            reso = "from metadata" if ds.resolution is None else f"{ds.resolution[0]}x{ds.resolution[1]}"
            bucket = (
                f", buckets {ds.min_bucket_reso}-{ds.max_bucket_reso} step {ds.bucket_reso_steps}"
                f"{' no upscale' if ds.bucket_no_upscale else ''}"
                if ds.enable_bucket
                else ""
            )
            held = ", validation set" if ds.is_validation else (
                f", validation_split {ds.validation_split:g}" if ds.validation_split else "")
            lines.append(f"  [dataset {i}] {ds.style}, resolution {reso}, batch size {ds.batch_size}{bucket}{held}")
            for j, sub in enumerate(ds.subsets):
                where = sub.metadata_file if sub.is_finetuning else sub.image_dir
                extra = ""
                if not sub.is_finetuning:
                    extra = f", class_tokens {sub.class_tokens!r}{', regularization' if sub.is_reg else ''}"
                settings = caption_settings_text(sub)
                extra += f", {settings}" if settings else ""
                lines.append(f"    [subset {j}] {where}: repeats {sub.num_repeats}{extra}")
        return "\n".join(lines)
