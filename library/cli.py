"""Entry-point wrapper: user mistakes become one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable, Sequence

from library.errors import UserError

EXIT_USER_ERROR = 2


class OneLineErrorParser(argparse.ArgumentParser):
    """An ArgumentParser whose mistakes (bad type, unknown option, invalid choice) are one line,
    ``error: argument --x: ...``, and exit code 2, like every other user error of the scripts
    (argparse would first print the whole usage, dozens of lines for a training script)."""

    def error(self, message: str):  # type: ignore[override]
        """Print ``error: <message>`` and a pointer to ``--help``; exit 2."""
        self.exit(EXIT_USER_ERROR, f"error: {message} (see {self.prog} --help)\n")


def setup_logging(level: int = logging.INFO) -> None:
    """Configure the root logger with a short format suitable for a terminal (``LEVEL logger: message`` on
    stderr; library/training/logging_setup.py, where ``--console_log_*`` change it after parsing)."""
    from library.training.logging_setup import ConsoleLogging, setup_console_logging

    setup_console_logging(ConsoleLogging(level=logging.getLevelName(level)))


def run_main(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> int:
    """Run ``main(argv)``; a UserError prints ``error: <message>`` and returns 2.

    Returns the exit code instead of calling ``sys.exit`` so tests can call it in-process;
    scripts do ``sys.exit(run_main(main))``.
    """
    setup_logging()
    try:
        code = main(argv)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        setup_logging()  # back to stderr: closes a --console_log_file (several runs in one process: tests)
    return int(code or 0)

