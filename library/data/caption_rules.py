"""The caption rules sd-scripts added after the 2023-05 baseline (docs/datasets.md, "Separators and wildcards").

Pure string functions used by :func:`library.data.captions.process_caption` and by the entry builders:
caption prefix/suffix, ``{a|b|c}`` wildcards and multi-line captions, the configurable part separator,
the ``keep_tokens_separator`` split into a fixed head, a shuffled middle and a fixed tail, and the
``secondary_separator`` that glues parts together until the caption is rebuilt. Every random choice
takes the caller's ``random.Random``, so a caption stays a pure function of the batch's generator.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

DEFAULT_SEPARATOR = ","
WILDCARD_PATTERN = re.compile(r"\{([^}]+)\}")
# stand-ins for the escaped braces "{{" and "}}" while wildcards are expanded (private-use characters)
_OPEN_MARK = "\ue000"
_CLOSE_MARK = "\ue001"


def add_prefix_suffix(caption: str, prefix: str | None, suffix: str | None) -> str:
    """``prefix + " " + caption + " " + suffix`` for those that are set (non-empty), as sd-scripts does.

    The whole caption text is wrapped, so with a multi-line caption (wildcard mode) the prefix joins the
    first line and the suffix the last one.
    """
    if prefix:
        caption = f"{prefix} {caption}"
    if suffix:
        caption = f"{caption} {suffix}"
    return caption


def expand_wildcards(caption: str, rng: random.Random) -> str:
    """Replace every ``{a|b|c}`` by one of its alternatives (``rng.choice``, left to right).

    ``{{`` and ``}}`` stand for literal braces. An alternative may be empty (``{a|}``); a group runs to
    the first ``}``.
    """
    open_mark, close_mark = _OPEN_MARK, _CLOSE_MARK
    while open_mark in caption or close_mark in caption:
        open_mark += _OPEN_MARK
        close_mark += _CLOSE_MARK
    text = caption.replace("{{", open_mark).replace("}}", close_mark)
    text = WILDCARD_PATTERN.sub(lambda match: rng.choice(match.group(1).split("|")), text)
    return text.replace(open_mark, "{").replace(close_mark, "}")


def caption_variant(caption: str, enable_wildcard: bool, rng: random.Random) -> str:
    """The caption text used this time: with wildcards, one random line of a multi-line caption and its
    wildcards expanded; without, the first line only."""
    if not enable_wildcard:
        return caption.split("\n", 1)[0]
    if "\n" in caption:
        caption = rng.choice(caption.split("\n"))
    return expand_wildcards(caption, rng)


@dataclass
class CaptionParts:
    """A caption cut into parts: ``fixed`` head, ``flex`` parts (shuffled/dropped), ``tail`` kept last.

    ``by_separator`` is True when ``keep_tokens_separator`` made the cut (empty parts are then dropped
    and ``keep_tokens`` is not used).
    """

    fixed: list[str]
    flex: list[str]
    tail: list[str]
    by_separator: bool


def _parts(text: str, separator: str) -> list[str]:
    return [p.strip() for p in text.split(separator) if p.strip()]


def split_caption(caption: str, separator: str, keep_tokens: int, keep_tokens_separator: str | None) -> CaptionParts:
    """Cut ``caption`` at ``separator`` into fixed / flexible / tail parts (sd-scripts' rule).

    When ``keep_tokens_separator`` occurs in the caption, the text before its first occurrence is the
    fixed head; a second occurrence ends the flexible middle and what follows it is the fixed tail (a
    third one stays as text inside the tail). Otherwise the first ``keep_tokens`` parts are fixed and the
    rest flexible, empty parts kept.
    """
    if keep_tokens_separator and keep_tokens_separator in caption:
        head, middle = caption.split(keep_tokens_separator, 1)
        tail = ""
        if keep_tokens_separator in middle:
            middle, tail = middle.split(keep_tokens_separator, 1)
        return CaptionParts(_parts(head, separator), _parts(middle, separator), _parts(tail, separator), True)
    parts = [p.strip() for p in caption.strip().split(separator)]
    keep = max(0, keep_tokens)
    return CaptionParts(parts[:keep], parts[keep:], [], False)


def join_parts(parts: list[str], separator: str) -> str:
    """Rebuild a caption from its parts: ``separator + " "`` between them (``", "`` by default)."""
    return f"{separator} ".join(parts)


def restore_secondary(caption: str, secondary_separator: str | None, separator: str) -> str:
    """Turn every ``secondary_separator`` into ``separator`` (after shuffling and dropping)."""
    if secondary_separator:
        return caption.replace(secondary_separator, separator)
    return caption


def caption_file_text(text: str, enable_wildcard: bool) -> str:
    """The caption held by a caption file's text (line ends already ``\\n``).

    Without wildcards the first line, stripped; with them every non-blank line, stripped, joined by
    ``\\n`` so that each use picks one (:func:`caption_variant`).
    """
    if not enable_wildcard:
        return text.split("\n", 1)[0].strip()
    return "\n".join(line.strip() for line in text.split("\n") if line.strip())


def metadata_caption_text(caption: str | None, tags: str | None, separator: str = DEFAULT_SEPARATOR,
                          enable_wildcard: bool = False) -> str:
    """A fine-tuning metadata entry's caption: ``caption``, the separator and ``tags``.

    Missing caption: the tags alone (which may then hold several lines). With wildcards the tags are made
    one line and appended to every non-blank line of the caption. Caption and tags are joined with
    ``separator + " "`` (``", "`` by default).
    """
    if caption is None:
        return tags or ""
    joiner = f"{separator} "
    if enable_wildcard:
        if tags:
            one_line = tags.replace("\n", separator)
            return "\n".join(f"{line}{joiner}{one_line}" for line in caption.split("\n") if line.strip())
        return caption
    if tags:
        return caption + joiner + tags
    return caption
