"""Caption sources and the per-draw caption pipeline (training_behaviour.md §9).

Every random decision takes the caller's ``random.Random``; the epoch and step are explicit arguments,
so a processed caption is a pure function of (caption, options, rng state, epoch, step).
"""

from __future__ import annotations

from collections.abc import Container

import math
import os
import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Mapping, Sequence

from library.data.caption_rules import (DEFAULT_SEPARATOR, add_prefix_suffix, caption_file_text, caption_variant,
                                         join_parts, metadata_caption_text, restore_secondary, split_caption)
from library.data.images import strip_face_suffix
from library.errors import UserError


class CaptionError(UserError):
    """A caption file that cannot be used (empty, or not UTF-8)."""


@dataclass(frozen=True)
class CaptionOptions:
    """Per-subset caption settings (option names as on the command line and in dataset configs).

    ``token_warmup_step`` below 1 is a fraction of ``max_train_steps``: call :meth:`resolved` once the
    step count is known (the reference overwrote the subset's value on first use).
    """

    shuffle_caption: bool = False
    keep_tokens: int = 0
    caption_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    caption_tag_dropout_rate: float = 0.0
    token_warmup_min: int = 1
    token_warmup_step: float = 0
    # later sd-scripts rules (library/data/caption_rules.py)
    caption_prefix: str | None = None
    caption_suffix: str | None = None
    caption_separator: str = DEFAULT_SEPARATOR
    keep_tokens_separator: str | None = None
    secondary_separator: str | None = None
    enable_wildcard: bool = False

    def resolved(self, max_train_steps: int) -> "CaptionOptions":
        """A copy whose ``token_warmup_step`` is absolute: ``floor(step * max_train_steps)`` if below 1."""
        step = resolve_token_warmup_step(self.token_warmup_step, max_train_steps)
        return replace(self, token_warmup_step=step)


def resolve_token_warmup_step(token_warmup_step: float, max_train_steps: int) -> int:
    """Absolute warm-up length: a value below 1 is a fraction of ``max_train_steps`` (floored).

    0 means warm-up off; so does a fraction that floors to 0.
    """
    if token_warmup_step < 1:
        return math.floor(token_warmup_step * max_train_steps)
    return math.floor(token_warmup_step)


def warmup_token_count(
    num_tokens: int, current_step: int, token_warmup_min: int, token_warmup_step: float
) -> int:
    """How many leading comma-separated parts token warm-up keeps at ``current_step``.

    ``floor(step * (N - min) / warmup_step) + min`` while ``step < warmup_step`` (``warmup_step`` already
    absolute), else all ``N``; clamped to ``[0, N]``.
    """
    if not token_warmup_step or current_step >= token_warmup_step:
        return num_tokens
    growth = (num_tokens - token_warmup_min) / token_warmup_step
    count = math.floor(current_step * growth) + token_warmup_min
    return max(0, min(num_tokens, count))


def is_caption_dropped(options: CaptionOptions, rng: random.Random, epoch: int) -> bool:
    """Whole-caption dropout decision (one draw from ``rng`` only when ``caption_dropout_rate > 0``).

    Dropped when ``U < caption_dropout_rate``, or when ``caption_dropout_every_n_epochs = n > 0`` and
    ``epoch % n == 0`` (epochs counted from 1).
    """
    dropped = options.caption_dropout_rate > 0 and rng.random() < options.caption_dropout_rate
    every = options.caption_dropout_every_n_epochs
    return dropped or (every > 0 and epoch % every == 0)


def process_caption(
    caption: str,
    options: CaptionOptions,
    rng: random.Random,
    epoch: int = 1,
    step: int = 0,
    replacements: Mapping[str, str | Sequence[str]] | None = None,
) -> str:
    """Process a caption as the reference does each time its sample is drawn.

    Order: (0) ``caption_prefix`` / ``caption_suffix`` are added; (1) whole-caption dropout → ``""`` and
    nothing else; (2) with ``enable_wildcard`` one line of a multi-line caption is picked and ``{a|b}``
    expanded, else only the first line is used; (3) if shuffle, token warm-up or tag dropout is active:
    split on ``caption_separator``, strip each part, hold the fixed parts in place (the head and tail
    around ``keep_tokens_separator`` when it occurs, else the first ``keep_tokens``), apply token warm-up
    (before the keep split on the ``keep_tokens`` path, as the baseline did; on the flexible parts on the
    separator path), shuffle the flexible parts (``rng.shuffle``), drop each with probability
    ``caption_tag_dropout_rate`` (one draw per part), rejoin with ``caption_separator + " "``;
    (4) ``secondary_separator`` becomes ``caption_separator``; (5) replacements: an empty key replaces the
    whole caption (a random choice when the value is a list), other keys are plain substring
    replacements, in mapping order. ``options.token_warmup_step`` must already be absolute
    (:meth:`CaptionOptions.resolved`).
    """
    caption = add_prefix_suffix(caption, options.caption_prefix, options.caption_suffix)
    if is_caption_dropped(options, rng, epoch):
        return ""
    caption = caption_variant(caption, options.enable_wildcard, rng)
    warmup_step = options.token_warmup_step
    separator = options.caption_separator
    if options.shuffle_caption or warmup_step > 0 or options.caption_tag_dropout_rate > 0:
        if 0 < warmup_step < 1:
            raise ValueError("token_warmup_step is a fraction; call CaptionOptions.resolved(max_train_steps)")
        parts = split_caption(caption, separator, options.keep_tokens, options.keep_tokens_separator)
        if parts.by_separator:
            count = warmup_token_count(len(parts.flex), step, options.token_warmup_min, warmup_step)
            parts.flex = parts.flex[:count]
        else:
            tokens = parts.fixed + parts.flex
            tokens = tokens[: warmup_token_count(len(tokens), step, options.token_warmup_min, warmup_step)]
            keep = len(parts.fixed)
            parts.fixed, parts.flex = tokens[:keep], tokens[keep:]
        if options.shuffle_caption:
            rng.shuffle(parts.flex)
        rate = options.caption_tag_dropout_rate
        if rate > 0:
            parts.flex = [t for t in parts.flex if rng.random() >= rate]
        caption = join_parts(parts.fixed + parts.flex + parts.tail, separator)
    caption = restore_secondary(caption, options.secondary_separator, separator)
    if replacements:
        caption = apply_replacements(caption, replacements, rng)
    return caption


