"""Extended Textual Inversion (XTI / P+): learn one embedding per UNet cross-attention layer for a new token.

    accelerate launch train_textual_inversion_XTI.py --pretrained_model_name_or_path model.safetensors \\
        --train_data_dir data --output_dir out --token_string zqxdog --init_word dog \\
        --num_vectors_per_token 1 --learning_rate 5e-3 --max_train_steps 1600 --save_model_as safetensors

The same options as train_textual_inversion.py; the saved file holds one [n, D] tensor per layer (IN01 …
OUT11). See docs/train_textual_inversion.md.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from library.cli import run_main


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, set up, train XTI embeddings, and say where they went."""
    from library.config.option_file import parse_with_config_file
    from train_textual_inversion import build_parser, train

    parser = build_parser("train_textual_inversion_XTI.py", __doc__.strip().splitlines()[0])
    return train(parse_with_config_file(parser, argv), xti=True)


if __name__ == "__main__":
    sys.exit(run_main(main))
