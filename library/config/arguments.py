"""Dataset command-line options (kohya names and defaults) and their use as the config's last fallback.

Also the folder convention used without a config file: every sub-folder of ``--train_data_dir`` (and of
``--reg_data_dir``) named ``<repeats>_<class tokens>`` becomes one DreamBooth-style subset.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

from library.config.caption_options import CAPTION_OPTION_KEYS, add_caption_arguments
from library.config.image_options import IMAGE_OPTION_KEYS, add_image_cache_arguments
from library.errors import UserError
from library.option_groups import DataOptions, ValidationOptions

logger = logging.getLogger(__name__)

# argparse attribute -> config key, where the two differ
OPTION_TO_KEY: Mapping[str, str] = MappingProxyType({"train_batch_size": "batch_size", "dataset_repeats": "num_repeats"})

# fallback keys whose options are in ValidationOptions (the others are in DataOptions)
VALIDATION_FALLBACK_KEYS = frozenset({"validation_split", "validation_seed"})

# keys whose command-line value is taken as-is (same name on both sides)
PLAIN_FALLBACK_KEYS = (
    "shuffle_caption", "keep_tokens", "color_aug", "flip_aug", "random_crop",
    "caption_dropout_rate", "caption_dropout_every_n_epochs", "caption_tag_dropout_rate",
    "token_warmup_min", "token_warmup_step",
    "enable_bucket", "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps", "bucket_no_upscale",
    "validation_split", "validation_seed",
    "alpha_mask",
    *CAPTION_OPTION_KEYS,
    *IMAGE_OPTION_KEYS,
)


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Register ``--dataset_config`` (a .toml or .json dataset configuration file)."""
    parser.add_argument(
        "--dataset_config", type=Path, default=None,
        help="dataset configuration file (.toml or .json); replaces --train_data_dir/--reg_data_dir/--in_json",
    )


def add_dataset_arguments(
    parser: argparse.ArgumentParser, *, support_dreambooth: bool, support_caption: bool, support_caption_dropout: bool
) -> None:
    """Register the dataset options with kohya's flag names and defaults.

    ``support_dreambooth`` adds ``--reg_data_dir``; ``support_caption`` (metadata captions) adds
    ``--in_json`` and ``--dataset_repeats``; ``support_caption_dropout`` adds the three dropout options.
    ``--train_batch_size``, ``--max_token_length`` and ``--prior_loss_weight`` belong to the training
    options group and are only read here (with their kohya defaults when absent).
    """
    add = parser.add_argument
    add("--train_data_dir", type=str, default=None,
        help="training images: parent of <repeats>_<class tokens> folders, or the image folder for --in_json")
    add("--shuffle_caption", action="store_true", help="shuffle the comma-separated parts of each caption")
    add_caption_arguments(parser)
    add("--caption_extension", type=str, default=".caption", help="extension of caption files (with the dot)")
    add("--caption_extention", type=str, default=None,
        help="misspelled legacy alias of --caption_extension; overrides it when given")
    add("--keep_tokens", type=int, default=0,
        help="number of leading caption parts kept in place when shuffling or dropping tags")
    add("--color_aug", action="store_true", help="weak colour augmentation (hue / gamma)")
    add("--flip_aug", action="store_true", help="random horizontal flip augmentation")
    add("--face_crop_aug_range", type=str, default=None,
        help="face-centred crop augmentation range 'low,high' (e.g. 2.0,4.0)")
    add("--random_crop", action="store_true", help="crop at a random position instead of the centre")
    add("--debug_dataset", action="store_true", help="show the training batches instead of training")
    add("--resolution", type=str, default=None, help="training resolution: 'size' or 'width,height'")
    add("--cache_latents", action="store_true",
        help="encode every image with the VAE once and keep the latents in memory")
    add("--vae_batch_size", type=int, default=1, help="batch size for latent caching")
    add("--cache_latents_to_disk", action="store_true",
        help="cache latents as .npz files beside the images and reuse them (implies --cache_latents)")
    add("--enable_bucket", action="store_true", help="enable aspect-ratio bucketing")
    add("--min_bucket_reso", type=int, default=256, help="smallest bucket side in pixels")
    add("--max_bucket_reso", type=int, default=1024, help="largest bucket side in pixels")
    add("--bucket_reso_steps", type=int, default=64,
        help="bucket side granularity in pixels (a multiple of 8 is recommended)")
    add("--bucket_no_upscale", action="store_true",
        help="one bucket per image size, never upscaling; large images are shrunk to the resolution's area")
    add_image_cache_arguments(parser)
    add("--token_warmup_min", type=int, default=1,
        help="number of caption parts used at step 0 during token warm-up")
    add("--token_warmup_step", type=float, default=0,
        help="step (or fraction of max_train_steps if < 1) at which all caption parts are used; 0 = off")
    if support_caption_dropout:
        add("--caption_dropout_rate", type=float, default=0.0, help="probability of dropping a whole caption")
        add("--caption_dropout_every_n_epochs", type=int, default=0,
            help="drop all captions every N-th epoch (0 = never)")
        add("--caption_tag_dropout_rate", type=float, default=0.0,
            help="probability of dropping each comma-separated tag that is not kept")
    if support_dreambooth:
        add("--reg_data_dir", type=str, default=None,
            help="regularization images: parent of <repeats>_<class> folders")
    if support_caption:
        add("--in_json", type=str, default=None, help="metadata json for fine-tuning-style training")
        add("--dataset_repeats", type=int, default=1, help="repeat count of the fine-tuning-style dataset")