def apply_replacements(
    caption: str, replacements: Mapping[str, str | Sequence[str]], rng: random.Random
) -> str:
    """Textual-inversion replacements: ``""`` → whole caption (``rng.choice`` for a list), else substring."""
    for source, target in replacements.items():
        if source == "":
            caption = target if isinstance(target, str) else rng.choice(list(target))
        else:
            if not isinstance(target, str):
                raise TypeError(f"replacement for {source!r} must be a string")
            caption = caption.replace(source, target)
    return caption


def read_caption_file(path: str | os.PathLike, enable_wildcard: bool = False) -> str:
    """The caption in a text file: its first line, stripped.

    UTF-8 with an optional BOM (the reference kept the BOM in the caption); ``\\r\\n`` and ``\\r`` line
    ends are accepted; later lines are ignored, as in the reference. A file with no content at all is an
    error (:class:`CaptionError`, as the reference's assertion); a blank first line gives ``""``. With
    ``enable_wildcard`` every non-blank line is kept, joined by ``\\n`` (one is picked per use).
    """
    with open(path, "rb") as f:  # plain open: pathlib costs measurable time over 20,000 files
        data = f.read()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise CaptionError(f"caption file {path} is not UTF-8 text (byte {exc.start})") from exc
    if text == "":
        raise CaptionError(f"caption file {path} is empty; write a caption or delete the file")
    return caption_file_text(text.replace("\r\n", "\n").replace("\r", "\n"), enable_wildcard)


def find_caption_file(image_path: str | os.PathLike, caption_extension: str) -> Path | None:
    """The caption file of an image: ``<stem><ext>`` beside it, else the stem without a face suffix.

    ``caption_extension`` includes the dot (e.g. ``.caption``, ``.txt``). The face-suffix fallback
    (``name_0256_0300_0120_0140.png`` → ``name.txt``) applies only when the last four ``_`` parts of the
    stem are integers (the reference stripped any four trailing parts of the whole path).
    """
    image_path = Path(image_path)
    candidate = image_path.with_name(image_path.stem + caption_extension)
    if candidate.is_file():
        return candidate
    stripped = strip_face_suffix(image_path.stem)
    if stripped != image_path.stem and stripped:
        candidate = image_path.with_name(stripped + caption_extension)
        if candidate.is_file():
            return candidate
    return None


def caption_file_name(image_name: str, caption_extension: str, names: Container[str]) -> str | None:
    """Like :func:`find_caption_file`, but looks the candidates up in ``names`` (the folder's file names,
    listed once) instead of asking the file system once per image; returns the caption file's name."""
    stem = image_name.rsplit(".", 1)[0] if "." in image_name else image_name
    candidate = stem + caption_extension
    if candidate in names:
        return candidate
    stripped = strip_face_suffix(stem)
    if stripped != stem and stripped and stripped + caption_extension in names:
        return stripped + caption_extension
    return None


def caption_for_image(
    image_path: str | os.PathLike, caption_extension: str, class_tokens: str | None
) -> tuple[str, str]:
    """Source caption of a DreamBooth-style image and its origin: ``"file"``, ``"class"`` or ``"none"``.

    The caption file (:func:`find_caption_file`) wins; without one the subset's ``class_tokens``; without
    those ``""`` (the caller prints a message, as the reference does).
    """
    caption_path = find_caption_file(image_path, caption_extension)
    if caption_path is not None:
        return read_caption_file(caption_path), "file"
    if class_tokens:
        return class_tokens, "class"
    return "", "none"


def metadata_caption(caption: str | None, tags: str | None, separator: str = DEFAULT_SEPARATOR,
                     enable_wildcard: bool = False) -> str:
    """Fine-tuning metadata caption: ``caption + ", " + tags`` when both, else whichever exists, or ``""``.

    (A tag string that is present but empty is ignored.) ``separator`` / ``enable_wildcard``: the
    subset's ``caption_separator`` and wildcard mode (:func:`caption_rules.metadata_caption_text`).
    """
    return metadata_caption_text(caption, tags, separator, enable_wildcard)


def class_tokens_from_folder(folder_name: str) -> tuple[int, str] | None:
    """``(repeats, class_tokens)`` from a DreamBooth folder name ``<repeats>_<class tokens>``.

    Everything after the first ``_`` is the class tokens (may contain ``_``); None when the part before
    it is not an integer (the reference skips such folders with a message).
    """
    head, sep, tail = folder_name.partition("_")
    try:
        repeats = int(head)
    except ValueError:
        return None
    return repeats, tail if sep else ""
