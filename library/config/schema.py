"""Validate a parsed dataset-config document with voluptuous and explain every problem in one line.

``check_config`` walks ``[general]``, each ``[[datasets]]`` and each ``[[datasets.subsets]]``, decides
each dataset's style (a subset with ``metadata_file`` is fine-tuning style, one without is DreamBooth
style; the two cannot share a dataset), validates every table with a voluptuous schema built from
``keys.KEYS`` for that level and style, and collects *all* problems instead of stopping at the first.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import voluptuous

from library.config.blueprint import DREAMBOOTH, FINETUNING, DatasetStyle
from library.config.keys import (
    CAPTION_DROPOUT,
    DATASET,
    GENERAL,
    HINTS,
    KEYS,
    LEVEL_TITLES,
    SUBSET,
    KeySpec,
    Level,
    describe_value,
    levels_text,
)

EXTRA_KEY_MESSAGE = "extra keys not allowed"
STYLE_TITLES: Mapping[str, str] = MappingProxyType({DREAMBOOTH: "DreamBooth-style", FINETUNING: "fine-tuning-style"})


@dataclass(frozen=True)
class Support:
    """What the calling training script can do: dataset styles and caption dropout."""

    dreambooth: bool = True
    finetuning: bool = True
    caption_dropout: bool = True

    def allows(self, style: str) -> bool:
        """True when the script can train datasets of ``style``."""
        return self.dreambooth if style == DREAMBOOTH else self.finetuning


@dataclass(frozen=True)
class CheckedSubset:
    """A validated ``[[datasets.subsets]]`` table: converted values of the keys it sets, and its location."""

    values: Mapping[str, Any]
    location: str


@dataclass(frozen=True)
class CheckedDataset:
    """A validated ``[[datasets]]`` table (without ``subsets``), its style and its subsets."""

    style: DatasetStyle
    values: Mapping[str, Any]
    subsets: tuple[CheckedSubset, ...]
    location: str


@dataclass(frozen=True)
class CheckedConfig:
    """A whole validated document: ``[general]`` values and the datasets, values already converted."""

    general: Mapping[str, Any]
    datasets: tuple[CheckedDataset, ...]


def keys_for(level: Level, style: DatasetStyle | None, support: Support) -> list[KeySpec]:
    """The key specs allowed at ``level`` for a dataset of ``style`` (None for ``[general]``)."""
    allowed = []
    for spec in KEYS.values():
        if level not in spec.levels:
            continue
        if spec.feature == CAPTION_DROPOUT and not support.caption_dropout:
            continue
        if spec.style is not None:
            if style is None and not support.allows(spec.style):
                continue
            if style is not None and spec.style != style:
                continue
        allowed.append(spec)
    return allowed


def build_schema(level: Level, style: DatasetStyle | None, support: Support) -> voluptuous.Schema:
    """The voluptuous schema of one table at ``level``; unknown keys are refused."""
    required = set()
    if level == SUBSET:
        required = {"image_dir"} if style == DREAMBOOTH else {"metadata_file"}
    fields = {
        (voluptuous.Required(spec.name) if spec.name in required else voluptuous.Optional(spec.name)): spec.validator
        for spec in keys_for(level, style, support)
    }
    return voluptuous.Schema(fields, extra=voluptuous.PREVENT_EXTRA)


def _closest(name: str) -> str | None:
    matches = difflib.get_close_matches(name, list(KEYS) + list(HINTS), n=1, cutoff=0.75)
    return matches[0] if matches else None


def explain_misplaced(key: str, level: Level, style: DatasetStyle | None, support: Support) -> str:
    """Say why ``key`` may not appear at ``level`` (in a dataset of ``style``) and what is allowed."""
    spec = KEYS.get(key)
    if spec is None:
        if key in HINTS:
            return f"unknown key '{key}': {HINTS[key]}"
        guess = _closest(key)
        if guess is not None:
            return f"unknown key '{key}' (did you mean '{guess}'?)"
        names = ", ".join(s.name for s in keys_for(level, style, support))
        return f"unknown key '{key}'; keys allowed in {LEVEL_TITLES[level]}: {names}"
    if spec.feature == CAPTION_DROPOUT and not support.caption_dropout:
        return f"'{key}' is not supported by this training script (it has no caption dropout)"
    if spec.style is not None and not support.allows(spec.style):
        other = "fine tuning (metadata_file)" if spec.style == DREAMBOOTH else "DreamBooth (image_dir)"
        return (f"'{key}' is a {STYLE_TITLES[spec.style]} key, but this training script supports only "
                f"{other} datasets")
    if level not in spec.levels:
        return f"'{key}' is not allowed in {LEVEL_TITLES[level]}; it is allowed only in {levels_text(spec.levels)}"
    if spec.style is not None and style is not None and spec.style != style:
        why = "its subsets have metadata_file" if style == FINETUNING else "its subsets have no metadata_file"
        return f"'{key}' is a {STYLE_TITLES[spec.style]} key, but this dataset is {STYLE_TITLES[style]} ({why})"
    return f"'{key}' is not allowed here"


def _explain_missing(key: str, style: DatasetStyle | None, support: Support) -> str:
    if key == "image_dir":
        return "required key 'image_dir' is missing (the folder that holds the images directly)"
    if key == "metadata_file" and not support.dreambooth:
        return ("required key 'metadata_file' is missing (this training script supports only fine-tuning-style "
                "datasets, which need a metadata json)")
    return f"required key '{key}' is missing"


def _validate_table(table: Mapping[str, Any], location: str, level: Level, style: DatasetStyle | None,
                    support: Support, errors: list[str]) -> dict[str, Any]:
    """Validate one table; append explained problems to ``errors``; return the converted values."""
    try:
        return dict(build_schema(level, style, support)(dict(table)))
    except voluptuous.MultipleInvalid as exc:
        order = {name: i for i, name in enumerate(table)}
        found = []
        for err in exc.errors:
            key = str(err.path[0]) if err.path else "?"
            if isinstance(err, voluptuous.RequiredFieldInvalid):
                text = _explain_missing(key, style, support)
            elif err.msg == EXTRA_KEY_MESSAGE:
                text = explain_misplaced(key, level, style, support)
            else:
                text = f"'{key}' {err.msg}"
            found.append((order.get(key, len(order)), f"{location}: {text}"))
        errors.extend(text for _, text in sorted(found))
        return {}


def _is_table(value: Any) -> bool:
    return isinstance(value, dict)


def _detect_style(subsets: Sequence[Mapping[str, Any]], location: str, support: Support,
                  errors: list[str]) -> DatasetStyle | None:
    """Pick the dataset style from its subsets; report a mix of both styles (None then)."""
    if not support.finetuning:
        return DREAMBOOTH
    if not support.dreambooth:
        return FINETUNING
    with_md = [j for j, sub in enumerate(subsets) if "metadata_file" in sub]
    without_md = [j for j, sub in enumerate(subsets) if "metadata_file" not in sub]
    if with_md and without_md:
        errors.append(
            f"{location}: DreamBooth-style subsets (no metadata_file: subsets {without_md}) and fine-tuning-style "
            f"subsets (with metadata_file: subsets {with_md}) cannot be mixed in one dataset; "
            "put them in separate [[datasets]]"
        )
        return None
    return FINETUNING if with_md else DREAMBOOTH


def _check_dataset(raw: Any, index: int, support: Support, errors: list[str]) -> CheckedDataset | None:
    location = f"datasets[{index}]"
    if not _is_table(raw):
        errors.append(f"{location}: must be a table ([[datasets]]), got {describe_value(raw)}")
        return None
    subsets_raw = raw.get("subsets")
    if subsets_raw is None:
        errors.append(f"{location}: has no [[datasets.subsets]]; add at least one subset (image_dir or metadata_file)")
        subsets_raw = []
    elif not isinstance(subsets_raw, list) or not all(_is_table(s) for s in subsets_raw):
        errors.append(f"{location}: 'subsets' must be an array of tables (write [[datasets.subsets]] with double "
                      f"brackets), got {describe_value(subsets_raw)}")
        subsets_raw = []
    elif not subsets_raw:
        errors.append(f"{location}: 'subsets' is empty; add at least one [[datasets.subsets]]")
    style = _detect_style(subsets_raw, location, support, errors)
    if style is None:
        return None
    table = {k: v for k, v in raw.items() if k != "subsets"}
    values = _validate_table(table, location, DATASET, style, support, errors)
    subsets = []
    for j, sub in enumerate(subsets_raw):
        sub_location = f"{location}.subsets[{j}]"
        subsets.append(CheckedSubset(_validate_table(sub, sub_location, SUBSET, style, support, errors), sub_location))
    return CheckedDataset(style, values, tuple(subsets), location)


def _top_level_message(key: str) -> str:
    if key in KEYS:
        return f"'{key}' must be inside a table: {levels_text(KEYS[key].levels)}"
    guess = difflib.get_close_matches(key, ["general", "datasets"], n=1, cutoff=0.6)
    hint = f" (did you mean '{guess[0]}'?)" if guess else ""
    return f"unknown top-level key '{key}'{hint}; allowed: [general] and [[datasets]]"


def check_config(raw: Any, support: Support) -> tuple[CheckedConfig, list[str]]:
    """Validate a parsed config document; return (checked config, list of one-line problems).

    When there are problems the checked config is partial: tables that failed are left empty and
    datasets whose style could not be decided are left out (their paths can still be checked).
    """
    errors: list[str] = []
    if not _is_table(raw):
        problem = f"the document must be a table with [general] and [[datasets]], got {describe_value(raw)}"
        return CheckedConfig({}, ()), [problem]
    for key in raw:
        if key not in ("general", "datasets"):
            errors.append(_top_level_message(str(key)))
    general_raw = raw.get("general", {})
    general: dict[str, Any] = {}
    if not _is_table(general_raw):
        errors.append(f"'general' must be a table ([general]), got {describe_value(general_raw)}")
    else:
        general = _validate_table(general_raw, LEVEL_TITLES[GENERAL], GENERAL, None, support, errors)
    datasets_raw = raw.get("datasets", [])
    if not isinstance(datasets_raw, list):
        errors.append(f"'datasets' must be an array of tables (write [[datasets]] with double brackets), "
                      f"got {describe_value(datasets_raw)}")
        datasets_raw = []
    elif not datasets_raw:
        errors.append("no [[datasets]] defined; add at least one [[datasets]] with [[datasets.subsets]]")
    datasets = []
    for i, dataset_raw in enumerate(datasets_raw):
        checked = _check_dataset(dataset_raw, i, support, errors)
        if checked is not None:
            datasets.append(checked)
    return CheckedConfig(general, tuple(datasets)), errors
