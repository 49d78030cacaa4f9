"""Every dataset-config key: its type check, the levels it may appear at, and the style it belongs to.

The table below is the single source of truth for both the voluptuous schemas (``schema.py``) and the
error messages that say where a misplaced key is allowed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal

import voluptuous

Level = Literal["general", "dataset", "subset"]
GENERAL: Level = "general"
DATASET: Level = "dataset"
SUBSET: Level = "subset"
ALL_LEVELS: frozenset[Level] = frozenset({GENERAL, DATASET, SUBSET})
DATASET_LEVELS: frozenset[Level] = frozenset({GENERAL, DATASET})

LEVEL_TITLES: Mapping[Level, str] = MappingProxyType({
    GENERAL: "[general]",
    DATASET: "[[datasets]]",
    SUBSET: "[[datasets.subsets]]",
})

CAPTION_DROPOUT = "caption_dropout"

Validator = Callable[[Any], Any]


def describe_value(value: Any) -> str:
    """Name a TOML/JSON value's type together with a short rendering of it, for error messages."""
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, int):
        return f"integer {value}"
    if isinstance(value, float):
        return f"float {value}"
    if isinstance(value, str):
        text = value if len(value) <= 60 else value[:57] + "..."
        return "string '" + text.replace("\n", "\\n") + "'"
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, (list, tuple)):
        text = str(list(value))
        return "array " + (text if len(text) <= 60 else text[:57] + "...")
    return type(value).__name__


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def boolean(value: Any) -> bool:
    """Accept only a real boolean (``true``/``false``)."""
    if not isinstance(value, bool):
        raise voluptuous.Invalid(f"must be true or false, got {describe_value(value)}")
    return value


def string(value: Any) -> str:
    """Accept a string."""
    if not isinstance(value, str):
        raise voluptuous.Invalid(f"must be a string, got {describe_value(value)}")
    return value


def path_string(value: Any) -> str:
    """Accept a non-empty string (a file or folder path)."""
    value = string(value)
    if not value.strip():
        raise voluptuous.Invalid("must be a non-empty path")
    return value


def integer(minimum: int | None = None) -> Validator:
    """Build a validator for an integer (booleans refused) not below ``minimum``; its ``range`` attribute is
    ``(minimum, None)`` (the command-line options of the same setting read it, library/training/bounds.py)."""

    def check(value: Any) -> int:
        if not _is_int(value):
            raise voluptuous.Invalid(f"must be an integer, got {describe_value(value)}")
        if minimum is not None and value < minimum:
            raise voluptuous.Invalid(f"must be an integer >= {minimum}, got {value}")
        return value

    check.range = (minimum, None)
    return check


def number(minimum: float | None = None, maximum: float | None = None) -> Validator:
    """Build a validator for an int or float within [minimum, maximum]; the result is a float. Its ``range``
    attribute is ``(minimum, maximum)`` (see :func:`integer`)."""

    def check(value: Any) -> float:
        if not _is_number(value):
            raise voluptuous.Invalid(f"must be a number, got {describe_value(value)}")
        if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
            low = "-inf" if minimum is None else f"{minimum:g}"
            high = "inf" if maximum is None else f"{maximum:g}"
            raise voluptuous.Invalid(f"must be a number between {low} and {high}, got {value}")
        return float(value)

    check.range = (minimum, maximum)
    return check


def separator(value: Any) -> str:
    """Accept a non-empty string (a caption part separator)."""
    value = string(value)
    if value == "":
        raise voluptuous.Invalid("must be a non-empty string, got an empty string")
    return value


def table(value: Any) -> dict:
    """Accept a table (TOML ``[...]`` / inline ``{...}``, JSON object) with any contents; a copy is kept."""
    if not isinstance(value, dict):
        raise voluptuous.Invalid(f"must be a table (e.g. {{ key = \"value\" }}), got {describe_value(value)}")
    return dict(value)


def interpolation_name(value: Any) -> str:
    """Accept a ``resize_interpolation`` name (``library.data.images.INTERPOLATIONS``)."""
    from library.data.images import INTERPOLATIONS

    if not isinstance(value, str) or value not in INTERPOLATIONS:
        raise voluptuous.Invalid(f"must be one of {', '.join(INTERPOLATIONS)}, got {describe_value(value)}")
    return value


RESOLUTION_RULE = "must be an int or [width, height] of positive ints"


def resolution(value: Any) -> tuple[int, int]:
    """Accept ``512`` or ``[512, 768]`` (positive ints); return (width, height)."""
    if _is_int(value) and value > 0:
        return (value, value)
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(_is_int(v) and v > 0 for v in value):
        return (int(value[0]), int(value[1]))
    raise voluptuous.Invalid(f"{RESOLUTION_RULE}, got {describe_value(value)}")


FACE_CROP_RULE = "must be [low, high] with two numbers, low <= high"


def face_crop_range(value: Any) -> tuple[float, float]:
    """Accept ``[low, high]`` numbers with low <= high; return them as floats."""
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(_is_number(v) for v in value):
        low, high = float(value[0]), float(value[1])
        if low <= high:
            return (low, high)
    raise voluptuous.Invalid(f"{FACE_CROP_RULE}, got {describe_value(value)}")


@dataclass(frozen=True)
class KeySpec:
    """One config key: validator, allowed levels, dataset style (None = both) and optional feature gate."""

    name: str
    validator: Validator
    levels: frozenset[Level]
    style: str | None = None
    feature: str | None = None


