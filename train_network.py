"""LoRA training (train_network.py): entry script. Training arrives in a later version; --debug_dataset works now."""

import sys

from library.cli import run_main
from library.staged import staged_main

main = staged_main("train_network.py", "LoRA training", support_dreambooth=True, support_caption=True,
                   support_caption_dropout=True)

if __name__ == "__main__":
    sys.exit(run_main(main))
