"""DreamBooth: train the whole UNet and text encoder of a Stable Diffusion 1.x/2.x model on a few images.

    accelerate launch train_db.py --pretrained_model_name_or_path model.safetensors \\
        --dataset_config data.toml --output_dir out --learning_rate 1e-6 --max_train_steps 1600 ...

See docs/train_db.md for every option.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from library.cli import run_main


def build_parser() -> argparse.ArgumentParser:
    """All options of train_db.py (kohya names)."""
    from library.methods.full_model import add_full_model_saving_arguments
    from library.training import args as training_args

    parser = training_args.build_training_parser(
        "train_db.py", __doc__.strip().splitlines()[0], support_dreambooth=True, support_caption=False,
        support_caption_dropout=True)
    add_full_model_saving_arguments(parser)
    from library.training.lr_options import add_text_encoder_lr_arguments
    add_text_encoder_lr_arguments(parser)  # --learning_rate_te
    g = parser.add_argument_group("DreamBooth")
    g.add_argument("--stop_text_encoder_training", type=int, default=None,
                   help="train the text encoder only for the first N steps (negative: never train it)")
    g.add_argument("--no_token_padding", action="store_true",
                   help="pad captions only to the batch's longest (max 77 tokens), as the original DreamBooth "
                        "script; --max_token_length and --clip_skip are then bypassed")
    from library.training.precision_options import add_no_half_vae_arguments
    add_no_half_vae_arguments(g)  # --no_half_vae
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, set up, train, and say where the model went."""
    from library.config.option_file import parse_with_config_file
    args = parse_with_config_file(build_parser(), argv)
    from library.methods import full_model
    from library.run_start import ScriptSupport, start_run
    from library.training import session

    started = start_run(args, ScriptSupport("dreambooth", dreambooth=True, captions=False),
                                full_model.method_start("dreambooth"))
    if isinstance(started, int):  # --debug_dataset, --dry_run
        return started
    method = full_model.prepare_method("dreambooth", started.opts, started.run, save_dtype=started.save_dtype)
    te_steps = method.text_encoder_steps
    te_text = {None: "UNet + text encoder", 0: "UNet only"}.get(te_steps, f"UNet + text encoder for {te_steps} steps")
    return session.train(started, method, description=f"DreamBooth, {te_text}", result_name="model")


if __name__ == "__main__":
    sys.exit(run_main(main))
