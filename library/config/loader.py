"""Turn (parsed options, optional dataset config file) into a validated ``DatasetBlueprint``.

Every value is looked up subset -> dataset -> ``[general]`` -> command line -> built-in default, taking
the first that is set. Without a config file the datasets come from ``--train_data_dir`` /
``--reg_data_dir`` (DreamBooth style) or ``--in_json`` (fine-tuning style).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

import toml
import voluptuous

from library.config.arguments import OPTION_TO_KEY, command_line_values, subsets_from_folders
from library.config.blueprint import (
    DREAMBOOTH,
    FINETUNING,
    BlueprintDataset,
    BlueprintSubset,
    DatasetBlueprint,
    DatasetStyle,
)
from library.config.keys import KEYS
from library.config.schema import CheckedConfig, CheckedDataset, CheckedSubset, Support, check_config
from library.errors import UserError
from library.option_groups import DataOptions, ValidationOptions

logger = logging.getLogger(__name__)

LEGACY_DATA_OPTIONS = ("train_data_dir", "reg_data_dir", "in_json")
# dataset fields that do not come from the cascade
_DATASET_OWN_FIELDS = frozenset({"style", "subsets", "max_token_length", "prior_loss_weight"})


def read_config_file(path: str | os.PathLike) -> Any:
    """Parse a ``.toml`` or ``.json`` dataset config; syntax errors name the file and the line.

    Returns the parsed document (normally a dict; a JSON file may hold anything, which
    ``check_config`` then reports).
    """
    file = Path(path)
    suffix = file.suffix.lower()
    if suffix not in (".toml", ".json"):
        raise UserError(f"{file}: a dataset config must be a .toml or .json file")
    if not file.is_file():
        raise UserError(f"{file}: dataset config file not found")
    text = read_text(file, "the dataset config")
    if suffix == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"{file}: line {exc.lineno}: JSON syntax error: {exc.msg}") from None
    return parse_toml(text, file)


def read_text(file: Path, what: str) -> str:
    """The UTF-8 text of a config file (a BOM is dropped); unreadable files are one line naming ``what``."""
    try:
        return file.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UserError(f"{file}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise UserError(f"{file}: cannot read {what} ({exc.strerror})") from None


def parse_toml(text: str, file: Path) -> dict[str, Any]:
    """TOML ``text`` parsed with the ``toml`` package; syntax errors name the file and the line."""
    try:
        return toml.loads(text)
    except toml.TomlDecodeError as exc:
        raise UserError(f"{file}: line {exc.lineno}: TOML syntax error: {exc.msg}") from None
    except (ValueError, IndexError, TypeError) as exc:  # the toml package fails this way on some inputs
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"{file}: TOML syntax error: {detail}") from None


def _pick(key: str, layers: Sequence[Mapping[str, Any]], default: Any) -> Any:
    """The first value that is set (not None) for ``key``, else ``default``."""
    for layer in layers:
        value = layer.get(key)
        if value is not None:
            return value
    return default


def _default(field_default: Any) -> Any:
    return None if field_default is MISSING else field_default


def _build_subset(style: DatasetStyle, layers: Sequence[Mapping[str, Any]]) -> BlueprintSubset:
    values = {f.name: _pick(f.name, layers, _default(f.default)) for f in fields(BlueprintSubset)}
    if style == FINETUNING:
        values.update(is_reg=False, class_tokens=None)
    else:
        values["metadata_file"] = None
    for name in ("caption_dropout_rate", "caption_tag_dropout_rate", "token_warmup_step"):
        values[name] = float(values[name])
    if values["face_crop_aug_range"] is not None:
        values["face_crop_aug_range"] = tuple(values["face_crop_aug_range"])
    return BlueprintSubset(**values)


def _same_path(path: str) -> str:
    return os.path.normcase(os.path.abspath(path))


def _check_subset_paths(image_dir: str | None, metadata_file: str | None, location: str,
                        errors: list[str]) -> None:
    if image_dir is not None and not Path(image_dir).is_dir():
        errors.append(f"{location}: image_dir '{image_dir}' does not exist or is not a folder")
    if metadata_file is not None and not Path(metadata_file).is_file():
        errors.append(f"{location}: metadata_file '{metadata_file}' does not exist or is not a file")


def _usable_subsets(dataset: CheckedDataset, layers: Sequence[Mapping[str, Any]],
                    errors: list[str]) -> list[BlueprintSubset]:
    """Build the subsets of one dataset; drop those with repeats < 1 and duplicates, with a warning."""
    subsets: list[BlueprintSubset] = []
    seen: dict[str, str] = {}
    for checked in dataset.subsets:
        subset = _build_subset(dataset.style, [checked.values, *layers])
        _check_subset_paths(subset.image_dir, subset.metadata_file, checked.location, errors)
        if subset.num_repeats < 1:
            logger.warning("%s: skipped because num_repeats is %d (must be at least 1)",
                           checked.location, subset.num_repeats)
            continue
        identity_key = "metadata_file" if subset.is_finetuning else "image_dir"
        identity = getattr(subset, identity_key)
        if identity is not None:
            normalized = _same_path(identity)
            if normalized in seen:
                logger.warning("%s: skipped as a duplicate of %s (same %s '%s')",
                               checked.location, seen[normalized], identity_key, identity)
                continue
            seen[normalized] = checked.location
        subsets.append(subset)
    return subsets


def _check_dataset_settings(ds: BlueprintDataset, location: str, errors: list[str]) -> None:
    if ds.min_bucket_reso > ds.max_bucket_reso:
        errors.append(f"{location}: min_bucket_reso {ds.min_bucket_reso} is larger than "
                      f"max_bucket_reso {ds.max_bucket_reso}")
    if ds.enable_bucket and ds.min_bucket_reso < ds.bucket_reso_steps:
        errors.append(f"{location}: min_bucket_reso {ds.min_bucket_reso} must be at least bucket_reso_steps "
                      f"{ds.bucket_reso_steps}")
    if ds.style != DREAMBOOTH:
        return
    if ds.resolution is None:
        errors.append(f"{location}: resolution is required for DreamBooth-style datasets: give --resolution "
                      "or set 'resolution' in [general] or [[datasets]] of the dataset config")
        return
    if ds.enable_bucket:
        width, height = ds.resolution
        if ds.min_bucket_reso > min(width, height):
            errors.append(f"{location}: min_bucket_reso {ds.min_bucket_reso} must be <= the smaller side of "
                          f"resolution {width}x{height} when bucketing is enabled")
        if ds.max_bucket_reso < max(width, height):
            errors.append(f"{location}: max_bucket_reso {ds.max_bucket_reso} must be >= the larger side of "
                          f"resolution {width}x{height} when bucketing is enabled")


def _build_blueprint(checked: CheckedConfig, data: DataOptions, source: str | None,
                     fallback: Mapping[str, Any]) -> tuple[DatasetBlueprint, list[str]]:
    """The blueprint of ``checked`` with --max_token_length and --prior_loss_weight, and the problems found."""
    errors: list[str] = []
    datasets = []
    for dataset in checked.datasets:
        layers = [dataset.values, checked.general, fallback]
        subsets = _usable_subsets(dataset, layers, errors)
        if not subsets and dataset.subsets:
            errors.append(f"{dataset.location}: no usable subset left (all have num_repeats < 1 or are duplicates)")
        values = {
            f.name: _pick(f.name, layers, _default(f.default))
            for f in fields(BlueprintDataset)
            if f.name not in _DATASET_OWN_FIELDS
        }
        blueprint_dataset = BlueprintDataset(
            style=dataset.style,
            subsets=tuple(subsets),
            max_token_length=data.max_token_length,
            prior_loss_weight=float(data.prior_loss_weight),
            **values,
        )
        _check_dataset_settings(blueprint_dataset, dataset.location, errors)
        datasets.append(blueprint_dataset)
    return DatasetBlueprint(tuple(datasets), source), errors


def _check_command_line(fallback: Mapping[str, Any]) -> list[str]:
    """Range-check option values with the same rules as the config keys they stand in for."""
    option_names = {key: option for option, key in OPTION_TO_KEY.items()}
    errors = []
    for key, value in fallback.items():
        spec = KEYS.get(key)
        if spec is None or key in ("resolution", "face_crop_aug_range"):
            continue  # those two were parsed (and checked) from their option strings already
        try:
            spec.validator(value)
        except voluptuous.Invalid as exc:
            errors.append(f"--{option_names.get(key, key)}: {exc.msg}")
    return errors


def _command_line_datasets(data: DataOptions, support: Support) -> CheckedConfig:
    """The single dataset described by --train_data_dir / --reg_data_dir / --in_json."""
    train_dir = data.train_data_dir
    in_json = data.in_json if support.finetuning else None
    use_metadata = not support.dreambooth or in_json is not None
    if use_metadata:
        if in_json is None:
            raise UserError("--in_json (the metadata json) is required when no --dataset_config is given")
        if not Path(in_json).is_file():
            raise UserError(f"--in_json '{in_json}' does not exist or is not a file")
        if train_dir is not None and not Path(train_dir).is_dir():
            raise UserError(f"--train_data_dir '{train_dir}' does not exist or is not a folder")
        if data.reg_data_dir is not None:
            logger.warning("--reg_data_dir is ignored with --in_json (fine-tuning-style datasets have no "
                           "regularization images)")
        tables = [{"image_dir": train_dir, "metadata_file": in_json}]
        style: DatasetStyle = FINETUNING
    else:
        if train_dir is None:
            raise UserError("--train_data_dir is required when no --dataset_config is given")
        tables = subsets_from_folders(train_dir, is_reg=False, option="--train_data_dir")
        reg_dir = data.reg_data_dir
        if reg_dir is not None:
            tables += subsets_from_folders(reg_dir, is_reg=True, option="--reg_data_dir")
        style = DREAMBOOTH
    subsets = tuple(
        CheckedSubset({k: v for k, v in table.items() if v is not None},
                      f"folder '{table['image_dir']}'" if style == DREAMBOOTH else "--in_json")
        for table in tables
    )
    return CheckedConfig({}, (CheckedDataset(style, {}, subsets, "dataset options"),))


def blueprint_from_dict(raw: Any, data: DataOptions, validation: ValidationOptions, *, given: frozenset[str],
                        source: str, support_dreambooth: bool = True, support_finetuning: bool = True,
                        support_caption_dropout: bool | None = None) -> DatasetBlueprint:
    """Validate an already parsed config document and resolve it against the command-line options
    (``data`` and ``validation``; ``given``: the option names the script's parser has, see
    :func:`library.config.arguments.command_line_values`).

    ``source`` names the document in error messages (normally the file path). ``support_caption_dropout``
    None: as the script's parser says (see :func:`_support`). Raises UserError with every problem found,
    joined by "; ".
    """
    support = _support(support_dreambooth, support_finetuning, support_caption_dropout, given)
    fallback = command_line_values(data, validation, given)
    errors = _check_command_line(fallback)
    if errors:
        raise UserError("; ".join(errors))
    checked, errors = check_config(raw, support)
    if errors:
        for dataset in checked.datasets:  # also report missing folders/files of the tables that were valid
            for subset in dataset.subsets:
                _check_subset_paths(subset.values.get("image_dir"), subset.values.get("metadata_file"),
                                    subset.location, errors)
        raise UserError(f"{source}: " + "; ".join(errors))
    blueprint, errors = _build_blueprint(checked, data, source, fallback)
    if errors:
        raise UserError(f"{source}: " + "; ".join(errors))
    return blueprint


def _support(dreambooth: bool, finetuning: bool, caption_dropout: bool | None, given: frozenset[str]) -> Support:
    """What the script supports. ``caption_dropout`` None: the config may set the caption-dropout keys
    exactly when the script registered the matching options (``--caption_dropout_rate`` ...), so a script
    without them (Textual Inversion, XTI) refuses the keys too, as kohya's does."""
    if not (dreambooth or finetuning):
        raise ValueError("at least one of support_dreambooth / support_finetuning must be true")
    if caption_dropout is None:
        caption_dropout = "caption_dropout_rate" in given
    return Support(dreambooth, finetuning, caption_dropout)


