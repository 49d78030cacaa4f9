"""Training options from a TOML file: ``--config_file FILE`` (read) and ``--output_config`` (write).

The file's top-level keys are option names (argparse ``dest``, e.g. ``learning_rate``); keys inside
``[tables]`` are flattened into the same namespace (table names are ignored), as kohya does. Every value
goes through its option's own argparse ``type`` and ``choices``, so a file value is checked exactly like the
same value typed on the command line. Precedence: command line > file > parser defaults.

Unlike kohya, an unknown key, a key set twice or a value of the wrong type is an error (one line, exit 2).

Typical use in an entry script::

    args = parse_with_config_file(build_parser(), argv)
"""

from __future__ import annotations

import argparse
import copy
import difflib
import json
import logging
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePath
from typing import Any

from library.config.keys import describe_value
from library.errors import UserError

logger = logging.getLogger(__name__)

SUFFIX = ".toml"
# options that steer this module, and the secrets that are never written to a file
OWN_OPTIONS = ("config_file", "output_config")
NEVER_WRITTEN = (*OWN_OPTIONS, "wandb_api_key", "huggingface_token")
_LIST_NARGS = (argparse.ZERO_OR_MORE, argparse.ONE_OR_MORE)


def add_option_file_arguments(parser: argparse.ArgumentParser) -> None:
    """Register ``--config_file`` and ``--output_config`` (read by :func:`parse_with_config_file`)."""
    g = parser.add_argument_group("options file (docs/config_file.md)")
    g.add_argument("--config_file", type=str, default=None, metavar="FILE",
                   help="read options from this TOML file (keys are option names; keys inside [tables] count as "
                        "top-level; '.toml' may be left out); options on the command line override it")
    g.add_argument("--output_config", action="store_true",
                   help="write the options that differ from the defaults to --config_file (never overwriting a "
                        "file) and exit without training")


