"""Console logging of every script: ``--console_log_level``, ``--console_log_file``, ``--console_log_simple``.

The scripts log through :mod:`logging`. :func:`setup_console_logging` gives the root logger at most one
handler of ours: by default it writes ``LEVEL logger: message`` lines to stderr through ``tqdm.write`` (so a
running progress bar is not broken by a log line); with ``--console_log_file`` the lines go to that file
*instead of* stderr (appended, so nothing already in it is lost), and ``--console_log_simple`` writes the
message alone. The level applies to every logger (the root logger's level). Handlers that are not ours
(e.g. a test runner's capture handler) are left in place. Error messages of wrong input
(``error: ...``, exit code 2) and the progress bar itself still go to stderr.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

from library.errors import UserError
from library.option_groups import LoggingOptions

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
FULL_FORMAT = "%(levelname)s %(name)s: %(message)s"
SIMPLE_FORMAT = "%(message)s"
_OURS = "_sdtrain_console_handler"  # attribute marking the handlers this module installed


def add_console_logging_arguments(parser: argparse.ArgumentParser) -> None:
    """``--console_log_level``, ``--console_log_file``, ``--console_log_simple`` (kohya's names and defaults)."""
    g = parser.add_argument_group("console log")
    g.add_argument("--console_log_level", type=str, default=None, choices=list(LEVELS),
                   help="lowest level of log messages shown (default INFO)")
    g.add_argument("--console_log_file", type=str, default=None, metavar="FILE",
                   help="write the log messages to this file instead of stderr (appended; the progress bar and "
                        "error messages stay on stderr)")
    g.add_argument("--console_log_simple", action="store_true",
                   help="log the message alone, without its level and logger name")


@dataclass(frozen=True)
class ConsoleLogging:
    """Where log messages go and from which level on."""

    level: str = "INFO"
    file: str | None = None
    simple: bool = False


def console_logging_of(logging_options: LoggingOptions) -> ConsoleLogging:
    """The console-logging settings of ``--console_log_level`` / ``--console_log_file`` / ``--console_log_simple``."""
    return ConsoleLogging(level=logging_options.console_log_level or "INFO", file=logging_options.console_log_file,
                          simple=logging_options.console_log_simple)


class TqdmStreamHandler(logging.Handler):
    """Writes records to the current ``sys.stderr`` through ``tqdm.write``, above any progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        """Format and write one record."""
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


def _file_handler(name: str) -> logging.Handler:
    path = Path(name)
    if path.is_dir():
        raise UserError(f"--console_log_file {name}: is a folder; give a file name")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return logging.FileHandler(path, mode="a", encoding="utf-8")
    except OSError as exc:
        raise UserError(f"--console_log_file {name}: cannot write there ({exc.strerror or exc})") from None


def reset_console_logging() -> None:
    """Remove (and close) the handlers :func:`setup_console_logging` installed."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, _OURS, False):
            root.removeHandler(handler)
            handler.close()


def setup_console_logging(settings: ConsoleLogging | None = None) -> None:
    """Replace our root handler by one for ``settings`` (default: INFO, stderr, full format).

    The stderr handler is installed only where the root logger has no other handler (as
    ``logging.basicConfig`` does: under a test runner its capture handler gets the records); the file
    handler of ``--console_log_file`` always is."""
    settings = settings or ConsoleLogging()
    handler = _file_handler(settings.file) if settings.file else None
    reset_console_logging()
    root = logging.getLogger()
    if handler is None and not root.handlers:
        handler = TqdmStreamHandler()
    if handler is not None:
        handler.setFormatter(logging.Formatter(SIMPLE_FORMAT if settings.simple else FULL_FORMAT))
        setattr(handler, _OURS, True)
        root.addHandler(handler)
    root.setLevel(getattr(logging, settings.level))
