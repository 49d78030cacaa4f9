"""The sample-prompt file of ``--sample_prompts`` (training_behaviour.md §13).

One prompt per line, UTF-8. Lines are stripped; blank lines and lines starting with ``#`` are skipped.
A line is split on the literal separator ``" --"`` (space, two dashes): the first piece is the prompt,
every other piece is an option whose name is its first word (case-insensitive) and whose value is the
rest of the piece::

    masterpiece, 1girl, upper body --n low quality, worst quality --w 768 --h 768 --d 1 --l 7.5 --s 28

| option | meaning | default |
| --- | --- | --- |
| ``--n <text>`` | negative prompt | empty |
| ``--w <int>`` / ``--h <int>`` | width / height (rounded down to a multiple of 8, at least 64) | 512 |
| ``--d <int>`` | seed of this image | derived from the run seed, step and line |
| ``--l <float>`` | classifier-free guidance scale | 7.5 |
| ``--s <int>`` | inference steps, clamped to [1, 1000] | 30 |

Deliberate differences from the reference, which ignores unknown options and keeps the default for a
value it cannot parse: here either is a :class:`~library.errors.UserError` naming the file and line, so a
typo does not silently produce the wrong images. The prompt itself (the first piece) is never read as
an option (the reference misreads a prompt starting with e.g. ``w 640``). TOML/JSON prompt files are a
later upstream addition and are refused with a clear message.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

from library.errors import UserError

logger = logging.getLogger(__name__)

DEFAULT_SIZE = 512
MIN_SIZE = 64
SIZE_MULTIPLE = 8
DEFAULT_SCALE = 7.5
DEFAULT_STEPS = 30
MAX_STEPS = 1000
OPTION_SEPARATOR = " --"
KNOWN_OPTIONS = ("n", "w", "h", "d", "l", "s")
MAX_SEED = 2**64 - 1
# --sample_sampler choices (mapped to diffusers schedulers in library/training/sampling.py)
SAMPLER_NAMES = ("ddim", "pndm", "lms", "euler", "euler_a", "heun", "dpm_2", "dpm_2_a", "dpmsolver", "dpmsolver++",
                 "dpmsingle", "k_lms", "k_euler", "k_euler_a", "k_dpm_2", "k_dpm_2_a")
DEFAULT_SAMPLER = "ddim"


@dataclass(frozen=True)
class SamplePrompt:
    """One image to generate: a non-blank, non-comment line of the prompt file."""

    line_index: int  # 0-based line number in the file, blank and comment lines counted (names the PNG)
    prompt: str
    negative_prompt: str = ""
    width: int = DEFAULT_SIZE
    height: int = DEFAULT_SIZE
    seed: int | None = None
    scale: float = DEFAULT_SCALE
    steps: int = DEFAULT_STEPS


def _where(source: str | None, line_index: int, option: str) -> str:
    """``<option> <source> line <n>`` for messages (just ``<option>`` for a prompt that is not from a file)."""
    return option if source is None else f"{option} {source} line {line_index + 1}"


def _int_value(value: str, option: str, where: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise UserError(f"{where}: --{option} {value!r} is not a whole number") from None


def _size(value: str, option: str, where: str) -> int:
    size = _int_value(value, option, where)
    if size < 1:
        raise UserError(f"{where}: --{option} {size} must be a positive number of pixels")
    rounded = max(MIN_SIZE, size // SIZE_MULTIPLE * SIZE_MULTIPLE)
    if rounded != size:
        logger.warning("%s: --%s %d is not a multiple of 8 of at least 64; using %d",
                       where, option, size, rounded)
    return rounded


def _steps(value: str, where: str) -> int:
    steps = _int_value(value, "s", where)
    clamped = min(MAX_STEPS, max(1, steps))
    if clamped != steps:
        logger.warning("%s: --s %d is outside 1..%d; using %d", where, steps, MAX_STEPS, clamped)
    return clamped


def _seed(value: str, where: str) -> int:
    seed = _int_value(value, "d", where)
    if not 0 <= seed <= MAX_SEED:
        raise UserError(f"{where}: --d {seed} must be a seed between 0 and 2**64-1")
    return seed


def _scale(value: str, where: str) -> float:
    try:
        scale = float(value)
    except ValueError:
        scale = math.nan
    if not math.isfinite(scale):
        raise UserError(f"{where}: --l {value!r} is not a number (the guidance scale, e.g. 7.5)")
    return scale


def parse_prompt_line(line: str, line_index: int, source: str | None = "<prompts>", *,
                      option: str = "--sample_prompts", defaults: dict | None = None) -> SamplePrompt | None:
    """Parse one line of a prompt file; None for a blank or comment line.

    ``line_index`` is the 0-based line number (used in file names and, plus one, in error messages);
    ``option`` and ``source`` name the option and file in errors (``source`` None: a prompt given on the
    command line). ``defaults`` replace the built-in defaults of the :class:`SamplePrompt` fields that
    the line does not set (gen_img_diffusers.py's ``--W``, ``--steps``, ...). Raises UserError for an
    unknown option or a bad value.
    """
    text = line.strip()
    if not text or text.startswith("#"):
        return None
    where = _where(source, line_index, option)
    pieces = text.split(OPTION_SEPARATOR)
    values: dict[str, object] = {**(defaults or {}), "prompt": pieces[0].strip()}
    for piece in pieces[1:]:
        name, _, value = piece.strip().partition(" ")
        key, value = name.lower(), value.strip()
        if key not in KNOWN_OPTIONS:
            known = " ".join(f"--{o}" for o in KNOWN_OPTIONS)
            raise UserError(f"{where}: unknown option --{name} (known: {known})")
        if key != "n" and not value:
            raise UserError(f"{where}: --{key} needs a value")
        if key == "n":
            values["negative_prompt"] = value
        elif key in ("w", "h"):
            values["width" if key == "w" else "height"] = _size(value, key, where)
        elif key == "d":
            values["seed"] = _seed(value, where)
        elif key == "l":
            values["scale"] = _scale(value, where)
        else:
            values["steps"] = _steps(value, where)
    return SamplePrompt(line_index=line_index, **values)  # type: ignore[arg-type]


def parse_prompts(text: str, source: str = "<prompts>", *, option: str = "--sample_prompts",
                  defaults: dict | None = None) -> list[SamplePrompt]:
    """Every prompt of a prompt file's text, in file order (see the module docstring for the syntax;
    ``option`` and ``defaults`` as in :func:`parse_prompt_line`)."""
    prompts = []
    for index, line in enumerate(text.split("\n")):  # universal newlines already applied
        prompt = parse_prompt_line(line, index, source, option=option, defaults=defaults)
        if prompt is not None:
            prompts.append(prompt)
    return prompts


def read_prompt_file(path: str | Path, *, option: str = "--sample_prompts",
                     defaults: dict | None = None) -> list[SamplePrompt]:
    """Read and parse ``--sample_prompts`` (or the file of ``option``, with ``defaults`` as in
    :func:`parse_prompt_line`); a missing, unreadable or TOML/JSON file raises UserError."""
    path = Path(path)
    if path.suffix.lower() in (".toml", ".json"):
        raise UserError(f"{option} {path}: TOML/JSON prompt files are not supported; use a text file "
                        "with one prompt per line (see docs/sampling.md)")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise UserError(f"{option} {path}: the file does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{option} {path}: cannot read it as UTF-8 text ({exc})") from None
    return parse_prompts(text, str(path), option=option, defaults=defaults)