def parse_with_config_file(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None
                           ) -> argparse.Namespace:
    """Parse ``argv`` like ``parser.parse_args`` and apply ``--config_file`` / ``--output_config``.

    Without ``--config_file`` this is exactly ``parser.parse_args(argv)``. With it, the file's values replace
    the defaults and the options typed on the command line replace the file's values. With
    ``--output_config`` the non-default options are written to the file and the process exits 0
    (``SystemExit``, like ``--help``). Problems with the file raise :class:`UserError`.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    given = vars(_suppressed_copy(parser).parse_args(argv))
    name = given.get("config_file")
    if given.get("output_config"):
        if not name:
            raise UserError("--output_config needs --config_file FILE: the file to write the options to")
        target = write_option_file(parser, argv, name)
        print(f"wrote the options to {target}; train with --config_file {target}")
        raise SystemExit(0)
    if not name:
        return _with_console_logging(parser.parse_args(argv))
    path = resolve_option_file(name)
    values = option_values(parser, read_option_file(path), path)
    logger.info("options from %s: %s", path, ", ".join(sorted(values)) or "none")
    preset = {dest: value for dest, value in values.items() if dest not in given}
    final_parser = parser
    if any(action.required and action.dest in preset for action in parser._actions):
        final_parser = copy.deepcopy(parser)
        for action in final_parser._actions:
            if action.dest in preset:
                action.required = False
    return _with_console_logging(final_parser.parse_args(argv, namespace=argparse.Namespace(**preset)))


def _with_console_logging(args: argparse.Namespace) -> argparse.Namespace:
    """Apply ``--console_log_*`` right after parsing (library/training/logging_setup.py)."""
    from library.option_groups import LoggingOptions
    from library.training.logging_setup import console_logging_of, setup_console_logging

    if "console_log_level" in vars(args):  # the training scripts; gen_img has no such options
        setup_console_logging(console_logging_of(LoggingOptions.from_args(args)))
    return args


def resolve_option_file(name: str) -> Path:
    """The file ``--config_file NAME`` means: NAME if it is a file, else NAME + '.toml'."""
    path = Path(name)
    if path.is_file():
        return path
    if not name.lower().endswith(SUFFIX):
        alternative = Path(name + SUFFIX)
        if alternative.is_file():
            return alternative
        if path.exists() or alternative.exists():
            raise UserError(f"--config_file {name}: neither {path} nor {alternative} is a file")
        raise UserError(f"--config_file {name}: config file not found (tried {path} and {alternative})")
    if path.exists():
        raise UserError(f"--config_file {name}: not a file")
    raise UserError(f"--config_file {name}: config file not found")


def read_option_file(path: Path) -> dict[str, tuple[Any, str | None]]:
    """Parse the TOML file and flatten one level of tables: ``{key: (value, table name or None)}``.

    A key set twice (at the top level and in a table, or in two tables) and a table inside a table are
    errors.
    """
    document = _load_toml(path)
    flat: dict[str, tuple[Any, str | None]] = {}
    problems: list[str] = []

    def put(key: str, value: Any, table: str | None) -> None:
        if key in flat:
            first = _where(flat[key][1])
            problems.append(f"'{key}' is set twice ({first} and {_where(table)})")
        else:
            flat[key] = (value, table)

    for key, value in document.items():
        if not isinstance(value, dict):
            put(key, value, None)
            continue
        for inner, inner_value in value.items():
            if isinstance(inner_value, dict):
                problems.append(f"[{key}.{inner}] is a table inside a table; only one level of [tables] is allowed")
            else:
                put(inner, inner_value, key)
    if problems:
        raise UserError(f"{path}: " + "; ".join(problems))
    return flat


def option_values(parser: argparse.ArgumentParser, flat: Mapping[str, tuple[Any, str | None]], path: Path
                  ) -> dict[str, Any]:
    """Check every file value against its option and convert it as the command line would.

    Returns ``{dest: value}`` for the options the file sets (a flag set to false is left out). Every problem
    (unknown key with the closest known option, wrong type, invalid value) is reported in one UserError line.
    """
    actions = known_options(parser)
    namespace = argparse.Namespace()
    problems: list[str] = []
    for key, (value, table) in flat.items():
        where = f" in [{table}]" if table else ""
        if key in OWN_OPTIONS:
            problems.append(f"'{key}'{where} cannot be set inside a config file (only on the command line)")
            continue
        action = actions.get(key)
        if action is None:
            guess = difflib.get_close_matches(key, list(actions), n=1)
            hint = f" (did you mean '{guess[0]}'?)" if guess else ""
            problems.append(f"unknown option '{key}'{where}{hint}")
            continue
        try:
            _apply(parser, action, value, namespace)
        except _BadValue as exc:
            problems.append(f"'{key}'{where} {exc}")
    if problems:
        raise UserError(f"{path}: " + "; ".join(problems))
    return vars(namespace)


def write_option_file(parser: argparse.ArgumentParser, argv: Sequence[str], name: str) -> Path:
    """Write the options of ``argv`` that differ from the parser defaults to NAME (+ '.toml' if it has no
    such suffix) as flat TOML, atomically; refuse to replace an existing file. Returns the path."""
    from library.fileio import atomic_write_text

    target = Path(name if name.lower().endswith(SUFFIX) else name + SUFFIX)
    if target.exists() or target.is_symlink():
        raise UserError(f"--output_config: {target} already exists; it is left untouched — choose another "
                        "--config_file or move it away")
    lenient = _lenient_copy(parser)
    args, defaults = vars(lenient.parse_args(argv)), vars(lenient.parse_args([]))
    lines = [f"# options for {parser.prog}, written by --output_config (only those that differ from the defaults)",
             f"# train with: {parser.prog} --config_file {target}  (options typed there override these)"]
    for dest, action in known_options(parser).items():
        if dest in NEVER_WRITTEN or dest not in args or _same(args[dest], defaults.get(dest)):
            continue
        lines.append(f"{_toml_key(dest)} = {_toml_value(_file_form(parser, action, args[dest]))}")
    atomic_write_text(target, "\n".join(lines) + "\n")
    return target


def known_options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """``{dest: action}`` of the options a config file may set (every optional but help/version)."""
    found: dict[str, argparse.Action] = {}
    for action in parser._actions:
        if not action.option_strings or isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            continue
        if action.dest == argparse.SUPPRESS:
            continue
        previous = found.get(action.dest)
        if previous is None or ("--" + action.dest in action.option_strings
                                and "--" + action.dest not in previous.option_strings):
            found[action.dest] = action
    return found


# ---- reading: one TOML value -> the option's value -------------------------------------------------


class _BadValue(Exception):
    """One file value that its option does not accept (the message says what it takes)."""


def _apply(parser: argparse.ArgumentParser, action: argparse.Action, value: Any, namespace: argparse.Namespace
           ) -> None:
    """Put the file value into ``namespace`` as the command line would (through the action itself)."""
    option = _option_string(action)
    if isinstance(action, argparse.BooleanOptionalAction):
        if not isinstance(value, bool):
            raise _BadValue(f"takes a boolean (true or false), got {describe_value(value)}")
        setattr(namespace, action.dest, value)
        return
    if isinstance(action, argparse._CountAction):
        if not _is_int(value) or value < 0:
            raise _BadValue(f"takes a count (an integer >= 0), got {describe_value(value)}")
        setattr(namespace, action.dest, value)
        return
    if action.nargs == 0:
        if not isinstance(value, bool):
            raise _BadValue(f"is a flag ({option}): it takes true (as if typed) or false (as if left out), "
                            f"got {describe_value(value)}")
        if value:
            action(parser, namespace, [], option)
        return
    if isinstance(action, argparse._AppendAction) and not isinstance(action, argparse._ExtendAction):
        if not isinstance(value, list):
            raise _BadValue(f"may be repeated: it takes an array, one element per use of {option}, "
                            f"got {describe_value(value)}")
        occurrences = [_shaped(action, element) for element in value]
    else:
        occurrences = [_shaped(action, value)]
    for converted in occurrences:
        try:
            action(parser, namespace, converted, option)
        except argparse.ArgumentError as exc:
            raise _BadValue(f"is invalid: {exc.message}") from None


def _shaped(action: argparse.Action, value: Any) -> Any:
    """Check the value's shape against ``nargs`` and convert its element(s)."""
    nargs = action.nargs
    if nargs is None or nargs == argparse.OPTIONAL:
        if isinstance(value, (list, dict)):
            raise _BadValue(f"takes {_article(_kind(action))}, not {describe_value(value)}")
        return _converted(action, value)
    if not isinstance(value, list):
        raise _BadValue(f"takes an array of {_kind(action)}s (nargs={nargs!r}), "
                        f"got {describe_value(value)}")
    if nargs == argparse.ONE_OR_MORE and not value:
        raise _BadValue(f"takes at least one {_kind(action)}, got an empty array")
    if isinstance(nargs, int) and len(value) != nargs:
        raise _BadValue(f"takes exactly {nargs} {_kind(action)}s, got {len(value)}")
    if nargs not in _LIST_NARGS and not isinstance(nargs, int):
        return [_text(action, element) for element in value]  # REMAINDER / PARSER: raw strings, as argparse
    return [_converted(action, element) for element in value]


