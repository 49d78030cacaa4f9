"""``--save_state_on_train_end`` (every training script, as in kohya): the training state of the final save
only. ``--save_state`` writes a state with every save, the final one included; this option writes the
``<output_name>-state`` folder (``last-state`` without ``--output_name``) at the end of the run and none with
the epoch or step saves, so a finished run can be continued with ``--resume`` and more steps.
"""

from __future__ import annotations

import argparse


def add_state_on_train_end_argument(group: argparse._ActionsContainer) -> None:
    """Register ``--save_state_on_train_end`` in ``group`` (the saving options' group)."""
    group.add_argument(
        "--save_state_on_train_end", action="store_true",
        help="save the training state (for --resume) at the end of the run, even without --save_state; "
             "no state with the epoch / step saves")