def parse_resolution_option(value: Any, option: str = "--resolution") -> tuple[int, int] | None:
    """Turn ``"512"``, ``"512,768"``, an int or a pair into (width, height); None stays None."""
    if value is None:
        return None
    parts: list[Any]
    if isinstance(value, str):
        parts = [p.strip() for p in value.split(",")]
    elif isinstance(value, (list, tuple)):
        parts = list(value)
    else:
        parts = [value]
    try:
        sizes = [int(p) for p in parts if not isinstance(p, (bool, float))]
    except ValueError:
        sizes = []
    if len(sizes) != len(parts) or len(sizes) not in (1, 2) or min(sizes) <= 0:
        raise UserError(f"{option}: must be 'size' or 'width,height' with positive integers, got '{value}'")
    return (sizes[0], sizes[0]) if len(sizes) == 1 else (sizes[0], sizes[1])


def parse_face_crop_option(value: Any, option: str = "--face_crop_aug_range") -> tuple[float, float] | None:
    """Turn ``"low,high"`` (or a pair) into a float pair with low <= high; None stays None."""
    if value is None:
        return None
    parts = value.split(",") if isinstance(value, str) else value
    try:
        if isinstance(parts, (list, tuple)) and len(parts) == 2:
            low, high = float(parts[0]), float(parts[1])
            if low <= high:
                return (low, high)
    except (TypeError, ValueError):
        pass
    raise UserError(f"{option}: must be 'low,high' with two numbers, low <= high, got '{value}'")


def parse_network_args(items: list[str] | None) -> dict[str, str]:
    """``--network_args key=value ...`` → dict of strings (values are converted by the module)."""
    out: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key or "=" in value:
            raise UserError(f"--network_args {item!r}: expected key=value (one '=')")
        out[key.strip()] = value.strip()
    return out


def command_line_values(data: DataOptions, validation: ValidationOptions, given: frozenset[str]) -> dict[str, Any]:
    """The dataset options (``data``, and ``--validation_split`` / ``--validation_seed`` of ``validation``) as
    config-key -> value, the last fallback before the built-in defaults.

    Options the script does not have (not in ``given``, e.g. dropout in textual inversion) are simply absent.
    """
    values: dict[str, Any] = {}
    for option, key in [(k, k) for k in PLAIN_FALLBACK_KEYS] + list(OPTION_TO_KEY.items()):
        group = validation if option in VALIDATION_FALLBACK_KEYS else data
        value = getattr(group, option) if option in given else None
        if value is not None:
            values[key] = list(value) if isinstance(value, tuple) else value
    extension = data.caption_extension_in_effect if "caption_extension" in given else None
    if extension is not None:
        values["caption_extension"] = extension
    resolution = parse_resolution_option(data.resolution)
    if resolution is not None:
        values["resolution"] = resolution
    face_crop = parse_face_crop_option(data.face_crop_aug_range)
    if face_crop is not None:
        values["face_crop_aug_range"] = face_crop
    return values


def split_folder_name(name: str) -> tuple[int, str] | None:
    """Split ``"<repeats>_<class tokens>"`` into (repeats, class tokens); None without a numeric prefix.

    Class tokens are everything after the first underscore and may contain further underscores.
    """
    head, _, rest = name.partition("_")
    try:
        repeats = int(head)
    except ValueError:
        return None
    return repeats, rest


def subsets_from_folders(parent: str, *, is_reg: bool, option: str) -> list[dict[str, Any]]:
    """One DreamBooth subset table per usable ``<repeats>_<class tokens>`` sub-folder of ``parent``.

    Unusable sub-folders (no numeric prefix, repeats < 1) are skipped with a warning naming them.
    Raises UserError when ``parent`` is not a folder, and when no training folder is usable.
    """
    base = Path(parent)
    if not base.is_dir():
        raise UserError(f"{option} '{parent}' does not exist or is not a folder")
    subsets = []
    skipped = []
    has_files = False
    for entry in sorted(base.iterdir(), key=lambda p: p.name):
        if not entry.is_dir():
            has_files = has_files or entry.is_file()
            continue
        parsed = split_folder_name(entry.name)
        if parsed is None:
            logger.warning("%s: ignoring folder '%s': its name does not start with '<repeats>_' (e.g. '10_%s')",
                           option, entry, entry.name)
            skipped.append(entry.name)
            continue
        repeats, class_tokens = parsed
        if repeats < 1:
            logger.warning("%s: ignoring folder '%s': repeats must be at least 1, got %d", option, entry, repeats)
            skipped.append(entry.name)
            continue
        subsets.append({"image_dir": str(entry), "num_repeats": repeats, "is_reg": is_reg,
                        "class_tokens": class_tokens})
    if not subsets:
        what = f"its sub-folders {skipped} are not named '<repeats>_<class tokens>'" if skipped else "it has no sub-folders"
        hint = " (give the parent folder of the image folders, not the image folder itself)" if has_files else ""
        message = f"{option} '{parent}' has no usable folder: {what}, e.g. '10_sks dog'{hint}"
        if not is_reg:
            raise UserError(message)
        logger.warning("%s; no regularization images will be used", message)
    return subsets