def _spec(name: str, validator: Validator, levels: frozenset[Level], style: str | None = None,
          feature: str | None = None) -> tuple[str, KeySpec]:
    return name, KeySpec(name, validator, levels, style, feature)


KEYS: Mapping[str, KeySpec] = MappingProxyType(dict(
    [
        # settings shared by every subset of a dataset
        _spec("batch_size", integer(1), DATASET_LEVELS),
        _spec("bucket_no_upscale", boolean, DATASET_LEVELS),
        _spec("bucket_reso_steps", integer(1), DATASET_LEVELS),
        _spec("enable_bucket", boolean, DATASET_LEVELS),
        _spec("max_bucket_reso", integer(1), DATASET_LEVELS),
        _spec("min_bucket_reso", integer(1), DATASET_LEVELS),
        _spec("resolution", resolution, DATASET_LEVELS),
        # per-subset settings that may be given once higher up
        _spec("color_aug", boolean, ALL_LEVELS),
        _spec("face_crop_aug_range", face_crop_range, ALL_LEVELS),
        _spec("flip_aug", boolean, ALL_LEVELS),
        _spec("keep_tokens", integer(0), ALL_LEVELS),
        _spec("num_repeats", integer(), ALL_LEVELS),
        _spec("random_crop", boolean, ALL_LEVELS),
        _spec("shuffle_caption", boolean, ALL_LEVELS),
        _spec("token_warmup_min", integer(0), ALL_LEVELS),
        _spec("token_warmup_step", number(0.0), ALL_LEVELS),
        # caption rules of later sd-scripts (library/data/caption_rules.py)
        _spec("caption_prefix", string, ALL_LEVELS),
        _spec("caption_suffix", string, ALL_LEVELS),
        _spec("caption_separator", separator, ALL_LEVELS),
        _spec("keep_tokens_separator", string, ALL_LEVELS),
        _spec("secondary_separator", string, ALL_LEVELS),
        _spec("enable_wildcard", boolean, ALL_LEVELS),
        _spec("custom_attributes", table, ALL_LEVELS),
        # caption dropout (scripts that support it)
        _spec("caption_dropout_every_n_epochs", integer(0), ALL_LEVELS, feature=CAPTION_DROPOUT),
        _spec("caption_dropout_rate", number(0.0, 1.0), ALL_LEVELS, feature=CAPTION_DROPOUT),
        _spec("caption_tag_dropout_rate", number(0.0, 1.0), ALL_LEVELS, feature=CAPTION_DROPOUT),
        # image resizing and the image-info cache (library/data/images.py, library/data/info_cache.py)
        _spec("resize_interpolation", interpolation_name, ALL_LEVELS),
        _spec("cache_info", boolean, ALL_LEVELS, style="dreambooth"),
        # DreamBooth style
        _spec("caption_extension", string, ALL_LEVELS, style="dreambooth"),
        _spec("class_tokens", string, ALL_LEVELS, style="dreambooth"),
        _spec("is_reg", boolean, frozenset({SUBSET}), style="dreambooth"),
        # both styles: required for DreamBooth, optional for fine tuning
        _spec("image_dir", path_string, frozenset({SUBSET})),
        # fine-tuning style
        _spec("metadata_file", path_string, frozenset({SUBSET}), style="finetuning"),
        # loss masks (docs/masked_loss.md): the image's alpha channel, or a folder of mask images
        _spec("alpha_mask", boolean, ALL_LEVELS),
        _spec("conditioning_data_dir", path_string, frozenset({SUBSET})),
        # validation loss (library/training/validation.py, docs/validation.md)
        _spec("is_validation", boolean, frozenset({DATASET})),
        _spec("validation_split", number(0.0, 1.0), DATASET_LEVELS),
        _spec("validation_seed", integer(0), DATASET_LEVELS),
    ]
))

_LATER_ADDITION = "this key was added to sd-scripts after the 2023-05 baseline and is not supported here"
_LATER_KEYS = (
    "network_multiplier",
)

# Keys users may write by mistake, with the hint to give instead of a bare "unknown key".
HINTS: Mapping[str, str] = MappingProxyType({
    **{name: _LATER_ADDITION for name in _LATER_KEYS},
    "train_batch_size": "the dataset config calls it 'batch_size'",
    "dataset_repeats": "the dataset config calls it 'num_repeats'",
    "train_data_dir": "give each image folder as 'image_dir' in its own [[datasets.subsets]]",
    "reg_data_dir": "give each regularization folder as 'image_dir' with 'is_reg = true' in a [[datasets.subsets]]",
    "in_json": "the dataset config calls it 'metadata_file' (in [[datasets.subsets]])",
    "caption_extention": "the dataset config spells it 'caption_extension'",
    "prior_loss_weight": "it is a command-line option (--prior_loss_weight), not a dataset config key",
    "max_token_length": "it is a command-line option (--max_token_length), not a dataset config key",
    "debug_dataset": "it is a command-line option (--debug_dataset), not a dataset config key",
    "cache_latents": "it is a command-line option (--cache_latents), not a dataset config key",
    "subset": "the array of subsets is called 'subsets' ([[datasets.subsets]])",
    "dataset": "the array of datasets is called 'datasets' ([[datasets]])",
})


def levels_text(levels: frozenset[Level]) -> str:
    """Render a set of levels in table order, e.g. "[general] or [[datasets]]"."""
    ordered = [LEVEL_TITLES[lv] for lv in (GENERAL, DATASET, SUBSET) if lv in levels]
    return " or ".join(ordered)
