"""Fine-tuning: train the whole UNet (and optionally the text encoder) of a Stable Diffusion 1.x/2.x model
from images with captions in a metadata json.

    accelerate launch fine_tune.py --pretrained_model_name_or_path model.safetensors \\
        --in_json meta_lat.json --train_data_dir train_data --output_dir out --learning_rate 5e-6 ...

See docs/fine_tune.md for every option.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from collections.abc import Sequence

from library.cli import run_main


def build_parser() -> argparse.ArgumentParser:
    """All options of fine_tune.py (kohya names)."""
    from library.methods.full_model import add_full_model_saving_arguments
    from library.training import args as training_args

    parser = training_args.build_training_parser(
        "fine_tune.py", __doc__.strip().splitlines()[0], support_dreambooth=False, support_caption=True,
        support_caption_dropout=True)
    add_full_model_saving_arguments(parser)
    from library.training.lr_options import add_text_encoder_lr_arguments
    add_text_encoder_lr_arguments(parser)  # --learning_rate_te
    g = parser.add_argument_group("fine-tuning")
    g.add_argument("--train_text_encoder", action="store_true", help="also train the text encoder (default: UNet only)")
    g.add_argument("--diffusers_xformers", action="store_true",
                   help="diffusers' own xformers attention in the UNet and VAE (needs the package 'xformers')")
    from library.training.precision_options import add_no_half_vae_arguments
    add_no_half_vae_arguments(g)  # --no_half_vae
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, set up, train, and say where the model went."""
    from library.config.option_file import parse_with_config_file
    args = parse_with_config_file(build_parser(), argv)
    from library.errors import UserError
    from library.methods import full_model
    from library.run_start import ScriptSupport, start_run
    from library.training import session

    if args.diffusers_xformers and importlib.util.find_spec("xformers") is None:
        raise UserError("--diffusers_xformers needs the package 'xformers' (pip install xformers); without it "
                        "PyTorch's scaled-dot-product attention is used by default")
    started = start_run(args, ScriptSupport("finetuning", dreambooth=False, captions=True),
                                full_model.method_start("finetune"))
    if isinstance(started, int):  # --debug_dataset, --dry_run
        return started
    method = full_model.prepare_method("finetune", started.opts, started.run, save_dtype=started.save_dtype)
    what = "UNet + text encoder" if started.opts.fine_tune.train_text_encoder else "UNet only"
    return session.train(started, method, description=f"fine-tuning, {what}", result_name="model")


if __name__ == "__main__":
    sys.exit(run_main(main))
