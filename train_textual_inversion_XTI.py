"""XTI training (train_textual_inversion_XTI.py): entry script. Training arrives in a later version; --debug_dataset works now."""

import sys

from library.cli import run_main
from library.staged import staged_main

main = staged_main("train_textual_inversion_XTI.py", "XTI training", support_dreambooth=True, support_caption=True,
                   support_caption_dropout=False)

if __name__ == "__main__":
    sys.exit(run_main(main))
