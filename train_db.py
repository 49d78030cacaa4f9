"""DreamBooth training: entry script (not implemented in this version yet)."""

import sys

from library.cli import not_yet_available, run_main

main = not_yet_available("train_db.py", "DreamBooth training (train_db.py)")

if __name__ == "__main__":
    sys.exit(run_main(main))