def load_dataset_blueprint(data: DataOptions, validation: ValidationOptions, toml_path: str | os.PathLike | None,
                           *, given: frozenset[str], support_dreambooth: bool = True, support_finetuning: bool = True,
                           support_caption_dropout: bool | None = None) -> DatasetBlueprint:
    """Build the run's dataset blueprint from ``toml_path`` (a .toml/.json config) or, when None,
    from ``--train_data_dir`` / ``--reg_data_dir`` / ``--in_json``.

    The dataset options (``data``) and ``--validation_split`` / ``--validation_seed`` (``validation``) are the
    last fallback of every key the config leaves unset; ``given`` is the set of option names the script's
    parser has (``Options.given``): an option the script lacks is no fallback.

    Checks that every ``image_dir`` and ``metadata_file`` exists but reads no image. Raises UserError
    (one line naming the file, the dataset/subset and the key) for every user mistake.
    ``support_caption_dropout`` None: as the script's parser says (see :func:`_support`).
    """
    support = _support(support_dreambooth, support_finetuning, support_caption_dropout, given)
    if toml_path is not None:
        ignored = [f"--{name}" for name in LEGACY_DATA_OPTIONS if getattr(data, name) is not None]
        if ignored:
            logger.info("--dataset_config is given, so %s %s ignored", ", ".join(ignored),
                        "is" if len(ignored) == 1 else "are")
        raw = read_config_file(toml_path)
        blueprint = blueprint_from_dict(raw, data, validation, given=given, source=str(toml_path),
                                        support_dreambooth=support_dreambooth, support_finetuning=support_finetuning,
                                        support_caption_dropout=support.caption_dropout)
    else:
        fallback = command_line_values(data, validation, given)
        errors = _check_command_line(fallback)
        if errors:
            raise UserError("; ".join(errors))
        checked = _command_line_datasets(data, support)
        blueprint, errors = _build_blueprint(checked, data, None, fallback)
        if errors:
            raise UserError("; ".join(errors))
    logger.info("%s", blueprint.summary())
    return blueprint