def _converted(action: argparse.Action, value: Any) -> Any:
    """One scalar through the option's ``type`` and ``choices``, like one command-line word."""
    text = _text(action, value)
    func = action.type
    if func is None or func is str:
        result: Any = text
    else:
        try:
            result = func(text)
        except argparse.ArgumentTypeError as exc:
            raise _BadValue(f"is invalid: {exc}") from None
        except (TypeError, ValueError):
            name = getattr(func, "__name__", repr(func))
            raise _BadValue(f"is not a valid {name} value: '{text}'") from None
    if action.choices is not None and result not in action.choices:
        allowed = ", ".join(repr(choice) for choice in action.choices if choice is not None)
        raise _BadValue(f"must be one of {allowed}, got {result!r}")
    return result


def _text(action: argparse.Action, value: Any) -> str:
    """The command-line word of a TOML scalar, after checking it is of the kind the option takes."""
    func = action.type
    if func is int:
        ok = _is_int(value)
    elif func is float:
        ok = _is_int(value) or isinstance(value, float)
    elif func is None or func is str:
        ok = isinstance(value, str)
    else:  # Path or a parsing function: it reads words, and a number is typed as one
        ok = isinstance(value, (str, int, float)) and not isinstance(value, bool)
    if not ok:
        raise _BadValue(f"takes {_article(_kind(action))}, got {describe_value(value)}")
    return repr(value) if isinstance(value, float) else str(value)


