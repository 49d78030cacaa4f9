"""The caption options of later sd-scripts (kohya names and defaults) and their one-line description.

``--caption_prefix``, ``--caption_suffix``, ``--caption_separator``, ``--keep_tokens_separator``,
``--secondary_separator`` and ``--enable_wildcard`` are the command-line fallbacks of the dataset-config
keys of the same names (library/config/keys.py); the rules themselves are in
library/data/caption_rules.py. docs/datasets.md, "Separators and wildcards".
"""

from __future__ import annotations

import argparse
from typing import Any

# config keys whose command-line option has the same name (taken as-is as the cascade's last fallback)
CAPTION_OPTION_KEYS = (
    "caption_prefix", "caption_suffix", "caption_separator", "keep_tokens_separator", "secondary_separator",
    "enable_wildcard",
)
# (field, default) pairs shown by caption_settings_text when they differ from the default
_SHOWN = (
    ("caption_prefix", None), ("caption_suffix", None), ("caption_separator", ","),
    ("keep_tokens_separator", None), ("secondary_separator", None), ("enable_wildcard", False),
    ("custom_attributes", None),
)


def add_caption_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the six caption options with kohya's names and defaults."""
    add = parser.add_argument
    add("--caption_prefix", type=str, default=None,
        help="text put before every caption (with a space), e.g. 'masterpiece, sks dog,'")
    add("--caption_suffix", type=str, default=None, help="text put after every caption (with a space)")
    add("--caption_separator", type=str, default=",",
        help="separator of caption parts for --shuffle_caption, --keep_tokens and tag dropout (default ',')")
    add("--keep_tokens_separator", type=str, default="",
        help="marker in a caption, e.g. '|||': parts before it stay in place, after it are shuffled; a second "
             "marker starts parts that stay at the end (replaces --keep_tokens where it occurs)")
    add("--secondary_separator", type=str, default=None,
        help="separator, e.g. ';;;', that keeps parts together as one unit for shuffling and tag dropout; it "
             "becomes --caption_separator in the final caption")
    add("--enable_wildcard", action="store_true",
        help="pick one of {a|b|c} per use; a caption file with several lines gives one line per use")


def caption_settings_text(subset: Any) -> str:
    """The subset's caption settings that differ from the defaults, e.g. ``caption_prefix 'sks',
    enable_wildcard``; ``""`` when all are at their defaults."""
    shown = []
    for name, default in _SHOWN:
        value = getattr(subset, name, default)
        if value in (default, "") or (name == "custom_attributes" and not value):
            continue
        shown.append(name if value is True else f"{name} {value!r}")
    return ", ".join(shown)


def caption_settings(subset: Any) -> dict[str, Any]:
    """The same settings as a JSON-ready dict (for ``--dry_run_json``)."""
    out = {}
    for name, default in _SHOWN:
        value = getattr(subset, name, default)
        if value not in (default, "") and not (name == "custom_attributes" and not value):
            out[name] = dict(value) if name == "custom_attributes" else value
    return out
