"""Textual Inversion training: entry script (not implemented in this version yet)."""

import sys

from library.cli import not_yet_available, run_main

main = not_yet_available("train_textual_inversion.py", "Textual Inversion training (train_textual_inversion.py)")

if __name__ == "__main__":
    sys.exit(run_main(main))