def _kind(action: argparse.Action) -> str:
    """What one element of the option is, in TOML words."""
    func = action.type
    if func is int:
        return "integer"
    if func is float:
        return "number"
    if func is None or func is str:
        return "string"
    return "string (" + getattr(func, "__name__", "value") + ")"


def _article(kind: str) -> str:
    return ("an " if kind[0] in "aeiou" else "a ") + kind


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _option_string(action: argparse.Action) -> str:
    for option in action.option_strings:
        if option == "--" + action.dest:
            return option
    return action.option_strings[-1]


def _where(table: str | None) -> str:
    return f"in [{table}]" if table else "at the top level"


def _load_toml(path: Path) -> dict[str, Any]:
    """The parsed document; unreadable files and syntax errors are one line naming the file."""
    from library.config.loader import parse_toml, read_text

    text = read_text(path, "the config file")
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        return parse_toml(text, path)
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{path}: TOML syntax error: {exc}") from None


# ---- parser copies -------------------------------------------------------------------------------------


def _lenient_copy(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """A copy of ``parser`` that requires nothing (to read defaults and partial command lines)."""
    lenient = copy.deepcopy(parser)
    for action in lenient._actions:
        action.required = False
    for group in lenient._mutually_exclusive_groups:
        group.required = False
    return lenient


def _suppressed_copy(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """A lenient copy whose defaults are all SUPPRESS: its namespace holds only the options typed."""
    suppressed = _lenient_copy(parser)
    for action in suppressed._actions:
        action.default = argparse.SUPPRESS
    return suppressed


# ---- writing: an option's value -> TOML text ------------------------------------------------------------


def _file_form(parser: argparse.ArgumentParser, action: argparse.Action, value: Any) -> Any:
    """The TOML value that reads back as ``value`` (checked by reading it back); UserError if there is none."""
    option = _option_string(action)
    if action.nargs == 0 and not isinstance(action, (argparse.BooleanOptionalAction, argparse._CountAction)):
        if value != action.const:
            raise UserError(f"--output_config: {option}'s value {value!r} cannot be written as a flag")
        candidate: Any = True
    else:
        candidate = _plain(value)
    if candidate is None:
        raise UserError(f"--output_config: {option} is {value!r}, which a TOML file cannot hold")
    check = argparse.Namespace()
    try:
        _apply(parser, action, candidate, check)
    except _BadValue:
        read_back = None
    else:
        read_back = getattr(check, action.dest, None)
    if not _same(read_back, value):
        raise UserError(f"--output_config: {option}'s value {value!r} cannot be written to a config file so "
                        "that it reads back the same; give it on the command line instead")
    return candidate


def _plain(value: Any) -> Any:
    """``value`` as TOML-representable data (paths become strings, tuples arrays), or None."""
    if isinstance(value, PurePath):
        value = str(value)
    if isinstance(value, str) and any("\ud800" <= ch <= "\udfff" for ch in value):
        return None  # undecodable bytes of a file name: not Unicode text, so not TOML
    if isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        items = [_plain(item) for item in value]
        return None if any(item is None for item in items) else items
    return None


def _same(a: Any, b: Any) -> bool:
    """Equality that treats tuples like lists, NaN like NaN, and a bool unlike the number it equals."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, bool) != isinstance(b, bool):
        return False
    return a == b


def _toml_key(key: str) -> str:
    bare = key and all(ch.isascii() and (ch.isalnum() or ch in "_-") for ch in key)
    return key if bare else _toml_string(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)  # shortest text that reads back as the same float ("0.0001", "1e-05")
    if isinstance(value, str):
        return _toml_string(value)
    return "[" + ", ".join(_toml_value(item) for item in value) + "]"


def _toml_string(text: str) -> str:
    """A TOML basic string (JSON's escapes are TOML's; DEL must be escaped too)."""
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")
